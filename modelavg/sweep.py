"""``modelavg sweep``: a grid of training runs, one results table, plots and speedup-to-accuracy.

Why: the paper's claims are comparisons across runs (N workers, averaging period K, minibatch,
optimiser, initialisation, schedule). A sweep runs every combination once, can be stopped and
started again, and puts the outcome in one table (``results.csv``/``results.md``) with plots.

Each cell is a separate ``python -m modelavg train`` process: no torch state (threads, process
groups, RNG) leaks between cells, an out-of-memory or crashing cell does not take the sweep down,
and ``in_process: false`` with ``workers: N`` spawns real gloo processes the same way.

The grid file: top-level keys are ``train`` options (underscored), fixed for every cell; ``grid``
maps option names to lists of values (every combination is a cell; ``a+b: [[a1, b1], ...]``
varies two options together); ``time_model`` and ``accuracy_drop`` configure the speedup table::

    data: data/demo/train
    cv: data/demo/cv
    in_process: true
    epochs: 3
    grid:
      workers: [1, 2, 4, 8]
      avg_every: [1, 10]
      optimizer+lr: [[sgd, 0.1], [ngsgd, 0.05]]
    time_model: [paper, paper-hardware]   # or measured, or {step_seconds: measured, ...}

Example::

    rows = run_sweep("experiments/demo_quick.yaml", "exp/sweep_demo")
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from modelavg.config import config_fields, load_config
from modelavg.errors import UsageError

RESERVED = ("grid", "time_model", "accuracy_drop")
SET_BY_SWEEP = ("out", "resume")
IGNORED_IN_COMPARISON = ("progress",)  # may change between invocations without a rerun
KEY_OPTIONS = (
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
RANDOM_INIT = ("random", "none")
INFEASIBLE = "exceeds the smallest shard"  # the trainer's message when K*B > a worker's shard
PAPER_DROP = 0.005


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


# -- the grid file ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One training run: its directory name, the options that vary, and every option given."""

    name: str
    varying: dict[str, Any]
    config: dict[str, Any]


@dataclass
class Grid:
    path: Path
    fixed: dict[str, Any]
    axes: list[tuple[tuple[str, ...], list[tuple]]]  # option names, one value tuple per point
    time_models: list[TimeModelSpec] = field(default_factory=lambda: [TimeModelSpec()])
    accuracy_drop: float = PAPER_DROP
    cells: list[Cell] = field(default_factory=list)

    @property
    def varying(self) -> list[str]:
        return [name for names, _ in self.axes for name in names]

    def others(self, name: str) -> list[str]:
        """The varying options not on ``name``'s axis: with ``workers+epochs``, cells that differ
        in N and in epochs still belong to one line of an N plot and one speedup table."""
        own = next((names for names, _ in self.axes if name in names), (name,))
        return [n for n in self.varying if n not in own]


