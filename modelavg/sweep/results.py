"""A cell's result row: its options, status and what its run measured, read from its own files.

A finished cell's directory (``modelavg train --out``) holds ``metrics.jsonl``, ``config.yaml``
and ``final_cv.json``; the runner adds ``cell.json`` (exit code, wall seconds).  The row carries
the learning curve (CV accuracy against frames per worker, what speedup-to-accuracy
interpolates) and, where the run logged it, the gradient noise scale along the run.

Example::

    row = {**base_row(cell, "done"), **cell_result(Path("exp/sweep/demo/workers=2"))}
    frames, accuracy = row["curve"]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from modelavg.io import read_jsonl
from modelavg.sweep.grid import Cell, default_of, format_option

KEY_OPTIONS = (  # in every row and table, varying or not
    "workers",
    "avg_every",
    "minibatch",
    "optimizer",
    "init",
    "schedule",
    "lr",
    "epochs",
    "hidden_layers",
    "hidden_dim",
    "in_process",
)


class NoiseSeries(NamedTuple):
    """One logged noise scale: its metrics.jsonl key, the run summary's curve of it, the speedup
    row's ceiling from it, and the metric's name in tables and plots."""

    key: str
    curve: str
    column: str
    metric: str


NOISE_CEILINGS = (
    NoiseSeries("noise_scale", "noise_curve", "ceiling", "noise scale"),
    NoiseSeries("noise_scale_ng", "noise_curve_ng", "ceiling_ng", "NG metric"),
)


def base_row(cell: Cell, status: str) -> dict[str, Any]:
    """A cell's name, status and options (the key options at their defaults when not given)."""
    options = {k: cell.config.get(k, default_of(k)) for k in KEY_OPTIONS}
    options.update(cell.varying)
    return {"cell": cell.name, "status": status, **options}


def learning_curve(metrics: list[dict], frames_per_epoch: int) -> tuple[list[float], list[float]]:
    """(frames per worker, CV accuracy) after epochs 0..E, and at the mid-epoch points of
    ``cv_every``, of the model training continues from.

    A Newbob-rejected epoch still costs its frames, but the run goes on from the previous model,
    so the curve keeps the previous accuracy at its end.
    """
    frames, acc, last_end = [], [], None
    for f, m in validation_points(metrics, frames_per_epoch):
        if m["kind"] == "cv":
            last = float(m["cv_frame_accuracy"])
        else:
            rejected = m.get("accepted") is False and last_end is not None
            last_end = last = last_end if rejected else float(m["cv_frame_accuracy"])
        frames.append(f)
        acc.append(last)
    return frames, acc


def noise_curve(
    metrics: list[dict], frames_per_epoch: int, key: str = "noise_scale"
) -> tuple[list[float], list[float]]:
    """(frames per worker, gradient noise scale) where the run logged one (``key``). A curve
    that starts late (``noise_scale_ng``: NG-SGD has no estimates before its first step) starts
    at frame 0 with its first value, which is what the ceiling's larger-end-point rule counts
    for that stretch while B grows."""
    points = [
        (f, float(m[key])) for f, m in validation_points(metrics, frames_per_epoch) if key in m
    ]
    if points and points[0][0] > 0:
        points.insert(0, (0.0, points[0][1]))
    return [f for f, _ in points], [b for _, b in points]


def sync_curve(metrics: list[dict], frames_per_epoch: int) -> tuple[list[float], ...]:
    """(frames per worker, averagings over all workers, averagings inside groups) so far, at the
    validations that logged them (runs from before the counts were logged: empty)."""
    points = [(0.0, 0.0, 0.0)] + [
        (f, float(m["syncs"]), float(m["group_syncs"]))
        for f, m in validation_points(metrics, frames_per_epoch)
        if "syncs" in m
    ]
    return tuple(map(list, zip(*points, strict=True))) if len(points) > 1 else ([], [], [])


def validation_points(metrics: list[dict], frames_per_epoch: int) -> list[tuple[float, dict]]:
    """(frames per worker, record) of every validation: after each epoch and every cv_every."""
    points = []
    for m in metrics:
        if m.get("kind") == "cv":
            points.append((float(m["frames_per_worker"]), m))
        elif m.get("kind") == "epoch":
            points.append((float(m["epoch"] * frames_per_epoch), m))
    return points


def cell_result(cell_dir: Path) -> dict[str, Any]:
    """The measured outcome of a finished cell, from its own files (works for old cells too)."""
    metrics = read_jsonl(cell_dir / "metrics.jsonl")
    cfg = yaml.safe_load((cell_dir / "config.yaml").read_text())
    start = next(m for m in metrics if m.get("kind") == "start")
    epochs = [m for m in metrics if m.get("kind") == "epoch" and m["epoch"] >= 1]
    round_steps = cfg["avg_every_max"] if cfg["avg_every"] == "auto" else cfg["avg_every"]
    per_epoch = start["rounds_per_epoch"] * round_steps * cfg["minibatch"]
    frames, acc = learning_curve(metrics, per_epoch)
    final = json.loads((cell_dir / "final_cv.json").read_text())
    compute = sum(e.get("compute_s", 0.0) for e in epochs)
    averaging = sum(e.get("averaging_s", 0.0) for e in epochs)
    steps = len(epochs) * start["rounds_per_epoch"] * round_steps
    local_workers = start["workers"] / start.get("processes", 1)
    info_path = cell_dir / "cell.json"
    wall = json.loads(info_path.read_text())["wall_s"] if info_path.exists() else None
    if wall is None and metrics:
        wall = metrics[-1]["time"] - metrics[0]["time"]
    return {
        "cv_frame_accuracy": final["frame_accuracy"],
        "cv_cross_entropy": final["cross_entropy"],
        "epochs_run": len(epochs),
        "frames_per_worker": len(epochs) * per_epoch,
        "frames_per_worker_epoch": per_epoch,
        "rounds_per_epoch": start["rounds_per_epoch"],
        "wall_s": wall,
        "train_s": compute + averaging,
        "averaging_share": averaging / (compute + averaging) if compute + averaging else 0.0,
        "step_s": compute / (steps * local_workers) if steps else None,
        "parameters": start.get("parameters"),
        "round_steps": round_steps,
        "group_size": cfg.get("group_size") or 1,
        "averaging": cfg.get("averaging") or "model",
        "sync_curve": (syncs := sync_curve(metrics, per_epoch)),
        "syncs": syncs[1][-1] if syncs[0] else None,
        "cv_acc_per_epoch": " ".join(
            f"{100 * a:.2f}" for f, a in zip(frames, acc, strict=True) if f % per_epoch == 0
        ),
        "curve": (frames, acc),
        **{s.curve: noise_curve(metrics, per_epoch, s.key) for s in NOISE_CEILINGS},
    }


def group_key(row: dict, names: Sequence[str]) -> tuple:
    return tuple((n, format_option(n, row.get(n))) for n in names)


def grouped(rows: list[dict], names: Sequence[str]) -> dict[tuple, list[dict]]:
    """Rows by their values of ``names``, in first-seen order: one plot line or table each."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(group_key(r, names), []).append(r)
    return groups


def label(key: tuple) -> str:
    return ",".join(f"{n}={v}" for n, v in key) or "all"
