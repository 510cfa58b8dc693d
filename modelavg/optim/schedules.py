"""Learning-rate schedules as small pure functions of the epoch and the CV history.

Each schedule is a frozen dataclass: ``lr`` for the next epoch and ``after_epoch(cv_loss)``
returning the next state plus whether the epoch is accepted and whether to stop. The trainer keeps
the state; checkpoints save it with ``asdict``.

Example::

    s = Newbob(lr=0.5, best_loss=initial_cv_loss)
    s, accepted, stop = s.after_epoch(cv_loss)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from modelavg.errors import UsageError


def exponential_lr(epoch: int, lr0: float, final_ratio: float, epochs: int) -> float:
    """lr_e = lr0 * final_ratio ** ((e - 1) / (E - 1)) for epoch e = 1..E (paper section 2.5).

    With final_ratio 0.01 and E = 15 each epoch multiplies the lr by 0.01 ** (1/14) ~ 0.72.
    """
    if epochs <= 1:
        return lr0
    return lr0 * final_ratio ** ((epoch - 1) / (epochs - 1))


def worker_lr_factor(cfg: Any, workers: int, rounds_done: int, ramp_rounds: int) -> float:
    """The factor on ``--lr``: N with linear scaling (paper section 2.4), 1 without.

    With a ramp (``--lr-warmup``, Goyal et al. 2017's gradual warm-up) the factor grows linearly
    from 1 to N over the first ``ramp_rounds`` averaging rounds: 1 + (N - 1) min(1, r / R), with
    r the rounds done before the one about to run. Large N x lr early, when the model changes
    fastest, is where averaged replicas diverge.
    """
    if cfg.lr_scaling != "linear":
        if ramp_rounds:
            raise UsageError("--lr-warmup ramps the linear scaling: it needs --lr-scaling linear")
        return 1.0
    if not ramp_rounds:
        return float(workers)
    return 1 + (workers - 1) * min(1.0, rounds_done / ramp_rounds)


def relative_improvement(previous: float, new: float) -> float:
    """(L_prev - L_new) / L_prev: Newbob's criterion on the CV cross-entropy."""
    return (previous - new) / previous if previous not in (0.0, math.inf) else math.inf


@dataclass(frozen=True)
class Constant:
    lr: float
    epochs: int
    epoch: int = 1  # the epoch about to run

    def after_epoch(self, cv_loss: float) -> tuple[Constant, bool, bool]:
        return replace(self, epoch=self.epoch + 1), True, self.epoch >= self.epochs


@dataclass(frozen=True)
class Exponential:
    """lr0 -> lr0 * final_ratio over ``epochs`` epochs; every epoch accepted."""

    lr0: float
    epochs: int
    final_ratio: float = 0.01
    epoch: int = 1

    @property
    def lr(self) -> float:
        return exponential_lr(self.epoch, self.lr0, self.final_ratio, self.epochs)

    def after_epoch(self, cv_loss: float) -> tuple[Exponential, bool, bool]:
        return replace(self, epoch=self.epoch + 1), True, self.epoch >= self.epochs


@dataclass(frozen=True)
class Newbob:
    """Kaldi nnet1's Newbob on the relative CV cross-entropy improvement.

    An epoch that does not lower the CV loss is rejected (training continues from the previous
    model). Once the improvement falls below ``start_halving`` the lr is halved after every epoch;
    once halving and the improvement falls below ``end_halving``, training stops. Also stops after
    ``epochs`` epochs.
    """

    lr: float
    epochs: int
    best_loss: float = math.inf
    start_halving: float = 0.01
    end_halving: float = 0.001
    halving_factor: float = 0.5
    halving: bool = False
    epoch: int = 1

    def after_epoch(self, cv_loss: float) -> tuple[Newbob, bool, bool]:
        accepted = cv_loss < self.best_loss
        impr = relative_improvement(self.best_loss, cv_loss)
        stop = (self.halving and impr < self.end_halving) or self.epoch >= self.epochs
        halving = self.halving or impr < self.start_halving
        state = replace(
            self,
            best_loss=cv_loss if accepted else self.best_loss,
            halving=halving,
            lr=self.lr * self.halving_factor if halving else self.lr,
            epoch=self.epoch + 1,
        )
        return state, accepted, stop


Schedule = Constant | Exponential | Newbob
SCHEDULES = {"constant": Constant, "exponential": Exponential, "newbob": Newbob}


def make_schedule(cfg: Any) -> Schedule:
    """The schedule a ``TrainConfig`` names, with its options."""
    if cfg.schedule == "exponential":
        return SCHEDULES["exponential"](
            lr0=cfg.lr, epochs=cfg.epochs, final_ratio=cfg.final_lr_ratio
        )
    if cfg.schedule == "newbob":
        return SCHEDULES["newbob"](
            lr=cfg.lr,
            epochs=cfg.epochs,
            start_halving=cfg.newbob_start,
            end_halving=cfg.newbob_end,
            halving_factor=cfg.halving_factor,
        )
    return SCHEDULES["constant"](lr=cfg.lr, epochs=cfg.epochs)
