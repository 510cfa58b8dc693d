"""The sweep's figures: final CV accuracy against N and K, learning curves, the gradient noise
scale along each run that logged it, and speedup to accuracy beside the paper's.

N workers need about 1/N of the frames each, and N and K grow in powers of two: frames and N
are on log axes.  matplotlib is imported when a figure is drawn, not with the sweep.

Example::

    plots = write_plots(grid, rows, Path("exp/sweep/demo"))   # the PNGs written
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from modelavg.io import save_figure
from modelavg.sweep.grid import Grid
from modelavg.sweep.results import NOISE_CEILINGS, grouped, label
from modelavg.sweep.time_models import paper_speedups


def write_plots(grid: Grid, rows: list[dict], out: Path) -> list[Path]:
    """CV accuracy against N and against K (one line per setting of the other options), the
    learning curves (CV accuracy against frames per worker) and, where cells logged it, the
    gradient noise scale against frames per worker."""
    done = [r for r in rows if r["status"] == "done"]
    if not done:
        return []
    plots = []
    for axis, name in (("workers", "cv_vs_workers.png"), ("avg_every", "cv_vs_avg_every.png")):
        numeric = all(isinstance(r[axis], int) for r in done)  # not --avg-every auto
        if axis in grid.varying and numeric:
            plots.append(plot_against(done, axis, grid.others(axis), out / name))
    plots.append(plot_curves(done, grid, out / "learning_curves.png"))
    if any(len(r.get("noise_curve", ([], []))[0]) > 1 for r in done):
        plots.append(plot_noise(done, out / "noise_scale.png"))
    return plots


def plot_against(rows: list[dict], axis: str, others: list[str], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, group in grouped(rows, others).items():
        group.sort(key=lambda r: r[axis])
        xs = [r[axis] for r in group]
        ax.plot(xs, [100 * r["cv_frame_accuracy"] for r in group], "o-", label=label(key))
    integer_log2_axis(ax, sorted({r[axis] for r in rows}))
    ax.set(xlabel={"workers": "workers N", "avg_every": "averaging period K"}[axis])
    ax.set(ylabel="final CV frame accuracy (%)")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def integer_log2_axis(ax: Any, ticks: list[int]) -> None:
    """N and K grow in powers of two; label the values actually run, as plain integers."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_curves(rows: list[dict], grid: Grid, path: Path) -> Path:
    """One panel per setting of the non-N options, one line per N (or per cell)."""
    import matplotlib.pyplot as plt

    line_by = "workers" if "workers" in grid.varying else None
    panels = grouped(rows, grid.others("workers") if line_by else grid.varying)
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.4 * nrows), squeeze=False)
    for ax, (key, group) in zip(axes.flat, panels.items(), strict=False):
        trained = []  # accuracies after the initial model: the y range worth seeing
        for r in sorted(group, key=lambda r: r.get(line_by) or 0):
            points = [(f, 100 * a) for f, a in zip(*r["curve"], strict=True) if f > 0]
            trained += [a for _, a in points]
            partners = [n for n in grid.varying if n not in grid.others("workers")]
            name = ",".join(f"{n}={r[n]}" for n in partners) if line_by else r["cell"]
            ax.plot([f for f, _ in points], [a for _, a in points], "o-", ms=3, label=name)
        ax.set_xscale("log")  # N workers need ~1/N of the frames each: equal spacing in log N
        if trained:
            ax.set_ylim(max(0.0, min(trained) - 2), min(100.0, max(trained) + 1))
        ax.set(title=label(key), xlabel="frames per worker (after epoch 0)")
        ax.set(ylabel="CV frame accuracy (%)")
        ax.title.set_fontsize(8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    return save_figure(fig, path)


def plot_noise(rows: list[dict], path: Path) -> Path:
    """The gradient noise scale along each run that logged it, solid in the Euclidean metric,
    dashed in NG-SGD's: how many frames per update the task could use as training went on."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, r in enumerate(rows):
        for series, style in zip(NOISE_CEILINGS, ("-", "--"), strict=True):
            frames, scales = r.get(series.curve) or ([], [])
            points = [
                (f, b) for f, b in zip(frames, scales, strict=True) if f > 0 and 0 < b < math.inf
            ]
            if len(points) < 2:
                continue
            name = f"{r['cell']} ({series.metric})"
            ax.plot(
                *zip(*points, strict=True), style, color=f"C{i % 10}", marker="o", ms=2, label=name
            )
    ax.set(xscale="log", yscale="log", xlabel="frames per worker", ylabel="noise scale B (frames)")
    ax.legend(fontsize=6)
    return save_figure(fig, path)


def plot_speedup(series: list[tuple[str, list[dict]]], path: Path) -> Path:
    """Speedup and efficiency to accuracy against N, one line per table of speedup.md, beside
    the ideal and the paper's time-only figures (paper §4.1)."""
    import matplotlib.pyplot as plt

    paper = paper_speedups()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ns = sorted({r["workers"] for _, result in series for r in result} | set(paper))
    ax1.plot(ns, ns, "k:", label="ideal")
    ax1.plot(list(paper), [v[0] for v in paper.values()], "ks--", label="paper (time only)")
    ax2.plot(list(paper), [100 * v[1] for v in paper.values()], "ks--", label="paper (time only)")
    for name, result in series:
        ok = [r for r in result if r["speedup"] is not None]
        ax1.plot([r["workers"] for r in ok], [r["speedup"] for r in ok], "o-", label=name)
        ax2.plot([r["workers"] for r in ok], [100 * r["efficiency"] for r in ok], "o-", label=name)
    for ax in (ax1, ax2):
        integer_log2_axis(ax, ns)
        ax.set_xlabel("workers N")
        ax.legend(fontsize=7)
    ax1.set(yscale="log", ylabel="speedup to accuracy T1/TN")
    ax2.set(ylabel="efficiency (%)", ylim=(0, 110))
    return save_figure(fig, path)
