"""``modelavg report``: report.md and PNG plots for one or more runs (train or pretrain), several
runs overlaid in each plot, read from their metrics.jsonl / pretrain.jsonl.

Plots put frames trained by all workers on the x axis, so runs with different N, K or minibatch
line up. A value a run does not have is an empty cell, never ``nan``.

Example::

    modelavg report exp/n1 exp/n8 --out exp/compare      # exp/compare/report.md + PNGs
    write_report([Path("exp/demo")])                       # exp/demo/report.md
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from modelavg.errors import UsageError  # noqa: E402
from modelavg.io import atomic_write_bytes, read_jsonl, save_figure  # noqa: E402

LOGS = {"metrics.jsonl": "train", "pretrain.jsonl": "pretrain"}


class RunRecords:
    """One run directory's log, split by record kind."""

    def __init__(self, path: Path) -> None:
        found = [name for name in LOGS if (path / name).exists()]
        if not found:
            raise UsageError(f"{path}: no metrics.jsonl or pretrain.jsonl (not a modelavg run)")
        self.path, self.kind = path, LOGS[found[0]]
        self.records = read_jsonl(path / found[0])
        self.name = path.name or str(path)

    def of(self, kind: str) -> list[dict]:
        return [r for r in self.records if r.get("kind") == kind]

    @property
    def start(self) -> dict:
        return next(iter(self.of("start")), {})


def cell(value: object, pattern: str = "{}") -> str:
    """A table cell: empty where the value does not exist (or is not a finite number)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return pattern.format(value)


def pct(value: float | None) -> str:
    return cell(None if value is None else 100 * value, "{:.2f}%")


def summary_table(runs: list[RunRecords]) -> str:
    rows = [
        "| run | kind | workers | K | frames | result | train s | averaging |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        if run.kind == "train":
            epochs, rounds = run.of("epoch"), run.of("round")
            last = epochs[-1] if epochs else {}
            result = f"CV acc {pct(last.get('cv_frame_accuracy'))}" if last else ""
            k = rounds[-1].get("avg_every") if rounds else None
            share, seconds = last.get("averaging_share"), sum(e.get("train_s", 0) for e in epochs)
        else:
            layers = run.of("layer")
            result = ", ".join(f"L{x['layer']} err {x['reconstruction_error']:.4g}" for x in layers)
            k = run.start.get("config", {}).get("avg_every")
            share = layers[-1].get("averaging_share") if layers else None
            seconds = sum(x.get("train_s", 0) for x in layers)
        frames = max((r["frames"] for r in run.records if "frames" in r), default=None)
        rows.append(
            f"| {run.name} | {run.kind} | {cell(run.start.get('workers'))} | {cell(k)} | "
            f"{cell(frames, '{:,}')} | {result} | {cell(seconds or None, '{:.0f}')} | "
            f"{pct(share)} |"
        )
    return "\n".join(rows)


def epoch_table(records: list[dict]) -> str:
    """A markdown table of a training run's per-epoch metrics."""
    rows = [
        "| epoch | lr next | CV loss | CV accuracy | seconds | averaging | accepted |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in (r for r in records if r["kind"] == "epoch"):
        secs = e.get("compute_s", 0.0) + e.get("averaging_s", 0.0) if "compute_s" in e else None
        rows.append(
            f"| {e['epoch']} | {cell(e.get('lr_next'), '{:.4g}')} | "
            f"{cell(e.get('cv_cross_entropy'), '{:.4f}')} | {pct(e.get('cv_frame_accuracy'))} | "
            f"{cell(secs, '{:.1f}')} | {pct(e.get('averaging_share'))} | "
            f"{cell(e.get('accepted'))} |"
        )
    return "\n".join(rows)


def layer_table(records: list[dict]) -> str:
    rows = [
        "| layer | type | epochs | error first | error last | guard firings | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for x in (r for r in records if r["kind"] == "layer"):
        rows.append(
            f"| {x['layer']} | {x['visible_type']} | {x['epochs']} | "
            f"{cell(x.get('first_reconstruction_error'), '{:.4g}')} | "
            f"{cell(x.get('reconstruction_error'), '{:.4g}')} | {x['guard_firings']} | "
            f"{cell(x.get('train_s'), '{:.1f}')} |"
        )
    return "\n".join(rows)


def line_plot(
    runs: list[RunRecords], kind: str, keys: list[tuple[str, str]], path: Path
) -> Path | None:
    """One panel per (field, label) against frames, one line per run; None if no run has it."""
    have = [r for r in runs if any(k in x for x in r.of(kind) for k, _ in keys)]
    if not have:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys, strict=True):
        for run in have:
            points = [(x["frames"], x[key]) for x in run.of(kind) if key in x and "frames" in x]
            if points:
                ax.plot(*zip(*points, strict=True), ".-", label=run.name)
        ax.set(xlabel="frames (all workers)", ylabel=label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    return save_figure(fig, path)


def plots(runs: list[RunRecords], out: Path) -> list[Path]:
    train = [r for r in runs if r.kind == "train"]
    pre = [r for r in runs if r.kind == "pretrain"]
    made = [
        line_plot(
            train,
            "epoch",
            [("cv_frame_accuracy", "CV frame accuracy"), ("cv_cross_entropy", "CV cross-entropy")],
            out / "learning.png",
        ),
        line_plot(train + pre, "round", [("lr", "learning rate")], out / "lr.png"),
        line_plot(
            train + pre,
            "round",
            [("averaging_share", "wall time in averaging")],
            out / "averaging.png",
        ),
        line_plot(
            train + pre,
            "round",
            [("spread_mean", "mean ||replica - mean||"), ("spread_max", "max ||replica - mean||")],
            out / "spread.png",
        ),
        line_plot(
            pre,
            "round",
            [("reconstruction_error", "CD-1 reconstruction error")],
            out / "reconstruction.png",
        ),
    ]
    return [p for p in made if p is not None]


def write_report(run_dirs: list[Path], out: Path | None = None, preamble: str = "") -> Path:
    """report.md (and its plots) in ``out`` (default: the first run's directory)."""
    runs = [RunRecords(Path(d)) for d in run_dirs]
    out = Path(out or run_dirs[0])
    images = plots(runs, out)
    parts = [preamble or "# modelavg report", "", "## Runs", "", summary_table(runs), ""]
    for run in runs:
        table = epoch_table(run.records) if run.kind == "train" else layer_table(run.records)
        parts += [f"## {run.name} ({run.kind}, {run.path})", "", table, ""]
    parts += [" ".join(f"![{p.stem}]({p.name})" for p in images), ""]
    path = out / "report.md"
    atomic_write_bytes("\n".join(parts).encode(), path)
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="run directories (modelavg train or pretrain --out)")
    p.add_argument("--out", help="where report.md and the plots go (default: the first run)")


def run(args: argparse.Namespace) -> int:
    path = write_report([Path(r) for r in args.runs], Path(args.out) if args.out else None)
    print(f"report: {path}")
    return 0
