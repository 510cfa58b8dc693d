"""The grid file: bad files refused with the file and key named, cell names, joint axes, the
paper's N-by-K table shape, and every committed grid."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from modelavg.errors import UsageError
from modelavg.sweep.grid import cell_name, load_grid
from modelavg.sweep.results import base_row
from modelavg.sweep.tables import pivot_by_workers


def write_grid(path: Path, **content) -> Path:
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"data": "d", "hiden_dim": 3}, "unknown key 'hiden_dim'"),
        ({"data": "d", "grid": {"workerz": [1]}}, "unknown option 'workerz'"),
        ({"data": "d", "out": "x"}, "'out' is set by the sweep"),
        ({"data": "d", "grid": {"workers": 2}}, "non-empty list"),
        ({"data": "d", "grid": {"optimizer": ["sgd", "rmsprop"]}}, "optimizer=rmsprop"),
        ({"data": "d", "workers": 1, "grid": {"workers": [1, 2]}}, "both fixed and in the grid"),
        ({"data": "d", "grid": {"optimizer+lr": [["sgd"]]}}, "is not 2 values"),
        ({"data": "d", "time_model": {"step_seconds": "fast"}}, "step_seconds: 'fast'"),
        ({"data": "d", "time_model": ["paper", "paper"]}, "names must differ"),
        ({"data": "d", "time_model": "k20"}, "time_model must be measured, paper, paper-hardware"),
        ({"data": "d", "accuracy_drop": 5}, "accuracy_drop"),
        ({"data": "d", "grid": {"workers": [1]}, "exclude": {"workers": 1}}, "a list of option"),
        ({"data": "d", "grid": {"workers": [1]}, "exclude": [{"lr": 1}]}, "'lr' is not an option"),
        (
            {"data": "d", "grid": {"workers": [1, 2]}, "exclude": [{"workers": 3}]},
            "matches no cell",
        ),
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


def test_exclude_drops_the_matching_combinations(tmp_path):
    """Several methods measured against one 1-worker reference: N = 1 only for the first."""
    grid = load_grid(
        write_grid(
            tmp_path / "g.yaml",
            data="d",
            grid={
                "workers+lr": [[1, 10.0], [4, 5.0], [4, 10.0]],
                "averaging+lr_scaling": [["model", "linear"], ["bmuf", "none"]],
            },
            exclude=[{"workers": 1, "averaging": "bmuf"}, {"lr": 5.0, "lr_scaling": "none"}],
        )
    )
    assert [c.name for c in grid.cells] == [
        "workers=1,lr=10.0,averaging=model,lr_scaling=linear",
        "workers=4,lr=5.0,averaging=model,lr_scaling=linear",
        "workers=4,lr=10.0,averaging=model,lr_scaling=linear",
        "workers=4,lr=10.0,averaging=bmuf,lr_scaling=none",
    ]


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
