"""When replicas synchronise inside an averaging round, and with which averager.

A *round* stays the engine's unit of data: R = ``--avg-every`` local minibatches per worker
(``--avg-every-max`` with ``auto``), so rounds per epoch, frame order, checkpoints and resume do
not depend on the schedule. A schedule splits round i into segments of local steps, each closed
by one sync; the last sync of a round is always global, so replicas are equal between rounds.

- ``FixedK``: one sync after R steps (the paper).
- ``Warmup``: K = 1 plain averaging for the first rounds (post-local SGD, Lin et al. 2020; the
  warm-up CNTK asks for before BMUF), then the wrapped schedule.
- ``TwoLevel``: plain averaging inside groups of G workers every K1 steps, the configured
  algorithm over all workers at the end of the round (K2 = R).
- ``AdaptiveK``: AdaComm (Wang & Joshi 2019): after each log window,
  K = clamp(ceil(K0 * sqrt(lr0 * F / (lr * F0))), 1, R), F the window's training loss;
  F0, lr0 those of the first window.

Example::

    schedule = Warmup(FixedK(averager, 10), rounds=120)
    for steps, averager in schedule.segments(round_index):
        ...steps local minibatches on every worker...
        averager.sync(models)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from modelavg.averaging.base import Averager
from modelavg.averaging.optstate import OptimizerStateSync
from modelavg.averaging.periodic import ModelAverager
from modelavg.comm.group import group_communicator
from modelavg.errors import UsageError

Segment = tuple[int, Averager]  # local steps, then one sync of this averager


def split(steps: int, every: int, inner: Averager, last: Averager) -> list[Segment]:
    """``steps`` local steps, a sync of ``inner`` after every ``every`` of them, and of ``last``
    at the end (a shorter final segment when ``every`` does not divide ``steps``)."""
    lengths = [every] * (steps // every) + ([steps % every] if steps % every else [])
    return [(n, inner) for n in lengths[:-1]] + [(lengths[-1], last)]


class FixedK:
    """One sync of ``averager`` after ``steps`` local steps, every round."""

    def __init__(self, averager: Averager, steps: int) -> None:
        self.averager, self.steps = averager, steps

    def segments(self, round_index: int) -> list[Segment]:
        """Round ``round_index`` (1-based, counted over the whole training run)."""
        return [(self.steps, self.averager)]

    def period(self, round_index: int) -> dict[str, int]:
        """What metrics.jsonl logs: the averaging period(s) in effect in that round."""
        return {"avg_every": self.steps}

    def observe(self, loss: float, lr: float) -> None:
        """A log window's mean training loss (equal on every process) and the lr."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class RestartingAverager(Averager):
    """Plain averaging that restarts ``algorithm`` from the mean, so that BMUF or DiLoCo begin
    after a warm-up from the warm model with no momentum (the warm-up's syncs)."""

    def __init__(self, algorithm: Averager) -> None:
        super().__init__(algorithm.comm)
        self.algorithm = algorithm

    def _sync(self, flats: list[torch.Tensor]) -> None:
        self.comm.allreduce_mean_(flats)

    def sync(self, models: list[nn.Module]) -> None:
        super().sync(models)
        self.algorithm.start(models)


class Warmup(FixedK):
    """K = 1 syncs of ``warm`` (default: plain averaging that restarts ``after``'s algorithm)
    during rounds 1..``rounds``, then ``after``'s segments."""

    def __init__(self, after: FixedK, rounds: int, warm: Averager | None = None) -> None:
        super().__init__(after.averager, after.steps)
        self.after, self.rounds = after, rounds
        self.warm = warm or RestartingAverager(after.averager)

    def segments(self, round_index: int) -> list[Segment]:
        if round_index <= self.rounds:
            return split(self.steps, 1, self.warm, self.warm)
        return self.after.segments(round_index)

    def period(self, round_index: int) -> dict[str, int]:
        warm = round_index <= self.rounds
        return {"avg_every": 1} if warm else self.after.period(round_index)

    def observe(self, loss: float, lr: float) -> None:
        self.after.observe(loss, lr)

    def state_dict(self) -> dict:
        return self.after.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.after.load_state_dict(state)


class TwoLevel(FixedK):
    """Every ``inner_every`` steps ``group`` (plain averaging inside each group of workers),
    at the end of the round ``averager`` over all workers."""

    def __init__(self, averager: Averager, steps: int, group: Averager, inner_every: int) -> None:
        super().__init__(averager, steps)
        self.group, self.inner_every = group, inner_every

    def segments(self, round_index: int) -> list[Segment]:
        return split(self.steps, self.inner_every, self.group, self.averager)

    def period(self, round_index: int) -> dict[str, int]:
        return {"avg_every": self.steps, "avg_every_inner": self.inner_every}


