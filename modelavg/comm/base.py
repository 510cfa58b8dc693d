"""The one interface through which replicas talk: sum or average flat buffers across all workers.

A communicator hosts ``local_workers`` logical workers in this process (one for a real process
group, N for the in-process simulator) and joins ``num_processes`` processes. The global worker
count is their product; global worker ids are ``process_rank * local_workers + i``.

Every reduction is "sum the local buffers, sum across processes, (scale)", so N logical workers in
one process and N processes with one worker each do the same arithmetic. A reduction may also be
started and waited for later (``allreduce_sum_async_``), so that computation overlaps it; a
backend without non-blocking collectives (and one process, which has nothing to wait for) just
finishes it at once. Butterfly mixing needs one point-to-point primitive beside them: every worker
averages with the one partner whose id differs in one bit (``exchange_mean_``).

Example::

    comm = InProcessCommunicator(workers=4)
    comm.allreduce_mean_([p0, p1, p2, p3])  # all four now hold the mean
    pending = comm.allreduce_sum_async_([p0, p1, p2, p3])
    ...work that does not touch p0..p3...
    pending.wait()                          # all four now hold the sum
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from modelavg.errors import Reported, UsageError


def _nothing() -> None:
    pass


class Pending:
    """A reduction in flight: once ``wait()`` returns its buffers hold the result; until then
    nobody may touch them. Waiting twice is waiting once."""

    def __init__(self, finish: Callable[[], None] = _nothing) -> None:
        self._finish = finish

    def wait(self) -> None:
        finish, self._finish = self._finish, _nothing
        finish()


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

    def _allreduce_sum_async_(self, tensor: torch.Tensor) -> Callable[[], None]:
        """Start summing ``tensor`` across processes; returns what waits for the sum. Default:
        the blocking sum, done before returning."""
        self._allreduce_sum_(tensor)
        return _nothing

    def _exchange_(self, send: torch.Tensor, recv: torch.Tensor, peer: int) -> None:
        """Send ``send`` to process ``peer`` and receive its buffer into ``recv`` (both at once:
        each of the pair calls this with the other as ``peer``)."""
        raise UsageError(f"{type(self).__name__} has no point-to-point exchange")

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
        self.allreduce_sum_async_(buffers).wait()

    def allreduce_sum_async_(self, buffers: list[torch.Tensor]) -> Pending:
        """``allreduce_sum_``, started: the buffers hold the sum once the result's ``wait()``
        returns (collective: every process starts its reductions in the same order)."""
        if len(buffers) != self.local_workers:
            raise ValueError(f"expected {self.local_workers} buffers, got {len(buffers)}")
        total = buffers[0]
        if len(buffers) > 1:
            total = buffers[0].clone()
            for b in buffers[1:]:
                total.add_(b)
        across = self._allreduce_sum_async_(total) if self.num_processes > 1 else _nothing

        def finish() -> None:
            across()
            for b in buffers:
                if b is not total:
                    b.copy_(total)

        return Pending(finish)

    def allreduce_mean_(self, buffers: list[torch.Tensor]) -> None:
        """Make each local buffer the mean over all workers: one allreduce, then scale by 1/N."""
        self.allreduce_sum_(buffers)
        for b in buffers:
            b.div_(self.num_workers)

    def exchange_mean_(self, buffers: list[torch.Tensor], distance: int) -> None:
        """Make each local buffer the mean of itself and that of worker ``id XOR distance`` (a
        power of 2 below N, which is a power of 2): in-process pairs are averaged here, a partner
        in another process is reached with one exchange per buffer. Both halves of a pair compute
        (a + b) / 2 with the same two numbers, so they stay bitwise equal."""
        if len(buffers) != self.local_workers:
            raise ValueError(f"expected {self.local_workers} buffers, got {len(buffers)}")
        if distance < self.local_workers:
            for i, a in enumerate(buffers):
                if i < i ^ distance:
                    b = buffers[i ^ distance]
                    a.add_(b).mul_(0.5)
                    b.copy_(a)
            return
        peer = self.process_rank ^ (distance // self.local_workers)
        received = self._receive_buffer(buffers[0])
        for a in buffers:
            self._exchange_(a, received, peer)
            a.add_(received).mul_(0.5)

    def _receive_buffer(self, like: torch.Tensor) -> torch.Tensor:
        """A receive buffer shaped like ``like``, allocated once and reused by every exchange
        (a model-sized allocation per sync would cost about what the exchange does)."""
        cached = getattr(self, "_received", None)
        if cached is None or (cached.shape, cached.dtype, cached.device) != (
            like.shape,
            like.dtype,
            like.device,
        ):
            self._received = torch.empty_like(like)
        return self._received

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
