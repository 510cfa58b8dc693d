"""Running a grid's cells: each one a ``python -m modelavg train`` process in its own directory.

Why a process per cell: no torch state (threads, process groups, RNG) leaks between cells, an
out-of-memory or crashing cell does not take the sweep down, and ``in_process: false`` with
``workers: N`` spawns real gloo processes the same way.

A cell's directory is its state: ``final_cv.json`` means done (skipped by the next sweep);
``cell.yaml`` holds the options it was run with and ``cell.json`` the exit code and wall seconds
of its last attempt.  Exit code ``Infeasible.exit_code`` means K x minibatch frames exceed a
worker's shard: the cell is reported as infeasible, not failed, and is not retried while its
options stay the same.

Example::

    rows = run_sweep("experiments/demo_quick.yaml", "exp/sweep/demo_quick", jobs=2)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from modelavg.errors import Infeasible, UsageError
from modelavg.io import atomic_write_bytes
from modelavg.sweep.grid import Cell, Grid, default_of, format_value, load_grid
from modelavg.sweep.plots import write_plots
from modelavg.sweep.results import base_row, cell_result
from modelavg.sweep.speedup import write_speedup
from modelavg.sweep.tables import results_markdown, write_csv
from modelavg.sweep.wer import CellDecoder

IGNORED_IN_COMPARISON = ("progress",)  # may change between invocations without a rerun
Log = Callable[[str], None]


def run_sweep(
    grid_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    dry_run: bool = False,
    *,
    resume: bool = False,
    keep_checkpoints: bool = False,
    jobs: int = 1,
    only: list[str] | None = None,
    log: Log = print,
) -> list[dict]:
    """Run (or with ``dry_run`` only list) every cell; returns one row per cell.

    ``jobs`` cells run at once (give each cell ``threads: 1`` and one job per core).
    Finished cells are skipped; half-finished ones restart cleanly, or continue from their last
    checkpoint with ``resume``. A finished cell's checkpoints are deleted (final.pt stays) unless
    ``keep_checkpoints``: a full grid of paper-size models would not fit on disk. Writes
    results.csv, results.md, the plots and speedup.md/.png. With a graph in the grid, each
    finished cell is then decoded (``modelavg.sweep.wer``) and its row gets a WER. ``only``
    (``option=value`` strings) keeps the matching cells: a re-run of part of a grid.
    """
    grid = load_grid(grid_path)
    grid.cells = select_cells(grid, only or [])
    out = Path(out_dir)
    if jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {jobs}")
    decoder = CellDecoder(grid.wer, jobs) if grid.wer is not None else None
    if decoder is not None and not dry_run:
        decoder.check()
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
            message = last_error(cell_dir)
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
        if row["status"] == "done" and decoder is not None:
            row.update(decoder.cell_wer(cell_dir, cell.config.get("cv")))
            say(f"{prefix} {decoder.spec.split} WER {100 * row['wer']:.2f}% (acwt {row['acwt']:g})")
        if row["status"] == "done" and not keep_checkpoints:
            shutil.rmtree(cell_dir / "checkpoints", ignore_errors=True)
        return position, row

    with ThreadPoolExecutor(jobs) as pool:  # each cell is its own process: threads only wait
        for position, row in pool.map(run_one, pending):
            rows[position] = row
    if not dry_run:
        write_reports(grid, rows, out, log)
    return rows


def select_cells(grid: Grid, only: list[str]) -> list[Cell]:
    """The cells whose varying options match every ``option=value`` of ``only`` (as written in
    the cell's directory name; ``option=a,b`` matches either value: a directory name cannot
    hold a comma inside a value, so the comma is free to mean "or")."""
    cells = grid.cells
    for spec in only:
        key, sep, value = spec.partition("=")
        if not sep or key not in grid.varying:
            raise UsageError(
                f"--only {spec}: expected OPTION=VALUE with OPTION one of the grid's "
                f"{', '.join(grid.varying)}"
            )
        wanted = set(value.split(","))
        cells = [c for c in cells if format_value(key, c.varying[key]) in wanted]
        if not cells:
            raise UsageError(f"--only {spec}: no cell of {grid.path} has this value")
    return cells


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


def cell_state(cell_dir: Path) -> str:
    """done (final_cv.json), partial (started, resumable if it has a checkpoint) or new."""
    if (cell_dir / "final_cv.json").exists():
        return "done"
    return "partial" if cell_dir.exists() else "new"


def stored_config(cell_dir: Path) -> dict[str, Any] | None:
    path = cell_dir / "cell.yaml"
    return yaml.safe_load(path.read_text()) if path.exists() else None


def last_attempt(cell_dir: Path) -> dict[str, Any] | None:
    """cell.json: the exit code (``returncode``) and wall seconds of the cell's last run."""
    path = cell_dir / "cell.json"
    return json.loads(path.read_text()) if path.exists() else None


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


