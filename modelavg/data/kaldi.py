"""Kaldi data directories: read features and per-frame targets with kaldiio, write them back.

A data directory holds ``feats.scp`` (float matrices, frames x dims) and ``targets.scp`` (int32
vectors, one class id per frame). Either can be replaced by any Kaldi rspecifier
(``ark:gunzip -c ali.1.gz|``, ``scp:other.scp``, a plain ``.ark`` or ``.scp`` path).

Features named by an scp are checked one utterance at a time and not kept: ``Corpus.feats`` reads
a matrix again from its scp entry when asked for it, so a process holds only the utterances of its
own shards (a 300-hour corpus is ~17 GB of float32 frames; with 8 processes per node a copy each
would not fit). Features from an ark or a pipe cannot be read twice and are kept in memory.

Example::

    corpus = read_corpus("data/train")
    corpus.lengths["utt1"], corpus.feats["utt1"].shape  # frames, (frames, dims)
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import kaldiio
import numpy as np

from modelavg.errors import UsageError

FEATS = "feats.scp"
TARGETS = "targets.scp"
# An utterance whose feature and target lengths differ by at most this many frames is trimmed to the
# shorter one (feature extractors and aligners often disagree by one frame at the end).
LENGTH_TOLERANCE = 2
_BINARY = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffd]")  # in an scp: not a text file


class ScpFeats(Mapping[str, np.ndarray]):
    """Feature matrices read from their scp entries when asked for (and trimmed to the checked
    length): ``read_corpus``'s memory-light ``Corpus.feats``."""

    def __init__(self, where: str, entries: dict[str, str], lengths: dict[str, int]) -> None:
        self.where, self.entries, self.lengths = where, entries, lengths

    def __getitem__(self, utt: str) -> np.ndarray:
        n, entry = self.lengths[utt], self.entries[utt]  # KeyError: not in this table
        try:
            mat = kaldiio.load_mat(entry)
        except Exception as exc:  # the file changed since it was checked
            raise UsageError(
                f"{self.where}: cannot read utterance {utt} again ({_reason(exc)})"
            ) from None
        return np.asarray(mat, dtype=np.float32)[:n]

    def __iter__(self) -> Iterator[str]:
        return iter(self.lengths)

    def __len__(self) -> int:
        return len(self.lengths)

    def only(self, lengths: dict[str, int]) -> ScpFeats:
        """These utterances, each cut to its length here."""
        return ScpFeats(self.where, self.entries, lengths)


@dataclass
class Corpus:
    """Features and (optionally) targets of one data set, in utterance order; ``lengths`` (frames
    per utterance) without reading the features, ``dim`` their dimension."""

    feats: Mapping[str, np.ndarray]
    targets: dict[str, np.ndarray] | None
    source: str
    lengths: dict[str, int] = field(default_factory=dict)
    dim: int = 0

    def __post_init__(self) -> None:  # in-memory features: the lengths and dim from them
        if not self.lengths:
            self.lengths = {u: len(m) for u, m in self.feats.items()}
        if not self.dim and self.feats:
            self.dim = next(iter(self.feats.values())).shape[1]

    @property
    def utts(self) -> list[str]:
        return list(self.lengths)

    def num_frames(self) -> int:
        return sum(self.lengths.values())

    def subset(self, utts: list[str]) -> Corpus:
        """These utterances only, features cut to ``lengths`` (still unread where they were)."""
        lengths = {u: self.lengths[u] for u in utts}
        feats = self.feats
        if isinstance(feats, ScpFeats):
            feats = feats.only(lengths)
        else:
            feats = {u: feats[u][:n] for u, n in lengths.items()}
        targets = None if self.targets is None else {u: self.targets[u] for u in utts}
        return Corpus(feats, targets, self.source, lengths, self.dim)


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


def _where(spec: str) -> str:
    """The file (or command) an rspecifier reads, for messages."""
    return spec.split(":", 1)[1]


