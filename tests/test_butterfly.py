"""Butterfly mixing (--averaging butterfly): the pairs by hand, the hypercube's exact mean, its
state through a checkpoint, and in-process == gloo == MPI processes via the CLI."""

import copy
import json
import queue
import threading

import pytest
import torch
from test_averaging import mlp
from test_averaging_beyond import assert_resumes_bitwise, move, train
from test_launch import assert_same_model, final_state, train_on_processes
from test_overlap import Scalar, values

from modelavg.averaging import ButterflyAverager, make_averager
from modelavg.averaging.base import averaged_copies, flatten
from modelavg.averaging.optstate import OptimizerStateSync
from modelavg.cli import main
from modelavg.comm import InProcessCommunicator
from modelavg.comm.base import Communicator
from modelavg.comm.cast import ReducedPrecision
from modelavg.errors import UsageError


def test_butterfly_pairs_by_hand():
    """N = 4: sync 1 pairs (0,1)(2,3), sync 2 pairs (0,2)(1,3), sync 3 (0,1)(2,3) again."""
    models = [Scalar(v) for v in (1.0, 2.0, 4.0, 8.0)]
    averager = ButterflyAverager(InProcessCommunicator(4))
    averager.sync(models)
    assert values(models) == [1.5, 1.5, 6.0, 6.0]
    with torch.no_grad():
        models[0].x.add_(2.0)  # local progress of worker 0 only: (3.5, 1.5, 6, 6)
    averager.sync(models)
    assert values(models) == [4.75, 3.75, 4.75, 3.75]
    averager.sync(models)
    assert values(models) == [4.25] * 4  # two dimensions visited since the step: the mean
    with torch.no_grad():
        models[3].x.add_(4.0)  # (4.25, 4.25, 4.25, 8.25)
    averager.settle(models)  # the epoch's end: one allreduce
    assert values(models) == [5.25] * 4


@pytest.mark.parametrize("n", [2, 8, 16])
def test_log2_n_syncs_without_steps_give_every_worker_the_exact_mean(n):
    g = torch.Generator().manual_seed(n)
    models = [Scalar(float(torch.randint(-64, 64, (1,), generator=g))) for _ in range(n)]
    mean = sum(values(models)) / n
    averager = ButterflyAverager(InProcessCommunicator(n))
    for _ in range(n.bit_length() - 1):
        averager.sync(models)
    assert values(models) == [mean] * n


class Twin(Communicator):
    """Process ``rank`` of 2, each hosting 2 workers, exchanging through queues (threads)."""

    def __init__(self, rank: int, inboxes: list[queue.Queue]) -> None:
        self.process_rank, self.num_processes, self.local_workers = rank, 2, 2
        self.inboxes = inboxes

    def _allreduce_sum_(self, tensor: torch.Tensor) -> None:
        raise AssertionError("butterfly syncs only exchange")

    def _exchange_(self, send: torch.Tensor, recv: torch.Tensor, peer: int) -> None:
        self.inboxes[peer].put(send.clone())
        recv.copy_(self.inboxes[self.process_rank].get(timeout=10))


