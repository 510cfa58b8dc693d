"""modelavg sweep end to end: a 2x2 grid, jobs in parallel, skipping finished cells, dry
runs, and infeasible cells known by the train process's exit code."""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import make_data_dir

from modelavg.errors import Infeasible, UsageError
from modelavg.sweep import add_arguments, run
from modelavg.sweep.grid import load_grid
from modelavg.sweep.runner import config_changes, plan_cell, run_sweep
from modelavg.sweep.speedup import write_speedup

TINY = {
    "hidden_layers": 1,
    "hidden_dim": 16,
    "context": 1,
    "minibatch": 16,
    "epochs": 2,
    "lr": 0.5,
    "in_process": True,
    "threads": 1,
}
PNGS = ["cv_vs_workers.png", "cv_vs_avg_every.png", "learning_curves.png", "speedup.png"]


def write_grid(path: Path, **content) -> Path:
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, Path, list[dict], list[str]]:
    tmp = tmp_path_factory.mktemp("sweep")
    data = make_data_dir(tmp / "train", utts=24)
    grid = write_grid(
        tmp / "grid.yaml", data=str(data), **TINY, grid={"workers": [1, 2], "avg_every": [1, 2]}
    )
    out = tmp / "out"
    stale = out / "workers=2,avg_every=2"  # a half-finished cell from an interrupted sweep
    stale.mkdir(parents=True)
    (stale / "stale.txt").write_text("left over")
    lines: list[str] = []
    rows = run_sweep(grid, out, jobs=2, log=lines.append)  # two cells at a time
    return grid, out, rows, lines


def test_results_table(sweep):
    _, out, rows, _ = sweep
    with (out / "results.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == len(rows) == 4
    assert [(r["workers"], r["avg_every"]) for r in table] == [
        ("1", "1"),
        ("1", "2"),
        ("2", "1"),
        ("2", "2"),
    ]
    assert [r["cell"] for r in table][2] == "workers=2,avg_every=1"
    for r in table:
        assert r["status"] == "done"
        assert (r["minibatch"], r["epochs"], r["optimizer"], r["init"]) == (
            "16",
            "2",
            "sgd",
            "random",
        )
        assert 0.25 < float(r["cv_frame_accuracy"]) <= 1  # 4 separable classes: chance is 0.25
        assert len(r["cv_acc_per_epoch"].split()) == 3  # epochs 0, 1, 2
        assert int(r["epochs_run"]) == 2
        assert int(r["frames_per_worker"]) == 2 * int(r["frames_per_worker_epoch"]) > 0
        assert float(r["wall_s"]) > 0 and 0 <= float(r["averaging_share"]) < 1
    # N=2 workers each see about half the frames of N=1
    assert int(table[2]["frames_per_worker"]) < int(table[0]["frames_per_worker"])


def test_reports_and_plots(sweep):
    _, out, _, _ = sweep
    md = (out / "results.md").read_text()
    assert "| workers | avg_every | status" in md and md.count("| done |") == 4
    pivot = md[md.index("CV frame accuracy (%) by N") :].splitlines()
    assert pivot[2] == "| N | avg_every=1 | avg_every=2 |"
    rows = {int(r["workers"]): r for r in sweep[2] if r["avg_every"] == 2}
    one = rows[1]
    assert pivot[4].startswith(
        f"| 1 | {100 * sweep[2][0]['cv_frame_accuracy']:.2f} [{sweep[2][0]['rounds_per_epoch']}] "
        f"| {100 * one['cv_frame_accuracy']:.2f} [{one['rounds_per_epoch']}] |"
    )
    assert rows[2]["rounds_per_epoch"] < one["rounds_per_epoch"]  # half the data per worker
    for name in [*PNGS, "speedup.md"]:
        assert (out / name).stat().st_size > 0, name
    speedup = (out / "speedup.md").read_text()
    assert "| 1 |" in speedup and "| 2 |" in speedup
    assert "| 4 |" not in speedup and "| 16 |" not in speedup  # only the grid's N (the paper
    # has 1-32); not "58.3%" (its N=16 efficiency): a measured efficiency can print the same
    assert "| N | run |" in speedup
    assert not (out / "workers=2,avg_every=2" / "stale.txt").exists()  # restarted cleanly
    assert not (out / "noise_scale.png").exists()  # no cell logged a noise scale


def test_a_setting_without_one_worker_runs_is_measured_against_the_sweeps(sweep, tmp_path):
    """As with a grid's ``exclude``: K = 2 has no N = 1 cell, its table uses K = 1's."""
    grid, _, rows, _ = sweep
    kept = [r for r in rows if not (r["workers"] == 1 and r["avg_every"] == 2)]
    text = write_speedup(load_grid(grid), kept, tmp_path)
    ref = next(r for r in kept if r["workers"] == 1)
    target = f"Target CV accuracy {100 * (ref['cv_frame_accuracy'] - 0.005):.2f}%"
    assert text.count("Target CV accuracy") == text.count(target) == 2  # one time model, 2 K


def test_concurrent_cells_log_whole_lines_and_bad_jobs_is_refused(sweep, tmp_path):
    grid, _, _, lines = sweep
    assert sum("running ..." in line for line in lines) == 4
    assert all(line.startswith(("[", "results:")) and line.count("[") <= 2 for line in lines)
    with pytest.raises(UsageError, match="--jobs must be >= 1"):
        run_sweep(grid, tmp_path / "x", jobs=0)


def test_budget_pairs_as_the_only_axis_and_two_runs_at_one_n(tmp_path):
    """workers+epochs alone (no other axis to pivot on), with two epoch budgets at N = 1."""
    data = make_data_dir(tmp_path / "train", utts=24)
    cells = [[1, 1], [1, 2], [2, 2]]
    fixed = {k: v for k, v in TINY.items() if k != "epochs"}
    grid = write_grid(tmp_path / "g.yaml", data=str(data), **fixed, grid={"workers+epochs": cells})
    rows = run_sweep(grid, tmp_path / "out", jobs=2, log=lambda _: None)
    assert [r["status"] for r in rows] == ["done"] * 3
    speedup = (tmp_path / "out" / "speedup.md").read_text()
    assert "CV frame accuracy (%) by N" not in (tmp_path / "out" / "results.md").read_text()
    best = max(r["cv_frame_accuracy"] for r in rows if r["workers"] == 1)
    assert f"Target CV accuracy {100 * (best - 0.005):.2f}%" in speedup
    assert speedup.count("| 1 | epochs=1 |") + speedup.count("| 1 | epochs=2 |") == 1  # fastest


def test_second_run_skips_finished_cells(sweep, capsys):
    grid, out, _, _ = sweep
    finals = sorted(out.glob("*/final_cv.json"))
    assert len(finals) == 4
    before = [p.stat().st_mtime_ns for p in finals]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args(["--grid", str(grid), "--out", str(out)])) == 0
    assert [p.stat().st_mtime_ns for p in finals] == before
    assert capsys.readouterr().out.count("skipped (finished)") == 4


