"""Partitioning utterances across workers and shuffling frames inside a shard (paper §2.1).

Utterances are sorted longest first and each goes to the shard with the fewest frames so far, so
shard sizes differ by at most one utterance. The shards are fixed for the whole run. Every worker
does the same number of averaging rounds per epoch, ``floor(min_shard_frames / (K * B))``, so no
worker waits for a partner that has run out of data; the frames beyond that are left over.

Example::

    shards = partition({"a": 300, "b": 200, "c": 120}, workers=2)  # [["a"], ["b", "c"]]
    rounds = rounds_per_epoch([300, 320], avg_every=10, minibatch=16)  # 1
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Mapping

import numpy as np
import torch

from modelavg.errors import UsageError


def partition(
    lengths: Mapping[str, int], workers: int, allow_empty: bool = False
) -> list[list[str]]:
    """Greedy frame-balanced split: longest utterance first, each to the lightest shard.

    Ties are broken by utterance id and shard index, so every process computes the same split.
    ``allow_empty`` permits more workers than utterances (a small CV set).
    """
    if workers > len(lengths) and not allow_empty:
        raise UsageError(f"--workers {workers}: more workers than utterances ({len(lengths)})")
    heap = [(0, w) for w in range(workers)]
    shards: list[list[str]] = [[] for _ in range(workers)]
    for utt in sorted(lengths, key=lambda u: (-lengths[u], u)):
        frames, w = heapq.heappop(heap)
        shards[w].append(utt)
        heapq.heappush(heap, (frames + lengths[utt], w))
    return shards


def rounds_per_epoch(shard_frames: list[int], avg_every: int, minibatch: int) -> int:
    """Averaging rounds every worker performs per epoch: floor(min_n frames_n / (K * B))."""
    return min(shard_frames) // (avg_every * minibatch)


def epoch_order(
    utt_lengths: np.ndarray, seed: int, epoch: int, worker: int, buffer_frames: int
) -> np.ndarray:
    """The frame visiting order of one worker's shard in one epoch.

    Utterances (stored consecutively, with ``utt_lengths`` frames each) are visited in a random
    order, and frames pass through a buffer of ``buffer_frames`` that is shuffled before it is
    emptied, like Kaldi's randomiser. Seeded by (seed, epoch, worker): a new order every epoch,
    reproducible across runs and resumes.
    """
    rng = np.random.default_rng([seed, epoch, worker])
    ends = np.cumsum(utt_lengths)
    starts = ends - utt_lengths
    perm = rng.permutation(len(utt_lengths))
    order = np.concatenate([np.arange(starts[u], ends[u]) for u in perm]) if len(perm) else ends
    for lo in range(0, len(order), buffer_frames):
        window = order[lo : lo + buffer_frames]
        order[lo : lo + buffer_frames] = window[rng.permutation(len(window))]
    return order


def minibatches(
    order: np.ndarray | torch.Tensor, minibatch: int, skip: int = 0
) -> Iterator[torch.Tensor]:
    """Consecutive full minibatches of frame indices (a trailing partial one is dropped); views
    of ``order``, so an order already on the GPU costs no copy per minibatch."""
    order = torch.as_tensor(order)
    for b in range(skip, len(order) // minibatch):
        yield order[b * minibatch : (b + 1) * minibatch]