def test_pairs_within_and_across_processes_of_two_workers_each():
    """Workers 0, 1 | 2, 3 in two processes: distance 1 pairs inside a process, distance 2
    across; the same numbers as 4 in-process workers."""
    start = [1.0, 2.0, 4.0, 8.0]
    inprocess = [torch.tensor([v]) for v in start]
    single = InProcessCommunicator(4)
    inboxes = [queue.Queue(), queue.Queue()]
    halves = [[torch.tensor([v]) for v in start[:2]], [torch.tensor([v]) for v in start[2:]]]

    def worker(rank: int) -> None:
        comm = Twin(rank, inboxes)
        for distance in (1, 2, 1):
            comm.exchange_mean_(halves[rank], distance)
            halves[rank][0].add_(rank + 1)  # local progress between syncs

    threads = [threading.Thread(target=worker, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for distance in (1, 2, 1):
        single.exchange_mean_(inprocess, distance)
        inprocess[0].add_(1)
        inprocess[2].add_(2)
    assert [b.item() for b in halves[0] + halves[1]] == [b.item() for b in inprocess]
    assert len({b.item() for b in inprocess}) > 1  # the steps keep them apart


def test_averaged_moments_follow_the_same_pairs():
    """--optimizer-state average under butterfly: each momentum buffer becomes its pair's mean."""
    models = [Scalar(1.0) for _ in range(4)]
    opts = [torch.optim.SGD(m.parameters(), lr=1.0, momentum=0.9) for m in models]
    for o, m, g in zip(opts, models, (1.0, 3.0, 10.0, 30.0), strict=True):
        m.x.grad = torch.tensor([g], dtype=torch.float64)
        o.step()  # momentum buffer = g
    averager = OptimizerStateSync(ButterflyAverager(InProcessCommunicator(4)), opts, "average")

    def buffers() -> list[float]:
        return [o.state[m.x]["momentum_buffer"].item() for o, m in zip(opts, models, strict=True)]

    averager.sync(models)  # pairs (0,1)(2,3)
    assert buffers() == [2.0, 2.0, 20.0, 20.0]
    averager.sync(models)  # pairs (0,2)(1,3)
    assert buffers() == [11.0] * 4


def test_butterfly_needs_a_power_of_two():
    with pytest.raises(UsageError, match="power-of-2 number of workers, not 6"):
        make_averager("butterfly", InProcessCommunicator(6))
    models = [mlp()]
    before = flatten(models[0]).clone()
    ButterflyAverager(InProcessCommunicator(1)).sync(models)  # N = 1: nothing to mix
    assert torch.equal(flatten(models[0]), before)


def test_the_exchange_runs_in_the_narrow_dtype():
    comm = ReducedPrecision(InProcessCommunicator(2), torch.bfloat16)
    a, b = torch.tensor([1 / 3]), torch.tensor([1.0])
    comm.exchange_mean_([a, b], 1)
    third = torch.tensor([1 / 3]).bfloat16()
    expected = ((third + 1) / 2).bfloat16().float()
    assert torch.equal(a, expected) and torch.equal(b, expected)
    assert not torch.equal(a, torch.tensor([(1 / 3 + 1) / 2]))  # not the fp32 mean


def test_butterfly_state_round_trips_bitwise_mid_epoch():
    comm = InProcessCommunicator(4)
    models = [mlp(i) for i in range(4)]
    averager = ButterflyAverager(comm)
    g = torch.Generator().manual_seed(5)
    steps = [0.01 * torch.randn(66, generator=g, dtype=torch.float64) for _ in range(4)]
    for _ in range(3):
        move(models, steps)
        averager.sync(models)  # replicas differ
    shared = copy.deepcopy(averager.state_dict())
    per_worker = [copy.deepcopy(averager.worker_state(i)) for i in range(4)]
    assert all("replica" in s for s in per_worker)
    twins = [mlp(9) for _ in range(4)]  # a resumed job, before its worker files are read
    restored = ButterflyAverager(comm)
    restored.load_state_dict(shared)
    for i, model in enumerate(twins):
        restored.load_worker_state(i, model, per_worker[i])
    for averager_, ms in ((averager, models), (restored, twins)):
        for _ in range(2):
            move(ms, steps[::-1])
            averager_.sync(ms)
        averager_.settle(ms)
    assert all(torch.equal(flatten(a), flatten(b)) for a, b in zip(models, twins, strict=True))
    assert averager.worker_state(0) == {}  # equal after settle: nothing per worker


def test_averaged_copies_hold_the_mean_and_leave_the_replicas_alone():
    models = [mlp(i) for i in range(4)]
    before = [flatten(m).clone() for m in models]
    copies = averaged_copies(models, InProcessCommunicator(4))
    mean = sum(before) / 4
    assert all(torch.allclose(flatten(c), mean, rtol=0, atol=1e-15) for c in copies)
    assert all(torch.equal(flatten(m), b) for m, b in zip(models, before, strict=True))


# -- through the CLI ------------------------------------------------------------------------------

BUTTERFLY = ["--averaging", "butterfly", "--epochs", "3", "--keep-checkpoints", "0"]


def test_butterfly_resume_mid_epoch_is_bitwise(data_dir, tmp_path):
    out = tmp_path / "full"
    args = ["--in-process", "--workers", "4", "--checkpoint-every", "3", *BUTTERFLY]
    assert train(data_dir, out, *args, "--avg-warmup", "0.2e") == 0
    worker = torch.load(out / "checkpoints" / "e002-r00003" / "worker-0003.pt", weights_only=False)
    assert "replica" in worker["averager"]  # the replicas differed at the checkpoint
    assert_resumes_bitwise(out, tmp_path)


@pytest.fixture(scope="module")
def butterfly_inprocess(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "butterfly"
    assert train(data_dir, out, "--in-process", "--workers", "4", *BUTTERFLY) == 0
    return out


@pytest.mark.parametrize("launcher", ["gloo", "mpi"])
def test_butterfly_on_four_processes_equals_in_process(
    data_dir, tmp_path, butterfly_inprocess, launcher
):
    """Partners in other processes through send/receive pairs: the pairs' means are exact, the
    epochs' closing allreduce sums 4 replicas in another order (float32 rounding)."""
    from conftest import SMALL

    out = tmp_path / launcher
    train_on_processes(data_dir, out, 4, launcher, *SMALL, *BUTTERFLY)
    got, want = final_state(out), final_state(butterfly_inprocess)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--workers", "6"], "--averaging butterfly needs a power-of-2 number of workers, not 6"),
        (["--workers", "4", "--group-size", "2", "--avg-every-inner", "1"], "--group-size: butt"),
    ],
)
def test_butterfly_refusals_are_one_line(data_dir, tmp_path, capsys, args, message):
    assert train(data_dir, tmp_path / "x", "--in-process", "--averaging", "butterfly", *args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_butterfly_resumes_on_another_power_of_two_only(data_dir, tmp_path, capsys):
    """Mid-epoch on another N every replica restarts from worker 0's; 3 workers are refused."""
    from test_elastic import kinds

    out = tmp_path / "four"
    args = ["--in-process", "--workers", "4", "--checkpoint-every", "2", *BUTTERFLY]
    assert train(data_dir, out, *args) == 0
    (out / "final.pt").unlink()
    (out / "checkpoints" / "LATEST").write_text("e002-r00002")
    resume = ["train", "--resume", "--out", str(out), "--in-process", "--workers"]
    assert main([*resume, "3"]) == 2
    assert "power-of-2 number of workers, not 3" in capsys.readouterr().err
    assert main([*resume, "2"]) == 0
    (resize,) = kinds(out, "resize")
    assert (resize["workers_before"], resize["workers"], resize["averager"]) == (4, 2, "restarted")


@pytest.mark.parametrize("averaging", ["butterfly", "overlap"])
def test_mid_epoch_cv_leaves_training_alone(data_dir, tmp_path, averaging):
    """--cv-every with replicas that differ mid-epoch validates a copy of their mean: the run
    logs the points and ends bitwise where the run without them does."""
    common = ["--in-process", "--workers", "4", "--averaging", averaging, "--epochs", "2"]
    assert train(data_dir, tmp_path / "plain", *common) == 0
    assert train(data_dir, tmp_path / "cv", *common, "--cv-every", "2") == 0
    assert_same_model(tmp_path / "plain", tmp_path / "cv")
    records = [json.loads(x) for x in (tmp_path / "cv" / "metrics.jsonl").read_text().splitlines()]
    points = [r for r in records if r["kind"] == "cv"]
    assert len(points) >= 2 and all(0 < r["cv_frame_accuracy"] <= 1 for r in points)
