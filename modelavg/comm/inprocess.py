"""N logical workers in one process: the same averaging arithmetic, no process group.

This is how N = 16 ... 64 workers are studied on a small machine: the trainer steps each replica
in turn and the reduction sums the N local buffers exactly as an allreduce would.

Example::

    comm = InProcessCommunicator(workers=16)
"""

from __future__ import annotations

import torch

from modelavg.comm.base import Communicator


class InProcessCommunicator(Communicator):
    def __init__(self, workers: int, device: torch.device | str = "cpu") -> None:
        self.local_workers = workers
        self.device = torch.device(device)

    def _allreduce_sum_(self, tensor: torch.Tensor) -> None:
        raise AssertionError("a single process never reduces across processes")
