"""From a run's metrics.jsonl to PNG plots and a markdown summary.

Example::

    paths = plot_run("exp/demo")     # exp/demo/cv.png, lr.png, averaging.png
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from modelavg.io import read_jsonl, save_figure  # noqa: E402


def load_metrics(run_dir: str | os.PathLike) -> list[dict]:
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


def plot_run(run_dir: str | os.PathLike, title: str = "") -> list[Path]:
    """cv.png (CV accuracy and loss per epoch), lr.png, averaging.png; returns the paths."""
    run_dir = Path(run_dir)
    metrics = load_metrics(run_dir)
    epochs = [m for m in metrics if m["kind"] == "epoch"]
    rounds = [m for m in metrics if m["kind"] == "round"]
    paths = []

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    xs = [e["epoch"] for e in epochs]
    ax1.plot(xs, [100 * e["cv_frame_accuracy"] for e in epochs], "o-")
    ax1.set(xlabel="epoch", ylabel="CV frame accuracy (%)", title=title or "validation")
    ax2.plot(xs, [e["cv_cross_entropy"] for e in epochs], "o-", color="C1")
    ax2.set(xlabel="epoch", ylabel="CV cross-entropy")
    for e in epochs:
        if e.get("accepted") is False:
            ax2.annotate("rejected", (e["epoch"], e["cv_cross_entropy"]), fontsize=8)
    paths.append(save_figure(fig, run_dir / "cv.png"))

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(
        [
            r["epoch"]
            - 1
            + r["round"] / max(x["round"] for x in rounds if x["epoch"] == r["epoch"])
            for r in rounds
        ],
        [r["lr"] for r in rounds],
        ".-",
    )
    ax.set(xlabel="epoch", ylabel="learning rate (all workers)", yscale="log")
    paths.append(save_figure(fig, run_dir / "lr.png"))

    fig, ax = plt.subplots(figsize=(5, 3.5))
    trained = [e for e in epochs if "averaging_share" in e]
    ax.bar([e["epoch"] for e in trained], [100 * e["averaging_share"] for e in trained])
    ax.set(xlabel="epoch", ylabel="wall time in averaging (%)")
    paths.append(save_figure(fig, run_dir / "averaging.png"))
    return paths


def epoch_table(metrics: list[dict]) -> str:
    """A markdown table of the per-epoch metrics."""
    rows = [
        "| epoch | lr next | CV loss | CV accuracy | seconds | averaging | accepted |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in (m for m in metrics if m["kind"] == "epoch"):
        secs = e.get("compute_s", 0.0) + e.get("averaging_s", 0.0)
        rows.append(
            f"| {e['epoch']} | {e.get('lr_next', float('nan')):.4g} | {e['cv_cross_entropy']:.4f} "
            f"| {100 * e['cv_frame_accuracy']:.2f}% | {secs:.1f} | "
            f"{100 * e.get('averaging_share', 0.0):.2f}% | {e.get('accepted', '')} |"
        )
    return "\n".join(rows)
