"""Frame-level evaluation: cross-entropy and frame accuracy, summable across workers.

``modelavg eval`` (``add_arguments``/``run``) reports them for a saved model on a data directory,
with phone accuracy and PER where the corpus has a class map, and with ``--graph`` the word error
rate of ``modelavg decode`` (``modelavg.decoding.decode``).

Example::

    stats = frame_stats(model, table, context=5)   # tensor [loss_sum, correct, frames]
    summary(stats)                                 # {"cross_entropy": ..., "frame_accuracy": ...}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from modelavg.data.frames import FrameTable
from modelavg.errors import UsageError
from modelavg.nets.dnn import load_model, utterance_log_probs


@torch.no_grad()
def frame_stats(
    model: nn.Module, table: FrameTable, context: int, batch: int = 8192
) -> torch.Tensor:
    """[sum of per-frame cross-entropy, correct frames, frames] in float64 (exact when summed)."""
    device = next(model.parameters()).device
    stats = torch.zeros(3, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    for lo in range(0, len(table), batch):
        idx = torch.arange(lo, min(lo + batch, len(table)), device=table.feats.device)
        x, y = table.minibatch(idx, context)
        logits = model(x.to(device))
        y = y.to(device)
        stats[0] += F.cross_entropy(logits, y, reduction="sum").double()
        stats[1] += (logits.argmax(1) == y).sum()
        stats[2] += len(y)
    model.train(was_training)
    return stats


def summary(stats: torch.Tensor) -> dict[str, float]:
    loss_sum, correct, frames = (float(v) for v in stats)
    frames_ = max(frames, 1.0)
    return {
        "cross_entropy": loss_sum / frames_,
        "frame_accuracy": correct / frames_,
        "frames": int(frames),
    }


def read_labelled_table(model, data_dir, feats=None, targets=None) -> tuple:
    """(corpus, FrameTable) of a data directory, checked against the model's input dimension
    and number of classes (one-line errors naming the file and utterance)."""
    from modelavg.data.kaldi import read_corpus

    spec = model.spec
    corpus = read_corpus(data_dir, feats, targets)
    if corpus.dim != spec.input_dim:
        raise UsageError(
            f"{corpus.source}: feature dimension {corpus.dim}, the model expects {spec.input_dim}"
        )
    for utt, t in corpus.targets.items():
        if int(t.max()) >= spec.num_classes:
            raise UsageError(
                f"{corpus.source}: utterance {utt} has class id {int(t.max())}, the "
                f"model has {spec.num_classes} classes"
            )
    return corpus, FrameTable.from_corpus(corpus, corpus.utts)


def evaluate_data_dir(
    model, data_dir, feats=None, targets=None, class_map=None, train_dir=None
) -> dict:
    """Frame accuracy and cross-entropy, with chance and majority-class baselines beside them.

    With a class map (``classes.txt`` + ``phones.txt``) and ``phones.scp`` in both ``data_dir``
    and ``train_dir``, also phone frame accuracy and the phone error rate of a Viterbi decode
    with a frame-level phone bigram estimated from the training alignments.
    """

    from modelavg import phones
    from modelavg.data.kaldi import read_labels

    spec = model.spec
    corpus, table = read_labelled_table(model, data_dir, feats, targets)
    result = summary(frame_stats(model, table, spec.context))
    if train_dir is None and class_map is None:
        return result
    result["chance_accuracy"] = phones.chance_accuracy(spec.num_classes)
    train = read_labels(train_dir) if train_dir else None
    if train is not None:
        result["majority_accuracy"] = phones.majority_accuracy(train, corpus.targets)
    phones_scp = Path(data_dir) / "phones.scp"
    if class_map is None or train is None or not phones_scp.exists():
        return result
    class_to_phone, names = phones.load_class_map(class_map)
    if len(class_to_phone) != spec.num_classes:
        raise UsageError(
            f"{class_map}/classes.txt: {len(class_to_phone)} classes, the model has "
            f"{spec.num_classes} outputs"
        )
    aligned = read_labels(data_dir, str(phones_scp))
    missing = [u for u in corpus.utts if u not in aligned]
    if missing:
        raise UsageError(f"{phones_scp}: utterance {missing[0]} has features but no phones")
    ref = {u: aligned[u][: corpus.lengths[u]] for u in corpus.utts}
    train_phones = read_labels(train_dir, default_name="phones.scp")
    log_probs = utterance_log_probs(model, table, spec.context)
    correct = sum(
        int(
            (
                phones.senone_to_phone_posteriors(lp, class_to_phone, len(names)).argmax(1).numpy()
                == ref[u][: len(lp)]
            ).sum()
        )
        for u, lp in zip(corpus.utts, log_probs, strict=True)
    )
    bigram = phones.estimate_phone_bigram(train_phones.values(), len(names))
    per = phones.phone_error_rate(
        ((lp, ref[u][: len(lp)]) for u, lp in zip(corpus.utts, log_probs, strict=True)),
        class_to_phone,
        bigram,
    )
    result.update(
        phone_frame_accuracy=correct / result["frames"],
        phone_chance_accuracy=phones.chance_accuracy(len(names)),
        phone_majority_accuracy=phones.majority_accuracy(train_phones, ref),
        phone_error_rate=per.per,
        phone_errors=per.errors,
        reference_phones=per.ref_len,
    )
    return result


def format_result(name: str, r: dict) -> str:
    """One readable line per quantity, each accuracy beside its baselines."""

    def pct(key: str) -> str:
        return f"{100 * r[key]:.2f}%" if key in r else "n/a"

    lines = [
        f"{name}: {r['frames']} frames, cross-entropy {r['cross_entropy']:.4f}",
        f"  frame accuracy {pct('frame_accuracy')}"
        + (
            f" (chance {pct('chance_accuracy')}, majority class {pct('majority_accuracy')})"
            if "chance_accuracy" in r
            else ""
        ),
    ]
    if "phone_error_rate" in r:
        lines += [
            f"  phone frame accuracy {pct('phone_frame_accuracy')} (chance "
            f"{pct('phone_chance_accuracy')}, majority {pct('phone_majority_accuracy')})",
            f"  phone error rate {pct('phone_error_rate')} ({r['phone_errors']} errors / "
            f"{r['reference_phones']} reference phones)",
        ]
    if "wer" in r:
        from modelavg.decoding.wer import format_wer

        lines.append(format_wer(f"  words (acwt {r['acwt']:g})", r))
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model file (final.pt)")
    p.add_argument("--data", required=True, help="data directory with feats.scp, targets.scp")
    p.add_argument("--feats", help="override feats.scp (path or rspecifier)")
    p.add_argument("--targets", help="override targets.scp (path or rspecifier)")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object")
    p.add_argument(
        "--class-map",
        help="directory with classes.txt and phones.txt for phone "
        "accuracy and PER (default: the parent of --data, if it has them)",
    )
    p.add_argument(
        "--train-data",
        help="training data dir for the majority-class baseline and "
        "the phone bigram (default: the sibling train/ of --data with a class map)",
    )
    from modelavg.decoding.decode import ACWT

    p.add_argument("--graph", help="graph dir from modelavg make-graph: adds the word error rate")
    p.add_argument("--acwt", type=float, default=ACWT, help="acoustic scale for --graph")


def run(args: argparse.Namespace) -> int:
    """``modelavg eval``: one data directory, printed as text or one JSON object."""
    data = Path(args.data)
    class_map = args.class_map
    if class_map is None and (data.parent / "classes.txt").exists():
        class_map = data.parent
    train_dir = args.train_data
    if train_dir is None and class_map is not None and (data.parent / "train").is_dir():
        train_dir = data.parent / "train"
    if args.graph is not None:
        from modelavg.decoding.graph import load_graph

        load_graph(args.graph, need_fst=False)  # a bad graph fails before the frame evaluation
        if not (data / "text").is_file():
            raise UsageError(f"{data}/text: no such file (--graph scores the words against it)")
    result = evaluate_data_dir(
        load_model(args.model), data, args.feats, args.targets, class_map, train_dir
    )
    if args.graph is not None:
        result.update(word_error_rate(args.model, data, args.graph, args.acwt))
    print(json.dumps(result) if args.json else format_result(str(data), result))
    return 0


def word_error_rate(model_path, data_dir, graph_dir, acwt: float) -> dict:
    """``modelavg decode``'s WER (ins/del/sub) of a model on a data dir, as eval's keys; the
    hypotheses go where decode puts them (``decode_<graph>_<data>`` beside the model)."""
    from modelavg.decoding.decode import decode_data_dir
    from modelavg.decoding.wer import WER_KEYS

    r = decode_data_dir(model_path, data_dir, graph_dir, acwt=acwt, progress=False)
    wer = {k: r[k] for k in (*WER_KEYS, "acwt", "rtf")}
    return {**wer, "hypotheses": str(Path(r["out"]) / "hyp.txt")}