def load_grid(path: str | os.PathLike) -> Grid:
    """Read and check a grid file; every cell's options are validated before anything runs."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"{path}: cannot read grid file ({exc.__class__.__name__})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: a grid file must be a mapping of option: value")
    known = {f.name for f in config_fields()}
    for key in raw:
        if key not in known and key not in RESERVED:
            raise UsageError(f"{path}: unknown key {key!r} (train options, {', '.join(RESERVED)})")
        if key in SET_BY_SWEEP:
            raise UsageError(f"{path}: {key!r} is set by the sweep (one directory per cell)")
    fixed = {k: normalise(k, v) for k, v in raw.items() if k not in RESERVED}
    axes = parse_axes(path, raw.get("grid") or {}, known)
    overlap = set(fixed) & {n for names, _ in axes for n in names}
    if overlap:
        raise UsageError(f"{path}: {sorted(overlap)[0]!r} is both fixed and in the grid")
    drop = raw.get("accuracy_drop", PAPER_DROP)
    if not isinstance(drop, int | float) or not 0 <= drop < 1:
        raise UsageError(f"{path}: accuracy_drop must be a number in [0, 1), e.g. 0.005")
    specs = time_model_specs(raw.get("time_model"), path)
    grid = Grid(path, fixed, axes, specs, float(drop))
    grid.cells = make_cells(grid)
    return grid


def parse_axes(path: Path, spec: Any, known: set[str]) -> list[tuple[tuple[str, ...], list[tuple]]]:
    """``grid:`` entries as (names, value tuples); ``a+b`` entries vary options together."""
    if not isinstance(spec, dict):
        raise UsageError(f"{path}: 'grid' must map option names to lists of values")
    axes = []
    for key, values in spec.items():
        names = tuple(str(key).split("+"))
        for name in names:
            if name not in known:
                raise UsageError(f"{path}: grid: unknown option {name!r}")
            if name in SET_BY_SWEEP:
                raise UsageError(f"{path}: grid: {name!r} is set by the sweep")
        if not isinstance(values, list) or not values:
            raise UsageError(f"{path}: grid: {key} must be a non-empty list of values")
        points = []
        for v in values:
            point = tuple(v) if len(names) > 1 and isinstance(v, list) else (v,)
            if len(point) != len(names):
                raise UsageError(f"{path}: grid: {key}: {v!r} is not {len(names)} values")
            points.append(tuple(normalise(n, x) for n, x in zip(names, point, strict=True)))
        axes.append((names, points))
    return axes


def normalise(name: str, value: Any) -> Any:
    """``init: random`` (or none/null) means a random initialisation: no --init."""
    if name == "init" and (value is None or str(value).lower() in RANDOM_INIT):
        return None
    return value


def make_cells(grid: Grid) -> list[Cell]:
    """Every combination of the axes, validated as a train config, with a unique safe name."""
    cells, seen = [], {}
    for combo in itertools.product(*[points for _, points in grid.axes]):
        varying = {
            n: v
            for (names, _), point in zip(grid.axes, combo, strict=True)
            for n, v in zip(names, point, strict=True)
        }
        config = {"progress": False, **grid.fixed, **varying}
        name = cell_name(varying)
        try:
            load_config(None, dict(config))
        except (UsageError, TypeError) as exc:
            raise UsageError(f"{grid.path}: cell {name}: {exc}") from None
        if name in seen:
            raise UsageError(f"{grid.path}: cells {seen[name]} and {varying} share the name {name}")
        seen[name] = varying
        cells.append(Cell(name, varying, config))
    return cells


def format_value(name: str, value: Any) -> str:
    if name == "init" and value is None:
        return "random"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def cell_name(varying: dict[str, Any]) -> str:
    """``workers=8,avg_every=10,optimizer=sgd``: a directory name from the varying options."""
    if not varying:
        return "single"
    parts = []
    for name, value in varying.items():
        text = re.sub(r"[^A-Za-z0-9._+-]+", "_", format_value(name, value)).strip("_") or "_"
        if len(text) > 40:  # e.g. a long --init path: keep the end, disambiguate with a hash
            digest = hashlib.sha1(str(value).encode()).hexdigest()[:8]
            text = f"{text[-31:]}-{digest}"
        parts.append(f"{name}={text}")
    return ",".join(parts)


# -- running cells ---------------------------------------------------------------------------


def cell_state(cell_dir: Path) -> str:
    """done (final_cv.json), partial (started, resumable if it has a checkpoint) or new."""
    if (cell_dir / "final_cv.json").exists():
        return "done"
    return "partial" if cell_dir.exists() else "new"


def stored_config(cell_dir: Path) -> dict[str, Any] | None:
    path = cell_dir / "cell.yaml"
    return yaml.safe_load(path.read_text()) if path.exists() else None


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Options whose value differs between a stored cell and the grid as it is now (an option
    left out and one spelled out at its default are the same run)."""
    keys = (set(old) | set(new)) - set(IGNORED_IN_COMPARISON)
    value = lambda cfg, k: cfg.get(k, default_of(k))  # noqa: E731
    return sorted(k for k in keys if value(old, k) != value(new, k))


