"""modelavg sweep: a 2x2 grid end to end, skipping finished cells, bad grid files, and the
speedup-to-accuracy arithmetic on hand-made curves."""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import pytest
import yaml
from conftest import make_data_dir

from modelavg.analysis import timemodel as tm
from modelavg.errors import UsageError
from modelavg.sweep import (
    TIME_MODEL_PRESETS,
    TimeModelSpec,
    add_arguments,
    add_noise_ceilings,
    base_row,
    cell_name,
    config_changes,
    frames_to_reach,
    learning_curve,
    load_grid,
    main,
    noise_curve,
    pivot_by_workers,
    plot_noise,
    run_sweep,
    seconds_function,
    speedup_table,
    speedup_to_accuracy,
    time_only,
)

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
    assert main(parser.parse_args(["--grid", str(grid), "--out", str(out)])) == 0
    assert [p.stat().st_mtime_ns for p in finals] == before
    assert capsys.readouterr().out.count("skipped (finished)") == 4


def test_dry_run_lists_without_running(sweep, tmp_path):
    grid, _, _, _ = sweep
    lines: list[str] = []
    rows = run_sweep(grid, tmp_path / "new", dry_run=True, log=lines.append)
    assert [r["status"] for r in rows] == ["planned"] * 4
    assert all("modelavg train --config" in line for line in lines)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"data": "d", "hiden_dim": 3}, "unknown key 'hiden_dim'"),
        ({"data": "d", "grid": {"workerz": [1]}}, "unknown option 'workerz'"),
        ({"data": "d", "out": "x"}, "'out' is set by the sweep"),
        ({"data": "d", "grid": {"workers": 2}}, "non-empty list"),
        ({"data": "d", "grid": {"optimizer": ["sgd", "adam"]}}, "optimizer=adam"),
        ({"data": "d", "workers": 1, "grid": {"workers": [1, 2]}}, "both fixed and in the grid"),
        ({"data": "d", "grid": {"optimizer+lr": [["sgd"]]}}, "is not 2 values"),
        ({"data": "d", "time_model": {"step_seconds": "fast"}}, "step_seconds: 'fast'"),
        ({"data": "d", "time_model": ["paper", "paper"]}, "names must differ"),
        ({"data": "d", "time_model": "k20"}, "time_model must be measured, paper, paper-hardware"),
        ({"data": "d", "accuracy_drop": 5}, "accuracy_drop"),
    ],
)
def test_bad_grid_files(tmp_path, content, message):
    with pytest.raises(UsageError, match=message.replace("+", r"\+")):
        load_grid(write_grid(tmp_path / "g.yaml", **content))


def test_cells_and_names(tmp_path):
    grid = load_grid(
        write_grid(
            tmp_path / "g.yaml",
            data="d",
            grid={
                "workers": [8],
                "avg_every": [10],
                "optimizer+lr": [["sgd", 0.1], ["ngsgd", 0.05]],
                "init": ["random", "exp/dbn demo/dbn.pt"],
            },
        )
    )
    names = [c.name for c in grid.cells]
    assert names[0] == "workers=8,avg_every=10,optimizer=sgd,lr=0.1,init=random"
    assert names[3] == "workers=8,avg_every=10,optimizer=ngsgd,lr=0.05,init=exp_dbn_demo_dbn.pt"
    assert grid.cells[0].config["init"] is None and grid.cells[3].config["lr"] == 0.05
    assert cell_name({"workers": 8, "avg_every": 10, "optimizer": "sgd"}) == (
        "workers=8,avg_every=10,optimizer=sgd"
    )


def test_joint_axis_stays_with_workers(tmp_path):
    """workers+epochs is one axis: N plots and speedup tables group by the other options only."""
    grid = load_grid(
        write_grid(
            tmp_path / "g.yaml",
            data="d",
            grid={"workers+epochs": [[1, 2], [4, 6]], "avg_every": [1, 10]},
        )
    )
    assert [c.name for c in grid.cells][2] == "workers=4,epochs=6,avg_every=1"
    assert grid.others("workers") == ["avg_every"]
    assert grid.others("avg_every") == ["workers", "epochs"]