def known_infeasible(cell: Cell, cell_dir: Path) -> bool:
    """A previous attempt with these very options exited with ``Infeasible``'s code."""
    attempt = last_attempt(cell_dir)
    if stored_config(cell_dir) != cell.config or attempt is None:
        return False
    return outcome(attempt["returncode"]) == "infeasible"


def outcome(returncode: int) -> str:
    """A train process's exit code as a cell status: done, infeasible or failed."""
    if returncode == 0:
        return "done"
    return "infeasible" if returncode == Infeasible.exit_code else "failed"


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


def train_command(cell_dir: Path, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "modelavg", "train", "--config", str(cell_dir / "cell.yaml")]
    return cmd + ["--out", str(cell_dir)] + (["--resume"] if resume else [])


def run_cell(cell: Cell, cell_dir: Path, action: str) -> dict[str, Any]:
    """One ``modelavg train`` process; its output goes to cell_dir/train.log, its exit code and
    wall seconds (summed over resumed attempts) to cell_dir/cell.json."""
    previous_s = 0.0
    if action == "run":
        if cell_dir.exists():
            shutil.rmtree(cell_dir)
        cell_dir.mkdir(parents=True)
        atomic_write_bytes(
            yaml.safe_dump(cell.config, sort_keys=False).encode(), cell_dir / "cell.yaml"
        )
    elif (attempt := last_attempt(cell_dir)) is not None:
        previous_s = attempt.get("wall_s", 0.0)
    t0 = time.perf_counter()
    with (cell_dir / "train.log").open("a") as log:
        code = subprocess.run(
            train_command(cell_dir, action == "resume"), stdout=log, stderr=subprocess.STDOUT
        ).returncode
    info = {"returncode": code, "wall_s": previous_s + time.perf_counter() - t0}
    atomic_write_bytes(json.dumps(info).encode(), cell_dir / "cell.json")
    return info


def last_error(cell_dir: Path) -> str:
    """The last error line of a cell's train.log, for the results table (the status comes from
    the exit code, not from this text)."""
    log = cell_dir / "train.log"
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    errors = [x for x in lines if "error" in x.lower()] or lines or ["no output"]
    return errors[-1].strip().removeprefix("modelavg: error: ")[:300]


def execute(cell: Cell, cell_dir: Path, action: str, prefix: str, log: Log) -> dict[str, Any]:
    """Run or skip one cell and turn its files into a results row."""
    if action != "skip":
        log(f"{prefix} {'resuming' if action == 'resume' else 'running'} ...")
        info = run_cell(cell, cell_dir, action)
        status = outcome(info["returncode"])
        if status != "done":
            message = last_error(cell_dir)
            log(f"{prefix} {status}: {message}")
            return {**base_row(cell, status), "error": message, "wall_s": info["wall_s"]}
    row = {**base_row(cell, "done"), **cell_result(cell_dir)}
    what = "skipped (finished)" if action == "skip" else f"done in {row['wall_s']:.1f} s"
    log(f"{prefix} {what}, CV accuracy {100 * row['cv_frame_accuracy']:.2f}%")
    return row


def write_reports(grid: Grid, rows: list[dict], out: Path, log: Log) -> None:
    """results.csv and results.md, plots, and the speedup table when workers includes 1."""
    out.mkdir(parents=True, exist_ok=True)
    write_csv(grid, rows, out / "results.csv")
    plots = write_plots(grid, rows, out)
    speedup = None
    if "workers" in grid.varying and any(r.get("workers") == 1 for r in rows):
        speedup = write_speedup(grid, rows, out)
    markdown = results_markdown(grid, rows, plots, speedup)
    atomic_write_bytes(markdown.encode(), out / "results.md")
    log(f"results: {out / 'results.csv'}, {out / 'results.md'}")