def _reason(exc: Exception) -> str:
    """One line saying why kaldiio could not read something."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    detail = " ".join(str(exc).split())
    return "truncated or corrupt data" + (f": {type(exc).__name__}: {detail}" if detail else "")


def _array(where: str, utt: str, value: object) -> np.ndarray:
    if isinstance(value, tuple):  # wav.scp-style (rate, samples) is not a feature table
        raise UsageError(f"{where}: utterance {utt} is audio, not a matrix")
    return np.asarray(value)


def _read_scp(path: str) -> Iterator[tuple[str, np.ndarray, str | None]]:
    """Entries of an scp read one by one, so a failure names its line or utterance and ark;
    each with its entry (``ark:offset``), to read it again later."""
    try:
        lines = kaldiio.open_like_kaldi(path, "rb")  # bytes: a binary file is garbled, not a crash
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({_reason(exc)})") from None
    arks: dict = {}  # open ark files, shared by the entries that point into them
    try:
        with lines:
            for n, raw in enumerate(lines, 1):
                line = raw.decode("utf-8", errors="replace")
                fields = line.split(None, 1)
                if len(fields) != 2 or _BINARY.search(line):
                    raise UsageError(
                        f"{path}: cannot read line {n} ({line.strip()[:60]!r}): "
                        "expected '<utterance> <ark>:<offset>'"
                    )
                utt, entry = fields[0], fields[1].strip()
                try:
                    value = kaldiio.load_mat(entry, fd_dict=arks)
                except Exception as exc:  # kaldiio raises many types for bad arks and offsets
                    raise UsageError(
                        f"{path}: cannot read utterance {utt} from {entry} ({_reason(exc)})"
                    ) from None
                yield utt, _array(path, utt, value), entry
    finally:
        for fd in arks.values():
            fd.close()


def _read_ark(path: str) -> Iterator[tuple[str, np.ndarray, str | None]]:
    """Records of an ark (file or pipe); a failure names the utterance being read or the last."""
    try:
        stream = kaldiio.open_like_kaldi(path, "rb")
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({_reason(exc)})") from None
    previous = None
    with stream:
        while True:
            utt = None
            try:
                utt = kaldiio.matio.read_token(stream)
                if utt is None:
                    return
                value = kaldiio.matio.read_kaldi(stream)
            except Exception as exc:  # kaldiio raises many types for truncated or corrupt arks
                if utt is not None:
                    record = f"utterance {utt}"
                elif previous is None:
                    record = "its first record"
                else:
                    record = f"the record after utterance {previous}"
                raise UsageError(f"{path}: cannot read {record} ({_reason(exc)})") from None
            previous = utt
            yield utt, _array(path, utt, value), None


def _read_table(spec: str) -> Iterator[tuple[str, np.ndarray, str | None]]:
    """Yield (utt, array, scp entry or None) from a kaldiio rspecifier; any read failure is a
    one-line UsageError."""
    parsed = kaldiio.parse_specifier(spec)
    return _read_scp(parsed["scp"]) if parsed["scp"] is not None else _read_ark(parsed["ark"])


def read_labels(
    data_dir: str | os.PathLike, spec: str | None = None, default_name: str = TARGETS
) -> dict[str, np.ndarray]:
    """Only the per-frame int vectors of a data dir (targets, phones): no features are read."""
    return {
        utt: vec.astype(np.int64)
        for utt, vec, _ in _read_table(rspecifier(data_dir, spec, default_name))
    }


def read_corpus(
    data_dir: str | os.PathLike,
    feats: str | None = None,
    targets: str | None = None,
    need_targets: bool = True,
    skip_bad_utts: bool = False,
) -> Corpus:
    """Read and validate a data directory; each problem is a one-line UsageError naming the file
    and, where there is one, the utterance.

    With ``skip_bad_utts`` an utterance unusable on its own (no frames, NaN/Inf, a negative class
    id, no partner, targets and frames that differ by more than ``LENGTH_TOLERANCE``) is dropped
    and counted in ``Corpus.source``, as Kaldi's nnet1 trainers skip such utterances. Faults of a
    whole table still fail: unreadable or garbled files, duplicate ids, matrices of another
    shape or type than the rest.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir() and feats is None:
        raise UsageError(f"{data_dir}: not a data directory")
    skipped: set[str] = set()

    def bad(utt: str, message: str) -> None:
        if not skip_bad_utts:
            raise UsageError(message)
        skipped.add(utt)

    feat_spec = rspecifier(data_dir, feats, FEATS)
    fdict, lengths, dim = _read_feats(feat_spec, bad)
    if not fdict:
        dropped = f" ({len(skipped)} bad utterances skipped)" if skipped else ""
        raise UsageError(f"{_where(feat_spec)}: no utterances{dropped}")

    tdict: dict[str, np.ndarray] | None = None
    has_targets = need_targets and (targets is not None or (data_dir / TARGETS).exists())
    if need_targets and not has_targets:
        raise UsageError(f"{data_dir / TARGETS}: no such file (per-frame class ids are needed)")
    if has_targets:
        tgt_spec = rspecifier(data_dir, targets, TARGETS)
        tdict = _read_targets(tgt_spec, lengths, bad)
        missing = [u for u in fdict if u not in tdict and u not in skipped]
        if missing:
            bad(
                missing[0],
                f"{_where(tgt_spec)}: utterance {missing[0]} has features but no targets "
                f"({len(missing)} such)",
            )
            skipped.update(missing)
        lengths = {u: n for u, n in lengths.items() if u in tdict}
        for utt, vec in tdict.items():  # trim the small length mismatches to the shorter side
            lengths[utt] = min(len(vec), lengths[utt])
            tdict[utt] = vec[: lengths[utt]]
        if not lengths:
            raise UsageError(f"{data_dir}: no utterance has both features and targets")
    source = str(data_dir) + (f" ({len(skipped)} bad utterances skipped)" if skipped else "")
    return Corpus(fdict, tdict, source, lengths, dim).subset(list(lengths))  # kept, trimmed