def check_unchanged(cell: Cell, cell_dir: Path) -> None:
    """A finished cell run with other options would be reported under the wrong name: refuse."""
    old = stored_config(cell_dir)
    changed = config_changes(old, cell.config) if old is not None else []
    if changed:
        k = changed[0]
        raise UsageError(
            f"{cell_dir}: run with {k}={old.get(k)!r}, the grid now says {cell.config.get(k)!r}; "
            "use another --out or delete the cell directory"
        )


def train_command(cell_dir: Path, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "modelavg", "train", "--config", str(cell_dir / "cell.yaml")]
    return cmd + ["--out", str(cell_dir)] + (["--resume"] if resume else [])


def plan_cell(cell: Cell, cell_dir: Path, resume: bool) -> str:
    """skip, resume, run, or infeasible (known not to fit: not retried while the grid is the same).

    A half-finished cell restarts cleanly unless resumed.
    """
    state = cell_state(cell_dir)
    if state == "done":
        check_unchanged(cell, cell_dir)
        return "skip"
    if state == "partial" and known_infeasible(cell, cell_dir):
        return "infeasible"
    if state == "partial" and resume and (cell_dir / "checkpoints" / "LATEST").exists():
        check_unchanged(cell, cell_dir)
        return "resume"
    return "run"


def known_infeasible(cell: Cell, cell_dir: Path) -> bool:
    """A previous attempt with these very options stopped because K*B exceeds a shard."""
    if stored_config(cell_dir) != cell.config or not (cell_dir / "cell.json").exists():
        return False
    return failure_reason(cell_dir)[0] == "infeasible"


def run_cell(cell: Cell, cell_dir: Path, action: str) -> dict[str, Any]:
    """One ``modelavg train`` process; its output goes to cell_dir/train.log."""
    previous_s = 0.0
    if action == "run":
        if cell_dir.exists():
            shutil.rmtree(cell_dir)
        cell_dir.mkdir(parents=True)
        (cell_dir / "cell.yaml").write_text(yaml.safe_dump(cell.config, sort_keys=False))
    elif (cell_dir / "cell.json").exists():
        previous_s = json.loads((cell_dir / "cell.json").read_text()).get("wall_s", 0.0)
    t0 = time.perf_counter()
    with (cell_dir / "train.log").open("a") as log:
        code = subprocess.run(
            train_command(cell_dir, action == "resume"), stdout=log, stderr=subprocess.STDOUT
        ).returncode
    info = {"returncode": code, "wall_s": previous_s + time.perf_counter() - t0}
    (cell_dir / "cell.json").write_text(json.dumps(info))
    return info


def failure_reason(cell_dir: Path) -> tuple[str, str]:
    """(status, last error line) of a failed cell: infeasible when K*B exceeds a shard."""
    log = cell_dir / "train.log"
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    errors = [x for x in lines if "error" in x.lower()] or lines or ["no output"]
    message = errors[-1].strip().removeprefix("modelavg: error: ")
    return ("infeasible" if INFEASIBLE in message else "failed"), message[:300]


# -- reading a finished cell -----------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
    per_epoch = start["rounds_per_epoch"] * cfg["avg_every"] * cfg["minibatch"]
    frames, acc = learning_curve(metrics, per_epoch)
    final = json.loads((cell_dir / "final_cv.json").read_text())
    compute = sum(e.get("compute_s", 0.0) for e in epochs)
    averaging = sum(e.get("averaging_s", 0.0) for e in epochs)
    steps = len(epochs) * start["rounds_per_epoch"] * cfg["avg_every"]
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
        "cv_acc_per_epoch": " ".join(
            f"{100 * a:.2f}" for f, a in zip(frames, acc, strict=True) if f % per_epoch == 0
        ),
        "curve": (frames, acc),
        **{s.curve: noise_curve(metrics, per_epoch, s.key) for s in NOISE_CEILINGS},
    }