class AdaptiveK(FixedK):
    """AdaComm's period: K = clamp(ceil(K0 * sqrt(lr0 * F / (lr * F0))), 1, ``steps``).

    A falling loss shortens the period (a lower error floor needs more averaging), a decaying
    lr lengthens it (smaller local steps drift apart more slowly). Rounds hold ``steps`` local
    steps; the period applies inside them.
    """

    def __init__(self, averager: Averager, steps: int, k0: int) -> None:
        super().__init__(averager, steps)
        self.k0, self.k = k0, min(k0, steps)
        self.loss0: float | None = None
        self.lr0: float | None = None

    def segments(self, round_index: int) -> list[Segment]:
        return split(self.steps, self.k, self.averager, self.averager)

    def period(self, round_index: int) -> dict[str, int]:
        return {"avg_every": self.k}

    def observe(self, loss: float, lr: float) -> None:
        if not math.isfinite(loss):
            return
        if self.loss0 is None:
            self.loss0, self.lr0 = loss, lr
            return
        ratio = self.lr0 * loss / (lr * self.loss0)
        self.k = max(1, min(self.steps, math.ceil(self.k0 * math.sqrt(ratio))))

    def state_dict(self) -> dict:
        return {"k": self.k, "loss0": self.loss0, "lr0": self.lr0}

    def load_state_dict(self, state: dict) -> None:
        self.k, self.loss0, self.lr0 = state["k"], state["loss0"], state["lr0"]


def parse_warmup(spec: str | int, option: str = "--avg-warmup") -> tuple[float, str]:
    """``'2e'`` -> (2.0, 'epochs'); ``500000`` -> (500000.0, 'frames'); bad input: UsageError
    naming ``option``."""
    text = str(spec).strip()
    unit = "epochs" if text.endswith("e") else "frames"
    try:
        value = float(text[:-1] if unit == "epochs" else text)
    except ValueError:
        value = -1.0
    if not value >= 0 or (unit == "frames" and value != int(value)):
        raise UsageError(f"{option} {spec}: give frames (500000) or epochs (2e), >= 0")
    return value, unit


def warmup_parser(option: str) -> Callable[[Any], str]:
    """The config parser of a warm-up length ``option``: frames (``500000``) or epochs (``2e``)."""

    def parse(value: Any) -> str:
        parse_warmup(value, option)
        return str(value)

    return parse


def period_or_auto(value: Any) -> int | str:
    """--avg-every: a period K >= 1, or ``auto``."""
    if value == "auto":
        return value
    try:
        k = int(value)
    except (TypeError, ValueError):
        k = 0
    if k < 1 or str(k) != str(value).strip():
        raise UsageError(f"--avg-every must be >= 1 or auto, not {value}")
    return k


def warmup_rounds(spec: str | int, rounds_per_epoch: int, frames_per_round: int) -> int:
    """Rounds of warm-up: every round that starts before the given frames or epochs end."""
    value, unit = parse_warmup(spec)
    if unit == "epochs":
        return math.ceil(value * rounds_per_epoch)
    return math.ceil(value / frames_per_round)


# algorithms whose replicas differ inside an epoch (equal again at its end)
UNEQUAL_REPLICAS = {"overlap": "overlapped averaging", "butterfly": "butterfly mixing"}


def refuse_unsupported(cfg: Any, warmup_rounds: int) -> None:
    """Two-level groups need the replicas equal at a round's end; overlap also refuses what
    puts a blocking sync inside a round."""
    name = UNEQUAL_REPLICAS.get(cfg.averaging)
    if name is None:
        return
    if cfg.group_size is not None:
        raise UsageError(f"--group-size: {name} has no two-level variant")
    if cfg.averaging != "overlap":
        return
    if cfg.avg_every == "auto":
        raise UsageError("--avg-every auto: overlapped averaging needs a fixed period")
    if warmup_rounds:
        raise UsageError("--avg-warmup: overlapped averaging has no warm-up")


def build_schedule(
    cfg: Any,
    averager: Averager,
    optimizers: list[torch.optim.Optimizer],
    rounds_per_epoch: int,
    frames_per_round: int,
) -> FixedK:
    """The schedule a TrainConfig asks for (collective: two-level averaging may create process
    subgroups). ``averager`` is the configured algorithm, its syncs the global ones."""
    if (cfg.group_size is None) != (cfg.avg_every_inner is None):
        raise UsageError("--group-size and --avg-every-inner go together")

    def with_state(inner: Averager) -> Averager:
        if cfg.optimizer_state == "local":
            return inner
        return OptimizerStateSync(inner, optimizers, cfg.optimizer_state)

    warm = warmup_rounds(cfg.avg_warmup, rounds_per_epoch, frames_per_round)
    refuse_unsupported(cfg, warm)
    top = with_state(averager)
    if cfg.group_size is not None:
        if cfg.avg_every == "auto" or cfg.avg_every_inner >= cfg.round_steps:
            raise UsageError("--avg-every-inner must be below a fixed --avg-every")
        group = with_state(ModelAverager(group_communicator(averager.comm, cfg.group_size)))
        schedule = TwoLevel(top, cfg.round_steps, group, cfg.avg_every_inner)
    elif cfg.avg_every == "auto":
        schedule = AdaptiveK(top, cfg.round_steps, cfg.avg_every_init)
    else:
        schedule = FixedK(top, cfg.round_steps)
    if warm:
        return Warmup(schedule, warm, with_state(RestartingAverager(averager)))
    return schedule
