"""``modelavg pretrain --resume`` on another number of workers (modelavg.elastic): at a layer
boundary, at an epoch's end and mid-epoch the run continues from its position with the finished
layers as they were, logs a ``resize`` line and records the new N for a later plain --resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import PRETRAIN_SMALL

from modelavg import pretrain as pretrain_module
from modelavg.cli import main
from modelavg.io import read_jsonl
from modelavg.nets.dbn import load_dbn
from modelavg.nets.rbm import CD1Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

# 2 RBMs: the Gaussian one 2 epochs, the Bernoulli one 1; 62 rounds per epoch on 2 workers,
# 41 on 3 (rounds of 2 x 16 frames per worker); a checkpoint every 5 rounds
FLAGS = [
    *PRETRAIN_SMALL,
    "--rbm-iter=1",
    "--lr-scaling=linear",
    "--checkpoint-every=5",
    "--keep-checkpoints=0",
    "--no-tensorboard",
]


def pretrain_run(data_dir: Path, out: Path, workers: int) -> Path:
    args = ["pretrain", "--data", str(data_dir), "--out", str(out), *FLAGS, "--in-process"]
    assert main([*args, "--workers", str(workers)]) == 0
    return out


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory) -> dict[int, Path]:
    """Complete pretrainings on 2 and 3 workers, every checkpoint kept."""
    root = tmp_path_factory.mktemp("pretrain-resize")
    return {n: pretrain_run(data_dir, root / f"n{n}", n) for n in (2, 3)}


def resume_on(run: Path, out: Path, checkpoint: str, workers: int, *extra: str) -> tuple[int, dict]:
    """A copy of ``run`` as if it had died after ``checkpoint``, resumed on ``workers``; the exit
    code and the checkpoint's shared state."""
    shutil.copytree(run, out)
    (out / "dbn.pt").unlink()
    (out / "checkpoints" / "LATEST").write_text(checkpoint)
    shared = torch.load(out / "checkpoints" / checkpoint / "shared.pt", weights_only=False)
    args = ["pretrain", "--resume", "--out", str(out), "--in-process"]
    return main([*args, "--workers", str(workers), *extra]), shared


def records(out: Path, kind: str) -> list[dict]:
    return [r for r in read_jsonl(out / "pretrain.jsonl") if r["kind"] == kind]


def check_continued(out: Path, shared: dict, workers: int) -> dict:
    """dbn.pt has both layers, the checkpoint's finished ones bitwise; each layer was summed up
    once; training went on from the checkpoint's position. Returns the resize record."""
    layers, _ = load_dbn(out / "dbn.pt")
    assert len(layers) == 2
    assert len(shared["stack"]) == shared["layer"]
    for rbm, state in zip(layers, shared["stack"], strict=False):
        for name, value in rbm.state_dict().items():
            assert torch.equal(value, state[name]), name
    assert [r["layer"] for r in records(out, "layer")] == [1, 2]
    (resize,) = records(out, "resize")
    assert (resize["workers_before"], resize["workers"]) == (shared["workers"], workers)
    assert (resize["layer"], resize["epoch"]) == (shared["layer"] + 1, shared["epoch"])
    assert resize["round_before"] == shared["round"]
    rounds = [r for r in records(out, "round") if r["time"] > resize["time"]]
    first = rounds[0]  # the first log line after the resize: the position, then on
    assert (first["layer"], first["epoch"]) == (resize["layer"], resize["epoch"])
    assert first["round"] > resize["round"] and first["frames"] > resize["frames"]
    if shared["rbm"] is not None:  # the replicas went on from the checkpoint's RBM, not afresh
        start = next(r for r in records(out, "round") if r["layer"] == resize["layer"])
        assert first["reconstruction_error"] < 0.75 * start["reconstruction_error"]
    assert f"workers: {workers}" in (out / "config.yaml").read_text()  # a plain --resume
    return resize


def test_resume_at_a_layer_boundary_on_three_workers(runs, tmp_path):
    out = tmp_path / "layer"
    code, shared = resume_on(runs[2], out, "l02-e001-r00000", workers=3)
    assert code == 0 and shared["rbm"] is None  # nothing per worker
    resize = check_continued(out, shared, workers=3)
    assert (resize["round"], resize["frames"], resize["averager"]) == (0, 0, "none")
    assert resize["rounds_per_epoch"] == 41
    assert not [r for r in records(out, "round") if r["time"] > resize["time"] and r["layer"] == 1]


