"""Speedup to accuracy: for each N, the frames per worker needed to reach the 1-worker run's
accuracy (minus ``accuracy_drop``), turned into time by the grid's time models.

Why frames and not wall time: the cells ran on this machine, N workers often in one process, so
their wall times say nothing about N GPUs.  What a run measures is its sample efficiency (how
many frames N averaged workers need), and ``modelavg.analysis.timemodel`` prices those frames on
given hardware.  Where the reference run logged its gradient noise scale, a ceiling column gives
the best sample efficiency any N-worker run could have had (``modelavg.analysis.noise``).

Example::

    rows = speedup_to_accuracy({1: [curve1], 2: [curve2]}, 0.80, lambda n, f: f / 1e4)
    text = write_speedup(grid, result_rows, Path("exp/sweep/demo"))   # speedup.md, speedup.png
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from modelavg.analysis.noise import trajectory_efficiency_ceiling
from modelavg.io import atomic_write_bytes
from modelavg.sweep.grid import PAPER_DROP, Grid
from modelavg.sweep.plots import plot_speedup
from modelavg.sweep.results import NOISE_CEILINGS, grouped, label
from modelavg.sweep.time_models import paper_speedups, seconds_function, syncs_at

Curve = tuple[Sequence[float], Sequence[float]]  # (frames per worker, CV accuracy)


def frames_to_reach(frames: Sequence[float], acc: Sequence[float], target: float) -> float | None:
    """Frames per worker at which the curve first reaches ``target``, interpolating linearly
    between validation points; None when it never does."""
    for i, (f, a) in enumerate(zip(frames, acc, strict=True)):
        if a >= target:
            if i == 0:
                return float(f)
            f0, a0 = frames[i - 1], acc[i - 1]
            return f0 + (target - a0) / (a - a0) * (f - f0)
    return None


def speedup_to_accuracy(
    curves: dict[int, list[Curve]],
    reference_accuracy: float,
    seconds: Callable[[int, float, int], float],
    drop: float = PAPER_DROP,
) -> list[dict[str, Any]]:
    """Per N: frames per worker to reach (1-worker final accuracy - drop), the modelled time
    ``seconds(N, frames, run)`` and speedup T1/TN, efficiency speedup/N (None where not reached).

    Each N may have several runs (e.g. epoch budgets, whose lr schedules anneal at different
    points, or lrs): the one that reaches the target with the fewest frames counts, for N = 1 as
    for every other N (each N tuned, as in time-to-accuracy benchmarks); ``run`` is its index in
    ``curves[N]``."""
    target = reference_accuracy - drop
    reach: dict[int, tuple[float | None, int | None]] = {}
    for n in sorted(curves):
        found = [(frames_to_reach(*c, target), i) for i, c in enumerate(curves[n])]
        found = [(f, i) for f, i in found if f is not None]
        reach[n] = min(found) if found else (None, None)
    f1, run1 = reach.get(1, (None, None))
    t1 = seconds(1, f1, run1) if f1 is not None else None
    rows = []
    for n, (f, run) in reach.items():
        t = seconds(n, f, run) if f is not None else None
        sp = t1 / t if t1 is not None and t else None
        rows.append(
            {
                "workers": n,
                "run": run,
                "target": target,
                "frames_to_target": f,
                # 1 when N workers need 1/N of the frames each: what the data costs, not the time
                "sample_efficiency": f1 / (n * f) if f1 is not None and f else None,
                "time_s": t,
                "speedup": sp,
                "efficiency": sp / n if sp is not None else None,
            }
        )
    return rows


def write_speedup(grid: Grid, rows: list[dict], out: Path) -> str:
    """speedup.md and speedup.png: one table per time model and setting of the options other
    than N. A setting without 1-worker runs (a grid's ``exclude``: several methods, one
    reference) is measured against every 1-worker run of the sweep."""
    others = grid.others("workers")
    done = [r for r in rows if r["status"] == "done"]
    ones = [r for r in done if int(r["workers"]) == 1]
    tables, series = [], []
    for spec in grid.time_models:
        for key, group in grouped(done, others).items():
            runs: dict[int, list[dict]] = {}
            for r in group:
                runs.setdefault(int(r["workers"]), []).append(r)
            runs.setdefault(1, ones)
            if not runs[1]:
                continue
            seconds, used = seconds_function(spec, group, grid.path)
            ref = max(runs[1], key=lambda r: r["cv_frame_accuracy"])  # the best 1-worker run
            curves = {n: [r["curve"] for r in rs] for n, rs in runs.items()}
            result = speedup_to_accuracy(
                curves, ref["cv_frame_accuracy"], priced(seconds, runs), grid.accuracy_drop
            )
            add_noise_ceilings(result, runs[1])
            partners = [n for n in grid.varying if n not in others and n != "workers"]
            for row in result:
                if row["run"] is not None:
                    cell = runs[row["workers"]][row["run"]]
                    row["run_label"] = ",".join(f"{n}={cell[n]}" for n in partners)
                    row["syncs"] = syncs_at(cell, row["frames_to_target"])
            title = f"{label(key)} (time model: {spec.name})"
            tables.append(speedup_table(title, result, used))
            series.append((title if len(grid.time_models) > 1 else label(key), result))
    text = speedup_markdown(grid, tables)
    atomic_write_bytes(text.encode(), out / "speedup.md")
    plot_speedup(series, out / "speedup.png")
    return text


def priced(
    seconds: Callable[..., float], runs: dict[int, list[dict]]
) -> Callable[[int, float, int], float]:
    """``seconds`` for run ``i`` of N: its own averagings up to those frames, its algorithm's
    cost per averaging."""

    def run_seconds(n: int, frames: float, i: int) -> float:
        row = runs[n][i]
        return seconds(n, frames, syncs_at(row, frames), row.get("averaging") or "model")

    return run_seconds


def add_noise_ceilings(result: list[dict], ones: list[dict]) -> None:
    """With the 1-worker reference run's noise scale logged (``noise_scale: true``): each N's
    best sample efficiency along that run up to the target (``noise.trajectory_efficiency_
    ceiling``), to set beside the measured one; in NG-SGD's metric too where it was logged."""
    first = next(r for r in result if r["workers"] == 1)
    if first["run"] is None:
        return
    ref = ones[first["run"]]
    for series in NOISE_CEILINGS:
        frames, scales = ref.get(series.curve) or ([], [])
        if len(frames) < 2 or frames[0] >= first["frames_to_target"]:
            continue
        for row in result:
            row[series.column] = trajectory_efficiency_ceiling(
                frames,
                scales,
                int(ref["minibatch"]),
                row["workers"],
                until=first["frames_to_target"],
            )


