"""Divergence guard: a NaN or Inf after averaging rolls every worker back to the last good model.

After each averaging all replicas are identical on every process, so every process reaches the
same verdict without extra communication. A rollback restores the last good averaged model,
clears the optimiser state (momentum or NG-SGD statistics may hold the NaN), multiplies the
learning rate by ``lr_factor`` and is logged; after ``max_rollbacks`` it stops the run. A model
can be finite yet already ruined (a huge step that has not overflowed yet): when the round right
after a rollback diverges again, the next rollback goes further back, to the ``fallback`` (the
last model the schedule validated and accepted).

Example::

    guard = DivergenceGuard(max_rollbacks=3, lr_factor=0.5)
    guard.remember(models)
    ...averager.sync(models)...
    if not guard.healthy(models):
        guard.roll_back(models, optimizers)
"""

from __future__ import annotations

import torch
from torch import nn

from modelavg.averaging.base import flatten, unflatten_
from modelavg.errors import UsageError


class DivergenceGuard:
    def __init__(self, max_rollbacks: int = 3, lr_factor: float = 0.5) -> None:
        self.max_rollbacks = max_rollbacks
        self.lr_factor = lr_factor
        self.rollbacks = 0
        self.just_rolled_back = False
        self.good: torch.Tensor | None = None

    @property
    def lr_scale(self) -> float:
        """Multiplier on the scheduled learning rate after the rollbacks so far."""
        return self.lr_factor**self.rollbacks

    @torch.no_grad()
    def remember(self, models: list[nn.Module]) -> None:
        flat = flatten(models[0])  # the replica's own flat buffer when it has one: no copy
        if self.good is None or self.good.shape != flat.shape:
            self.good = flat.clone()
        else:
            self.good.copy_(flat)  # reuse the buffer: no model-sized allocation
        self.just_rolled_back = False

    @torch.no_grad()
    def healthy(self, models: list[nn.Module]) -> bool:
        return not bool(self.diverged(models))

    @torch.no_grad()
    def diverged(self, models: list[nn.Module]) -> torch.Tensor:
        """1.0 when the parameters hold a NaN/Inf, else 0.0, on their device (not read here: the
        trainer reads it with the round's other flags, one wait for the GPU per round)."""
        # a sum is NaN/Inf iff an element is (or it overflows float32: worth a rollback too)
        return (~torch.isfinite(flatten(models[0]).sum())).double()

    @torch.no_grad()
    def roll_back(
        self,
        models: list[nn.Module],
        optimizers: list[torch.optim.Optimizer],
        fallback: dict | None = None,
    ) -> None:
        self.rollbacks += 1
        if self.rollbacks > self.max_rollbacks:
            raise UsageError(
                f"training diverged (NaN/Inf parameters) {self.rollbacks} times; gave up after "
                f"--max-rollbacks {self.max_rollbacks}: lower --lr"
            )
        for model in models:
            if self.just_rolled_back and fallback is not None:
                model.load_state_dict(fallback)
            else:
                unflatten_(self.good, model)
        self.just_rolled_back = True
        for opt in optimizers:
            opt.state.clear()
            if hasattr(opt, "reset_preconditioners"):
                opt.reset_preconditioners()

    def state_dict(self) -> dict:
        return {"rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict) -> None:
        self.rollbacks = state["rollbacks"]
