"""Butterfly mixing (the paper's drafts, cut from the final version): pairs instead of allreduce.

At sync r every worker n averages with one partner only, the worker whose id differs in bit
b = r mod log2 N:

    theta_n <- (theta_n + theta_{n XOR 2^b}) / 2

One exchange of the model per sync instead of a ring allreduce's two (reduce-scatter +
allgather): half the bytes and one message latency instead of 2 (N - 1). log2 N consecutive
syncs with no steps between would give every worker the exact mean (the hypercube allreduce);
with K local steps between them each replica only mixes in the others gradually, which is why
the drafts found it converged worse at 16 and 32 GPUs (Hub5'00 SWB WER 15.6 / 16.0 against
allreduce's 15.1 / 15.2). N must be a power of 2.

The epoch's last sync is followed by one allreduce (``settle``), so the replicas are equal when
an epoch ends: CV, the accepted model, final.pt and the epoch's checkpoint are the average, as
with every other algorithm. Inside an epoch the replicas differ: a mid-epoch checkpoint keeps
each replica in its worker's file (a resume is bitwise identical), mid-epoch ``--cv-every``
validates a copy of their mean, and a resume on another N mid-epoch starts every replica from
worker 0's.
The drafts also forced the first epoch to allreduce; ``--avg-warmup`` (K = 1 allreduce for the
given frames or epochs, then butterfly) is the nearest option.

Example::

    averager = ButterflyAverager(comm)              # N = 8: partners at distance 1, 2, 4, 1, ...
    ...K local steps...; averager.sync(models)      # each replica: the mean of its pair
    averager.settle(models)                         # the epoch's end: every replica the mean
"""

from __future__ import annotations

import torch
from torch import nn

from modelavg.averaging.base import Averager, flatten, unflatten_, write_back
from modelavg.comm.base import Communicator
from modelavg.errors import UsageError


class ButterflyAverager(Averager):
    def __init__(self, comm: Communicator) -> None:
        super().__init__(comm)
        n = comm.num_workers
        if n & (n - 1):
            raise UsageError(f"--averaging butterfly needs a power-of-2 number of workers, not {n}")
        self.bits = n.bit_length() - 1  # log2 N partners, visited in turn
        self.replicas: list[torch.Tensor] = []  # the replicas as the last sync left them
        self.mixed = False  # replicas differ (a sync since the last settle or start)
        self.last_distance = 0  # the last sync's partner distance (0: none yet, or N = 1)

    def partner_distance(self) -> int:
        """2^(r mod log2 N) for the coming sync r (0-based)."""
        return 1 << (self.syncs % self.bits)

    def start(self, models: list[nn.Module]) -> None:
        """Fresh, equal replicas (start, rollback, after a warm-up sync)."""
        self.mixed = False

    def _sync(self, flats: list[torch.Tensor]) -> None:
        self.last_distance = self.partner_distance() if self.bits else 0
        self.average_like_(flats)
        self.replicas, self.mixed = flats, self.bits > 0

    def average_like_(self, buffers: list[torch.Tensor]) -> None:
        """Over the last sync's pairs (``--optimizer-state average``: the moments too)."""
        if self.last_distance:
            self.comm.exchange_mean_(buffers, self.last_distance)

    @torch.no_grad()
    def settle(self, models: list[nn.Module]) -> None:
        """One allreduce: every replica the mean of all (the model an epoch ends with)."""
        flats = [flatten(m) for m in models]
        self.comm.allreduce_mean_(flats)
        write_back(flats, models)
        self.mixed = False

    def worker_state(self, i: int) -> dict:
        """Mid-epoch, local worker ``i``'s replica (the checkpoint's shared model is replica 0)."""
        return {"replica": self.replicas[i].clone()} if self.mixed else {}

    @torch.no_grad()
    def load_worker_state(self, i: int, model: nn.Module, state: dict) -> None:
        if "replica" in state:
            unflatten_(state["replica"], model)
            self.mixed = True
