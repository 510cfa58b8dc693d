"""Frames: utterances concatenated into one table, spliced on the fly, and the normalisation stats.

Splicing +-C frames (edge frames repeated at utterance boundaries) turns a D-dim frame into a
(2C+1)*D-dim input, as Kaldi's ``splice-feats`` does. It is done per minibatch by index arithmetic
instead of materialising the (2C+1)x larger matrix.

Example::

    table = FrameTable.from_corpus(corpus, utts)
    x, y = table.minibatch(torch.tensor([0, 5, 9]), context=5)  # x: (3, 11*D)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from modelavg.data.kaldi import Corpus


@dataclass
class FrameTable:
    """All frames of a set of utterances, with each frame's utterance bounds for splicing."""

    feats: torch.Tensor  # (T, D) float32
    targets: torch.Tensor | None  # (T,) int64
    start: torch.Tensor  # (T,) index of the first frame of the frame's utterance
    end: torch.Tensor  # (T,) index one past the last frame of the frame's utterance
    lengths: np.ndarray  # frames per utterance, in table order

    @classmethod
    def from_corpus(cls, corpus: Corpus, utts: list[str]) -> FrameTable:
        """The utterances' frames in one table, each matrix read into place (no second copy)."""
        lengths = np.array([corpus.lengths[u] for u in utts], dtype=np.int64)
        ends = np.cumsum(lengths)
        starts = ends - lengths
        feats = torch.empty(int(lengths.sum()), corpus.dim)
        rows = feats.numpy()  # the same memory: a matrix is read and cast into place
        for utt, lo, hi in zip(utts, starts, ends, strict=True):
            rows[lo:hi] = corpus.feats[utt]
        targets = None
        if corpus.targets is not None:  # int64 (T,); empty for a CV shard without utterances
            targets = torch.zeros(0, dtype=torch.int64)
            if utts:
                targets = torch.from_numpy(np.concatenate([corpus.targets[u] for u in utts]))
        return cls(
            feats=feats,
            targets=targets,
            start=torch.from_numpy(np.repeat(starts, lengths)),
            end=torch.from_numpy(np.repeat(ends, lengths)),
            lengths=lengths,
        )

    def __len__(self) -> int:
        return len(self.feats)

    def to(self, device: torch.device) -> FrameTable:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return FrameTable(
            move(self.feats), move(self.targets), move(self.start), move(self.end), self.lengths
        )

    def splice(self, idx: torch.Tensor, context: int) -> torch.Tensor:
        """Frames ``idx`` with +-context neighbours, kept inside their utterance: (B, (2C+1)D)"""
        offsets = torch.arange(-context, context + 1, device=idx.device)
        pos = idx[:, None] + offsets[None, :]
        pos = torch.maximum(torch.minimum(pos, self.end[idx, None] - 1), self.start[idx, None])
        return self.feats[pos].reshape(len(idx), -1)

    def minibatch(self, idx: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.splice(idx, context), self.targets[idx]


def moment_sums(table: FrameTable) -> torch.Tensor:
    """[count, sum(x), sum(x^2)] per dimension in float64: summable across workers exactly."""
    x = table.feats.double()
    count = torch.full((1, x.shape[1]), float(len(x)), dtype=torch.float64)
    return torch.cat([count, x.sum(0, keepdim=True), (x * x).sum(0, keepdim=True)])


def mean_std(sums: torch.Tensor, floor: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Global mean and standard deviation from summed ``moment_sums``."""
    count, s1, s2 = sums
    mean = s1 / count
    var = (s2 / count - mean * mean).clamp_min(floor * floor)
    return mean.float(), var.sqrt().float()


FEATURE_TRANSFORM = "splice-global-cmvn"  # its type in dbn.pt


@dataclass
class FeatureTransform:
    """Splice +-context frames, then (x - mean) * inv_std, exactly as the DNN's Normalize does.

    The statistics are per-frame ones repeated 2C+1 times (the spliced layout), so a fine-tuned
    DNN given this mean/std sees the very input the RBMs were trained on.
    """

    context: int
    mean: torch.Tensor  # ((2C+1) * D,)
    std: torch.Tensor
    frames: int  # frames the statistics were computed over

    def __post_init__(self) -> None:
        self.inv_std = 1.0 / self.std

    @property
    def spliced_dim(self) -> int:
        return self.mean.numel()

    def __call__(self, table: FrameTable, idx: torch.Tensor) -> torch.Tensor:
        return (table.splice(idx, self.context) - self.mean) * self.inv_std

    def state(self) -> dict[str, Any]:
        """Plain data for ``save_dbn`` (loads with weights_only=True)."""
        return {
            "type": FEATURE_TRANSFORM,
            "context": self.context,
            "input_dim": self.spliced_dim // (2 * self.context + 1),
            "mean": self.mean.detach().cpu().clone(),
            "std": self.std.detach().cpu().clone(),
            "frames": self.frames,
        }
