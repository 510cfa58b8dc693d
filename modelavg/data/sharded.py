"""A corpus split into one shard per worker, and the input statistics of all shards together.

Every process reads the same utterance lists and computes the same partition (``partition``), then
keeps only its own workers' shards; the statistics are summed over every worker's shard, so all
processes (and every communicator) get the same values. Fine-tuning and pretraining share this.

Example::

    shards = shard_corpus(corpus, comm.num_workers, comm.worker_ids, avg_every=10, minibatch=256)
    mean, std = global_mean_std(comm, shards.tables)       # per frame; a collective
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modelavg.comm.base import Communicator
from modelavg.data.frames import FrameTable, mean_std, moment_sums
from modelavg.data.kaldi import Corpus
from modelavg.data.shards import partition, rounds_per_epoch
from modelavg.errors import Infeasible


@dataclass
class Shards:
    tables: list[FrameTable]  # this process's workers' shards (CPU)
    shard_frames: list[int]  # every worker's, in global worker order
    rounds: int  # averaging rounds per epoch, the same for every worker


def shard_corpus(
    corpus: Corpus, num_workers: int, worker_ids: list[int], avg_every: int, minibatch: int
) -> Shards:
    """Frame-balanced shards (paper §2.1); refuses K x minibatch larger than the smallest one."""
    shards = partition(corpus.lengths, num_workers)
    shard_frames = [sum(corpus.lengths[u] for u in s) for s in shards]
    rounds = rounds_per_epoch(shard_frames, avg_every, minibatch)
    if rounds == 0:
        raise Infeasible(
            f"--avg-every {avg_every} x --minibatch {minibatch} frames exceeds the smallest "
            f"shard ({min(shard_frames)} frames with {num_workers} workers): lower one of them "
            "or --workers"
        )
    tables = [FrameTable.from_corpus(corpus, shards[w]) for w in worker_ids]
    return Shards(tables, shard_frames, rounds)


def global_mean_std(
    comm: Communicator, tables: list[FrameTable]
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-frame mean and std over every worker's shard (float64 sums), and the frame count."""
    sums = comm.sum_stats([moment_sums(t).to(comm.device) for t in tables]).cpu()
    mean, std = mean_std(sums)
    return mean, std, int(sums[0, 0])