def test_pivot_tables_put_the_longest_axis_in_columns(tmp_path):
    """One table per optimiser, K across, N down; infeasible cells say so."""
    grid = load_grid(
        write_grid(
            tmp_path / "g.yaml",
            data="d",
            grid={"workers": [1, 2], "avg_every": [1, 5, 10], "optimizer": ["sgd", "ngsgd"]},
        )
    )
    rows = []
    for i, cell in enumerate(grid.cells):
        done = cell.varying["workers"] == 1 or cell.varying["avg_every"] < 10
        row = base_row(cell, "done" if done else "infeasible")
        row.update(cv_frame_accuracy=i / 100, rounds_per_epoch=7)
        rows.append(row)
    lines = pivot_by_workers(grid, rows)
    assert lines[2:7] == [
        "optimizer=sgd:",
        "",
        "| N | avg_every=1 | avg_every=5 | avg_every=10 |",
        "|---|---|---|---|",
        "| 1 | 0.00 [7] | 2.00 [7] | 4.00 [7] |",
    ]
    assert lines[7] == "| 2 | 6.00 [7] | 8.00 [7] | infeasible |"
    assert lines[9] == "optimizer=ngsgd:" and lines[13] == "| 1 | 1.00 [7] | 3.00 [7] | 5.00 [7] |"


def test_frames_to_reach_interpolates():
    frames, acc = [0, 100, 200], [0.1, 0.5, 0.7]
    assert frames_to_reach(frames, acc, 0.6) == pytest.approx(150.0)
    assert frames_to_reach(frames, acc, 0.5) == pytest.approx(100.0)
    assert frames_to_reach(frames, acc, 0.05) == 0.0
    assert frames_to_reach(frames, acc, 0.71) is None


def test_a_changed_option_is_a_change_and_a_spelled_out_default_is_not():
    assert config_changes({"lr": 0.5, "workers": 2}, {"workers": 2}) == []  # 0.5: the default
    assert config_changes({"max_change": 0.075}, {}) == []
    assert config_changes({"lr": 1.0}, {"lr": 2.0}) == ["lr"]
    assert config_changes({}, {"max_change": 0.3, "progress": False}) == ["max_change"]


def test_speedup_to_accuracy_by_hand():
    curves = {
        1: [([0, 100, 200], [0.2, 0.6, 0.8])],  # reference 0.8 -> target 0.795 at 197.5 frames
        2: [
            ([0, 50, 100, 150, 200], [0.2, 0.6, 0.7, 0.79, 0.81]),  # a longer budget: 175
            ([0, 50, 100, 150], [0.2, 0.7, 0.79, 0.8]),  # 100 + 0.005/0.01 * 50 = 125
        ],
        4: [([0, 25, 50], [0.2, 0.7, 0.79])],  # never reaches 0.795
    }
    rows = speedup_to_accuracy(curves, 0.8, lambda n, f: 2 * f + (10 if n > 1 else 0))
    by_n = {r["workers"]: r for r in rows}
    assert by_n[2]["run"] == 1 and by_n[1]["run"] == 0 and by_n[4]["run"] is None
    assert by_n[1]["target"] == pytest.approx(0.795)
    assert by_n[1]["frames_to_target"] == pytest.approx(197.5)
    assert by_n[2]["frames_to_target"] == pytest.approx(125.0)
    assert by_n[1]["speedup"] == pytest.approx(1.0)
    assert by_n[2]["time_s"] == pytest.approx(260.0)
    assert by_n[2]["speedup"] == pytest.approx(395.0 / 260.0)
    assert by_n[2]["efficiency"] == pytest.approx(395.0 / 260.0 / 2)
    assert by_n[2]["sample_efficiency"] == pytest.approx(197.5 / (2 * 125.0))
    assert by_n[4]["frames_to_target"] is None
    assert by_n[4]["speedup"] is None and by_n[4]["efficiency"] is None


