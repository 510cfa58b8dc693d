"""What happens to the local optimisers' state at a sync: ``--optimizer-state``.

After averaging the models, the optimisers still carry moments built on their own replica's
trajectory (PyTorch RFC #59699 blames them for accuracy lost to parameter averaging):

- ``local``: keep them (the paper; no wrapper);
- ``average``: replace each moment by its mean over the same workers the models were averaged
  over: m_n <- (1/N) sum_k m_k for SGD's momentum buffer and Adam's exp_avg and exp_avg_sq
  (fairseq BMUF's --average-sync; one more allreduce of the moment buffers; under butterfly
  mixing the mean of the same pair, ``Averager.average_like_``);
- ``reset``: drop them, as CNTK's reset_sgd_momentum_after_aggregation does; the next step
  starts them afresh (SGD: buf = g; Adam: step 0, so bias correction restarts).

NG-SGD's Fisher estimates are not moments and stay local (Kaldi keeps them per job).

Example::

    averager = OptimizerStateSync(ModelAverager(comm), [w.optimizer for w in workers], "average")
    averager.sync(models)            # models and momentum buffers now hold their means
"""

from __future__ import annotations

import torch
from torch import nn

from modelavg.averaging.base import Averager

POLICIES = ("local", "average", "reset")
MOMENTS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def moments(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimiser's moment tensors in parameter order (the same order on every worker)."""
    return [
        optimizer.state[p][key]
        for group in optimizer.param_groups
        for p in group["params"]
        for key in MOMENTS
        if key in optimizer.state.get(p, {})
    ]


def reset_moments_(optimizer: torch.optim.Optimizer) -> None:
    """Drop the moments; a state left with only Adam's step counter is cleared whole."""
    for state in optimizer.state.values():
        for key in MOMENTS:
            state.pop(key, None)
        if set(state) <= {"step"}:
            state.clear()


class OptimizerStateSync(Averager):
    """``averager``, then the optimisers' moments averaged over its workers, or reset."""

    def __init__(
        self, averager: Averager, optimizers: list[torch.optim.Optimizer], policy: str
    ) -> None:
        super().__init__(averager.comm)
        if policy not in ("average", "reset"):
            raise ValueError(f"optimizer-state policy {policy!r}: average or reset")
        self.averager, self.optimizers, self.policy = averager, optimizers, policy

    def _sync(self, flats: list[torch.Tensor]) -> None:
        raise AssertionError("OptimizerStateSync.sync delegates to the wrapped averager")

    @torch.no_grad()
    def sync(self, models: list[nn.Module]) -> None:
        self.averager.sync(models)
        if self.policy == "reset":
            for optimizer in self.optimizers:
                reset_moments_(optimizer)
            return
        per_worker = [moments(o) for o in self.optimizers]
        if not per_worker[0]:
            return
        flats = [torch.cat([m.reshape(-1) for m in ms]) for ms in per_worker]
        self.averager.average_like_(flats)
        for flat, ms in zip(flats, per_worker, strict=True):
            offset = 0
            for m in ms:
                m.copy_(flat[offset : offset + m.numel()].view_as(m))
                offset += m.numel()