# -- the sweep -------------------------------------------------------------------------------


def run_sweep(
    grid_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    dry_run: bool = False,
    *,
    resume: bool = False,
    keep_checkpoints: bool = False,
    jobs: int = 1,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Run (or with ``dry_run`` only list) every cell; returns one row per cell.

    ``jobs`` cells run at once (give each cell ``threads: 1`` and one job per core).
    Finished cells are skipped; half-finished ones restart cleanly, or continue from their last
    checkpoint with ``resume``. A finished cell's checkpoints are deleted (final.pt stays) unless
    ``keep_checkpoints``: a full grid of paper-size models would not fit on disk. Writes
    results.csv, results.md, the plots and speedup.md/.png.
    """
    grid = load_grid(grid_path)
    out = Path(out_dir)
    if jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {jobs}")
    rows: list[dict] = []
    pending = []
    for i, cell in enumerate(grid.cells, 1):
        cell_dir = out / cell.name
        action = plan_cell(cell, cell_dir, resume)
        prefix = f"[{i}/{len(grid.cells)}] {cell.name}:"
        missing = missing_input(cell) if action in ("run", "resume") else None
        if missing:  # e.g. the DBN is not pretrained yet: the other cells can still run
            log(f"{prefix} missing input: {missing}")
            rows.append({**base_row(cell, "planned" if dry_run else "failed"), "error": missing})
            continue
        if dry_run:
            cmd = " ".join(train_command(cell_dir, action == "resume"))
            log(f"{prefix} {action}" + ("" if action in ("skip", "infeasible") else f": {cmd}"))
            status = {"skip": "done", "infeasible": "infeasible"}.get(action, "planned")
            rows.append(base_row(cell, status))
            continue
        if action == "infeasible":
            message = failure_reason(cell_dir)[1]
            log(f"{prefix} infeasible (known): {message}")
            rows.append({**base_row(cell, "infeasible"), "error": message})
            continue
        rows.append({})  # filled in below, in grid order whatever order the cells end in
        pending.append((len(rows) - 1, cell, cell_dir, action, prefix))

    lock = threading.Lock()

    def say(message: str) -> None:  # one line at a time from concurrent cells
        with lock:
            log(message)

    def run_one(job: tuple) -> tuple[int, dict]:
        position, cell, cell_dir, action, prefix = job
        row = execute(cell, cell_dir, action, prefix, say)
        if row["status"] == "done" and not keep_checkpoints:
            shutil.rmtree(cell_dir / "checkpoints", ignore_errors=True)
        return position, row

    with ThreadPoolExecutor(jobs) as pool:  # each cell is its own process: threads only wait
        for position, row in pool.map(run_one, pending):
            rows[position] = row
    if not dry_run:
        write_reports(grid, out, rows, log)
    return rows


def missing_input(cell: Cell) -> str | None:
    """The first data directory or --init file of a cell that does not exist (None: all do)."""
    c = cell.config
    checks = [
        ("data", c.get("data"), c.get("feats") is None, Path.is_dir),
        ("cv", c.get("cv"), c.get("cv_feats") is None, Path.is_dir),
        ("init", c.get("init"), True, Path.is_file),
    ]
    for key, value, needed, exists in checks:
        if value is not None and needed and not exists(Path(value)):
            return f"{key} {value}: no such {'file' if key == 'init' else 'directory'}"
    return None


def base_row(cell: Cell, status: str) -> dict[str, Any]:
    options = {k: cell.config.get(k, default_of(k)) for k in KEY_OPTIONS}
    options.update(cell.varying)
    return {"cell": cell.name, "status": status, **options}


def default_of(name: str) -> Any:
    return next(f.default for f in config_fields() if f.name == name)


def execute(cell: Cell, cell_dir: Path, action: str, prefix: str, log) -> dict[str, Any]:
    """Run or skip one cell and turn its files into a results row."""
    if action != "skip":
        log(f"{prefix} {'resuming' if action == 'resume' else 'running'} ...")
        info = run_cell(cell, cell_dir, action)
        if info["returncode"] != 0:
            status, message = failure_reason(cell_dir)
            log(f"{prefix} {status}: {message}")
            return {**base_row(cell, status), "error": message, "wall_s": info["wall_s"]}
    row = {**base_row(cell, "done"), **cell_result(cell_dir)}
    what = "skipped (finished)" if action == "skip" else f"done in {row['wall_s']:.1f} s"
    log(f"{prefix} {what}, CV accuracy {100 * row['cv_frame_accuracy']:.2f}%")
    return row


# -- reports ---------------------------------------------------------------------------------

RESULT_COLUMNS = (
    "cv_frame_accuracy",
    "cv_cross_entropy",
    "epochs_run",
    "frames_per_worker",
    "frames_per_worker_epoch",
    "rounds_per_epoch",
    "wall_s",
    "train_s",
    "averaging_share",
    "step_s",
    "parameters",
    "cv_acc_per_epoch",
    "error",
)


def csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def write_reports(grid: Grid, out: Path, rows: list[dict], log) -> None:
    """results.csv and results.md, plots, and the speedup table when workers includes 1."""
    out.mkdir(parents=True, exist_ok=True)
    options = list(KEY_OPTIONS) + [n for n in grid.varying if n not in KEY_OPTIONS]
    columns = ["cell", "status", *options, *RESULT_COLUMNS]
    with (out / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: csv_value(format_option(k, row.get(k))) for k in columns})
    plots = write_plots(grid, out, rows)
    speedup = None
    if "workers" in grid.varying and any(r.get("workers") == 1 for r in rows):
        speedup = write_speedup(grid, out, rows)
    (out / "results.md").write_text(results_markdown(grid, rows, plots, speedup))
    log(f"results: {out / 'results.csv'}, {out / 'results.md'}")


def format_option(name: str, value: Any) -> Any:
    return "random" if name == "init" and value is None else value


def results_markdown(grid: Grid, rows: list[dict], plots: list[Path], speedup: str | None) -> str:
    varying = grid.varying
    head = [*varying, "status", "CV acc", "CV loss", "epochs run", "frames/worker", "wall s"]
    head.append("avg %")
    lines = [
        f"# Sweep results: {grid.path.name}",
        "",
        "Fixed options: "
        + (", ".join(f"`{k}={format_option(k, v)}`" for k, v in grid.fixed.items()) or "none"),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        done = r["status"] == "done"
        cells = [str(format_option(k, r.get(k))) for k in varying] + [r["status"]]
        if done:
            cells += [
                f"{100 * r['cv_frame_accuracy']:.2f}%",
                f"{r['cv_cross_entropy']:.4f}",
                str(r["epochs_run"]),
                str(r["frames_per_worker"]),
                f"{r['wall_s']:.1f}" if r.get("wall_s") is not None else "",
                f"{100 * r['averaging_share']:.2f}",
            ]
        else:
            cells += [r.get("error", "")[:80].replace("|", "/"), "", "", "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "CV accuracy per epoch (epoch 0 = initial model) is in results.csv.", ""]
    if any("workers" not in names for names, _ in grid.axes) and "workers" in varying:
        lines += [*pivot_by_workers(grid, rows), ""]  # N against another axis
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    if speedup:
        lines += ["", speedup]
    return "\n".join(lines) + "\n"


def pivot_by_workers(grid: Grid, rows: list[dict]) -> list[str]:
    """The paper's table shape: one row per N, one column per point of the longest other axis
    (ties: the later one), one table per setting of the remaining options.  Each entry is the
    final CV accuracy with, in brackets, the averaging rounds per epoch (the regime: the paper
    had hundreds), or why the cell has no result."""
    axes = [names for names, _ in grid.axes if "workers" not in names]
    sizes = {names: len(points) for names, points in grid.axes}
    column_axis = max(reversed(axes), key=lambda names: sizes[names])
    rest = [n for names in axes if names != column_axis for n in names]
    lines = ["CV frame accuracy (%) by N; [averaging rounds per epoch]:"]
    for table_key, table_rows in grouped(rows, rest).items():
        columns = list(grouped(table_rows, column_axis))
        by_cell = {(int(r["workers"]), group_key(r, column_axis)): r for r in table_rows}
        lines.append("")
        if rest:
            lines += [f"{label(table_key)}:", ""]
        lines += [
            "| N | " + " | ".join(label(c) for c in columns) + " |",
            "|---|" + "---|" * len(columns),
        ]
        for n in sorted({int(r["workers"]) for r in table_rows}):
            entries = [pivot_entry(by_cell.get((n, c))) for c in columns]
            lines.append(f"| {n} | " + " | ".join(entries) + " |")
    return lines


def pivot_entry(row: dict | None) -> str:
    if row is None:
        return ""
    if row["status"] != "done":
        return row["status"]
    return f"{100 * row['cv_frame_accuracy']:.2f} [{row['rounds_per_epoch']}]"


def group_key(row: dict, names: Sequence[str]) -> tuple:
    return tuple((n, format_option(n, row.get(n))) for n in names)


def label(key: tuple) -> str:
    return ",".join(f"{n}={v}" for n, v in key) or "all"


def write_plots(grid: Grid, out: Path, rows: list[dict]) -> list[Path]:
    """CV accuracy against N and against K (one line per setting of the other options), the
    learning curves (CV accuracy against frames per worker) and, where cells logged it, the
    gradient noise scale against frames per worker."""
    done = [r for r in rows if r["status"] == "done"]
    if not done:
        return []
    plots = []
    for axis, name in (("workers", "cv_vs_workers.png"), ("avg_every", "cv_vs_avg_every.png")):
        if axis in grid.varying:
            plots.append(plot_against(done, axis, grid.others(axis), out / name))
    plots.append(plot_curves(done, grid, out / "learning_curves.png"))
    if any(len(r.get("noise_curve", ([], []))[0]) > 1 for r in done):
        plots.append(plot_noise(done, out / "noise_scale.png"))
    return plots


def plot_against(rows: list[dict], axis: str, others: list[str], path: Path) -> Path:
    import matplotlib.pyplot as plt

    from modelavg import io

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, group in grouped(rows, others).items():
        group.sort(key=lambda r: r[axis])
        xs = [r[axis] for r in group]
        ax.plot(xs, [100 * r["cv_frame_accuracy"] for r in group], "o-", label=label(key))
    integer_log2_axis(ax, sorted({r[axis] for r in rows}))
    ax.set(xlabel={"workers": "workers N", "avg_every": "averaging period K"}[axis])
    ax.set(ylabel="final CV frame accuracy (%)")
    ax.legend(fontsize=7)
    return io.save_figure(fig, path)


def integer_log2_axis(ax, ticks: list[int]) -> None:
    """N and K grow in powers of two; label the values actually run, as plain integers."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())


def grouped(rows: list[dict], names: Sequence[str]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(group_key(r, names), []).append(r)
    return groups


def plot_curves(rows: list[dict], grid: Grid, path: Path) -> Path:
    """One panel per setting of the non-N options, one line per N (or per cell)."""
    import matplotlib.pyplot as plt

    from modelavg import io

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
    return io.save_figure(fig, path)


def plot_noise(rows: list[dict], path: Path) -> Path:
    """The gradient noise scale along each run that logged it, solid in the Euclidean metric,
    dashed in NG-SGD's: how many frames per update the task could use as training went on."""
    import matplotlib.pyplot as plt

    from modelavg import io

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
    return io.save_figure(fig, path)


# -- speedup to accuracy ---------------------------------------------------------------------


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


Curve = tuple[Sequence[float], Sequence[float]]  # (frames per worker, CV accuracy)


def speedup_to_accuracy(
    curves: dict[int, list[Curve]],
    reference_accuracy: float,
    seconds: Callable[[int, float], float],
    drop: float = PAPER_DROP,
) -> list[dict[str, Any]]:
    """Per N: frames per worker to reach (1-worker final accuracy - drop), the modelled time
    ``seconds(N, frames)`` and speedup T1/TN, efficiency speedup/N (None where not reached).

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
    f1 = reach.get(1, (None, None))[0]
    t1 = seconds(1, f1) if f1 is not None else None
    rows = []
    for n, (f, run) in reach.items():
        t = seconds(n, f) if f is not None else None
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
# Named models.  paper: the paper's K20 cluster as it measured (its step, model size, host-staged
# link and its N > 1 overheads).  paper-hardware: the same GPUs and link fit, but a ring allreduce
# without host staging (NCCL or CUDA-aware MPI on one flat buffer) and without the paper's
# unexplained 26% per-frame and ~3 min per-epoch overheads - an assumption, not a measurement.
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


def seconds_function(spec: TimeModelSpec, group: list[dict], where: Path):
    """``seconds(N, frames_per_worker)`` for one group of cells (same B, K, model)."""
    from modelavg.analysis import timemodel as tm

    ref = group[0]
    minibatch, avg_every = int(ref["minibatch"]), int(ref["avg_every"])
    cal = tm.calibration_report()
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

    def seconds(n: int, frames: float) -> float:
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
        )
        return e.total_s

    described = {"step_s": step, "model_bytes": model_bytes, "link": link, "overhead": overhead}
    return seconds, described


def pick(value: Any, words: dict[str, float]) -> float:
    return words[value] if isinstance(value, str) else float(value)


def link_from(raw: Any, where: Path):
    from modelavg.analysis.timemodel import Link

    try:
        return Link(**raw)
    except TypeError:
        raise UsageError(
            f"{where}: time_model: link must be paper or {{latency_s, bandwidth_Bps, "
            "host_bandwidth_Bps}"
        ) from None


def paper_speedups() -> dict[int, tuple[float, float]]:
    """The paper's (time-only) speedup and efficiency per N, brief §4.1."""
    from modelavg.analysis import timemodel as tm

    t1 = tm.PAPER_EPOCH_MIN[0]
    return {n: (t1 / t, t1 / t / n) for n, t in zip(tm.PAPER_GPUS, tm.PAPER_EPOCH_MIN, strict=True)}


def write_speedup(grid: Grid, out: Path, rows: list[dict]) -> str:
    """speedup.md and speedup.png: one table per time model and setting of the options other
    than N."""
    others = grid.others("workers")
    done = [r for r in rows if r["status"] == "done"]
    tables, series = [], []
    for spec in grid.time_models:
        for key, group in grouped(done, others).items():
            runs: dict[int, list[dict]] = {}
            for r in group:
                runs.setdefault(int(r["workers"]), []).append(r)
            if 1 not in runs:
                continue
            seconds, used = seconds_function(spec, group, grid.path)
            ref = max(runs[1], key=lambda r: r["cv_frame_accuracy"])  # the best 1-worker run
            curves = {n: [r["curve"] for r in rs] for n, rs in runs.items()}
            result = speedup_to_accuracy(
                curves, ref["cv_frame_accuracy"], seconds, grid.accuracy_drop
            )
            add_noise_ceilings(result, runs[1])
            partners = [n for n in grid.varying if n not in others and n != "workers"]
            for row in result:
                if row["run"] is not None:
                    cell = runs[row["workers"]][row["run"]]
                    row["run_label"] = ",".join(f"{n}={cell[n]}" for n in partners)
            title = f"{label(key)} (time model: {spec.name})"
            tables.append(speedup_table(title, result, used))
            series.append((title if len(grid.time_models) > 1 else label(key), result))
    text = speedup_markdown(grid, tables)
    (out / "speedup.md").write_text(text)
    plot_speedup(series, out / "speedup.png")
    return text


def add_noise_ceilings(result: list[dict], ones: list[dict]) -> None:
    """With the 1-worker reference run's noise scale logged (``noise_scale: true``): each N's
    best sample efficiency along that run up to the target (``noise.trajectory_efficiency_
    ceiling``), to set beside the measured one; in NG-SGD's metric too where it was logged."""
    from modelavg.analysis.noise import trajectory_efficiency_ceiling

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
        "| N | run | frames/worker to target | sample efficiency "
        + "".join(f"| {title} " for _, title in ceilings)
        + "| time-only efficiency | modelled time (s) | speedup | efficiency | paper speedup "
        "| paper efficiency |",
        "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(ceilings),
    ]
    for r in result:
        n = r["workers"]
        p = paper.get(n)
        lines.append(
            f"| {n} | {r.get('run_label') or '-'} | {fmt(r['frames_to_target'], '.0f')} "
            f"| {fmt(r['sample_efficiency'], '.1%', '-')} "
            + "".join(f"| {fmt(r.get(key), '.1%', '-')} " for key, _ in ceilings)
            + f"| {fmt(time_only(r), '.1%', '-')} | {fmt(r['time_s'], '.4g', '-')} "
            f"| {fmt(r['speedup'], '.2f', '-')} | {fmt(r['efficiency'], '.1%', '-')} "
            f"| {f'{p[0]:.2f}' if p else '-'} | {f'{p[1]:.1%}' if p else '-'} |"
        )
    return "\n".join(lines)


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
        "overheads cost at this K and minibatch. Where the reference run logged its gradient "
        "noise scale (`noise_scale: true`), the ceiling column is the best sample efficiency "
        "any N-worker run could have had along it (`modelavg.analysis.noise`: N workers "
        "acting like one minibatch N times larger, McCandlish et al. 2018); with NG-SGD a "
        "second one measures the noise scale in NG-SGD's own metric. "
        "The paper's columns are its time-only figures (equal epochs, "
        "K=10, B=1024, brief §4.1): 58% efficiency at N=16 and 52% at N=32.",
        "",
    ]
    return (
        "\n".join(head)
        + "\n"
        + "\n\n".join(tables or ["No group has a finished 1-worker cell."])
        + "\n"
    )


