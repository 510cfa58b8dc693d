"""``modelavg decode``: word hypotheses and WER of a model (or of the alignments) on a data dir.

The network reads features only (a split's class ids may exceed the model's outputs, e.g. the
demo's ``test_other``). Its log posteriors minus log priors, times the acoustic scale, go
through the graph's beam search (``decoder.py``); hypotheses are scored against the data dir's
``text``. Priors are the training targets' class counts stored in the model file
(``class_counts``), or counted from ``--priors-from TRAIN_DIR`` for older model files.
``--oracle`` decodes one-hot scores from the data dir's own targets instead of a model: the
WER floor of the graph (out-of-vocabulary words, homophones, the LM's choices).

Outputs, in ``--out`` (default: ``decode_<graph>_<data>`` beside the model, or
``oracle_<data>`` inside the graph): ``hyp.txt`` (utterance id, words as the graph spells them)
and ``wer.json``. Both sides are scored in the transcripts' normal form (``scoring_form``).

Example::

    modelavg decode --model exp/demo/final.pt --data data/demo/test --graph data/lang_enus
    result = decode_data_dir("exp/demo/final.pt", "data/demo/test", "data/lang_enus")
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from modelavg.decoding.graph import Graph, load_graph
from modelavg.decoding.wer import format_wer, score
from modelavg.errors import UsageError
from modelavg.io import atomic_write_bytes

FRAME_SHIFT_SECONDS = 0.01
# Kaldi's default acoustic scale for hybrid models. The best one depends on how sharp the
# network's posteriors are (docs/RESULTS.md, "Word error rate"): ``tune_acwt`` picks it on a
# held-out set from ACWT_GRID, as Kaldi's scoring picks its LM weight.
ACWT = 0.1
ACWT_GRID = (0.07, 0.1, 0.15)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model file (final.pt); not needed with --oracle")
    parser.add_argument("--data", required=True, help="data dir (feats.scp, text)")
    parser.add_argument("--graph", required=True, help="graph dir from modelavg make-graph")
    parser.add_argument("--acwt", type=float, default=ACWT, help="acoustic scale")
    parser.add_argument("--beam", type=float, default=13.0, help="search beam")
    parser.add_argument("--max-active", type=int, default=7000, help="most active states")
    parser.add_argument("--jobs", type=int, default=1, help="search processes")
    parser.add_argument("--priors-from", help="train data dir to count priors from (old models)")
    parser.add_argument("--oracle", action="store_true", help="one-hot scores from the targets")
    parser.add_argument("--out", help="output dir (hyp.txt, wer.json)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")


def run(args: argparse.Namespace) -> int:
    if not args.oracle and args.model is None:
        raise UsageError("--model is required (or --oracle)")
    result = decode_data_dir(
        None if args.oracle else args.model,
        args.data,
        args.graph,
        acwt=args.acwt,
        beam=args.beam,
        max_active=args.max_active,
        jobs=args.jobs,
        priors_from=args.priors_from,
        out_dir=args.out,
    )
    if args.json:
        print(json.dumps(result))
    else:
        name = f"{'oracle' if args.oracle else args.model} on {args.data}"
        if "wer" in result:
            print(format_wer(name, result))
        print(f"  {result['frames']} frames, real-time factor {result['rtf']:.3f}; {result['out']}")
    return 0


def scoring_form(words: list[str]) -> list[str]:
    """Words as the demo's transcripts were normalised (``modelavg/corpora/text.py``): lower
    case, punctuation a word break. The en-us LM spells letters "m." and "a.m.": they score as
    "m" and "a m", which is how the transcripts write them."""
    return re.sub(r"[^a-z0-9']+", " ", " ".join(words).lower()).split()


def read_text(data_dir: Path) -> dict[str, list[str]] | None:
    """The reference transcripts (``text``: utterance id, words), or None without one."""
    path = data_dir / "text"
    if not path.is_file():
        return None
    return {
        fields[0]: scoring_form(fields[1:])
        for fields in (line.split() for line in path.read_text(encoding="utf-8").splitlines())
        if fields
    }


def class_counts(model_path: str | os.PathLike, num_classes: int, priors_from) -> np.ndarray:
    """Training-target counts per class: from the model file, else from ``priors_from``."""
    import torch

    from modelavg.data.kaldi import read_labels

    blob = torch.load(model_path, map_location="cpu", weights_only=False)
    counts = blob.get("class_counts")
    if counts is None and priors_from is None:
        raise UsageError(
            f"{model_path}: no class_counts in the model file; pass --priors-from TRAIN_DATA_DIR"
        )
    if counts is None:
        labels = read_labels(priors_from)
        if not labels:
            raise UsageError(f"{priors_from}: no targets to count priors from")
        flat = np.concatenate(list(labels.values()))
        if flat.max() >= num_classes:
            raise UsageError(f"{priors_from}: class id {flat.max()} >= {num_classes} outputs")
        return np.bincount(flat, minlength=num_classes).astype(np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    if counts.shape != (num_classes,):
        raise UsageError(
            f"{model_path}: class_counts has shape {counts.shape}, not ({num_classes},)"
        )
    return counts


def _check_classes(data_dir: Path, graph: Graph, graph_dir) -> None:
    """The corpus's class map (beside its splits), if any, must be the graph's."""
    from modelavg.decoding.graph import read_classes

    path = data_dir.resolve().parent / "classes.txt"
    if path.is_file() and not np.array_equal(
        read_classes(path, len(graph.senone_states)), graph.classes
    ):
        raise UsageError(f"{path}: not the class -> senone map of graph {graph_dir}")


def model_inputs(
    model_path, data_dir: Path, graph: Graph, graph_dir, acwt: float, priors_from
) -> tuple[dict[str, np.ndarray], Callable[[np.ndarray], np.ndarray]]:
    """Per utterance, the network's log posteriors; and the map to acwt x the graph's scores."""
    from modelavg.decoding.decoder import Scorer
    from modelavg.nets.dnn import load_model

    model = load_model(model_path)
    spec = model.spec
    if spec.num_classes > len(graph.classes):  # fewer: the classes unseen in training
        raise UsageError(
            f"{model_path}: {spec.num_classes} outputs, graph {graph_dir} has "
            f"{len(graph.classes)} classes (classes.txt): not the same senone set"
        )
    scorer = Scorer(graph, class_counts(model_path, spec.num_classes, priors_from))
    return data_log_probs(model, data_dir), lambda log_post: acwt * scorer(log_post)


def data_log_probs(model, data_dir) -> dict[str, np.ndarray]:
    """Per utterance of a data dir (features only), the model's float64 log posteriors."""
    from modelavg.data.frames import FrameTable
    from modelavg.data.kaldi import read_corpus
    from modelavg.nets.dnn import utterance_log_probs

    spec = model.spec
    corpus = read_corpus(data_dir, need_targets=False)
    if corpus.dim != spec.input_dim:
        raise UsageError(
            f"{data_dir}: feature dimension {corpus.dim}, model expects {spec.input_dim}"
        )
    table = FrameTable.from_corpus(corpus, corpus.utts)
    log_probs = utterance_log_probs(model, table, spec.context)
    return {u: lp.double().numpy() for u, lp in zip(corpus.utts, log_probs, strict=True)}


