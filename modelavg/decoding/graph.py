"""``modelavg make-graph``: the decoding graph HCLG over pocketsphinx en-us senones, cached.

Kaldi's recipe (Mohri, Pereira & Riley, "Speech Recognition with Weighted Finite-State
Transducers", 2008; Povey et al. 2011), with kaldifst and kaldilm doing the FST work:

1. L: the aligner's lexicon with word-position phones and optional silence (``lexicon.py``);
   G: the LM as an FST (``kaldilm.arpa2fst``; ``lm.py``).
2. LG = L∘G, determinised in the log semiring, minimised, arc-sorted.
3. CLG: ``compose_context`` makes the left/right phone context explicit; each of its input
   labels is a triphone (left, centre, right; 0 is the utterance edge, read as SIL).
4. H: each triphone label becomes the 3-state left-to-right HMM pocketsphinx would use
   (``Mdef.phone_id_nearest``: the same back-off as the aligner), with the model's transition
   probabilities (self-loop scale 0.1, Kaldi's default). Input labels
   are senone id + 1; disambiguation symbols become epsilon (HCLG is not determinised again).
5. HCLG = H∘CLG.

The graph is independent of any network: ``classes.txt`` (network output -> senone) is copied
beside it, and ``senones.txt`` gives each senone's phone and state for the decoder's back-off
for senones the network has no output for (``decoder.py``). A second call with the same inputs
(file contents and options, hashed into ``graph.json``) does nothing; the graph is built in a
temporary directory and renamed into place.

Example::

    modelavg make-graph --data data/demo --lm en-us --out data/lang_enus
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import kaldifst
import numpy as np

from modelavg.decoding.lexicon import Lexicon, aligner_dictionary, split_phone
from modelavg.decoding.mdef import (
    WPOS_SINGLE,
    Mdef,
    default_model_dir,
    read_transition_matrices,
)
from modelavg.errors import UsageError
from modelavg.io import atomic_write_bytes

GRAPH_FORMAT = "modelavg-graph-1"
# Kaldi's default: a self-loop costs -0.1 log a_jj, leaving costs -0.1 log(1 - a_jj); the
# transition-scale term, log(a_jk / (1 - a_jj)), is 0 with a single way forward.
SELF_LOOP_SCALE = 0.1
STEPS = ("language model", "lexicon L", "grammar G", "LG", "CLG", "H", "HCLG", "write")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="corpus dir with classes.txt (data/demo)")
    parser.add_argument(
        "--lm", default="en-us", help="'en-us' (pocketsphinx's LM, bigram part) or an ARPA file"
    )
    parser.add_argument(
        "--lm-text", help="estimate a Kneser-Ney LM from this text (one sentence a line) instead"
    )
    parser.add_argument("--order", type=int, default=3, help="n-gram order for --lm-text")
    parser.add_argument("--vocab", type=int, help="keep only the N most probable words")
    parser.add_argument("--sil-prob", type=float, default=0.5, help="optional silence probability")
    parser.add_argument("--out", required=True, help="graph directory (e.g. data/lang_enus)")


def run(args: argparse.Namespace) -> int:
    info = make_graph(
        args.data,
        args.out,
        lm=args.lm,
        lm_text=args.lm_text,
        order=args.order,
        vocab=args.vocab,
        sil_prob=args.sil_prob,
    )
    state = "up to date" if info.get("cached") else f"built in {info['build_seconds']:.0f} s"
    print(
        f"graph {args.out}: {state}; {info['words']} words, HCLG {info['hclg_states']} states, "
        f"{info['hclg_bytes'] / 1e6:.0f} MB"
    )
    return 0


def _inputs_hash(data: Path, lm: str, lm_text: str | None, options: dict) -> str:
    from modelavg.corpora.align import EXTRA_PRONUNCIATIONS
    from modelavg.decoding.lm import enus_lm_path

    model = default_model_dir()
    files = [model / "mdef", model / "transition_matrices", model.parent / "cmudict-en-us.dict"]
    files.append(data / "classes.txt")
    files.append(Path(lm_text) if lm_text else enus_lm_path() if lm == "en-us" else Path(lm))
    h = hashlib.sha256(json.dumps([GRAPH_FORMAT, options, EXTRA_PRONUNCIATIONS]).encode())
    for path in files:
        if not path.is_file():
            raise UsageError(f"{path}: no such file")
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def make_graph(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    lm: str = "en-us",
    lm_text: str | None = None,
    order: int = 3,
    vocab: int | None = None,
    sil_prob: float = 0.5,
    progress: bool = True,
) -> dict:
    """Build (or find up to date) the graph in ``out_dir``; returns its ``graph.json`` record."""
    data, out = Path(data_dir), Path(out_dir)
    if not (data / "classes.txt").is_file():
        raise UsageError(f"{data}/classes.txt: no such file (the class -> senone map)")
    if lm_text is not None and lm != "en-us":
        raise UsageError("--lm and --lm-text: give one (--lm-text estimates the LM from text)")
    if vocab is not None and vocab < 1:
        raise UsageError(f"--vocab {vocab}: must be at least 1")
    if not 0.0 < sil_prob < 1.0:
        raise UsageError(f"--sil-prob {sil_prob}: must be inside (0, 1)")
    options = {"lm": lm if lm_text is None else None, "lm_text": bool(lm_text), "vocab": vocab,
               "order": order if lm_text else None, "sil_prob": sil_prob}  # fmt: skip
    digest = _inputs_hash(data, lm, lm_text, options)
    meta = _graph_meta(out)
    if meta is None and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out}: exists and is not a graph directory; choose another")
    if meta is not None and meta.get("inputs_hash") == digest and (out / "HCLG.fst").is_file():
        return {**meta, "cached": True}
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        meta = _build(data, work, lm, lm_text, order, vocab, sil_prob, progress)
        meta.update(inputs_hash=digest, options=options)
        atomic_write_bytes(json.dumps(meta, indent=1).encode(), work / "graph.json")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        work.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return meta


def _graph_meta(out: Path) -> dict | None:
    """The graph.json of a graph directory made here, else None (it is replaced only then)."""
    try:
        meta = json.loads((out / "graph.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == GRAPH_FORMAT else None


def _build(
    data: Path,
    work: Path,
    lm: str,
    lm_text: str | None,
    order: int,
    vocab: int | None,
    sil_prob: float,
    progress: bool,
) -> dict:
    import kaldilm
    from tqdm import tqdm

    from modelavg.decoding.lm import prepare_arpa, unigram_log10

    start = time.perf_counter()
    model = default_model_dir()
    mdef = Mdef.read(model / "mdef")
    tmats = read_transition_matrices(model / "transition_matrices")
    classes = read_classes(data / "classes.txt", mdef.num_senones)
    base_phones = [p for i, p in enumerate(mdef.ciphones) if not mdef.filler[i]]
    bar = tqdm(total=len(STEPS), desc="make-graph", unit="step", disable=not progress,
               file=sys.stderr)  # fmt: skip
    with bar:  # closed before an error is printed: the error is the last line
        started: list[float] = []  # when each step began

        def step() -> None:
            """Mark the running step done (if any) and show the next one."""
            if started:
                bar.update()
            started.append(time.perf_counter())
            bar.set_postfix_str(STEPS[len(started) - 1])

        step()
        prons = aligner_dictionary()
        arpa = prepare_arpa(lm, lm_text, order, set(prons), vocab, work)
        step()
        lexicon = Lexicon.build(unigram_log10(arpa), prons, base_phones)
        lexicon.write(work)
        L = lexicon.fst(sil_prob)
        step()
        with _quiet_stderr():  # kaldilm logs every ARPA section it reads
            kaldilm.arpa2fst(
                str(arpa), str(work / "G.fst"), disambig_symbol="#0",
                read_symbol_table=str(work / "words.txt"), max_arpa_warnings=0,
            )  # fmt: skip
        G = kaldifst.StdVectorFst.read(str(work / "G.fst"))
        step()
        LG = kaldifst.compose(L, G)
        del L, G
        kaldifst.determinize_star(LG, use_log=True)
        kaldifst.minimize_encoded(LG)
        kaldifst.arcsort(LG, sort_type="ilabel")
        step()
        CLG, ilabels = kaldifst.compose_context(lexicon.disambig_phone_ids, 3, 1, LG)
        del LG
        kaldifst.arcsort(CLG, sort_type="ilabel")
        step()
        H, backed_off = _make_h(ilabels, lexicon.phones, mdef, tmats)
        step()
        HCLG = kaldifst.compose(H, CLG)
        del H, CLG
        kaldifst.arcsort(HCLG, sort_type="ilabel")
        step()
        HCLG.write(str(work / "HCLG.fst"))
        for name in ("G.fst", "G.arpa", "text.arpa", "en-us-dump.arpa"):
            (work / name).unlink(missing_ok=True)
        states = mdef.senone_states()
        lines = (
            f"{s} {mdef.ciphones[p] if p >= 0 else '-'} {j}" for s, (p, j) in enumerate(states)
        )
        atomic_write_bytes(("\n".join(lines) + "\n").encode(), work / "senones.txt")
        shutil.copyfile(data / "classes.txt", work / "classes.txt")
        bar.update()
    ends = [*started[1:], time.perf_counter()]
    return {
        "format": GRAPH_FORMAT,
        "words": len(lexicon.words) - 4,
        "pronunciations": len(lexicon.entries),
        "classes": len(classes),
        "num_senones": mdef.num_senones,
        "triphone_labels": sum(len(x) == 3 for x in ilabels),
        "triphones_backed_off": backed_off,
        "hclg_states": HCLG.num_states,
        "hclg_bytes": (work / "HCLG.fst").stat().st_size,
        "build_seconds": time.perf_counter() - start,
        "step_seconds": {k: round(e - b, 1) for k, b, e in zip(STEPS, started, ends, strict=True)},
    }


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence C++ logging on file descriptor 2; replay it if the block fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _make_h(
    ilabels: list[list[int]], phones: list[str], mdef: Mdef, tmats: np.ndarray
) -> tuple[kaldifst.StdVectorFst, int]:
    """H: senone sequences -> CLG's input labels. One shared 3-state chain per distinct HMM;
    returns H and how many triphones had no exact model (pocketsphinx's back-off chose one)."""
    ci = {name: i for i, name in enumerate(mdef.ciphones)}
    base_of = np.full(len(phones), mdef.sil)  # <eps> (the utterance edge) reads as SIL
    wpos_of = np.full(len(phones), WPOS_SINGLE)  # silence has no word position
    for i, phone in enumerate(phones):
        name, wpos = split_phone(phone)
        base_of[i] = ci.get(name, mdef.sil)
        wpos_of[i] = WPOS_SINGLE if wpos is None else wpos
    tri = np.array([(k, *w) for k, w in enumerate(ilabels) if len(w) == 3], dtype=np.int64)
    k, left, centre, right = tri.T
    b, pos = base_of[centre], wpos_of[centre]
    lc = np.where(left > 0, base_of[left], mdef.sil)
    rc = np.where(right > 0, base_of[right], mdef.sil)
    pid = mdef.phone_id_nearest(b, lc, rc, pos)
    backed_off = int(((pid != mdef.phone_id(b, lc, rc, pos)) & ~mdef.filler[b]).sum())
    hmms, chain = np.unique(pid, return_inverse=True)
    first = 1 + 3 * np.arange(len(hmms))
    senones = mdef.senones(hmms) + 1  # input labels: senone id + 1
    loops = tmats[mdef.tmat_of(hmms)][:, [0, 1, 2], [0, 1, 2]]  # (hmms, 3) self-loop probs
    stay, leave = -SELF_LOOP_SCALE * np.log(loops), -SELF_LOOP_SCALE * np.log(1.0 - loops)
    lines = [f"0 0 0 {x}" for x, w in enumerate(ilabels) if len(w) == 1]  # disambiguation
    lines += [f"0 {f} {s} {x}" for f, s, x in zip(first[chain], senones[chain, 0], k, strict=True)]
    for j in range(3):
        here = first + j
        nxt, into = (here + 1, senones[:, j + 1]) if j < 2 else (0 * here, 0 * here)
        loop_arcs = zip(here, senones[:, j], stay[:, j], strict=True)
        out_arcs = zip(here, nxt, into, leave[:, j], strict=True)
        lines += [f"{q} {q} {s} 0 {w}" for q, s, w in loop_arcs]
        lines += [f"{q} {n} {s} 0 {w}" for q, n, s, w in out_arcs]
    lines.append("0")
    H = kaldifst.compile("\n".join(lines) + "\n")
    kaldifst.arcsort(H, sort_type="olabel")
    return H, backed_off


def read_classes(path: Path, num_senones: int) -> np.ndarray:
    """classes.txt (``class senone phone`` lines) as the senone id of each network output."""
    senones = []
    for n, line in enumerate(path.read_text().splitlines()):
        fields = line.split()
        if len(fields) < 2 or fields[0] != str(n) or not fields[1].isdigit():
            raise UsageError(f"{path}: line {n + 1} is not '{n} <senone> <phone>'")
        if int(fields[1]) >= num_senones:
            raise UsageError(f"{path}: line {n + 1}: senone {fields[1]} >= {num_senones}")
        senones.append(int(fields[1]))
    if not senones:
        raise UsageError(f"{path}: no classes")
    return np.asarray(senones, dtype=np.int64)


@dataclass
class Graph:
    """What the decoder needs of a graph directory."""

    fst: kaldifst.StdVectorFst
    words: list[str]
    classes: np.ndarray  # senone of each network output
    senone_states: np.ndarray  # (num_senones, 2): CI phone id (-1: unused) and state
    meta: dict


def load_graph(graph_dir: str | os.PathLike, need_fst: bool = True) -> Graph:
    """Read a graph directory made by ``make_graph`` (one-line errors for missing parts)."""
    d = Path(graph_dir)
    meta_path = d / "graph.json"
    if not meta_path.is_file():
        raise UsageError(f"{d}: not a graph directory (no graph.json; run modelavg make-graph)")
    meta = json.loads(meta_path.read_text())
    for name in ("HCLG.fst", "words.txt", "classes.txt", "senones.txt"):
        if not (d / name).is_file():
            raise UsageError(f"{d / name}: no such file (rebuild with modelavg make-graph)")
    words = [line.split()[0] for line in (d / "words.txt").read_text().splitlines()]
    phones: dict[str, int] = {}
    states = []
    for line in (d / "senones.txt").read_text().splitlines():
        _, phone, state = line.split()
        states.append((-1 if phone == "-" else phones.setdefault(phone, len(phones)), int(state)))
    fst = kaldifst.StdVectorFst.read(str(d / "HCLG.fst")) if need_fst else None
    classes = read_classes(d / "classes.txt", len(states))
    return Graph(fst, words, classes, np.asarray(states, dtype=np.int64), meta)
