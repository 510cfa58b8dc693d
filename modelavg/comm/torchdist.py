"""torch.distributed process groups: gloo on CPU, NCCL on GPU (one GPU per process).

Rendezvous is ``env://`` (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), which torchrun sets and
``modelavg.launch`` sets for mpirun, srun and local spawning.

Example::

    comm = TorchDistCommunicator(rank=0, world_size=2, backend="gloo")
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from modelavg.comm.base import Communicator


class TorchDistCommunicator(Communicator):
    def __init__(
        self,
        rank: int,
        world_size: int,
        backend: str = "gloo",
        device: torch.device | str = "cpu",
        timeout_s: float = 300.0,
    ) -> None:
        self.process_rank = rank
        self.num_processes = world_size
        self.device = torch.device(device)
        if not dist.is_initialized():
            dist.init_process_group(
                backend,
                init_method="env://",
                rank=rank,
                world_size=world_size,
                timeout=timedelta(seconds=timeout_s),
            )
        self.backend = dist.get_backend()

    def _allreduce_sum_(self, tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> None:
        dist.broadcast(tensor, src=src)

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
