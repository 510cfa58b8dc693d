"""Groups of consecutive workers as communicators: the inner level of two-level averaging.

Workers are grouped by global id, G at a time (0..G-1, G..2G-1, ...). A group that fits inside
one process (in-process workers) is reduced locally; a group spanning processes uses a process
subgroup of the backend (``Communicator.split``: gloo/NCCL ``new_group``, MPI ``Split``).

Example::

    inner = group_communicator(comm, 4)       # 16 workers -> 4 groups of 4
    inner.allreduce_mean_(flats)              # each buffer: the mean over its own group
"""

from __future__ import annotations

import torch

from modelavg.comm.base import Communicator, Pending
from modelavg.errors import UsageError


class LocalGroups(Communicator):
    """Groups of ``size`` of this process's workers; no cross-process traffic."""

    def __init__(self, comm: Communicator, size: int) -> None:
        self.local_workers, self.size, self.device = comm.local_workers, size, comm.device

    @property
    def num_workers(self) -> int:
        return self.size

    def _allreduce_sum_(self, tensor: torch.Tensor) -> None:
        raise AssertionError("local groups never reduce across processes")

    def allreduce_sum_async_(self, buffers: list[torch.Tensor]) -> Pending:
        """Each buffer becomes the sum over its group (summed in worker order, as a process
        group would), at once."""
        for first in range(0, len(buffers), self.size):
            group = buffers[first : first + self.size]
            total = group[0].clone()
            for b in group[1:]:
                total.add_(b)
            for b in group:
                b.copy_(total)
        return Pending()


def group_communicator(comm: Communicator, size: int) -> Communicator:
    """The communicator of this process's group(s) of ``size`` workers (collective: with process
    subgroups every process creates every group)."""
    if comm.num_workers % size:
        raise UsageError(f"--group-size {size} must divide the {comm.num_workers} workers")
    if size == comm.num_workers:
        return comm
    if comm.local_workers % size == 0:
        return LocalGroups(comm, size)
    if size % comm.local_workers == 0:
        return comm.split(size // comm.local_workers)
    raise UsageError(
        f"--group-size {size}: a group must hold whole processes of {comm.local_workers} workers"
    )
