"""Averaging in a narrower dtype (``--avg-dtype bf16|fp16``): half the bytes per allreduce.

Every buffer is rounded to the dtype, the reduction (or butterfly exchange) runs in it (the local
fold of in-process workers too, so N in-process workers compute what N processes do), and the
result is written back into the buffer, which keeps its own dtype: the replicas stay fp32,
holding the rounded average.

Example::

    averager = make_averager("model", ReducedPrecision(comm, torch.bfloat16))
"""

from __future__ import annotations

import torch

from modelavg.comm.base import Communicator, Pending
from modelavg.precision import AVG_DTYPES


class ReducedPrecision(Communicator):
    """``comm`` with its reductions carried out in ``dtype``."""

    def __init__(self, comm: Communicator, dtype: torch.dtype) -> None:
        self.inner, self.dtype = comm, dtype
        self.process_rank, self.num_processes = comm.process_rank, comm.num_processes
        self.local_workers, self.device = comm.local_workers, comm.device

    def _allreduce_sum_(self, tensor: torch.Tensor) -> None:
        self.inner._allreduce_sum_(tensor)

    def allreduce_sum_async_(self, buffers: list[torch.Tensor]) -> Pending:
        narrow = [b.to(self.dtype) for b in buffers]
        pending = self.inner.allreduce_sum_async_(narrow)

        def finish() -> None:
            pending.wait()
            for b, n in zip(buffers, narrow, strict=True):
                b.copy_(n)

        return Pending(finish)

    def exchange_mean_(self, buffers: list[torch.Tensor], distance: int) -> None:
        narrow = [b.to(self.dtype) for b in buffers]
        self.inner.exchange_mean_(narrow, distance)
        for b, n in zip(buffers, narrow, strict=True):
            b.copy_(n)

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> None:
        self.inner.broadcast_(tensor, src)

    def barrier(self) -> None:
        self.inner.barrier()

    def split(self, processes: int) -> Communicator:
        return ReducedPrecision(self.inner.split(processes), self.dtype)


def reduced_precision(comm: Communicator, avg_dtype: str) -> Communicator:
    """``comm`` itself for fp32, else the wrapper."""
    dtype = AVG_DTYPES[avg_dtype]
    return comm if dtype == torch.float32 else ReducedPrecision(comm, dtype)
