"""The grid's ``time_model:``: how frames per worker become seconds for the speedup table.

Each spec picks, per term of ``modelavg.analysis.timemodel.epoch_time``, a measured value, the
paper's (fitted by ``modelavg.analysis.calibration``) or a number (docs/RESULTS.md says which
grids use which).  Named models:
``measured`` (this machine's step, the paper's fitted link), ``paper`` (the paper's K20 cluster
as it measured: its step, model size, host-staged link and N > 1 overheads) and
``paper-hardware`` (the same GPUs and link fit, but a ring allreduce without host staging and
without the paper's unexplained per-frame and per-epoch overheads: an assumption, not a
measurement).

Example::

    specs = time_model_specs(["paper", {"step_seconds": 0.01, "name": "fast"}], Path("g.yaml"))
    seconds, used = seconds_function(specs[0], rows_of_one_group, Path("g.yaml"))
    seconds(16, 1e6)   # modelled seconds for 16 workers to process 1e6 frames each
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from modelavg.analysis import timemodel as tm
from modelavg.analysis.calibration import calibration_report
from modelavg.errors import UsageError


@dataclass(frozen=True)
class TimeModelSpec:
    """How to turn frames per worker into seconds (see ``modelavg.analysis.timemodel``)."""

    step_seconds: float | str = "measured"  # per minibatch: measured | paper | seconds
    model_bytes: float | str = "model"  # model | paper | bytes
    link: dict | str = "paper"  # paper | paper-ring | {latency_s, bandwidth_Bps, ...}
    parallel_overhead: float | str = 0.0  # o, for N > 1: a number or paper
    parallel_fixed_s: float | str = 0.0  # s per epoch of this run, or paper (prorated)
    name: str = "measured"


TIME_MODEL_WORDS = {
    "step_seconds": ("measured", "paper"),
    "model_bytes": ("model", "paper"),
    "link": ("paper", "paper-ring"),
    "parallel_overhead": ("paper",),
    "parallel_fixed_s": ("paper",),
}
TIME_MODEL_PRESETS = {
    "measured": TimeModelSpec(),
    "paper": TimeModelSpec("paper", "paper", "paper", "paper", "paper", "paper"),
    "paper-hardware": TimeModelSpec("paper", "paper", "paper-ring", 0.0, 0.0, "paper-hardware"),
}


def time_model_specs(raw: Any, where: Path) -> list[TimeModelSpec]:
    """``time_model:`` a preset name, a mapping (its own ``name`` optional), or a list of them:
    speedup.md then has one table per model.  Checked when the grid is read, so a typo does not
    surface only after every cell has run."""
    items = raw if isinstance(raw, list) else [raw]
    specs = [_time_model_spec(item, where, i) for i, item in enumerate(items)]
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise UsageError(f"{where}: time_model: names must differ, got {names}")
    return specs


def _time_model_spec(raw: Any, where: Path, index: int) -> TimeModelSpec:
    if raw is None:
        return TIME_MODEL_PRESETS["measured"]
    if isinstance(raw, str) and raw in TIME_MODEL_PRESETS:
        return TIME_MODEL_PRESETS[raw]
    if not isinstance(raw, dict):
        presets = ", ".join(TIME_MODEL_PRESETS)
        raise UsageError(f"{where}: time_model must be {presets}, a mapping or a list of them")
    for key, value in raw.items():
        if key == "name":
            continue
        if key not in TIME_MODEL_WORDS:
            known = ", ".join(["name", *TIME_MODEL_WORDS])
            raise UsageError(f"{where}: time_model: unknown key {key!r} ({known})")
        if key == "link" and isinstance(value, dict):
            link_from(value, where)
        elif value not in TIME_MODEL_WORDS[key] and not (
            isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
        ):
            words = " | ".join(TIME_MODEL_WORDS[key])
            raise UsageError(f"{where}: time_model: {key}: {value!r} is not {words} or a number")
    return TimeModelSpec(**{"name": f"model {index + 1}", **raw})


def seconds_function(
    spec: TimeModelSpec, group: list[dict], where: Path
) -> tuple[Callable[..., float], dict[str, Any]]:
    """``seconds(N, frames_per_worker, syncs=None, averaging="model")`` for one group of result rows
    (same B, round length, model), and the step, model bytes, link and overhead it used.
    ``syncs`` (``timemodel.Syncs``): the averagings a run logged up to that point, for schedules
    whose period varies; without it, one per round."""
    ref = group[0]
    minibatch, avg_every = int(ref["minibatch"]), int(ref.get("round_steps") or ref["avg_every"])
    cal = calibration_report()
    model_bytes = pick(
        spec.model_bytes, {"model": 4.0 * ref["parameters"], "paper": tm.PAPER_MODEL_BYTES}
    )
    steps = [r["step_s"] for r in group if r.get("step_s")]
    paper_step = (  # FLOPs scale with model size and minibatch
        cal.compute.step_seconds
        * (minibatch / tm.PAPER_MINIBATCH)
        * (model_bytes / tm.PAPER_MODEL_BYTES)
    )
    measured = statistics.median(steps) if steps else math.nan
    step = pick(spec.step_seconds, {"measured": measured, "paper": paper_step})
    fitted = cal.link_fit.link
    if spec.link == "paper":
        link = fitted
    elif spec.link == "paper-ring":  # the fitted latency and bandwidth, no host staging
        link = replace(fitted, host_bandwidth_Bps=None)
    else:
        link = link_from(spec.link, where)
    overhead = pick(spec.parallel_overhead, {"paper": cal.compute.parallel_overhead})
    per_epoch = ref["frames_per_worker_epoch"]

    def fixed(n: int, frames: float) -> float:
        if spec.parallel_fixed_s == "paper":  # the paper's s per 92.7M-frame epoch, prorated
            return cal.compute.parallel_fixed_s * n * frames / tm.PAPER_FRAMES_PER_EPOCH
        return float(spec.parallel_fixed_s) * frames / per_epoch

    def seconds(
        n: int, frames: float, syncs: tm.Syncs | None = None, averaging: str = "model"
    ) -> float:
        e = tm.epoch_time(
            frames * n,
            n,
            minibatch,
            avg_every,
            step,
            model_bytes,
            link,
            parallel_overhead=overhead,
            parallel_fixed_s=fixed(n, frames),
            syncs=syncs,
            averaging=averaging,
        )
        return e.total_s

    described = {"step_s": step, "model_bytes": model_bytes, "link": link, "overhead": overhead}
    return seconds, described


def syncs_at(row: dict, frames: float) -> tm.Syncs:
    """The averagings ``row``'s run had made after ``frames`` per worker, interpolated on its
    logged counts; one a round where it logged none (runs from before the counts)."""
    curve = row.get("sync_curve") or ([], [], [])
    if not curve[0]:
        return tm.Syncs(frames / (row["round_steps"] * row["minibatch"]))
    full, group = (float(np.interp(frames, curve[0], c)) for c in curve[1:])
    return tm.Syncs(full, group, int(row.get("group_size") or 1))


def pick(value: Any, words: dict[str, float]) -> float:
    return words[value] if isinstance(value, str) else float(value)


def link_from(raw: Any, where: Path) -> tm.Link:
    try:
        return tm.Link(**raw)
    except TypeError:
        raise UsageError(
            f"{where}: time_model: link must be paper or {{latency_s, bandwidth_Bps, "
            "host_bandwidth_Bps}"
        ) from None


def paper_speedups() -> dict[int, tuple[float, float]]:
    """The paper's (time-only) speedup and efficiency per N, from its epoch times (paper §4.1)."""
    t1 = tm.PAPER_EPOCH_MIN[0]
    return {n: (t1 / t, t1 / t / n) for n, t in zip(tm.PAPER_GPUS, tm.PAPER_EPOCH_MIN, strict=True)}