def fmt(value: float | None, pattern: str, missing: str = "not reached") -> str:
    return missing if value is None else format(value, pattern)


def speedup_table(title: str, result: list[dict], used: dict) -> str:
    """One markdown table: per N its run, frames to target, efficiencies, modelled time and
    speedup, beside the paper's."""
    paper = paper_speedups()
    ceilings = [
        (s.column, f"ceiling ({s.metric})") for s in NOISE_CEILINGS if s.column in result[0]
    ]
    lk = used["link"]
    lines = [
        f"### {title}",
        "",
        f"Target CV accuracy {100 * result[0]['target']:.2f}%. Time model: step "
        f"{1e3 * used['step_s']:.3g} ms per minibatch, model {used['model_bytes'] / 1e6:.3g} MB, "
        f"link latency {1e3 * lk.latency_s:.3g} ms, bandwidth {lk.bandwidth_Bps / 1e9:.3g} GB/s"
        + (
            f", host staging {lk.host_bandwidth_Bps / 1e9:.3g} GB/s"
            if lk.host_bandwidth_Bps
            else ""
        )
        + f", parallel overhead {used['overhead']:.3g}.",
        "",
        "| N | run | frames/worker to target | averagings to target | sample efficiency "
        + "".join(f"| {title} " for _, title in ceilings)
        + "| time-only efficiency | modelled time (s) | speedup | efficiency | paper speedup "
        "| paper efficiency |",
        "|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(ceilings),
    ]
    for r in result:
        n = r["workers"]
        p = paper.get(n)
        lines.append(
            f"| {n} | {r.get('run_label') or '-'} | {fmt(r['frames_to_target'], '.0f')} "
            f"| {averagings(r)} | {fmt(r['sample_efficiency'], '.1%', '-')} "
            + "".join(f"| {fmt(r.get(key), '.1%', '-')} " for key, _ in ceilings)
            + f"| {fmt(time_only(r), '.1%', '-')} | {fmt(r['time_s'], '.4g', '-')} "
            f"| {fmt(r['speedup'], '.2f', '-')} | {fmt(r['efficiency'], '.1%', '-')} "
            f"| {f'{p[0]:.2f}' if p else '-'} | {f'{p[1]:.1%}' if p else '-'} |"
        )
    return "\n".join(lines)


