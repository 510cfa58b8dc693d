"""The engine's promises across processes: one mistake is one line, a worker's own bug keeps
its traceback and the launcher names that worker; progress is plain lines off a terminal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL
from test_kaldi_errors import ARK, edit, truncated_in

from modelavg.comm import InProcessCommunicator
from modelavg.data.frames import FrameTable
from modelavg.engine import Engine, Progress
from modelavg.errors import Reported, UsageError


def env(**extra: str) -> dict:
    keep = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "TORCHELASTIC"))
    }
    return {**keep, "OMP_NUM_THREADS": "1", **extra}


def train(data: Path, out: Path, *extra: str, **env_extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "modelavg", "train", "--data", str(data), "--out", str(out)]
    return subprocess.run(
        [*cmd, *SMALL, *extra], capture_output=True, text=True, env=env(**env_extra), timeout=240
    )


def test_bad_data_with_two_worker_processes_is_one_line(tmp_path):
    data = edit(ARK, truncated_in("u07"))(tmp_path)
    r = train(data, tmp_path / "out", "--workers", "2")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("modelavg: error: "), r.stderr
    assert "u07" in lines[0]


def test_infeasible_options_with_two_worker_processes_exit_4_in_one_line(data_dir, tmp_path):
    r = train(data_dir, tmp_path / "out", "--workers", "2", "--avg-every", "1000")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 4 and len(lines) == 1 and "smallest shard" in lines[0], r.stderr


def test_a_workers_own_error_keeps_its_traceback_and_the_launcher_names_it(data_dir, tmp_path):
    """Rank 1 hits a bug of its own (injected through sitecustomize) mid-training: its traceback
    and message reach the user, rank 0 stops as a lost peer, the launcher blames rank 1."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import modelavg.train as t\n"
        "    step = t.DNNWorker.step\n"
        "    def broken(self, idx, calls=[]):\n"
        "        calls.append(1)\n"
        "        if len(calls) == 7:\n"
        "            raise RuntimeError('injected shape bug on rank 1')\n"
        "        return step(self, idx)\n"
        "    t.DNNWorker.step = broken\n"
    )
    r = train(data_dir, tmp_path / "out", "--workers", "2", PYTHONPATH=str(hook))
    assert r.returncode == 1, r.stderr
    assert "Traceback" in r.stderr and "RuntimeError: injected shape bug on rank 1" in r.stderr
    assert "worker rank 1 failed (exit code 1)" in r.stderr
    assert "worker rank 0 failed" not in r.stderr


def test_one_voice_raises_on_the_failing_process_only():
    comm = InProcessCommunicator(2)
    with pytest.raises(UsageError, match="bad file"), comm.one_voice():
        raise UsageError("bad file")
    with comm.one_voice():
        pass  # nothing failed: nothing raised
    assert Reported(2).exit_code == 2 and str(Reported(2)) == ""


def test_progress_off_a_terminal_prints_one_line_per_note(capsys):
    bar = Progress(total=10, frames_per_round=64, enabled=True, desc="epoch 1/2")
    for _ in range(5):
        bar.update()
    bar.note(loss="0.123")
    bar.close()
    err = capsys.readouterr().err
    assert err == "epoch 1/2: 5/10 rounds (320 frames) loss=0.123\n"
    silent = Progress(total=10, frames_per_round=64, enabled=False)
    silent.note(loss="1")
    assert capsys.readouterr().err == ""


class CountingAverager:
    def __init__(self, comm) -> None:
        self.comm, self.syncs = comm, []

    def sync(self, modules) -> None:
        self.syncs.append(len(modules))

    def settle(self, modules) -> None:
        self.syncs.append("settle")


class IndexWorker:
    """Records the frame indices it is given."""

    def __init__(self, worker: int, frames: int = 40) -> None:
        self.worker, self.module, self.steps = worker, torch.nn.Linear(1, 1), []
        starts, ends = torch.zeros(frames, dtype=torch.long), torch.full((frames,), frames)
        self.table = FrameTable(torch.zeros(frames, 1), None, starts, ends, np.array([frames]))

    def step(self, idx: torch.Tensor) -> None:
        self.steps.append(idx.tolist())


def test_run_epoch_steps_every_worker_k_times_per_round_then_averages():
    comm = InProcessCommunicator(2)
    averager = CountingAverager(comm)
    engine = Engine(comm, averager, avg_every=3, minibatch=4, seed=1, buffer_frames=8)
    workers, after = [IndexWorker(0), IndexWorker(1)], []
    engine.run_epoch(workers, epoch_key=1, rounds=3, start_round=1, after_round=after.append)
    assert after == [2, 3] and averager.syncs == [2, 2, "settle"]  # equal replicas at the end
    assert engine.syncs == {"syncs": 2, "group_syncs": 0}  # what the time model prices
    assert [len(w.steps) for w in workers] == [6, 6]
    assert workers[0].steps != workers[1].steps  # each worker its own frame order
    whole = IndexWorker(0)
    engine.run_epoch([whole], epoch_key=1, rounds=3)
    assert workers[0].steps == whole.steps[3:]  # a resumed epoch skips exactly the rounds done