def test_resume_at_an_epoch_boundary_on_three_workers(runs, tmp_path):
    out = tmp_path / "epoch"
    code, shared = resume_on(runs[2], out, "l01-e002-r00000", workers=3)
    assert code == 0 and shared["rbm"] is not None
    resize = check_continued(out, shared, workers=3)
    # epoch 1 (62 rounds of 64 frames) is not trained again; epoch 2 runs 41 rounds of 96
    assert (resize["round"], resize["frames"], resize["averager"]) == (0, 41 * 96, "restarted")
    epoch_1 = [r for r in records(out, "round") if (r["layer"], r["epoch"]) == (1, 1)]
    assert all(r["time"] < resize["time"] for r in epoch_1)
    assert records(out, "layer")[0]["frames"] == 2 * 41 * 96


@pytest.mark.parametrize(
    ("before", "checkpoint", "after", "mapped"),
    # 30 rounds x 64 frames = 20 rounds x 96: as many frames done on the new N
    [(2, "l02-e001-r00030", 3, 20), (3, "l02-e001-r00020", 2, 30)],
)
def test_resume_mid_epoch_on_another_n_continues_at_as_many_frames(
    runs, tmp_path, monkeypatch, before, checkpoint, after, mapped
):
    first_frames = []  # each trainer's frame count at its first step: where its ramp starts

    class Recording(CD1Trainer):
        def step(self, v):
            if not getattr(self, "stepped", False):
                first_frames.append(self.frames_seen)
                self.stepped = True
            return super().step(v)

    monkeypatch.setattr(pretrain_module, "CD1Trainer", Recording)
    out = tmp_path / "mid"
    code, shared = resume_on(runs[before], out, checkpoint, workers=after)
    assert code == 0
    resize = check_continued(out, shared, workers=after)
    assert (resize["round"], resize["frames"], resize["averager"]) == (mapped, 1920, "restarted")
    assert first_frames == [1920] * after  # fresh trainers; the ramp continues, not from 0
    # --lr-scaling linear: the lr of the new N from the first step on (the ramp has not moved)
    rounds = records(out, "round")
    lr_before = [r["lr"] for r in rounds if r["time"] < resize["time"] and r["layer"] == 2]
    lr_after = [r["lr"] for r in rounds if r["time"] > resize["time"]]
    assert lr_after[0] == pytest.approx(lr_before[-1] * after / before)


def test_a_plain_resume_after_a_resize_keeps_the_new_n(runs, tmp_path):
    out = tmp_path / "again"
    assert resume_on(runs[2], out, "l02-e001-r00030", workers=3)[0] == 0
    (out / "checkpoints" / "LATEST").write_text("l02-e001-r00035")  # written by the 3 workers
    assert main(["pretrain", "--resume", "--out", str(out)]) == 0
    assert len(records(out, "resize")) == 1  # the same N: no second resize
    assert len(load_dbn(out / "dbn.pt")[0]) == 2


def test_resume_on_more_workers_than_the_data_feeds_is_one_line(runs, tmp_path, capsys):
    out = tmp_path / "too-many"
    code, _ = resume_on(runs[2], out, "l02-e001-r00030", workers=41)  # 40 utterances
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("modelavg: error: --workers 41"), err
    assert "workers: 2" in (out / "config.yaml").read_text()  # the run is as it was
    assert (out / "checkpoints" / "LATEST").read_text() == "l02-e001-r00030"


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (
            "--hidden-dim=8",
            "does not fit this run's model (weight is [16, 18] there, [8, 18] here)",
        ),
        ("--context=2", "does not fit this run's model (weight is [16, 18] there, [16, 30] here)"),
        ("--hidden-layers=1", "has layer 2, more than --hidden-layers 1"),
    ],
)
def test_resume_with_other_model_options_is_one_line(runs, tmp_path, capsys, option, message):
    out = tmp_path / "other"
    code, _ = resume_on(runs[2], out, "l02-e001-r00030", 2, option)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"checkpoints/l02-e001-r00030: {message}" in err, err
    assert not (out / "dbn.pt").exists()


def test_a_diverged_rbm_is_not_checkpointed(data_dir, tmp_path, capsys, monkeypatch):
    """A NaN between log lines: the next checkpoint is refused, LATEST stays on the last one."""
    step = CD1Trainer.step

    def poisoned(self, v):
        result = step(self, v)
        if self.frames_seen > 1500:
            self.rbm.weight.data[0, 0] = torch.nan
        return result

    monkeypatch.setattr(CD1Trainer, "step", poisoned)
    out = tmp_path / "nan"
    args = ["pretrain", "--data", str(data_dir), "--out", str(out), *FLAGS, "--in-process"]
    assert main([*args, "--workers", "2", "--log-every=1000", "--checkpoint-every=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "layer 1: the RBM diverged (NaN/Inf in CD-1) before checkpoint l01-" in err, err
    latest = (out / "checkpoints" / "LATEST").read_text()
    shared = torch.load(out / "checkpoints" / latest / "shared.pt", weights_only=False)
    assert all(t.isfinite().all() for t in shared["rbm"].values())
