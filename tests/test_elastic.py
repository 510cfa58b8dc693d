"""Elastic and preemptible runs (issue 22): resume on another number of workers, a torchrun
``--nnodes 1:2`` job that loses a node, SIGTERM -> checkpoint -> exit 75 -> bitwise resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import SMALL
from slurm_cluster import Unavailable, one_node_cluster, which

from modelavg.averaging import BlockMomentumAverager, ModelAverager
from modelavg.averaging.base import flatten
from modelavg.cli import main
from modelavg.comm import InProcessCommunicator
from modelavg.errors import Preempted, UsageError
from modelavg.io import read_jsonl
from modelavg.launch import free_port
from modelavg.nets.dnn import DNN, DNNSpec
from modelavg.preempt import interval_seconds

PREEMPTED = Preempted.exit_code


def env() -> dict:
    """This environment without a launcher's variables (pytest may run under one)."""
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "OMPI_", "PMI_", "TORCH", "SLURM_")
    keep = {k: v for k, v in os.environ.items() if not k.startswith(launcher)}
    return {**keep, "OMP_NUM_THREADS": "1"}


def train_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    paths = ["--data", str(data), "--out", str(out)]
    flags = ["--timeout", "30", "--no-tensorboard"]
    return [sys.executable, "-m", "modelavg", "train", *paths, *SMALL, *flags, *extra]


def final_state(out: Path) -> dict:
    return torch.load(out / "final.pt", weights_only=False)["state_dict"]


def same_model(a: Path, b: Path) -> bool:
    sa, sb = final_state(a), final_state(b)
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def final_accuracy(out: Path) -> float:
    return json.loads((out / "final_cv.json").read_text())["frame_accuracy"]


def kinds(out: Path, kind: str) -> list[dict]:
    return [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == kind]


def wait_for(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)


def round_lines(out: Path, epoch: int) -> bool:
    """Training is inside ``epoch``: a round line of it is in the log."""
    path = out / "metrics.jsonl"
    return path.exists() and f'"kind": "round", "epoch": {epoch},' in path.read_text()


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


# -- resume on another N, in one process ----------------------------------------------------


def test_checkpoint_interval_parses_units():
    assert [interval_seconds(v) for v in ("600s", "10m", "1h", "90", 0, "0.5s")] == [
        600,
        600,
        3600,
        90,
        0,
        0.5,
    ]
    with pytest.raises(UsageError, match="--checkpoint-interval 5d"):
        interval_seconds("5d")


@pytest.mark.parametrize(
    ("averaging", "state"),
    [("model", "restarted"), ("bmuf", "kept"), ("diloco", "kept"), ("overlap", "restarted")],
)
def test_resume_on_three_workers_continues_the_two_worker_run(data_dir, tmp_path, averaging, state):
    out = tmp_path / "two"
    args = ["--in-process", "--epochs", "3", "--log-every", "3", "--checkpoint-every", "4"]
    args += ["--data", str(data_dir), "--keep-checkpoints", "0", "--averaging", averaging]
    assert main(["train", *SMALL, "--out", str(out), "--workers", "2", *args]) == 0
    (out / "final.pt").unlink()
    (out / "checkpoints" / "LATEST").write_text("e002-r00004")  # as if it died mid-epoch 2
    assert main(["train", "--resume", "--out", str(out), "--workers", "3", "--in-process"]) == 0
    (resize,) = kinds(out, "resize")
    assert (resize["workers_before"], resize["workers"], resize["epoch"]) == (2, 3, 2)
    # 4 rounds x 2 steps x 16 frames x 2 workers = 256 frames: round 3 of 3 workers (96 each)
    assert (resize["round_before"], resize["round"], resize["averager"]) == (4, 3, state)
    assert [e["epoch"] for e in kinds(out, "epoch")] == [0, 1, 2, 3]  # none lost or repeated
    after = [r for r in kinds(out, "round") if r["time"] > resize["time"]]
    assert after[0]["epoch"] == 2 and after[0]["round"] > 3
    before = [r for r in kinds(out, "round") if r["time"] < resize["time"]]
    assert after[0]["lr"] == pytest.approx(before[-1]["lr"] * 3 / 2)  # linear scaling, same epoch
    assert "workers: 3" in (out / "config.yaml").read_text()  # a plain --resume keeps 3
    assert final_accuracy(out) > 0.8


@pytest.mark.parametrize("option", ["--hidden-dim=24", "--context=2"])
def test_resume_with_other_model_options_is_one_line(data_dir, tmp_path, capsys, option):
    out = tmp_path / "run"
    args = ["--in-process", "--epochs", "1", "--checkpoint-every", "4", "--data", str(data_dir)]
    assert main(["train", *SMALL, "--out", str(out), "--workers", "2", *args]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(out), option]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not fit this run's model" in err, err
    assert f"{out}/checkpoints/e002-r00000: " in err and " there, " in err, err