def test_dry_run_lists_without_running(sweep, tmp_path):
    grid, _, _, _ = sweep
    lines: list[str] = []
    rows = run_sweep(grid, tmp_path / "new", dry_run=True, log=lines.append)
    assert [r["status"] for r in rows] == ["planned"] * 4
    assert all("modelavg train --config" in line for line in lines)
    assert not (tmp_path / "new").exists()


def test_a_reader_that_leaves_early_ends_the_listing_quietly(sweep):
    grid, out, _, _ = sweep
    cmd = [sys.executable, "-m", "modelavg", "sweep", "--grid", str(grid), "--out", str(out)]
    proc = subprocess.Popen([*cmd, "--dry-run"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # gone before the first line (e.g. `| head -0`): every write fails
    _, err = proc.communicate()
    assert proc.returncode == 141 and b"Traceback" not in err and b"BrokenPipe" not in err


def test_only_selects_cells_by_their_directory_names_values(sweep, tmp_path):
    grid, out, _, _ = sweep
    lines: list[str] = []
    rows = run_sweep(grid, out, dry_run=True, only=["avg_every=2"], log=lines.append)
    assert [(r["workers"], r["avg_every"]) for r in rows] == [(1, 2), (2, 2)]
    assert all("avg_every=2:" in line and "skip" in line for line in lines)  # the grid's dirs
    rows = run_sweep(grid, out, dry_run=True, only=["avg_every=1,2", "workers=2"], log=lines.append)
    assert sorted(r["avg_every"] for r in rows) == [1, 2]  # a comma is "or" within one option
    for bad, message in [("avg_every=3", "no cell of"), ("lr=0.5", "one of the grid's")]:
        with pytest.raises(UsageError, match=f"--only {bad}: .*{message}"):
            run_sweep(grid, tmp_path / "x", dry_run=True, only=[bad])


def test_a_changed_option_is_a_change_and_a_spelled_out_default_is_not():
    assert config_changes({"lr": 0.5, "workers": 2}, {"workers": 2}) == []  # 0.5: the default
    assert config_changes({"max_change": 0.075}, {}) == []
    assert config_changes({"lr": 1.0}, {"lr": 2.0}) == ["lr"]
    assert config_changes({}, {"max_change": 0.3, "progress": False}) == ["max_change"]


def test_too_large_k_ends_infeasible_by_exit_code_and_is_not_retried(tmp_path, capsys):
    """K x minibatch frames beyond a worker's shard: train exits with Infeasible's code, the cell
    is infeasible (not failed, the sweep exits 0), and the next sweep knows it from cell.json
    alone: with the log's message gone it still does not run the cell again."""
    data = make_data_dir(tmp_path / "train", utts=24)  # ~2.4k frames; K x B = 16k
    grid = write_grid(tmp_path / "g.yaml", data=str(data), **TINY, grid={"avg_every": [1000]})
    out = tmp_path / "out"
    rows = run_sweep(grid, out, log=lambda _: None)
    assert [r["status"] for r in rows] == ["infeasible"]
    cell_dir = out / "avg_every=1000"
    assert json.loads((cell_dir / "cell.json").read_text())["returncode"] == Infeasible.exit_code
    assert "| infeasible |" in (out / "results.md").read_text()
    (cell_dir / "train.log").write_text("")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args(["--grid", str(grid), "--out", str(out)])) == 0
    assert "infeasible (known)" in capsys.readouterr().out
    assert (cell_dir / "train.log").read_text() == ""  # not run again


def test_a_failure_is_not_infeasible_whatever_its_log_says(tmp_path):
    """Only the exit code makes a cell infeasible: a cell that exited 2 is run again."""
    cell = load_grid(write_grid(tmp_path / "g.yaml", data="d", grid={"avg_every": [1000]})).cells[0]
    cell_dir = tmp_path / "out" / cell.name
    cell_dir.mkdir(parents=True)
    (cell_dir / "cell.yaml").write_text(yaml.safe_dump(cell.config, sort_keys=False))
    (cell_dir / "train.log").write_text("modelavg: error: ... exceeds the smallest shard ...\n")
    (cell_dir / "cell.json").write_text(json.dumps({"returncode": 2, "wall_s": 1.0}))
    assert plan_cell(cell, cell_dir, resume=False) == "run"
    (cell_dir / "cell.json").write_text(
        json.dumps({"returncode": Infeasible.exit_code, "wall_s": 1.0})
    )
    assert plan_cell(cell, cell_dir, resume=False) == "infeasible"
