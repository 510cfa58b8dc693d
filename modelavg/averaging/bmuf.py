"""Blockwise model-update filtering (BMUF; Chen & Huo, ICASSP 2016) as an averager.

With W the global model after the previous block, S the point the replicas started this block
from and G = mean_n(theta_n) - S the averaged block update (Chen & Huo's eqs.):

    Delta <- block_momentum * Delta + block_lr * G
    W     <- W + Delta
    S     <- W + block_momentum * Delta  (Nesterov, default)
          or W                          (classical)

G is measured from S, not W: measured from W it would count the look-ahead block_momentum *
Delta a second time, and the momentum would never decay (it grows for block_momentum > 0.5).

block_momentum defaults to 1 - 1/N (CNTK's recommendation). With block_momentum = 0 and
block_lr = 1 this is plain model averaging. W and Delta are saved with checkpoints, and kept
when a run resumes on another number of workers (they are global, not per worker).

Example::

    averager = BlockMomentumAverager(comm, block_momentum=0.75)
"""

from __future__ import annotations

import torch
from torch import nn

from modelavg.averaging.base import Averager, flatten, unflatten_
from modelavg.comm.base import Communicator


class BlockMomentumAverager(Averager):
    def __init__(
        self,
        comm: Communicator,
        block_momentum: float | None = None,
        block_lr: float = 1.0,
        nesterov: bool = True,
    ) -> None:
        super().__init__(comm)
        n = comm.num_workers
        self.block_momentum = (1.0 - 1.0 / n) if block_momentum is None else block_momentum
        self.block_lr = block_lr
        self.nesterov = nesterov
        self.global_model: torch.Tensor | None = None
        self.delta: torch.Tensor | None = None

    def start(self, models: list[nn.Module]) -> None:
        with torch.no_grad():
            self.global_model = flatten(models[0]).clone()
        self.delta = torch.zeros_like(self.global_model)

    def _sync(self, flats: list[torch.Tensor]) -> None:
        if self.global_model is None:
            raise RuntimeError("BlockMomentumAverager.start() must be called before sync()")
        self.comm.allreduce_mean_(flats)
        update = flats[0] - self._start_point()
        self.delta.mul_(self.block_momentum).add_(update, alpha=self.block_lr)
        self.global_model.add_(self.delta)
        start = self._start_point()
        for flat in flats:
            flat.copy_(start)

    def _start_point(self) -> torch.Tensor:
        """Where the replicas start a block: W, or W + block_momentum * Delta (Nesterov)."""
        if self.nesterov:
            return self.global_model + self.block_momentum * self.delta
        return self.global_model

    def state_dict(self) -> dict:
        return {**super().state_dict(), "global_model": self.global_model, "delta": self.delta}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.global_model, self.delta = state["global_model"], state["delta"]

    @torch.no_grad()
    def load_resized_state(self, state: dict, models: list[nn.Module], workers_before: int) -> str:
        """W and Delta are global, so they carry over to another N; the replicas restart from
        the start point under this N's block momentum (1 - 1/N by default)."""
        self.load_state_dict(state)
        start = self._start_point()
        for model in models:
            unflatten_(start, model)
        return "kept"
