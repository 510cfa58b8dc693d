"""torch.distributed process groups: gloo on CPU, NCCL on GPU (one GPU per process).

Rendezvous is ``env://`` (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), which torchrun sets and
``modelavg.launch`` sets for mpirun, srun and local spawning.

Example::

    comm = TorchDistCommunicator(rank=0, world_size=2, backend="gloo")
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from modelavg.comm.base import Communicator


def rendezvous_store(rank: int, world_size: int, timeout: timedelta) -> dist.Store:
    """The TCP store at MASTER_ADDR:MASTER_PORT, under a prefix unique to this (re)start.

    After torchrun restarts a job, the store still holds the failed attempt's gloo addresses; a
    per-attempt prefix keeps the new processes from dialling the dead ones.
    """
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    is_server = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "False") != "True"
    store = dist.TCPStore(addr, port, world_size, is_master=is_server, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"modelavg/attempt-{attempt}", store)


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
            timeout = timedelta(seconds=timeout_s)
            dist.init_process_group(
                backend,
                store=rendezvous_store(rank, world_size, timeout),
                rank=rank,
                world_size=world_size,
                timeout=timeout,
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