def plot_speedup(series: list[tuple[str, list[dict]]], path: Path) -> Path:
    import matplotlib.pyplot as plt

    from modelavg import io

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
    return io.save_figure(fig, path)


# -- command line ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grid", required=True, help="grid YAML file (see modelavg/sweep.py)")
    parser.add_argument("--out", required=True, help="sweep directory: one subdirectory per cell")
    parser.add_argument(
        "--dry-run", action="store_true", help="list the cells and their commands, run nothing"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue half-finished cells from their last checkpoint (default: restart them)",
    )
    parser.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep finished cells' checkpoints (default: delete them, keep final.pt)",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="cells to run at once (default 1; one per core)"
    )


def main(args: argparse.Namespace) -> int:
    """0 when every cell finished (or could not fit its data: infeasible), else 1."""
    rows = run_sweep(
        args.grid,
        args.out,
        args.dry_run,
        resume=args.resume,
        keep_checkpoints=args.keep_checkpoints,
        jobs=args.jobs,
    )
    failed = [r["cell"] for r in rows if r["status"] == "failed"]
    if failed:
        print(f"modelavg: {len(failed)} cell(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":  # python -m modelavg.sweep, until `modelavg sweep` is wired in
    _parser = argparse.ArgumentParser(prog="modelavg sweep", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    try:
        sys.exit(main(_parser.parse_args()))
    except UsageError as _exc:
        print(f"modelavg: error: {_exc}", file=sys.stderr)
        sys.exit(2)
