"""Overlapped averaging: round r's allreduce runs while round r+1 computes, applied one round late.

At sync r every replica x_n, with s_n its snapshot from sync r-1 and m the mean of those
snapshots (the allreduce started at sync r-1, waited for only now):

    x_n <- m + (x_n - s_n)     the late average, keeping the local progress made since s_n
    s_n <- x_n                 the new snapshot, in a buffer of its own
    start allreduce(s)         not waited for: the next round computes meanwhile

The first sync (of training, after a rollback, and of every epoch) has no mean to apply and only
snapshots and starts. The epoch's last sync is blocking (``settle``: wait, x_n <- m + (x_n - s_n)
= m, since x_n = s_n right after a sync), so the replicas are equal when an epoch ends: the CV
accuracy, the accepted model, final.pt and the epoch's checkpoint are the average of the
replicas, as with blocking averaging. Inside an epoch the replicas differ (mid-epoch
``--cv-every`` validates a copy of their mean); a mid-epoch checkpoint keeps each replica (= its
snapshot) in its worker's file and the started sum in the shared state, so a resume applies the
same mean and is bitwise identical (its shared ``model`` is replica 0; the global model there is
the sum / N, which a resume on another N starts from).
Costs two model copies per worker (snapshot and reduction buffer). Each replica sees the other
workers' progress one round late. ``--optimizer-state reset`` costs nothing more; ``average``
adds a blocking allreduce of the moments at every sync. The divergence guard reads replica 0
(with processes, every process's, through its poll): a NaN in another in-process replica shows
a round later, once the mean carries it.

Example::

    averager = OverlapAverager(comm)
    averager.start(models)
    ...K local steps...; averager.sync(models)     # starts round 1's allreduce, returns at once
    ...K local steps...; averager.sync(models)     # applies round 1's mean, starts round 2's
    averager.settle(models)                        # waits: every replica holds the mean
"""

from __future__ import annotations

import torch
from torch import nn

from modelavg.averaging.base import Averager, flatten, unflatten_, write_back
from modelavg.comm.base import Communicator, Pending


class OverlapAverager(Averager):
    def __init__(self, comm: Communicator) -> None:
        super().__init__(comm)
        self.pending: Pending | None = None  # the allreduce started at the last sync
        self.snapshots: list[torch.Tensor] = []  # s_n, one per local worker
        self.sums: list[torch.Tensor] = []  # the started allreduce's buffers

    def start(self, models: list[nn.Module]) -> None:
        """Fresh replicas (start, rollback, rejected epoch): nothing to apply. A reduction in
        flight is waited for first, since its buffers are reused."""
        if self.pending is not None:
            self.pending.wait()
        self.pending = None

    def _apply(self, flats: list[torch.Tensor]) -> None:
        """x_n <- m + (x_n - s_n) with the started allreduce's mean m, if one was started."""
        if self.pending is None:
            return
        self.pending.wait()
        for x, s, total in zip(flats, self.snapshots, self.sums, strict=True):
            x.sub_(s).add_(total.div_(self.comm.num_workers))
        self.pending = None

    def _sync(self, flats: list[torch.Tensor]) -> None:
        self._apply(flats)
        if not self.snapshots:
            self.snapshots = [x.clone() for x in flats]
            self.sums = [x.clone() for x in flats]
        for x, s, total in zip(flats, self.snapshots, self.sums, strict=True):
            s.copy_(x)
            total.copy_(x)
        self.pending = self.comm.allreduce_sum_async_(self.sums)

    @torch.no_grad()
    def settle(self, models: list[nn.Module]) -> None:
        """Wait for the started allreduce and apply it: right after a sync every replica is then
        the mean of all replicas (blocking averaging's model)."""
        flats = [flatten(m) for m in models]
        self._apply(flats)
        write_back(flats, models)

    def state_dict(self) -> dict:
        """The started sum (waited for: the same numbers the next sync would apply); global."""
        if self.pending is not None:
            self.pending.wait()
        started = self.pending is not None
        return {**super().state_dict(), "sum": self.sums[0].clone() if started else None}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.start([])
        if state["sum"] is not None:
            self.sums = [state["sum"].clone() for _ in range(self.comm.local_workers)]
            self.snapshots = [torch.empty_like(state["sum"]) for _ in self.sums]
            self.pending = Pending()  # done: the sum is here

    def worker_state(self, i: int) -> dict:
        """Local worker ``i``'s snapshot (between rounds, its replica), when a sum is started."""
        return {"snapshot": self.snapshots[i].clone()} if self.pending is not None else {}

    @torch.no_grad()
    def load_worker_state(self, i: int, model: nn.Module, state: dict) -> None:
        """After ``load_state_dict``: the replica and its snapshot, as the checkpoint left them."""
        if "snapshot" in state:
            self.snapshots[i].copy_(state["snapshot"])
            unflatten_(self.snapshots[i], model)

    @torch.no_grad()
    def load_resized_state(self, state: dict, models: list[nn.Module], workers_before: int) -> str:
        """Another N: every replica restarts from the checkpoint's global model, the mean of
        its replicas (the started sum / the old N), with nothing in flight."""
        self.syncs = state["syncs"]
        if state["sum"] is not None:
            for model in models:
                unflatten_(state["sum"] / workers_before, model)
        self.start(models)
        return "restarted"