def test_noise_ceiling_follows_the_reference_run_up_to_its_target():
    metrics = [
        {"kind": "start"},
        {"kind": "epoch", "epoch": 0, "cv_frame_accuracy": 0.2, "noise_scale": 100.0},
        {"kind": "cv", "frames_per_worker": 100, "cv_frame_accuracy": 0.6, "noise_scale": 400.0}
        | {"noise_scale_ng": 900.0},  # NG-SGD's metric: not before the first step
        {"kind": "epoch", "epoch": 1, "cv_frame_accuracy": 0.8, "noise_scale": 900.0}
        | {"noise_scale_ng": 1e12},
    ]
    assert noise_curve(metrics, 200) == ([0.0, 100.0, 200.0], [100.0, 400.0, 900.0])
    ng = noise_curve(metrics, 200, "noise_scale_ng")
    assert ng == ([0.0, 100.0, 200.0], [900.0, 900.0, 1e12])  # starts at frame 0
    curves = {1: [learning_curve(metrics, 200)], 2: [([0, 150], [0.2, 0.8])]}
    rows = speedup_to_accuracy(curves, 0.8, lambda n, f: f)  # N = 1 reaches 0.795 at 197.5
    ref = {"noise_curve": noise_curve(metrics, 200), "noise_curve_ng": ng, "minibatch": 100}
    add_noise_ceilings(rows, [ref])
    by_n = {r["workers"]: r for r in rows}
    assert by_n[1]["ceiling"] == pytest.approx(1.0)
    # stretches [0, 100) and [100, 197.5) at the larger end point's B: 400 and 900
    cost = 100 / ((1 + 0.25) / (1 + 0.5)) + 97.5 / ((1 + 1 / 9) / (1 + 2 / 9))
    assert by_n[2]["ceiling"] == pytest.approx(197.5 / cost)
    # NG metric: B = 900 up to frame 100, then ~no noise-limited loss (ceiling ~1)
    assert by_n[2]["ceiling_ng"] == pytest.approx(197.5 / (100 / (10 / 11) + 97.5), rel=1e-6)
    cell = {"minibatch": 100, "avg_every": 1, "parameters": 1000, "step_s": 0.01}
    used = seconds_function(
        TIME_MODEL_PRESETS["paper"], [cell | {"frames_per_worker_epoch": 200}], None
    )[1]
    table = speedup_table("t", rows, used)
    assert "| ceiling (noise scale) | ceiling (NG metric) |" in table
    assert f"| {by_n[2]['ceiling']:.1%} | {by_n[2]['ceiling_ng']:.1%} |" in table
    plain = speedup_to_accuracy(curves, 0.8, lambda n, f: f)
    add_noise_ceilings(plain, [{"noise_curve": ([], []), "minibatch": 100}])
    assert all("ceiling" not in r for r in plain)  # no noise scale logged: no column
    assert "ceiling" not in speedup_table("t", plain, used)


def test_noise_plot_draws_each_logged_curve(tmp_path, monkeypatch):
    """Both metrics of a run that logged them; frame 0 and an infinite B (no measurable
    gradient) left out of the log-log plot; a run without a curve adds nothing."""
    rows = [
        {
            "cell": "workers=1",
            "noise_curve": ([0.0, 100.0, 200.0, 300.0], [50.0, 400.0, 900.0, math.inf]),
            "noise_curve_ng": ([0.0, 100.0, 200.0], [900.0, 900.0, 2000.0]),
        },
        {"cell": "workers=2", "noise_curve": ([], []), "noise_curve_ng": ([], [])},
    ]
    import modelavg.io

    save, lines = modelavg.io.save_figure, []

    def keep(fig, path):
        lines.extend((ln.get_label(), list(ln.get_xdata())) for ln in fig.axes[0].get_lines())
        return save(fig, path)

    monkeypatch.setattr(modelavg.io, "save_figure", keep)
    assert plot_noise(rows, tmp_path / "noise_scale.png").stat().st_size > 0
    assert lines == [
        ("workers=1 (noise scale)", [100.0, 200.0]),
        ("workers=1 (NG metric)", [100.0, 200.0]),
    ]