def test_averagers_map_their_state_to_another_n():
    spec = DNNSpec(input_dim=3, context=0, hidden_layers=1, hidden_dim=4, num_classes=2)
    models = [DNN(spec) for _ in range(2)]
    bmuf = BlockMomentumAverager(InProcessCommunicator(4))
    bmuf.start(models)
    bmuf.delta = torch.ones_like(bmuf.delta)
    state = bmuf.state_dict()
    resized = BlockMomentumAverager(InProcessCommunicator(2))  # block momentum 1 - 1/2
    assert resized.load_resized_state(state, models, workers_before=4) == "kept"
    assert torch.equal(resized.delta, state["delta"])
    start = state["global_model"] + 0.5 * state["delta"]  # W + momentum x Delta, for N = 2
    assert all(torch.equal(flatten(m), start) for m in models)
    plain = ModelAverager(InProcessCommunicator(2))
    assert plain.load_resized_state({"syncs": 7}, models, workers_before=4) == "restarted"
    assert plain.syncs == 7


def test_checkpoint_interval_checkpoints_mid_epoch_without_changing_training(data_dir, tmp_path):
    args = ["--data", str(data_dir), "--in-process", "--workers", "2", "--epochs", "1"]
    assert main(["train", *SMALL, *args, "--out", str(tmp_path / "plain")]) == 0
    timed = tmp_path / "timed"
    every = ["--checkpoint-interval", "0.05s", "--keep-checkpoints", "0"]
    assert main(["train", *SMALL, *args, *every, "--out", str(timed)]) == 0
    names = [p.name for p in (timed / "checkpoints").iterdir() if p.is_dir()]
    assert any(not n.endswith("r00000") for n in names), names  # mid-epoch ones
    assert same_model(timed, tmp_path / "plain")


# -- real processes ---------------------------------------------------------------------------

# 6 short epochs: a signal sent in epoch 2 lands before the end even when it takes seconds to
# arrive (Slurm's path, scancel -> slurmctld -> slurmd -> slurmstepd, on a loaded machine)
PREEMPT = ["--epochs", "6", "--log-every", "3"]


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory) -> Path:
    """Two in-process workers, never interrupted (N processes compute the same, bit for bit)."""
    out = tmp_path_factory.mktemp("preempt") / "ref"
    r = subprocess.run(
        train_cmd(data_dir, out, *PREEMPT, "--in-process", "--workers", "2"),
        capture_output=True,
        text=True,
        env=env(),
    )
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.slow
@pytest.mark.parametrize("target", ["launcher", "rank 1"])
def test_sigterm_checkpoints_exits_75_and_resumes_bitwise(
    data_dir, uninterrupted, tmp_path, target
):
    """SIGTERM to the launcher (passed on to both workers) or to one worker only (the other
    learns it at the round's end): both finish the round, one checkpoint, exit 75, one line."""
    out = tmp_path / "preempted"
    cmd = train_cmd(data_dir, out, *PREEMPT, "--workers", "2")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env()
    )
    wait_for(proc, lambda: round_lines(out, 2))  # mid-epoch 2
    pid = proc.pid if target == "launcher" else children(proc.pid)[1]
    os.kill(pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "modelavg: error: preempted" in lines[0], err
    assert ("SIGTERM" in lines[0]) == (target == "launcher")
    latest = (out / "checkpoints" / "LATEST").read_text()
    assert latest.startswith("e002-") and latest != "e002-r00000", latest  # mid-epoch
    assert lines[0].endswith(f"wrote checkpoint {latest}; continue with --resume")
    assert not (out / "final.pt").exists()
    resumed = subprocess.run(
        [*cmd[:4], "--resume", "--out", str(out)], capture_output=True, text=True, env=env()
    )
    assert resumed.returncode == 0, resumed.stderr
    assert same_model(out, uninterrupted)
    assert [e["epoch"] for e in kinds(out, "epoch")] == list(range(7))  # none lost or repeated


@pytest.mark.slow
def test_mpirun_passes_sigusr1_on_and_the_job_checkpoints(data_dir, uninterrupted, tmp_path):
    """OpenMPI's mpirun forwards SIGUSR1 to every rank (not SIGTERM: it ends the job its own
    way), so under mpirun preemption is SIGUSR1 (sbatch --signal=USR1@120)."""
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("OpenMPI not installed (apt-get install -y openmpi-bin libopenmpi-dev)")
    mpi_env = {**env(), "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    out = tmp_path / "mpirun"
    cmd = [mpirun, "--oversubscribe", "-np", "2", *train_cmd(data_dir, out, *PREEMPT)]
    job = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=mpi_env
    )
    wait_for(job, lambda: round_lines(out, 2))
    job.send_signal(signal.SIGUSR1)
    _, err = job.communicate(timeout=120)
    assert job.returncode == PREEMPTED, err
    assert "modelavg: error: preempted (SIGUSR1): wrote checkpoint e00" in err, err
    resume = [*cmd[:8], "--resume", "--out", str(out)]  # mpirun ... python -m modelavg train
    r = subprocess.run(resume, capture_output=True, text=True, env=mpi_env)
    assert r.returncode == 0, r.stderr
    assert same_model(out, uninterrupted)


@pytest.mark.slow
def test_worker_killed_of_four_resumes_on_three(data_dir, tmp_path):
    """4 worker processes, one SIGKILLed; --resume --workers 3 finishes within 1 point of 3
    in-process workers resumed from the same checkpoint (not bitwise: gloo sums 3 processes'
    buffers in another order than a process sums its 3 workers')."""
    out = tmp_path / "four"
    args = ["--epochs", "3", "--checkpoint-every", "5", "--log-every", "5"]
    cmd = train_cmd(data_dir, out, *args, "--workers", "4")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env()
    )
    wait_for(proc, lambda: (out / "checkpoints" / "LATEST").exists())
    os.kill(children(proc.pid)[2], signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGKILL, err
    assert "worker rank 2 failed (signal 9)" in err, err
    reference = tmp_path / "reference"
    shutil.copytree(out, reference)
    resume = [*cmd[:4], "--resume", "--workers", "3"]
    r = subprocess.run([*resume, "--out", str(out)], capture_output=True, text=True, env=env())
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        [*resume, "--in-process", "--out", str(reference)],
        capture_output=True,
        text=True,
        env=env(),
    )
    assert r.returncode == 0, r.stderr
    accuracy = final_accuracy(out), final_accuracy(reference)
    print(
        f"final CV accuracy: resumed on 3 processes {accuracy[0]:.4f}, in-process {accuracy[1]:.4f}"
    )
    assert abs(accuracy[0] - accuracy[1]) <= 0.01
    (resize,) = kinds(out, "resize")
    assert (resize["workers_before"], resize["workers"]) == (4, 3)
    assert [e["epoch"] for e in kinds(out, "epoch")] == [0, 1, 2, 3]


