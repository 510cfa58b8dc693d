"""The one interface through which replicas talk: sum or average flat buffers across all workers.

A communicator hosts ``local_workers`` logical workers in this process (one for a real process
group, N for the in-process simulator) and joins ``num_processes`` processes. The global worker
count is their product; global worker ids are ``process_rank * local_workers + i``.

Every reduction is "sum the local buffers, sum across processes, (scale)", so N logical workers in
one process and N processes with one worker each do the same arithmetic.

Example::

    comm = InProcessCommunicator(workers=4)
    comm.allreduce_mean_([p0, p1, p2, p3])  # all four now hold the mean
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from modelavg.errors import Reported, UsageError


class Communicator(ABC):
    process_rank: int = 0
    num_processes: int = 1
    local_workers: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def num_workers(self) -> int:
        return self.num_processes * self.local_workers

    @property
    def worker_ids(self) -> list[int]:
        """Global ids of the workers this process hosts."""
        base = self.process_rank * self.local_workers
        return list(range(base, base + self.local_workers))

    @property
    def is_main(self) -> bool:
        return self.process_rank == 0

    @abstractmethod
    def _allreduce_sum_(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` in place across processes."""

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> None:  # noqa: B027
        """Overwrite ``tensor`` with process ``src``'s copy (no-op for a single process)."""

    def barrier(self) -> None:  # noqa: B027
        """Wait for every process."""

    def close(self) -> None:  # noqa: B027
        """Leave the process group."""

    def split(self, processes: int) -> Communicator:
        """This process's block of ``processes`` consecutive ranks as a communicator (collective:
        every process calls it, in the same order)."""
        raise UsageError(f"{type(self).__name__} has no process subgroups")

    def allreduce_sum_(self, buffers: list[torch.Tensor]) -> None:
        """Make each of the local buffers (one per local worker) the sum over all workers."""
        if len(buffers) != self.local_workers:
            raise ValueError(f"expected {self.local_workers} buffers, got {len(buffers)}")
        total = buffers[0]
        if len(buffers) > 1:
            total = buffers[0].clone()
            for b in buffers[1:]:
                total.add_(b)
        if self.num_processes > 1:
            self._allreduce_sum_(total)
        for b in buffers:
            if b is not total:
                b.copy_(total)

    def allreduce_mean_(self, buffers: list[torch.Tensor]) -> None:
        """Make each local buffer the mean over all workers: one allreduce, then scale by 1/N."""
        self.allreduce_sum_(buffers)
        for b in buffers:
            b.div_(self.num_workers)

    def sum_stats(self, per_worker: list[torch.Tensor]) -> torch.Tensor:
        """Global sum of small per-worker statistics (returns a new tensor, inputs untouched).

        Inputs are copied onto the communicator's device: NCCL reduces nothing else."""
        bufs = [t.to(self.device, copy=True) for t in per_worker]
        self.allreduce_sum_(bufs)
        return bufs[0]

    @contextmanager
    def one_voice(self) -> Iterator[None]:
        """Around collective-free work that every process does alike (reading the same data):
        a ``UsageError`` is printed by the lowest process that raised it; the others exit with
        the same code silently, so one mistake is one line, not one per worker."""
        error = None
        try:
            yield
        except UsageError as exc:
            error = exc
        if self.num_processes > 1:
            codes = torch.zeros(self.num_processes, dtype=torch.float64, device=self.device)
            codes[self.process_rank] = error.exit_code if error else 0
            self._allreduce_sum_(codes)
            failed = [(rank, int(c)) for rank, c in enumerate(codes.tolist()) if c]
            if failed and failed[0][0] != self.process_rank:
                raise Reported(failed[0][1])
        if error is not None:
            raise error