def oracle_inputs(
    data_dir: Path, graph: Graph, graph_dir
) -> tuple[dict[str, np.ndarray], Callable[[np.ndarray], np.ndarray]]:
    """Per utterance, the aligned classes; and the map to one-hot scores."""
    from functools import partial

    from modelavg.data.kaldi import read_labels
    from modelavg.decoding.decoder import oracle_log_likelihoods

    targets = read_labels(data_dir)
    if not targets:
        raise UsageError(f"{data_dir}/targets.scp: no utterances")
    for utt, t in targets.items():
        if len(t) and t.max() >= len(graph.classes):
            raise UsageError(
                f"{data_dir}/targets.scp: utterance {utt} has class {t.max()}, graph "
                f"{graph_dir} has {len(graph.classes)} classes"
            )
    inputs = {utt: t for utt, t in targets.items() if len(t)}
    return inputs, partial(oracle_log_likelihoods, graph=graph)


def decode_data_dir(
    model: str | os.PathLike | None,
    data_dir: str | os.PathLike,
    graph_dir: str | os.PathLike | Graph,
    acwt: float = ACWT,
    beam: float = 13.0,
    max_active: int = 7000,
    jobs: int = 1,
    priors_from: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Decode a data dir; returns wer, ins, del, sub, words, utts, frames, rtf, seconds, out.

    ``model`` None: the oracle decode. ``graph_dir`` may be a loaded ``Graph`` (decode several
    sets without reading HCLG again; then outputs need ``out_dir`` or a model).
    """
    import sys

    from tqdm import tqdm

    from modelavg.decoding.decoder import search_all

    if jobs < 1 or beam <= 0 or acwt <= 0 or max_active < 1:
        raise UsageError("--jobs, --beam, --acwt and --max-active must be positive")
    data = Path(data_dir)
    if not data.is_dir():
        raise UsageError(f"{data}: not a data directory")
    graph = graph_dir if isinstance(graph_dir, Graph) else load_graph(graph_dir)
    graph_name = Path(graph_dir).name if not isinstance(graph_dir, Graph) else "graph"
    if out_dir is None:
        if model is None and isinstance(graph_dir, Graph):
            raise UsageError("an oracle decode with a loaded graph needs out_dir")
        base = Path(graph_dir) / f"oracle_{data.name}" if model is None else None
        out_dir = base or Path(model).parent / f"decode_{graph_name}_{data.name}"
    _check_classes(data, graph, graph_dir)
    start = time.perf_counter()
    if model is None:
        inputs, to_scores = oracle_inputs(data, graph, graph_dir)
    else:
        inputs, to_scores = model_inputs(model, data, graph, graph_dir, acwt, priors_from)
    forward_seconds = time.perf_counter() - start
    hyps: dict[str, list[str]] = {}
    bar = tqdm(
        total=len(inputs), desc="decoding", unit="utt", disable=not progress, file=sys.stderr
    )
    with bar:
        for utt, ids in search_all(graph.fst, inputs, to_scores, beam, max_active, jobs):
            hyps[utt] = [graph.words[i] for i in ids]
            bar.update()
    seconds = time.perf_counter() - start
    frames = sum(len(m) for m in inputs.values())
    result: dict = {
        "utts": len(inputs),
        "frames": frames,
        "seconds": seconds,
        "forward_seconds": forward_seconds,
        "rtf": seconds / max(frames * FRAME_SHIFT_SECONDS, 1e-9),
        "acwt": acwt,
        "beam": beam,
        "oracle": model is None,
        "graph": graph.meta.get("options"),
        "out": str(out_dir),
    }
    refs = read_text(data)
    if refs is not None:
        scored = {u: scoring_form(words) for u, words in hyps.items()}
        result.update(score({u: refs.get(u, []) for u in sorted(inputs)}, scored))
    out = Path(out_dir)
    text = "".join(f"{u} {' '.join(hyps[u])}\n" for u in sorted(hyps))
    atomic_write_bytes(text.encode(), out / "hyp.txt")
    atomic_write_bytes(json.dumps(result, indent=1).encode(), out / "wer.json")
    return result


def tune_acwt(
    model: str | os.PathLike,
    cv_dir: str | os.PathLike,
    graph: Graph,
    out_dir: str | os.PathLike,
    grid: tuple[float, ...] = ACWT_GRID,
    **options,
) -> tuple[float, dict[float, dict]]:
    """The acoustic scale of ``grid`` with the lowest WER on ``cv_dir`` (ties: the first), and
    each scale's result (decoded into ``out_dir/acwt_<scale>``)."""
    results = {
        acwt: decode_data_dir(
            model, cv_dir, graph, acwt=acwt, out_dir=Path(out_dir) / f"acwt_{acwt:g}", **options
        )
        for acwt in grid
    }
    if any("wer" not in r for r in results.values()):
        raise UsageError(f"{cv_dir}/text: no such file (tuning needs reference transcripts)")
    return min(grid, key=lambda a: results[a]["wer"]), results
