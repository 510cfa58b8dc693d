"""End to end through the CLI: outputs, learning, schedules, resume, uneven shards, bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SMALL, make_data_dir

from modelavg.checkpoint import load, worker_file
from modelavg.cli import main
from modelavg.config import TrainConfig
from modelavg.io import read_jsonl
from modelavg.optim import build_optimizer
from modelavg.sweep.results import learning_curve


def train(*args: str) -> int:
    return main(["train", *SMALL, *args])


def train_two(data: Path, out: Path, *args: str) -> int:
    """Train with 2 in-process workers on ``data`` into ``out``."""
    return train("--data", str(data), "--out", str(out), "--in-process", "--workers", "2", *args)


def records(out: Path, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


RUN3 = ["--epochs", "3", "--log-every", "3", "--checkpoint-every", "4", "--keep-checkpoints", "0"]


@pytest.fixture(scope="module")
def run3(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run3"
    assert train_two(data_dir, out, *RUN3) == 0
    return out


def test_keep_checkpoints_prunes_all_but_the_newest(data_dir, tmp_path):
    out = tmp_path / "pruned"
    args = ["--epochs", "3", "--checkpoint-every", "4", "--keep-checkpoints", "2"]
    assert train_two(data_dir, out, *args) == 0
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["e003-r00056", "e004-r00000"]  # 57 rounds per epoch: the last mid-epoch one
    assert (out / "checkpoints" / "LATEST").read_text() == "e004-r00000"


def test_outputs_and_learning(run3, data_dir, capsys):
    for name in ["config.yaml", "metrics.jsonl", "final.pt", "final_cv.json", "checkpoints/LATEST"]:
        assert (run3 / name).exists(), name
    epochs = records(run3, "epoch")
    assert [e["epoch"] for e in epochs] == [0, 1, 2, 3]
    assert epochs[-1]["cv_frame_accuracy"] > 0.8  # 4 separable classes: chance is 0.25
    assert epochs[-1]["cv_cross_entropy"] < epochs[0]["cv_cross_entropy"]
    for key in ["compute_s", "averaging_s", "averaging_share", "leftover_frames", "lr_next"]:
        assert key in epochs[1]
    rounds = records(run3, "round")
    assert rounds and {"lr", "train_cross_entropy", "train_frame_accuracy"} <= set(rounds[0])
    start = records(run3, "start")[0]
    assert rounds[0]["lr"] == pytest.approx(0.5 * 2)  # linear lr scaling with 2 workers
    # every frame is either trained on or counted as left over
    total = sum(start["shard_frames"])
    used = start["rounds_per_epoch"] * 2 * 2 * 16
    assert epochs[1]["leftover_frames"] == total - used

    capsys.readouterr()
    assert main(["eval", "--model", str(run3 / "final.pt"), "--data", str(data_dir), "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    result = json.loads(out[0])
    assert set(result) == {"frame_accuracy", "cross_entropy", "frames"}
    assert result["frame_accuracy"] > 0.8


def resume_from(run: Path, checkpoint: str, tmp: Path) -> Path:
    """A copy of ``run`` as it was when ``checkpoint`` was the newest, then resumed."""
    copy = tmp / "resumed"
    shutil.copytree(run, copy)
    (copy / "final.pt").unlink()
    (copy / "checkpoints" / "LATEST").write_text(checkpoint)
    assert main(["train", "--resume", "--out", str(copy)]) == 0  # options come from config.yaml
    return copy


def same_final_model(a: Path, b: Path) -> bool:
    """Bitwise-equal final.pt parameters in two run directories."""
    sa, sb = (torch.load(d / "final.pt", weights_only=False)["state_dict"] for d in (a, b))
    return all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("checkpoint", ["e002-r00000", "e002-r00004"])
def test_resume_gives_the_identical_model(run3, tmp_path, checkpoint):
    assert (run3 / "checkpoints" / checkpoint).is_dir()
    resumed = resume_from(run3, checkpoint, tmp_path)
    assert same_final_model(run3, resumed)
    assert (resumed / "metrics.jsonl").read_text().count('"kind": "epoch"') == 4


@pytest.mark.parametrize("ng_reset", ["epoch", "never"])
def test_ngsgd_state_is_per_worker_checkpointed_and_resumes_identically(
    data_dir, tmp_path, ng_reset
):
    out = tmp_path / "ng"
    ng = ["--optimizer", "ngsgd", "--ng-rank-in", "4", "--ng-rank-out", "8", "--lr", "0.2"]
    args = [
        "--epochs",
        "2",
        "--checkpoint-every",
        "4",
        "--keep-checkpoints",
        "0",
        "--ng-reset",
        ng_reset,
        *ng,
    ]
    assert train_two(data_dir, out, *args) == 0
    ckpt_dir = out / "checkpoints" / "e002-r00004"
    workers = [load(worker_file(ckpt_dir, w), torch.device("cpu")) for w in (0, 1)]
    states = [w["optimizer"]["ngsgd"] for w in workers]
    assert states[0].keys() == states[1].keys() and states[0]
    # never averaged: each worker's Fisher estimate comes from its own shard
    assert all(not torch.equal(states[0][k]["in"]["w"], states[1][k]["in"]["w"]) for k in states[0])
    assert same_final_model(out, resume_from(out, "e002-r00004", tmp_path))


def test_max_change_scaling_loosens_the_cap_n_fold(data_dir, tmp_path):
    """A cap that binds: scaling it by N changes 2 workers' training, not 1 worker's."""
    ng = ["--optimizer", "ngsgd", "--lr", "2.0", "--max-change", "0.001", "--epochs", "1"]
    for workers in ("1", "2"):
        for scaling in ("none", "linear"):
            out = tmp_path / f"w{workers}_{scaling}"
            args = ["--data", str(data_dir), "--out", str(out), "--in-process"]
            assert train(*args, "--workers", workers, *ng, "--max-change-scaling", scaling) == 0
    assert same_final_model(tmp_path / "w1_none", tmp_path / "w1_linear")
    assert not same_final_model(tmp_path / "w2_none", tmp_path / "w2_linear")
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    cfg = TrainConfig(optimizer="ngsgd", max_change=0.1, max_change_scaling="linear")
    assert build_optimizer(model, cfg, workers=4).max_change == pytest.approx(0.4)


def test_cv_every_adds_curve_points_without_changing_training(run3, data_dir, tmp_path):
    out = tmp_path / "cv_every"
    assert train_two(data_dir, out, *RUN3, "--cv-every", "2") == 0
    assert same_final_model(run3, out)
    start = records(out, "start")[0]
    rounds, frames_per_round = start["rounds_per_epoch"], 2 * 16  # --avg-every 2, minibatch 16
    points = records(out, "cv")
    expected = [(e, r) for e in (1, 2, 3) for r in range(2, rounds, 2)]
    assert [(p["epoch"], p["round"]) for p in points] == expected and expected
    for p in points:
        assert p["frames_per_worker"] == ((p["epoch"] - 1) * rounds + p["round"]) * frames_per_round
        assert 0 <= p["cv_frame_accuracy"] <= 1
    frames, acc = learning_curve(read_jsonl(out / "metrics.jsonl"), rounds * frames_per_round)
    assert len(frames) == 4 + len(points) and frames == sorted(frames)
    assert acc[-1] == records(out, "epoch")[-1]["cv_frame_accuracy"]


def test_newbob_rejects_an_epoch_that_hurts(data_dir, tmp_path):
    out = tmp_path / "nb"
    assert (
        train_two(
            data_dir,
            out,
            "--schedule",
            "newbob",
            "--lr",
            "200",
            "--epochs",
            "2",
        )
        == 0
    )
    epochs = records(out, "epoch")
    assert epochs[1]["accepted"] is False
    assert epochs[1]["lr_next"] == pytest.approx(100.0)  # halving started
    final = json.loads((out / "final_cv.json").read_text())
    best = min(e["cv_cross_entropy"] for e in epochs if e.get("accepted", True))
    assert final["cross_entropy"] == pytest.approx(best, rel=1e-9)


def test_very_uneven_shards_end_the_epoch_without_hanging(tmp_path):
    data = make_data_dir(tmp_path / "uneven", utts=5, lengths=[2000, 60, 50, 40, 30])
    out = tmp_path / "u"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelavg",
            "train",
            "--data",
            str(data),
            "--cv-fraction",
            "0.2",
            "--out",
            str(out),
            "--workers",
            "2",
            *SMALL,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    start = records(out, "start")[0]
    assert start["shard_frames"] == [2000, 150]
    assert start["rounds_per_epoch"] == 150 // (2 * 16)
    epoch = records(out, "epoch")[1]
    assert epoch["leftover_frames"] == 2150 - start["rounds_per_epoch"] * 2 * 2 * 16


def test_yaml_config_with_command_line_override(data_dir, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("hidden_dim: 8\nepochs: 1\nlr: 0.1\n")
    out = tmp_path / "y"
    assert (
        train(
            "--config",
            str(cfg),
            "--data",
            str(data_dir),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--hidden-dim",
            "12",
        )
        == 0
    )
    saved = (out / "config.yaml").read_text()
    assert "hidden_dim: 12" in saved and "lr: 0.1" in saved


@pytest.mark.parametrize(
    "args, message",
    [
        (["--avg-every", "0"], "--avg-every must be >= 1"),
        (["--workers", "0"], "--workers must be >= 1"),
        (["--activation", "gelu"], "--activation"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--minibatch", "many"], "--minibatch"),
        (["--resume"], "--resume: no checkpoint"),
        (["--data", "/nonexistent/dir"], "/nonexistent/dir"),
        (["--workers", "100000", "--in-process"], "more workers than utterances"),
        (["--avg-every", "1000"], "exceeds the smallest shard"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(data_dir, tmp_path, capsys, args, message):
    out = tmp_path / "bad"
    code = main(["train", "--data", str(data_dir), "--out", str(out), *SMALL, *args])
    err = capsys.readouterr().err.strip()
    assert code == (4 if "smallest shard" in message else 2)  # infeasible options: exit 4
    assert len(err.splitlines()) == 1 and err.startswith("modelavg: error:")
    assert message in err
    assert not (out / "final.pt").exists() and not (out / "checkpoints").exists()


def test_refuses_to_overwrite_a_run(run3, data_dir, capsys):
    assert main(["train", "--data", str(data_dir), "--out", str(run3), *SMALL]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_init_from_a_model_file_and_a_misfit(run3, data_dir, tmp_path, capsys):
    out = tmp_path / "init"
    assert (
        train(
            "--data",
            str(data_dir),
            "--out",
            str(out),
            "--init",
            str(run3 / "final.pt"),
            "--epochs",
            "1",
        )
        == 0
    )
    code = train(
        "--data",
        str(data_dir),
        "--out",
        str(tmp_path / "bad"),
        "--init",
        str(run3 / "final.pt"),
        "--hidden-dim",
        "12",
    )
    err = capsys.readouterr().err
    assert code == 2 and "do not fit this data and model" in err
