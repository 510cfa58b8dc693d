"""Kaldi data directories: read features and per-frame targets with kaldiio, write them back.

A data directory holds ``feats.scp`` (float matrices, frames x dims) and ``targets.scp`` (int32
vectors, one class id per frame). Either can be replaced by any Kaldi rspecifier
(``ark:gunzip -c ali.1.gz|``, ``scp:other.scp``, a plain ``.ark`` or ``.scp`` path).

Example::

    corpus = read_corpus("data/train")
    corpus.feats["utt1"].shape  # (frames, dims)
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import kaldiio
import numpy as np

from modelavg.errors import UsageError

FEATS = "feats.scp"
TARGETS = "targets.scp"
# An utterance whose feature and target lengths differ by at most this many frames is trimmed to the
# shorter one (feature extractors and aligners often disagree by one frame at the end).
LENGTH_TOLERANCE = 2


@dataclass
class Corpus:
    """Features and (optionally) targets of one data set, in utterance order."""

    feats: dict[str, np.ndarray]
    targets: dict[str, np.ndarray] | None
    source: str

    @property
    def utts(self) -> list[str]:
        return list(self.feats)

    @property
    def dim(self) -> int:
        return next(iter(self.feats.values())).shape[1]

    def num_frames(self) -> int:
        return sum(len(m) for m in self.feats.values())


def rspecifier(data_dir: str | os.PathLike, spec: str | None, default_name: str) -> str:
    """A data-dir-relative file name, a path, or a full rspecifier, as a kaldiio rspecifier."""
    if spec is None:
        spec = str(Path(data_dir) / default_name)
    if spec.startswith(("ark:", "scp:", "ark,", "scp,")):
        return spec
    if spec.endswith("|"):
        return "ark:" + spec
    path = Path(spec) if Path(spec).is_absolute() or Path(spec).exists() else Path(data_dir) / spec
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    return ("scp:" if path.suffix == ".scp" else "ark:") + str(path)


def _read_table(spec: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (utt, array) from a kaldiio rspecifier; any read failure becomes a UsageError."""
    where = spec.split(":", 1)[1]
    try:
        with kaldiio.ReadHelper(spec) as reader:
            it = iter(reader)
            while True:
                try:
                    utt, value = next(it)
                except StopIteration:
                    return
                if isinstance(value, tuple):  # wav.scp-style (rate, samples) is not a feature table
                    raise UsageError(f"{where}: utterance {utt} is audio, not a matrix")
                yield utt, np.asarray(value)
    except UsageError:
        raise
    except Exception as exc:  # kaldiio raises many types for truncated or missing arks
        raise UsageError(f"{where}: cannot read ({type(exc).__name__}: {exc})") from None


def read_labels(
    data_dir: str | os.PathLike, spec: str | None = None, default_name: str = TARGETS
) -> dict[str, np.ndarray]:
    """Only the per-frame int vectors of a data dir (targets, phones): no features are read."""
    return {
        utt: vec.astype(np.int64)
        for utt, vec in _read_table(rspecifier(data_dir, spec, default_name))
    }


def read_corpus(
    data_dir: str | os.PathLike,
    feats: str | None = None,
    targets: str | None = None,
    need_targets: bool = True,
    skip_bad_utts: bool = False,
) -> Corpus:
    """Read and validate a data directory; each problem is a one-line UsageError naming the culprit.

    With ``skip_bad_utts`` utterances lacking a partner or with NaN/Inf are dropped (and counted in
    ``Corpus.source``) instead of refused.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir() and feats is None:
        raise UsageError(f"{data_dir}: not a data directory")
    feat_spec = rspecifier(data_dir, feats, FEATS)
    fdict: dict[str, np.ndarray] = {}
    dim = None
    skipped: set[str] = set()
    for utt, mat in _read_table(feat_spec):
        where = f"{feat_spec.split(':', 1)[1]}: utterance {utt}"
        if mat.ndim != 2 or mat.shape[0] == 0:
            raise UsageError(f"{where}: expected a non-empty frames x dims matrix, got {mat.shape}")
        if not np.isfinite(mat).all():
            if skip_bad_utts:
                skipped.add(utt)
                continue
            raise UsageError(f"{where}: features contain NaN or Inf")
        if dim is None:
            dim = mat.shape[1]
        elif mat.shape[1] != dim:
            raise UsageError(f"{where}: feature dimension {mat.shape[1]}, expected {dim}")
        if utt in fdict:
            raise UsageError(f"{where}: duplicate utterance id")
        fdict[utt] = mat.astype(np.float32, copy=False)
    if not fdict:
        raise UsageError(f"{feat_spec.split(':', 1)[1]}: no utterances")

    tdict: dict[str, np.ndarray] | None = None
    has_targets = need_targets and (targets is not None or (data_dir / TARGETS).exists())
    if need_targets and not has_targets:
        raise UsageError(f"{data_dir / TARGETS}: no such file (per-frame class ids are needed)")
    if has_targets:
        tgt_spec = rspecifier(data_dir, targets, TARGETS)
        tdict = {}
        for utt, vec in _read_table(tgt_spec):
            where = f"{tgt_spec.split(':', 1)[1]}: utterance {utt}"
            if vec.ndim != 1 or not np.issubdtype(vec.dtype, np.integer):
                raise UsageError(f"{where}: expected an int32 vector of class ids, got {vec.dtype}")
            if (vec < 0).any():
                raise UsageError(f"{where}: negative class id {int(vec.min())}")
            if utt not in fdict:
                if skip_bad_utts:
                    skipped.add(utt)
                    continue
                raise UsageError(f"{where}: targets but no features")
            n = len(fdict[utt])
            if abs(len(vec) - n) > LENGTH_TOLERANCE:
                raise UsageError(f"{where}: {len(vec)} targets for {n} feature frames")
            tdict[utt] = vec.astype(np.int64)
        missing = [u for u in fdict if u not in tdict]
        if missing and not skip_bad_utts:
            raise UsageError(
                f"{feat_spec.split(':', 1)[1]}: utterance {missing[0]} has features "
                f"but no targets ({len(missing)} such)"
            )
        for utt in missing:
            del fdict[utt]
            skipped.add(utt)
        for utt, vec in tdict.items():  # trim the small length mismatches to the shorter side
            n = min(len(vec), len(fdict[utt]))
            fdict[utt], tdict[utt] = fdict[utt][:n], vec[:n]
        if not fdict:
            raise UsageError(f"{data_dir}: no utterance has both features and targets")
    source = str(data_dir) + (f" ({len(skipped)} bad utterances skipped)" if skipped else "")
    return Corpus(fdict, tdict, source)


def write_data_dir(
    out_dir: str | os.PathLike,
    feats: Mapping[str, np.ndarray],
    targets: Mapping[str, np.ndarray] | None = None,
    tables: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> None:
    """Write feats.ark/scp, targets.ark/scp and any extra named tables (e.g. ``phones``).

    Utterances are written in sorted order so that the same input gives byte-identical files.
    """
    out = Path(out_dir).resolve()  # absolute paths in the scp: readable from any directory
    out.mkdir(parents=True, exist_ok=True)
    all_tables: dict[str, Mapping[str, np.ndarray]] = {"feats": feats}
    if targets is not None:
        all_tables["targets"] = targets
    all_tables.update(tables or {})
    for name, table in all_tables.items():
        with kaldiio.WriteHelper(f"ark,scp:{out / name}.ark,{out / name}.scp") as writer:
            for utt in sorted(table):
                value = table[utt]
                value = value.astype(np.float32) if name == "feats" else value.astype(np.int32)
                writer(utt, value)