@pytest.mark.slow
def test_torchrun_elastic_job_loses_a_node_and_finishes_on_the_survivor(data_dir, tmp_path):
    """Two torchrun agents (--nnodes 1:2, one process each) rendezvous over c10d on the
    loopback; the second agent is SIGKILLed with its worker. The first agent's worker loses
    its peer (exit 3), the agent restarts it in a new rendezvous of one node, and it resumes
    from the last checkpoint on 1 worker and finishes."""
    out = tmp_path / "elastic"
    rdzv = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    # the survivor hosts the rendezvous store; a peer is dead after 2 missed 1-s heartbeats;
    # with 2 agents the round closes at once, with 1 it waits 5 s for a second one
    conf = "last_call_timeout=5,keep_alive_interval=1,keep_alive_max_attempt=2,is_host="
    agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2"]
    agent += ["--nproc-per-node", "1", "--max-restarts", "2", "--monitor-interval", "0.5"]
    agent += [*rdzv, "--rdzv-id", "issue22"]
    train = train_cmd(data_dir, out, "--epochs", "4", "--checkpoint-every", "10")[1:]
    agents = [
        subprocess.Popen(
            [*agent, "--rdzv-conf", conf + host, *train],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env(),
        )
        for host in ("true", "false")
    ]
    survivor, lost = agents
    wait_for(survivor, lambda: round_lines(out, 2))
    for pid in [*children(lost.pid), lost.pid]:
        os.kill(pid, signal.SIGKILL)
    lost.wait()
    try:
        stdout, err = survivor.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        survivor.kill()
        stdout, err = survivor.communicate()
    assert survivor.returncode == 0, err
    assert kinds(out, "start")[0]["workers"] == 2
    (resize,) = kinds(out, "resize")
    assert (resize["workers_before"], resize["workers"]) == (2, 1)
    assert [e["epoch"] for e in kinds(out, "epoch")] == [0, 1, 2, 3, 4]
    assert final_accuracy(out) > 0.8


# -- real Slurm on this machine ---------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> Iterator[dict]:
    """A one-node Slurm cluster private to these tests; the environment for its commands."""
    try:
        with one_node_cluster(tmp_path_factory.mktemp("slurm"), env()) as cluster_env:
            yield cluster_env
    except Unavailable as why:
        pytest.skip(f"no Slurm cluster here: {why}")