def test_paper_time_model_reproduces_calibrated_speedup():
    """If N workers need exactly 1/N of the frames, speedup-to-accuracy is the time model's."""
    frames = tm.PAPER_FRAMES_PER_EPOCH
    group = [
        {
            "minibatch": 1024,
            "avg_every": 10,
            "parameters": tm.PAPER_MODEL_PARAMS,
            "step_s": 0.01,
            "frames_per_worker_epoch": frames,
        }
    ]
    spec = TimeModelSpec("paper", "paper", "paper", "paper", "paper")
    seconds, _ = seconds_function(spec, group, Path("g.yaml"))
    curves = {n: [([0.0, frames / n], [0.0, 1.0])] for n in tm.PAPER_GPUS}
    rows = speedup_to_accuracy(curves, 1.0, seconds, drop=0.0)
    cal = tm.calibration_report()
    for row, ref in zip(rows, cal.rows, strict=True):
        assert row["speedup"] == pytest.approx(ref["speedup_pred"], rel=1e-9)
    assert rows[4]["efficiency"] == pytest.approx(9.32 / 16, abs=0.03)  # the paper's 58% at 16
    for row in rows:  # 1/N of the frames each: all of the efficiency is the time model's
        assert row["sample_efficiency"] == pytest.approx(1.0)
        assert time_only(row) == pytest.approx(row["efficiency"])


def test_paper_hardware_drops_staging_and_overheads_only(tmp_path):
    """paper-hardware = the paper's step, bytes and fitted ring; no staging, no N > 1 overheads."""
    group = [
        {
            "minibatch": 1024,
            "avg_every": 10,
            "parameters": 1000,
            "step_s": 0.01,
            "frames_per_worker_epoch": 1e6,
        }
    ]
    grid = load_grid(
        write_grid(tmp_path / "g.yaml", data="d", time_model=["paper", "paper-hardware"])
    )
    assert [m.name for m in grid.time_models] == ["paper", "paper-hardware"]
    paper, _ = seconds_function(grid.time_models[0], group, grid.path)
    hardware, used = seconds_function(grid.time_models[1], group, grid.path)
    cal = tm.calibration_report()
    link = cal.link_fit.link
    assert used["link"].host_bandwidth_Bps is None and used["overhead"] == 0.0
    assert (
        used["link"].latency_s == link.latency_s
        and used["link"].bandwidth_Bps == link.bandwidth_Bps
    )
    frames = 1e6
    rounds = frames / (1024 * 10)
    ring = tm.allreduce_seconds(tm.PAPER_MODEL_BYTES, 16, link.latency_s, link.bandwidth_Bps)
    expected = frames / 1024 * cal.compute.step_seconds + rounds * ring
    assert hardware(16, frames) == pytest.approx(expected, rel=1e-12)
    assert hardware(16, frames) < paper(16, frames)
    assert hardware(1, frames) == pytest.approx(paper(1, frames), rel=1e-12)


EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def test_every_committed_grid_loads_with_the_cell_count_its_readme_gives():
    """A typo in a grid file, or a README table that no longer matches it, fails here."""
    table = {}
    for line in (EXPERIMENTS / "README.md").read_text().splitlines():
        cols = [c.strip() for c in line.strip("|").split("|")]
        if len(cols) > 2 and cols[0].startswith("`") and cols[0].endswith(".yaml`"):
            table[cols[0].strip("`")] = int(cols[1])
    grids = sorted(p.name for p in EXPERIMENTS.glob("*.yaml"))
    assert grids == sorted(table)
    for name in grids:
        assert len(load_grid(EXPERIMENTS / name).cells) == table[name], name
