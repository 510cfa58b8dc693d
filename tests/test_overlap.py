"""Overlapped averaging (--averaging overlap): the late-applied mean by hand, its state through a
checkpoint, the non-blocking reductions, and in-process == gloo == MPI processes via the CLI."""

import copy

import pytest
import torch
from test_averaging import mlp
from test_averaging_beyond import assert_resumes_bitwise, move, train
from test_launch import assert_same_model, train_on_processes

from modelavg.averaging import ModelAverager, OverlapAverager
from modelavg.averaging.base import flatten
from modelavg.comm import InProcessCommunicator
from modelavg.comm.cast import ReducedPrecision


class Scalar(torch.nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.x = torch.nn.Parameter(torch.tensor([value], dtype=torch.float64))


def values(models: list[Scalar]) -> list[float]:
    return [m.x.item() for m in models]


def local_steps(models: list[Scalar]) -> None:
    """Worker a: x <- x + 1; worker b: x <- 3 x (progress that depends on where it starts)."""
    with torch.no_grad():
        models[0].x.add_(1)
        models[1].x.mul_(3)


def test_overlap_applies_the_mean_one_round_late_keeping_local_progress_by_hand():
    models = [Scalar(1.0), Scalar(1.0)]
    averager = OverlapAverager(InProcessCommunicator(2))
    averager.start(models)
    local_steps(models)  # (2, 3)
    averager.sync(models)  # nothing to apply; s = (2, 3), mean 2.5 started
    assert values(models) == [2.0, 3.0]
    local_steps(models)  # (3, 9)
    averager.sync(models)  # 2.5 + (3 - 2), 2.5 + (9 - 3); s = (3.5, 8.5), mean 6 started
    assert values(models) == [3.5, 8.5]
    local_steps(models)  # (4.5, 25.5)
    averager.sync(models)  # 6 + (4.5 - 3.5), 6 + (25.5 - 8.5); mean 15 started
    assert values(models) == [7.0, 23.0]
    averager.settle(models)  # the epoch's end: every replica the mean of the last snapshots
    assert values(models) == [15.0, 15.0]
    local_steps(models)  # a new epoch starts with nothing in flight
    averager.sync(models)
    assert values(models) == [16.0, 45.0]


def test_overlap_with_state_free_steps_ends_where_blocking_averaging_does():
    """Steps that do not depend on x: late application + settle = averaging every round."""
    steps = [torch.full((66,), 0.01, dtype=torch.float64), torch.full((66,), -0.03).double()]
    overlapped, blocking = [mlp(), mlp()], [mlp(), mlp()]
    over, block = OverlapAverager(InProcessCommunicator(2)), ModelAverager(InProcessCommunicator(2))
    for _ in range(4):
        move(overlapped, steps)
        move(blocking, steps)
        over.sync(overlapped)
        block.sync(blocking)
    over.settle(overlapped)
    for m in overlapped:
        torch.testing.assert_close(flatten(m), flatten(blocking[0]), rtol=0, atol=1e-15)


def test_overlap_state_round_trips_bitwise_mid_flight():
    comm = InProcessCommunicator(2)
    models = [mlp(), mlp()]
    averager = OverlapAverager(comm)
    averager.start(models)
    g = torch.Generator().manual_seed(5)
    steps = [0.01 * torch.randn(66, generator=g, dtype=torch.float64) for _ in range(2)]
    for _ in range(2):
        move(models, steps)
        averager.sync(models)  # a sum in flight, replicas differ
    shared = copy.deepcopy(averager.state_dict())
    per_worker = [copy.deepcopy(averager.worker_state(i)) for i in range(2)]
    twins = [mlp(), mlp()]  # a resumed job: every replica holds the checkpoint's replica 0
    restored = OverlapAverager(comm)
    restored.load_state_dict(shared)
    for i, model in enumerate(twins):
        restored.load_worker_state(i, model, per_worker[i])
    for averager_, ms in ((averager, models), (restored, twins)):
        for _ in range(2):
            move(ms, [steps[1], steps[0]])
            averager_.sync(ms)
        averager_.settle(ms)
    assert all(torch.equal(flatten(a), flatten(b)) for a, b in zip(models, twins, strict=True))


def test_overlap_on_another_n_restarts_from_the_mean_of_the_replicas():
    models = [mlp(0), mlp(1)]
    mean = (flatten(models[0]) + flatten(models[1])) / 2
    averager = OverlapAverager(InProcessCommunicator(2))
    averager.sync(models)
    state = averager.state_dict()
    bigger = [mlp(7) for _ in range(4)]
    resized = OverlapAverager(InProcessCommunicator(4))
    assert resized.load_resized_state(state, bigger, workers_before=2) == "restarted"
    assert all(torch.equal(flatten(m), mean) for m in bigger) and resized.pending is None


def test_started_reductions_finish_at_the_wait_in_the_narrow_dtype():
    comm = ReducedPrecision(InProcessCommunicator(2), torch.bfloat16)
    a, b = torch.tensor([1.0, 1 / 3]), torch.tensor([2.0, 1 / 3])
    pending = comm.allreduce_sum_async_([a, b])
    pending.wait()
    pending.wait()  # a second wait is no second copy
    third = torch.tensor(1 / 3).bfloat16().item()  # 1/3 rounded to bf16; doubling it is exact
    expected = torch.tensor([3.0, 2 * third])
    assert torch.equal(a, expected) and torch.equal(b, expected)


# -- through the CLI ------------------------------------------------------------------------------

OVERLAP = ["--averaging", "overlap", "--epochs", "3", "--keep-checkpoints", "0"]


@pytest.mark.parametrize(
    "extra",
    [[], ["--avg-dtype", "bf16", "--momentum", "0.9", "--optimizer-state", "average"]],
    ids=["plain", "bf16-momentum-average"],
)
def test_overlap_resume_mid_epoch_is_bitwise(data_dir, tmp_path, extra):
    out = tmp_path / "full"
    args = ["--in-process", "--workers", "2", "--checkpoint-every", "3", *OVERLAP, *extra]
    assert train(data_dir, out, *args) == 0
    shared = torch.load(out / "checkpoints" / "e002-r00003" / "shared.pt", weights_only=False)
    assert shared["averager"]["sum"] is not None  # a sum in flight at the checkpoint
    assert_resumes_bitwise(out, tmp_path)


@pytest.fixture(scope="module")
def overlap_inprocess(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "overlap"
    assert train(data_dir, out, "--in-process", "--workers", "2", *OVERLAP) == 0
    return out


@pytest.mark.parametrize("launcher", ["gloo", "mpi"])
def test_overlap_on_two_processes_equals_in_process(
    data_dir, tmp_path, overlap_inprocess, launcher
):
    """2 processes sum 2 buffers as the in-process loop does: bitwise equal (the started
    allreduce runs beside the blocking ones of the divergence check and the log rounds)."""
    from conftest import SMALL

    out = tmp_path / launcher
    train_on_processes(data_dir, out, 2, launcher, *SMALL, *OVERLAP, "--log-every", "1")
    assert_same_model(out, overlap_inprocess)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--group-size", "2", "--avg-every-inner", "1"], "--group-size: overlapped"),
        (["--avg-every", "auto"], "--avg-every auto: overlapped"),
        (["--avg-warmup", "1e"], "--avg-warmup: overlapped"),
    ],
)
def test_overlap_refuses_what_needs_equal_replicas_mid_epoch(
    data_dir, tmp_path, capsys, args, message
):
    argv = ["--in-process", "--workers", "4", "--averaging", "overlap", *args]
    assert train(data_dir, tmp_path / "x", *argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_overlap_rolls_back_a_divergence_with_a_sum_in_flight(data_dir, tmp_path):
    """NaN after a sync: the rollback waits for the started sum, drops it, and training goes on."""
    out = tmp_path / "recover"
    args = ["--in-process", "--workers", "2", "--averaging", "overlap", "--activation", "relu"]
    args += ["--schedule", "constant", "--lr", "1e7", "--max-rollbacks", "10"]
    assert train(data_dir, out, *args, "--rollback-lr-factor", "0.001") == 0
    assert '"kind": "rollback"' in (out / "metrics.jsonl").read_text()
    state = torch.load(out / "final.pt", weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values())