def averagings(row: dict) -> str:
    """Averagings over all workers to the target, and inside groups where there were any."""
    syncs = row.get("syncs")
    if syncs is None or row["workers"] == 1:
        return "-"
    return f"{syncs.full:.0f}" + (f" + {syncs.group:.0f} in groups" if syncs.group else "")


def time_only(row: dict) -> float | None:
    """efficiency / sample efficiency: what the time model alone gives at this K and B."""
    if row["efficiency"] is None or not row["sample_efficiency"]:
        return None
    return row["efficiency"] / row["sample_efficiency"]


def speedup_markdown(grid: Grid, tables: list[str]) -> str:
    head = [
        "## Speedup to accuracy",
        "",
        f"For each N: the frames per worker needed to reach the 1-worker run's final CV frame "
        f"accuracy minus {100 * grid.accuracy_drop:.2g}% absolute (linear interpolation on the "
        "CV curve: after each epoch, and every `cv_every` rounds when set), turned into time "
        "with `modelavg.analysis.timemodel` ("
        + "; ".join(
            f"{m.name}: step {m.step_seconds}, model bytes {m.model_bytes}, link {m.link}, "
            f"overhead {m.parallel_overhead}, fixed {m.parallel_fixed_s}"
            for m in grid.time_models
        )
        + "). Where several runs share an N (epoch budgets, lrs), the one reaching the target "
        "with the fewest frames counts, and the target comes from the best 1-worker run. "
        "Speedup = T1/TN, efficiency = speedup/N; sample efficiency = frames(1) / "
        "(N frames(N)), what averaging costs in data (1: N workers need 1/N of the frames each), "
        "and time-only efficiency = efficiency / sample efficiency, what communication and "
        "overheads cost at this K and minibatch. Communication is priced by the averagings "
        "each run logged up to the target (a K = 1 warm-up, adaptive K and two-level groups "
        "cost what they did; runs from before the counts: one a round), and overlapped "
        "averaging (`averaging: overlap`) only by the part of each allreduce that is longer "
        "than a round's local steps, butterfly mixing by one pairwise exchange per sync. "
        "Where the reference run logged its gradient noise scale (`noise_scale: true`), "
        "the ceiling column is the best sample efficiency "
        "any N-worker run could have had along it (`modelavg.analysis.noise`: N workers "
        "acting like one minibatch N times larger, McCandlish et al. 2018); with NG-SGD a "
        "second one measures the noise scale in NG-SGD's own metric. "
        "The paper's columns are its time-only figures (equal epochs, "
        "K=10, B=1024, paper §4.1): 58% efficiency at N=16 and 52% at N=32.",
        "",
    ]
    return (
        "\n".join(head)
        + "\n"
        + "\n\n".join(tables or ["No group has a finished 1-worker cell."])
        + "\n"
    )
