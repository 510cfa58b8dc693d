"""MPI through mpi4py, as in the paper: one in-place Allreduce(SUM) on the flat buffer.

CUDA tensors go to MPI directly when the MPI library reports CUDA support (or
``MODELAVG_MPI_CUDA_AWARE=1`` says so; ``0`` forces staging); otherwise they are staged through a
reused pinned host buffer (GPU -> host -> MPI -> host -> GPU), as the paper's non-CUDA-aware
OpenMPI did. Either way the stream is synchronised first: MPI reads memory now, not in stream
order. A started reduction (``Iallreduce``) stages through a host buffer of its own, which it
holds until the wait; an MPI library without a progress thread advances it only inside MPI
calls, so how much of it overlaps computation depends on the library.

Example::

    comm = MPICommunicator()  # under mpirun -np 4
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from modelavg.comm.base import Communicator
from modelavg.errors import UsageError


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError:
        raise UsageError(
            "--backend mpi needs mpi4py: apt-get install -y openmpi-bin libopenmpi-dev && "
            "pip install mpi4py"
        ) from None
    return MPI


def _cuda_aware(mpi) -> bool:
    forced = os.environ.get("MODELAVG_MPI_CUDA_AWARE")
    if forced in ("0", "1"):
        return forced == "1"
    query = getattr(mpi, "Query_cuda_support", None)
    try:
        return bool(query()) if query else False
    except Exception:
        return False


class MPICommunicator(Communicator):
    def __init__(self, device: torch.device | str = "cpu", comm=None) -> None:  # noqa: ANN001
        self.MPI = _mpi()
        self.comm = self.MPI.COMM_WORLD if comm is None else comm
        self.process_rank = self.comm.Get_rank()
        self.num_processes = self.comm.Get_size()
        self.device = torch.device(device)
        self.cuda_aware = self.device.type != "cpu" and _cuda_aware(self.MPI)
        self._staging: dict[tuple, torch.Tensor] = {}

    def _host(self, tensor: torch.Tensor, slot: str = "sync") -> torch.Tensor:
        """The pinned host buffer for tensors of this shape and dtype in ``slot`` (``sync``,
        ``async`` for the one started reduction in flight, ``recv`` for an exchange's receive),
        allocated once (a model-sized pageable allocation per averaging would cost more than the
        copy)."""
        key = (tuple(tensor.shape), tensor.dtype, slot)
        if key not in self._staging:
            pin = torch.cuda.is_available()
            self._staging[key] = torch.empty(key[0], dtype=tensor.dtype, pin_memory=pin)
        return self._staging[key]

    def _buffer(self, tensor: torch.Tensor, slot: str = "sync"):
        """(what MPI reads and writes, the host copy to write back or None)."""
        if tensor.device.type == "cpu":
            return tensor.numpy(), None
        if self.cuda_aware:
            torch.cuda.synchronize(tensor.device)  # the kernels that wrote it have finished
            return tensor, None
        host = self._host(tensor, slot)
        host.copy_(tensor, non_blocking=True)
        torch.cuda.synchronize(tensor.device)
        return host.numpy(), host

    def _allreduce_sum_(self, tensor: torch.Tensor) -> None:
        buf, host = self._buffer(tensor)
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        if host is not None:
            tensor.copy_(host, non_blocking=True)  # in stream order before the buffer's next use

    def _allreduce_sum_async_(self, tensor: torch.Tensor) -> Callable[[], None]:
        buf, host = self._buffer(tensor, "async")
        request = self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)

        def wait() -> None:
            request.Wait()
            if host is not None:
                tensor.copy_(host, non_blocking=True)

        return wait

    def _exchange_(self, send: torch.Tensor, recv: torch.Tensor, peer: int) -> None:
        out, _ = self._buffer(send)
        into, host = self._buffer(recv, "recv")
        self.comm.Sendrecv(out, dest=peer, recvbuf=into, source=peer)
        if host is not None:
            recv.copy_(host, non_blocking=True)

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> None:
        buf, host = self._buffer(tensor)
        self.comm.Bcast(buf, root=src)
        if host is not None:
            tensor.copy_(host, non_blocking=True)

    def barrier(self) -> None:
        self.comm.Barrier()

    def split(self, processes: int) -> Communicator:
        block = self.comm.Split(color=self.process_rank // processes, key=self.process_rank)
        return MPICommunicator(self.device, block)
