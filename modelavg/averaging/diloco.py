"""DiLoCo (Douillard et al. 2023): an outer optimiser on the averaged pseudo-gradient.

With W the global model the replicas started this block from:

    g = W - mean_n(theta_n)                        (the pseudo-gradient)
    torch.optim.SGD(lr=outer_lr, momentum=mu, nesterov=True) steps W with W.grad = g:
        b <- mu * b + g,   W <- W - outer_lr * (g + mu * b)

and every replica restarts from W. This is Nesterov BMUF written as an optimiser: with
block_lr = outer_lr and block_momentum = mu, BMUF's start point S = W_bmuf + mu * Delta follows
exactly DiLoCo's W (S' - S = block_lr * (G + mu * D), D = Delta / block_lr = -b, G = -g), so
the replicas see the same models (tests/test_averaging.py checks it). What DiLoCo adds is
the optimiser as a plug-in: any torch.optim rule can be the outer step. W and the optimiser's
state are saved with checkpoints.

Example::

    averager = DiLoCoAverager(comm, outer_lr=0.7, outer_momentum=0.9)
    averager.start(models)
    ...H local AdamW steps...
    averager.sync(models)
"""

from __future__ import annotations

import torch
from torch import nn

from modelavg.averaging.base import Averager, flatten
from modelavg.comm.base import Communicator


class DiLoCoAverager(Averager):
    def __init__(
        self, comm: Communicator, outer_lr: float = 0.7, outer_momentum: float = 0.9
    ) -> None:
        super().__init__(comm)
        self.outer_lr, self.outer_momentum = outer_lr, outer_momentum
        self.global_model: torch.Tensor | None = None
        self.outer: torch.optim.SGD | None = None

    def start(self, models: list[nn.Module]) -> None:
        with torch.no_grad():
            self._set_global(flatten(models[0]).clone())

    def _set_global(self, flat: torch.Tensor) -> None:
        self.global_model = nn.Parameter(flat, requires_grad=False)
        self.outer = torch.optim.SGD(
            [self.global_model],
            lr=self.outer_lr,
            momentum=self.outer_momentum,
            nesterov=self.outer_momentum > 0,
        )

    def _sync(self, flats: list[torch.Tensor]) -> None:
        if self.global_model is None:
            raise RuntimeError("DiLoCoAverager.start() must be called before sync()")
        self.comm.allreduce_mean_(flats)
        self.global_model.grad = self.global_model.detach() - flats[0]
        self.outer.step()
        self.global_model.grad = None
        for flat in flats:
            flat.copy_(self.global_model)

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "global_model": self.global_model.detach(),
            "outer": self.outer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._set_global(state["global_model"].clone())
        self.outer.load_state_dict(state["outer"])

    def load_resized_state(self, state: dict, models: list[nn.Module], workers_before: int) -> str:
        """W and the outer momentum are global: another N keeps them (the replicas hold W)."""
        self.load_state_dict(state)
        return "kept"