@pytest.mark.slow
def test_srun_job_preempted_by_scancel_resumes_bitwise(data_dir, uninterrupted, slurm, tmp_path):
    """srun -n 2 (the launcher detects SLURM_* variables), scancel --signal=TERM in epoch 2
    (it lands a little later when Slurm delivers it slowly): both tasks checkpoint and exit 75
    (srun's exit code too); srun --resume finishes with the uninterrupted run's model."""
    out = tmp_path / "slurm"
    srun = [which("srun"), "-n", "2", "--job-name", f"modelavg-{os.getpid()}"]
    cmd = train_cmd(data_dir, out, *PREEMPT)
    job = subprocess.Popen(
        [*srun, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=slurm
    )
    wait_for(job, lambda: round_lines(out, 2))
    squeue = [which("squeue"), "-h", "-n", srun[4], "-o", "%i"]
    job_id = subprocess.run(squeue, capture_output=True, text=True, env=slurm).stdout.split()[0]
    subprocess.run([which("scancel"), "--signal=TERM", job_id], check=True, env=slurm)
    _, err = job.communicate(timeout=120)
    assert job.returncode == PREEMPTED, err
    preempted = [line for line in err.splitlines() if line.startswith("modelavg: error:")]
    assert len(preempted) == 1 and "preempted (SIGTERM)" in preempted[0], err
    assert (out / "checkpoints" / "LATEST").exists()  # the epoch depends on Slurm's delivery
    resumed = subprocess.run(
        [*srun, *cmd[:4], "--resume", "--out", str(out)], capture_output=True, text=True, env=slurm
    )
    assert resumed.returncode == 0, resumed.stderr
    assert same_model(out, uninterrupted)
    assert [e["epoch"] for e in kinds(out, "epoch")] == list(range(7))  # none lost or repeated


@pytest.mark.slow
def test_sbatch_example_requeues_itself_and_resumes(data_dir, uninterrupted, slurm, tmp_path):
    """docs/slurm/train.sbatch as a user submits it: SIGTERM to its steps during training, srun
    exits 75, the script requeues the job, the requeued job resumes and ends bitwise equal to
    the uninterrupted run. (Slurm delays a requeued job by about 2 minutes; the test lifts it.)"""
    out = tmp_path / "sbatch"
    script = Path(__file__).resolve().parent.parent / "docs" / "slurm" / "train.sbatch"
    cmd = train_cmd(data_dir, out, *PREEMPT)
    path = f"{Path(sys.executable).parent}:{slurm['PATH']}"  # the venv's modelavg for srun
    job_env = {**slurm, "PATH": path, "DATA": str(data_dir), "OUT": str(out)}
    log = tmp_path / "slurm.log"
    sbatch = [which("sbatch"), "--parsable", "--nodes=1", "--ntasks-per-node=2"]
    sbatch += ["--cpus-per-task=1", f"--output={log}", "--export=ALL"]
    options = cmd[cmd.index("--out") + 2 :]
    submitted = subprocess.run(
        [*sbatch, str(script), *options], capture_output=True, text=True, env=job_env, check=True
    )
    job_id = submitted.stdout.strip()

    def until(ready, timeout: float = 300) -> None:  # generous: a loaded host slows slurmd too
        deadline = time.monotonic() + timeout
        while not ready():
            assert time.monotonic() < deadline, log.read_text() if log.exists() else "no output"
            time.sleep(0.1)

    until(lambda: round_lines(out, 2))
    subprocess.run([which("scancel"), "--signal=TERM", job_id], check=True, env=slurm)
    show = [which("scontrol"), "show", "job", job_id]
    # 2 s after the requeue, not at once: a job restarted within the second its first run ended
    # finds its credential revoked ("Killing non-startable batch job") and fails
    start_at: list[str] = []

    def completed() -> bool:
        job = subprocess.run(show, capture_output=True, text=True, env=slurm).stdout
        if "JobState=PENDING" in job:  # requeued by the script: start it soon, not in 2 min
            if not start_at:  # one time, kept: each update with "now+2" would push it back
                start_at.append(time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() + 2)))
            update = [which("scontrol"), "update", f"JobId={job_id}", f"StartTime={start_at[0]}"]
            subprocess.run(update, capture_output=True, env=slurm)  # (again, if Slurm reset it)
        return "JobState=COMPLETED" in job and "Restarts=1" in job

    until(completed, timeout=420)
    text = log.read_text()
    assert "preempted (SIGTERM): wrote checkpoint e00" in text, text
    assert "Exited with exit code 75" in text, text
    assert same_model(out, uninterrupted)
    assert [e["epoch"] for e in kinds(out, "epoch")] == list(range(7))  # none lost or repeated