def _read_feats(
    spec: str, bad: Callable[[str, str], None]
) -> tuple[Mapping[str, np.ndarray], dict[str, int], int]:
    """The usable utterances of a feature table, checked one by one, as float32 matrices (kept
    only when they cannot be read again: an ark or a pipe), their lengths and the dimension."""
    kept: dict[str, np.ndarray] = {}
    entries: dict[str, str] = {}
    lengths: dict[str, int] = {}
    seen: set[str] = set()
    dim = None
    for utt, mat, entry in _read_table(spec):
        where = f"{_where(spec)}: utterance {utt}"
        if utt in seen:
            raise UsageError(f"{where}: duplicate utterance id")
        seen.add(utt)
        if mat.ndim != 2 or mat.shape[1] == 0 or not np.issubdtype(mat.dtype, np.number):
            raise UsageError(f"{where}: expected a non-empty frames x dims matrix, got {mat.shape}")
        if dim is not None and mat.shape[1] != dim:
            raise UsageError(f"{where}: feature dimension {mat.shape[1]}, expected {dim}")
        dim = mat.shape[1]
        if mat.shape[0] == 0:
            bad(utt, f"{where}: expected a non-empty frames x dims matrix, got {mat.shape}")
        elif not np.isfinite(mat).all():
            bad(utt, f"{where}: features contain NaN or Inf")
        else:
            lengths[utt] = len(mat)
            if entry is None:
                kept[utt] = mat.astype(np.float32, copy=False)
            else:
                entries[utt] = entry
    feats = ScpFeats(_where(spec), entries, lengths) if entries else kept
    return feats, lengths, dim or 0


def _read_targets(
    spec: str, lengths: Mapping[str, int], bad: Callable[[str, str], None]
) -> dict[str, np.ndarray]:
    """The class-id vectors of a target table that match a usable utterance (``lengths``)."""
    tdict: dict[str, np.ndarray] = {}
    seen: set[str] = set()
    for utt, vec, _ in _read_table(spec):
        where = f"{_where(spec)}: utterance {utt}"
        if utt in seen:
            raise UsageError(f"{where}: duplicate utterance id")
        seen.add(utt)
        if vec.ndim != 1 or not np.issubdtype(vec.dtype, np.integer):
            raise UsageError(
                f"{where}: expected an int32 vector of class ids, got {vec.dtype} {vec.shape}"
            )
        n = lengths.get(utt)
        if n is None:
            bad(utt, f"{where}: targets but no features")
        elif (vec < 0).any():
            bad(utt, f"{where}: negative class id {int(vec.min())}")
        elif abs(len(vec) - n) > LENGTH_TOLERANCE:
            bad(utt, f"{where}: {len(vec)} targets for {n} feature frames")
        else:
            tdict[utt] = vec.astype(np.int64)
    return tdict


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
