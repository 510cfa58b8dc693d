"""TensorBoard scalars and `modelavg report` for training and pretraining runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import SMALL

from modelavg.cli import main


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report")
    made = {}
    for name, extra in (
        ("n1", ["--workers", "1"]),
        ("n2k4", ["--workers", "2", "--avg-every", "4"]),
    ):
        out = root / name
        args = ["train", "--data", str(data_dir), "--out", str(out), "--in-process", *SMALL]
        assert main([*args, *extra, "--log-every", "5"]) == 0
        made[name] = out
    out = root / "dbn"
    pre = ["pretrain", "--data", str(data_dir), "--out", str(out), "--in-process", "--workers", "2"]
    small = ["--hidden-layers", "2", "--hidden-dim", "8", "--context", "1", "--minibatch", "16"]
    assert main([*pre, *small, "--avg-every", "2", "--no-progress", "--threads", "1"]) == 0
    made["dbn"] = out
    return made


def test_training_writes_the_tensorboard_scalars(runs):
    tags = scalars(runs["n2k4"])
    for tag in [
        "round/train_cross_entropy",
        "round/train_frame_accuracy",
        "round/lr",
        "round/avg_every",
        "round/compute_s",
        "round/averaging_s",
        "round/averaging_share",
        "round/frames_per_s",
        "round/spread_min",
        "round/spread_mean",
        "round/spread_max",
        "epoch/cv_cross_entropy",
        "epoch/cv_frame_accuracy",
    ]:
        assert tag in tags, tag
    steps = [s for s, _ in tags["round/lr"]]
    assert steps == sorted(steps) and steps[0] > 0  # frames by all workers
    assert all(v == 4 for _, v in tags["round/avg_every"])
    spread = dict(tags["round/spread_max"])
    assert all(v > 0 for v in spread.values())  # two replicas drift apart between averagings
    lone = scalars(runs["n1"])
    assert all(v == 0 for _, v in lone["round/spread_max"])  # one worker: nothing to reconcile


def test_pretraining_writes_the_tensorboard_scalars(runs):
    tags = scalars(runs["dbn"])
    assert {"round/layer1/reconstruction_error", "round/layer2/reconstruction_error"} <= set(tags)
    assert "round/layer1/spread_max" in tags and "layer/layer2/train_s" in tags


def test_report_overlays_runs_without_nan_cells(runs, tmp_path, capsys):
    args = ["report", str(runs["n1"]), str(runs["n2k4"]), str(runs["dbn"]), "--out", str(tmp_path)]
    assert main(args) == 0
    text = (tmp_path / "report.md").read_text()
    assert "nan" not in text.lower()
    assert "| n1 | train | 1 |" in text and "| n2k4 | train | 2 | 4 |" in text
    assert "| dbn | pretrain | 2 | 2 |" in text
    for png in ["learning", "lr", "averaging", "spread", "reconstruction"]:
        assert (tmp_path / f"{png}.png").stat().st_size > 1000, png
        assert f"({png}.png)" in text


def test_report_of_a_directory_that_is_no_run_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "not a modelavg run" in err
