"""Writing a speech corpus: the seeded split by utterance and one Kaldi data directory per split.

Both speech corpora with targets (the demo and the synthetic one) hold out 10% of utterances for
``cv`` and 10% for ``test``, like Kaldi's ``subset_data_dir_tr_cv.sh``; a split is a directory
with the feature and label tables plus Kaldi's ``text``, ``utt2spk`` and ``spk2utt``.

Example::

    splits = split_utts(utts, seed=0)  # {"train": [...], "cv": [...], "test": [...]}
    write_split(out / "train", feats, targets, phones, texts, speaker="allison")
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from modelavg.data.kaldi import write_data_dir
from modelavg.io import atomic_write_bytes

SPLITS = ("train", "cv", "test")
HELD_OUT_FRACTION = 0.1  # each of cv and test


def split_utts(utts: list[str], seed: int) -> dict[str, list[str]]:
    """Seeded 80/10/10 split by utterance (cv and test get at least one each when possible)."""
    utts = sorted(utts)
    n = len(utts)
    n_held = max(1, round(HELD_OUT_FRACTION * n)) if n >= 3 else 0
    perm = np.random.default_rng(seed).permutation(n)
    test, cv, train = perm[:n_held], perm[n_held : 2 * n_held], perm[2 * n_held :]
    return {
        name: sorted(utts[i] for i in idx)
        for name, idx in zip(SPLITS, (train, cv, test), strict=True)
    }


def write_lines(path: Path, lines: Iterable[str]) -> None:
    atomic_write_bytes("".join(line + "\n" for line in lines).encode("utf-8"), path)


def write_split(
    split_dir: Path,
    feats: dict[str, np.ndarray],
    targets: dict[str, np.ndarray],
    phones: dict[str, np.ndarray],
    texts: dict[str, str],
    speaker: str,
) -> None:
    """One Kaldi data directory: the tables plus ``text``, ``utt2spk`` and ``spk2utt``."""
    write_data_dir(split_dir, feats, targets, tables={"phones": phones})
    utts = sorted(feats)
    write_lines(split_dir / "text", (f"{u} {texts[u]}" for u in utts))
    write_lines(split_dir / "utt2spk", (f"{u} {speaker}" for u in utts))
    write_lines(split_dir / "spk2utt", [" ".join([speaker, *utts])])
