"""Test doubles shared by the GPU-readiness tests."""

from __future__ import annotations

import torch

from modelavg.comm.base import Communicator


class FakePeer(Communicator):
    """Process 0 of two whose peer holds the same buffers: a reduction doubles them.

    It asserts that every collective gets a tensor on the communicator's device, which NCCL
    needs: the CPU twin of a one-GPU NCCL run with a phantom second rank.
    """

    def __init__(self, device: torch.device, local_workers: int = 1) -> None:
        self.device, self.local_workers, self.num_processes = device, local_workers, 2
        self.reduced = 0

    def _allreduce_sum_(self, tensor: torch.Tensor) -> None:
        assert tensor.device == self.device, f"collective on {tensor.device}, not {self.device}"
        tensor.mul_(2)
        self.reduced += 1

    def _exchange_(self, send: torch.Tensor, recv: torch.Tensor, peer: int) -> None:
        """The peer sends back the same buffer (butterfly mixing's exchange)."""
        assert send.device == recv.device == self.device, f"exchange on {send.device}"
        recv.copy_(send)
        self.reduced += 1

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> None:
        assert tensor.device == self.device, f"broadcast on {tensor.device}, not {self.device}"
