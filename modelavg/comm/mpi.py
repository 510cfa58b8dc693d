"""MPI through mpi4py, as in the paper: one in-place Allreduce(SUM) on the flat buffer.

CUDA tensors go to MPI directly when the MPI library reports CUDA support; otherwise they are
staged through host memory (GPU -> host -> MPI -> host -> GPU), as the paper's non-CUDA-aware
OpenMPI did.

Example::

    comm = MPICommunicator()  # under mpirun -np 4
"""

from __future__ import annotations

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
        self.cuda_aware = self.device.type == "cuda" and _cuda_aware(self.MPI)

    def _buffer(self, tensor: torch.Tensor):
        if tensor.device.type == "cpu":
            return tensor.numpy(), None
        if self.cuda_aware:
            return tensor, None
        host = tensor.cpu()
        return host.numpy(), host

    def _allreduce_sum_(self, tensor: torch.Tensor) -> None:
        buf, host = self._buffer(tensor)
        if tensor.device.type == "cuda":
            torch.cuda.synchronize(tensor.device)
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        if host is not None:
            tensor.copy_(host)

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> None:
        buf, host = self._buffer(tensor)
        self.comm.Bcast(buf, root=src)
        if host is not None:
            tensor.copy_(host)

    def barrier(self) -> None:
        self.comm.Barrier()

    def split(self, processes: int) -> Communicator:
        block = self.comm.Split(color=self.process_rank // processes, key=self.process_rank)
        return MPICommunicator(self.device, block)
