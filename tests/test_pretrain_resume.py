"""Pretraining on the engine keeps training's guarantees: a killed run resumes to the identical
dbn.pt, and a torchrun restart continues from the last checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import PRETRAIN_SMALL

from modelavg.nets.dbn import load_dbn

FLAGS = [*PRETRAIN_SMALL, "--rbm-iter=3"]


def env() -> dict:
    keep = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "OMPI_", "PMI_", "TORCH"))
    }
    return {**keep, "OMP_NUM_THREADS": "1"}


def pretrain_cmd(data_dir: Path, out: Path, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "modelavg", "pretrain", "--data", str(data_dir)]
    return [*cmd, "--out", str(out), *FLAGS, *extra]


def assert_same_dbn(a: Path, b: Path) -> None:
    (dbn_a, _), (dbn_b, _) = load_dbn(a), load_dbn(b)
    assert len(dbn_a) == len(dbn_b) == 2
    for ra, rb in zip(dbn_a, dbn_b, strict=True):
        for (name, pa), pb in zip(ra.state_dict().items(), rb.state_dict().values(), strict=True):
            assert torch.equal(pa, pb), f"{name} differs between {a} and {b}"


def wait_for_layer2_checkpoint(proc: subprocess.Popen, out: Path, timeout: float = 120) -> None:
    """Until a mid-layer checkpoint of the second RBM is committed (LATEST names it)."""
    latest = out / "checkpoints" / "LATEST"
    deadline = time.monotonic() + timeout
    while not (latest.exists() and latest.read_text().startswith("l02-e002")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)


@pytest.fixture(scope="module")
def ref(data_dir, tmp_path_factory) -> Path:
    """An uninterrupted 2-worker pretraining: what every interrupted run must end as."""
    ref = tmp_path_factory.mktemp("pretrain") / "ref"
    args = ["--in-process", "--workers", "2"]
    r = subprocess.run(pretrain_cmd(data_dir, ref, *args), capture_output=True, env=env())
    assert r.returncode == 0, r.stderr
    return ref


def test_pretrain_killed_mid_layer_resumes_to_the_identical_dbn(data_dir, ref, tmp_path):
    args = ["--in-process", "--workers", "2"]
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        pretrain_cmd(data_dir, out, *args, "--checkpoint-every", "3"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env(),
    )
    wait_for_layer2_checkpoint(proc, out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "dbn.pt").exists() or len(load_dbn(out / "dbn.pt")[0]) == 1
    # --resume alone takes the run's own options from its config.yaml (another N:
    # test_pretrain_resize.py)
    r = subprocess.run(
        pretrain_cmd(data_dir, out, "--resume"), capture_output=True, text=True, env=env()
    )
    assert r.returncode == 0, r.stderr
    assert_same_dbn(out / "dbn.pt", ref / "dbn.pt")
    log = (out / "pretrain.jsonl").read_text()
    assert log.count('"kind": "layer"') == 2 and log.count('"kind": "start"') == 1
    assert '"train_s"' in log


def test_torchrun_restarts_a_killed_pretraining_and_it_continues(data_dir, ref, tmp_path):
    out = tmp_path / "restarted"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    torchrun += ["--nproc_per_node", "2", "--max-restarts", "1"]
    cmd = pretrain_cmd(data_dir, out, "--checkpoint-every", "3")[2:]  # after "python -m"
    agent = subprocess.Popen(
        [*torchrun, "-m", *cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )
    wait_for_layer2_checkpoint(agent, out)
    children = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True)
    os.kill(int(children.stdout.split()[-1]), signal.SIGKILL)
    try:
        _, err = agent.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        agent.kill()
        _, err = agent.communicate()
    assert agent.returncode == 0, err
    assert_same_dbn(out / "dbn.pt", ref / "dbn.pt")


def test_pretrain_sigterm_checkpoints_exits_75_and_resumes_to_the_identical_dbn(
    data_dir, ref, tmp_path
):
    """SIGTERM inside the second RBM: the round ends, a checkpoint, exit 75, one line."""
    out = tmp_path / "preempted"
    proc = subprocess.Popen(
        pretrain_cmd(data_dir, out, "--in-process", "--workers", "2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )
    log = out / "pretrain.jsonl"
    deadline = time.monotonic() + 120
    while not (log.exists() and '"kind": "round", "layer": 2' in log.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    assert err.startswith("modelavg: error: preempted (SIGTERM): wrote checkpoint l02-"), err
    r = subprocess.run(
        pretrain_cmd(data_dir, out, "--resume"), capture_output=True, text=True, env=env()
    )
    assert r.returncode == 0, r.stderr
    assert_same_dbn(out / "dbn.pt", ref / "dbn.pt")
