"""How far the replicas drifted apart between two averagings: ||theta_n - mean|| per worker.

Measured just before a synchronisation, it shows what averaging has to reconcile: it grows with
K and the learning rate, and a replica that runs away shows as a large maximum. It costs one extra
allreduce of the model, so the drivers measure it only at log rounds.

Example::

    dist = replica_spread(comm, models)      # (num_workers,) float64, every worker's distance
    dist.min(), dist.mean(), dist.max()
"""

from __future__ import annotations

import torch
from torch import nn

from modelavg.averaging.base import flatten
from modelavg.comm.base import Communicator


@torch.no_grad()
def replica_spread(comm: Communicator, models: list[nn.Module]) -> torch.Tensor:
    """Every worker's Euclidean distance to the mean of all replicas, in global worker order.

    Collective: every process calls it at the same point; the models are not changed.
    """
    flats = [flatten(m) for m in models]
    means = [f.clone() for f in flats]
    comm.allreduce_mean_(means)
    parts = []
    for worker, flat, mean in zip(comm.worker_ids, flats, means, strict=True):
        own = torch.zeros(comm.num_workers, dtype=torch.float64, device=flat.device)
        own[worker] = (flat - mean).double().norm()
        parts.append(own)
    return comm.sum_stats(parts)
