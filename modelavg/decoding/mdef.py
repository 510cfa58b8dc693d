"""The pocketsphinx en-us acoustic model's definition: phones, triphones, senones, transitions.

The demo corpus's targets are senones of pocketsphinx's bundled en-us model (see
``modelavg/corpora/asterisk.py``). To decode words with a network trained on them, the decoding
graph must pick, for every triphone it can produce, the three senones and the transition matrix
the aligner would have used. Those come from the model's binary ``mdef`` (layout: pocketsphinx's
``bin_mdef.c``, also printed as a text block inside the file) and its sphinx-3
``transition_matrices`` file.

The lookup ``phone_id_nearest`` repeats pocketsphinx's back-off for a triphone the model lacks:
other word positions, then silence as the context at word edges (and for filler contexts), then
the context-independent phone. ``tests/test_decoding_mdef.py`` checks it against the aligner's
senones on every phone instance of a demo split.

Example::

    mdef = Mdef.read(default_model_dir() / "mdef")
    pid = mdef.phone_id_nearest(mdef.ci("AH"), mdef.ci("K"), mdef.ci("T"), WPOS_BEGIN)
    mdef.senones(pid), mdef.tmat_of(pid)  # (3,) senone ids, transition matrix id
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modelavg.errors import UsageError

MAGIC = b"BMDF"
TMAT_MAGIC = 0x11223344
# Word positions as pocketsphinx numbers them (WPOS_NAME "ibesu"): internal, begin, end, single.
WPOS_INTERNAL, WPOS_BEGIN, WPOS_END, WPOS_SINGLE = range(4)
NUM_WPOS = 4


def default_model_dir() -> Path:
    """The en-us acoustic model directory shipped in the pocketsphinx pip package."""
    try:
        from pocketsphinx import get_model_path
    except ImportError:
        raise UsageError(
            "python module pocketsphinx missing; run: pip install pocketsphinx"
        ) from None
    return Path(get_model_path()) / "en-us" / "en-us"


@dataclass
class Mdef:
    """A homogeneous 3-state triphone model definition, as read from a binary ``mdef``."""

    ciphones: list[str]  # CI phone names, sorted (CI phone id = index)
    filler: np.ndarray  # (n_ci,) bool: SIL, +NSN+, ... (no triphones, map to SIL in contexts)
    sil: int  # CI id of SIL
    num_senones: int
    phone_ssid: np.ndarray  # (n_phone,) senone sequence of each phone (CI phones first)
    phone_tmat: np.ndarray  # (n_phone,) transition matrix of each phone
    cd: np.ndarray  # (n_phone - n_ci, 4) uint8: word position, base, left, right
    sseq: np.ndarray  # (n_sseq, 3) senone ids
    _table: np.ndarray  # (4 * n_ci**3,) phone id of (wpos, base, left, right), -1 if none

    @classmethod
    def read(cls, path: str | os.PathLike) -> Mdef:
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UsageError(f"{path}: cannot read ({exc.strerror})") from None
        if data[:4] != MAGIC:
            raise UsageError(f"{path}: not a binary pocketsphinx mdef (no BMDF marker)")
        try:
            return cls._parse(data)
        except (ValueError, IndexError) as exc:
            raise UsageError(f"{path}: truncated or malformed mdef ({exc})") from None

    @classmethod
    def _parse(cls, data: bytes) -> Mdef:
        i32 = np.dtype("<i4")
        desc_len = int(np.frombuffer(data, i32, 1, 8)[0])
        pos = 12 + desc_len
        (n_ci, n_phone, n_emit, _n_ci_sen, n_sen, _n_tmat, n_sseq, _n_ctx, n_tree, _sil) = (
            int(v) for v in np.frombuffer(data, i32, 10, pos)
        )
        if n_emit != 3:
            raise ValueError(f"{n_emit} emitting states per phone, only 3 are supported")
        pos += 40
        names = data[pos:].split(b"\0", n_ci)[:n_ci]
        ciphones = [n.decode("ascii") for n in names]
        pos += sum(len(n) + 1 for n in names)
        pos = (pos + 3) & ~3
        pos += 8 * n_tree  # the lookup tree: replaced by a dense table below
        phones = np.frombuffer(data, np.dtype([("ssid", i32), ("tmat", i32), ("attr", "u1", 4)]),
                               n_phone, pos)  # fmt: skip
        pos += 12 * n_phone
        sseq_size = int(np.frombuffer(data, i32, 1, pos)[0])
        sseq = np.frombuffer(data, np.dtype("<u2"), sseq_size, pos + 4).astype(np.int64)
        cd = phones["attr"][n_ci:].copy()
        table = np.full(NUM_WPOS * n_ci**3, -1, dtype=np.int64)
        table[_key(n_ci, cd[:, 0], cd[:, 1], cd[:, 2], cd[:, 3])] = np.arange(n_ci, n_phone)
        return cls(
            ciphones=ciphones,
            filler=phones["attr"][:n_ci, 0].astype(bool),
            sil=ciphones.index("SIL"),
            num_senones=n_sen,
            phone_ssid=phones["ssid"].astype(np.int64),
            phone_tmat=phones["tmat"].astype(np.int64),
            cd=cd,
            sseq=sseq.reshape(n_sseq, 3),
            _table=table,
        )

    @property
    def num_ci(self) -> int:
        return len(self.ciphones)

    def ci(self, name: str) -> int:
        try:
            return self.ciphones.index(name)
        except ValueError:
            raise UsageError(f"phone {name} is not in the acoustic model") from None

    def phone_id(self, base, left, right, wpos) -> np.ndarray:
        """The triphones' phone ids, -1 where the model has none (filler contexts read as SIL).
        Arguments are integers or arrays of CI phone ids and word positions."""
        left = np.where(self.filler[left], self.sil, left)
        right = np.where(self.filler[right], self.sil, right)
        return self._table[_key(self.num_ci, wpos, base, left, right)]

    def phone_id_nearest(self, base, left, right, wpos) -> np.ndarray:
        """pocketsphinx's ``bin_mdef_phone_id_nearest``, vectorised: the triphone, else the same
        contexts at another word position (in ascending order), else SIL as the context at word
        edges and for fillers, at each position, else the CI phone."""
        base, left, right, wpos = np.broadcast_arrays(
            *(np.asarray(a) for a in (base, left, right, wpos))
        )
        at_start = (wpos == WPOS_BEGIN) | (wpos == WPOS_SINGLE)
        at_end = (wpos == WPOS_END) | (wpos == WPOS_SINGLE)
        new_left = np.where(self.filler[left] | at_start, self.sil, left)
        new_right = np.where(self.filler[right] | at_end, self.sil, right)
        retry = (new_left != left) | (new_right != right)
        pid = np.full(base.shape, -1, dtype=np.int64)
        for lc, rc, allowed in ((left, right, True), (new_left, new_right, retry)):
            for k in range(NUM_WPOS + 1):  # the given position first, then the others
                pos = wpos if k == 0 else np.full_like(wpos, k - 1)
                todo = (pid < 0) & allowed & ((k == 0) | (pos != wpos))
                pid = np.where(todo, self.phone_id(base, lc, rc, pos), pid)
        return np.where(pid < 0, base, pid)

    def senones(self, pid) -> np.ndarray:
        """(..., 3) senone ids of the phones ``pid``."""
        return self.sseq[self.phone_ssid[pid]]

    def tmat_of(self, pid) -> np.ndarray:
        return self.phone_tmat[pid]

    def senone_states(self) -> np.ndarray:
        """(num_senones, 2): each senone's CI phone and state (0-2); -1 if no phone uses it."""
        out = np.full((self.num_senones, 2), -1, dtype=np.int64)
        base = np.concatenate([np.arange(self.num_ci), self.cd[:, 1].astype(np.int64)])
        for state in range(3):
            out[self.sseq[self.phone_ssid, state]] = np.stack(
                [base, np.full_like(base, state)], axis=1
            )
        return out


def _key(n_ci: int, wpos, base, left, right):
    return ((np.asarray(wpos, np.int64) * n_ci + base) * n_ci + left) * n_ci + right


def read_transition_matrices(path: str | os.PathLike) -> np.ndarray:
    """(n_tmat, 3, 4) transition probabilities (rows normalised) from a sphinx-3 binary file."""
    path = Path(path)
    try:
        data = path.read_bytes()
        end = data.index(b"endhdr\n") + len(b"endhdr\n")
        magic, n, rows, cols, count = np.frombuffer(data, np.dtype("<i4"), 5, end)
        if magic != TMAT_MAGIC or count != n * rows * cols:
            raise ValueError("unexpected header")
        probs = np.frombuffer(data, np.dtype("<f4"), count, end + 20).reshape(n, rows, cols)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: not a sphinx-3 transition matrix file ({exc})") from None
    probs = probs.astype(np.float64)
    return probs / probs.sum(axis=2, keepdims=True)
