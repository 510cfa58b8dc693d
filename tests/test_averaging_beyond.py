"""Issue 20's averaging rules against hand derivations: DiLoCo (and its identity with Nesterov
BMUF), warm-up, AdaComm's K, two-level groups, optimiser-state policies, Adam; then bitwise
resume and in-process == process groups through the CLI."""

import copy
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import SMALL
from test_averaging import mlp
from test_launch import assert_same_model, final_state, train_on_processes

from modelavg.averaging import BlockMomentumAverager, DiLoCoAverager, ModelAverager
from modelavg.averaging.base import flatten, unflatten_
from modelavg.averaging.optstate import OptimizerStateSync
from modelavg.averaging.schedule import (
    AdaptiveK,
    FixedK,
    TwoLevel,
    Warmup,
    split,
    warmup_rounds,
)
from modelavg.cli import main
from modelavg.comm import InProcessCommunicator
from modelavg.comm.group import group_communicator
from modelavg.errors import UsageError
from modelavg.optim import build_optimizer


def move(models, steps):
    """Pretend local training moved replica n by steps[n]."""
    with torch.no_grad():
        for m, s in zip(models, steps, strict=True):
            unflatten_(flatten(m) + s, m)


def test_diloco_outer_nesterov_step_by_hand():
    lr, mu = 0.7, 0.9
    models = [mlp(), mlp()]
    diloco = DiLoCoAverager(InProcessCommunicator(2), outer_lr=lr, outer_momentum=mu)
    diloco.start(models)
    w0 = flatten(models[0]).clone()
    a, b = torch.full_like(w0, 0.02), torch.full_like(w0, -0.01)
    move(models, [a, 2 * a])  # mean moved by 1.5a: pseudo-gradient g1 = -1.5a
    diloco.sync(models)
    g1 = -1.5 * a  # buf = g1; W1 = W0 - lr (g1 + mu g1)
    w1 = w0 - lr * (1 + mu) * g1
    torch.testing.assert_close(flatten(models[1]), w1, rtol=0, atol=1e-15)
    move(models, [b, b])  # g2 = -b; buf = mu g1 + g2; W2 = W1 - lr (g2 + mu buf)
    diloco.sync(models)
    g2 = -b
    w2 = w1 - lr * (g2 + mu * (mu * g1 + g2))
    torch.testing.assert_close(flatten(models[0]), w2, rtol=0, atol=1e-15)


def test_diloco_is_nesterov_bmuf_with_block_lr_outer_lr_and_momentum_outer_momentum():
    """S' - S = block_lr (G + bm D) in BMUF is W' - W = outer_lr (G + mu B) in DiLoCo."""
    comm = InProcessCommunicator(3)
    a, b = [mlp(), mlp(), mlp()], [mlp(), mlp(), mlp()]
    diloco = DiLoCoAverager(comm, outer_lr=0.7, outer_momentum=0.9)
    bmuf = BlockMomentumAverager(comm, block_momentum=0.9, block_lr=0.7, nesterov=True)
    diloco.start(a)
    bmuf.start(b)
    g = torch.Generator().manual_seed(3)
    for _ in range(6):
        steps = [0.01 * torch.randn(flatten(a[0]).shape, generator=g, dtype=a[0][0].weight.dtype)]
        steps += [0.01 * torch.randn(steps[0].shape, generator=g, dtype=steps[0].dtype)] * 2
        move(a, steps)
        move(b, steps)
        diloco.sync(a)
        bmuf.sync(b)
        torch.testing.assert_close(flatten(a[0]), flatten(b[0]), rtol=0, atol=1e-12)


def test_diloco_state_round_trips_bitwise():
    comm = InProcessCommunicator(2)
    models = [mlp(), mlp()]
    diloco = DiLoCoAverager(comm, outer_lr=0.5, outer_momentum=0.8)
    diloco.start(models)
    step = torch.full_like(flatten(models[0]), 0.01)
    move(models, [step, -step / 3])
    diloco.sync(models)
    saved, twins = copy.deepcopy(diloco.state_dict()), copy.deepcopy(models)
    restored = DiLoCoAverager(comm, outer_lr=0.5, outer_momentum=0.8)
    restored.load_state_dict(saved)
    for averager, ms in ((diloco, models), (restored, twins)):
        move(ms, [step, step])
        averager.sync(ms)
    assert torch.equal(flatten(models[0]), flatten(twins[0]))


def test_split_and_the_schedules_segments():
    comm = InProcessCommunicator(4)
    top, group = ModelAverager(comm), ModelAverager(group_communicator(comm, 2))
    assert split(5, 2, group, top) == [(2, group), (2, group), (1, top)]
    assert split(4, 4, top, top) == [(4, top)]
    assert TwoLevel(top, 5, group, 2).segments(1) == [(2, group), (2, group), (1, top)]
    warm = Warmup(FixedK(top, 4), rounds=2)
    assert [n for n, _ in warm.segments(2)] == [1, 1, 1, 1]
    assert all(a is warm.warm for _, a in warm.segments(1))
    assert warm.segments(3) == [(4, top)] and warm.period(3) == {"avg_every": 4}
    assert warm.period(1) == {"avg_every": 1}
    # '2e' over 10 rounds/epoch = 20 rounds; 500,000 frames of 40,960 per round: 13 rounds start
    assert warmup_rounds("2e", 10, 40960) == 20
    assert warmup_rounds("500000", 10, 40960) == math.ceil(500000 / 40960) == 13
    assert warmup_rounds("0", 10, 40960) == 0
    for bad in ("x", "-1", "2.5", "e"):
        with pytest.raises(UsageError):
            warmup_rounds(bad, 10, 100)


def test_adacomm_period_by_hand():
    """K = clamp(ceil(K0 sqrt(lr0 F / (lr F0))), 1, R) with K0 = 2, R = 16."""
    k = AdaptiveK(ModelAverager(InProcessCommunicator(2)), steps=16, k0=2)
    assert k.period(1) == {"avg_every": 2}
    k.observe(2.0, 1.0)  # the reference window: F0 = 2, lr0 = 1
    assert k.k == 2
    k.observe(0.5, 0.01)  # sqrt(1 * 0.5 / (0.01 * 2)) = 5: K = 10
    assert k.k == 10 and [n for n, _ in k.segments(7)] == [10, 6]
    k.observe(2.0, 1e-4)  # sqrt(1e4) * 2 = 200 -> clamped to 16
    assert k.k == 16
    k.observe(0.01, 1.0)  # sqrt(0.005) * 2 = 0.14 -> 1
    assert k.k == 1
    k.observe(float("nan"), 1.0)  # a diverged window leaves K alone
    again = AdaptiveK(k.averager, 16, 2)
    again.load_state_dict(k.state_dict())
    assert (again.k, again.loss0, again.lr0) == (1, 2.0, 1.0)


def test_local_groups_average_within_groups_only():
    comm = InProcessCommunicator(4)
    bufs = [torch.tensor([float(i)]) for i in range(4)]
    group_communicator(comm, 2).allreduce_mean_(bufs)
    assert [b.item() for b in bufs] == [0.5, 0.5, 2.5, 2.5]
    assert group_communicator(comm, 4) is comm
    with pytest.raises(UsageError, match="must divide"):
        group_communicator(comm, 3)


def sgd_pair(momentum: float = 0.9):
    models = [mlp(0), mlp(1)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=momentum) for m in models]
    x = torch.randn(4, 5, dtype=torch.float64)
    for m, o in zip(models, opts, strict=True):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    return models, opts


def test_optimizer_state_average_makes_every_momentum_the_mean():
    models, opts = sgd_pair()
    params = [list(m.parameters()) for m in models]
    bufs = [
        [o.state[p]["momentum_buffer"].clone() for p in ps]
        for o, ps in zip(opts, params, strict=True)
    ]
    OptimizerStateSync(ModelAverager(InProcessCommunicator(2)), opts, "average").sync(models)
    for o, ps in zip(opts, params, strict=True):
        for i, p in enumerate(ps):
            torch.testing.assert_close(o.state[p]["momentum_buffer"], (bufs[0][i] + bufs[1][i]) / 2)
    torch.testing.assert_close(flatten(models[0]), flatten(models[1]))


def test_optimizer_state_reset_restarts_sgd_momentum_and_adam():
    models, opts = sgd_pair()
    OptimizerStateSync(ModelAverager(InProcessCommunicator(2)), opts, "reset").sync(models)
    assert all("momentum_buffer" not in s for o in opts for s in o.state.values())
    model = mlp()
    adam = torch.optim.Adam(model.parameters(), lr=0.01)
    fresh_model = copy.deepcopy(model)
    for _ in range(3):
        adam.zero_grad()
        model(torch.ones(2, 5, dtype=torch.float64)).sum().backward()
        adam.step()
    OptimizerStateSync(ModelAverager(InProcessCommunicator(1)), [adam], "reset").sync([model])
    assert all(len(s) == 0 for s in adam.state.values())  # step 0 again: bias correction restarts
    fresh_model.load_state_dict(model.state_dict())
    fresh = torch.optim.Adam(fresh_model.parameters(), lr=0.01)
    for m, o in ((model, adam), (fresh_model, fresh)):
        o.zero_grad()
        m(torch.ones(2, 5, dtype=torch.float64)).sum().backward()
        o.step()
    assert torch.equal(flatten(model), flatten(fresh_model))


def test_adam_and_adamw_in_the_registry():
    cfg = SimpleNamespace(optimizer="adamw", lr=1e-3, weight_decay=None)
    opt = build_optimizer(mlp(), cfg, 4)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["weight_decay"] == 0.01
    cfg.optimizer, cfg.weight_decay = "adam", 0.1
    opt = build_optimizer(mlp(), cfg, 4)
    assert type(opt) is torch.optim.Adam and opt.defaults["weight_decay"] == 0.1


# -- through the CLI ------------------------------------------------------------------------------


def train(data: Path, out: Path, *args: str) -> int:
    return main(["train", *SMALL, "--data", str(data), "--out", str(out), *args])


RESUMABLE = {
    "diloco-warmup-average": [
        "--averaging",
        "diloco",
        "--avg-warmup",
        "1e",
        "--optimizer-state",
        "average",
        "--momentum",
        "0.9",
        "--lr",
        "0.1",
    ],
    "auto-adamw-reset": [
        "--avg-every",
        "auto",
        "--avg-every-max",
        "4",
        "--avg-every-init",
        "2",
        "--optimizer",
        "adamw",
        "--lr",
        "0.01",
        "--optimizer-state",
        "reset",
        "--log-every",
        "2",
    ],
    "two-level-bmuf": ["--averaging", "bmuf", "--group-size", "2", "--avg-every-inner", "1"],
    "lr-ramp": ["--lr-warmup", "2e", "--lr", "0.05"],  # the resume lands inside the ramp
}


# averagings over all workers and inside groups by the end of epoch e of R rounds of 2 steps
SYNCS = {
    "diloco-warmup-average": lambda r, e: (2 * r + (e - 1) * r, 0),  # K = 1 in epoch 1
    "two-level-bmuf": lambda r, e: (e * r, e * r),  # a group sync after step 1 of each round
    "lr-ramp": lambda r, e: (e * r, 0),
}


@pytest.mark.parametrize("name", list(RESUMABLE))
def test_resume_mid_epoch_is_bitwise(data_dir, tmp_path, name):
    out = tmp_path / "full"
    args = ["--in-process", "--workers", "4", "--epochs", "3", "--checkpoint-every", "3"]
    args += ["--keep-checkpoints", "0", *RESUMABLE[name]]
    assert train(data_dir, out, *args) == 0
    if name in SYNCS:  # what the time model prices: the averagings the schedule made
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        r = next(m["rounds_per_epoch"] for m in records if m["kind"] == "start")
        assert epoch_syncs(out) == [SYNCS[name](r, e) for e in (1, 2, 3)]
    assert_resumes_bitwise(out, tmp_path)


def epoch_syncs(out: Path) -> list[tuple[int, int]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ends = [m for m in records if m["kind"] == "epoch" and m["epoch"] >= 1]
    return [(m["syncs"], m["group_syncs"]) for m in ends]


def assert_resumes_bitwise(out: Path, tmp_path: Path, checkpoint: str = "e002-r00003") -> None:
    """A copy of the finished run ``out``, resumed from ``checkpoint``, ends with its model and
    has counted the same averagings."""
    copy_ = tmp_path / "resumed"
    shutil.copytree(out, copy_)
    (copy_ / "final.pt").unlink()
    (copy_ / "checkpoints" / "LATEST").write_text(checkpoint)
    assert main(["train", "--resume", "--out", str(copy_)]) == 0
    assert_same_model(out, copy_)
    assert epoch_syncs(copy_) == epoch_syncs(out)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--avg-every", "0"], "--avg-every must be >= 1 or auto, not 0"),
        (["--avg-warmup", "2x"], "--avg-warmup 2x"),
        (["--lr-warmup", "-1"], "--lr-warmup -1"),
        (["--lr-warmup", "1e", "--lr-scaling", "none"], "needs --lr-scaling linear"),
        (["--group-size", "2"], "--group-size and --avg-every-inner go together"),
        (["--group-size", "3", "--avg-every-inner", "1"], "--group-size 3 must divide"),
        (["--group-size", "2", "--avg-every-inner", "2"], "--avg-every-inner must be below"),
    ],
)
def test_bad_options_are_one_line_exit_2(data_dir, tmp_path, capsys, args, message):
    assert train(data_dir, tmp_path / "x", "--in-process", "--workers", "4", *args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_lr_warmup_ramps_every_rounds_lr_linearly(data_dir, tmp_path):
    out = tmp_path / "ramp"
    args = ["--in-process", "--workers", "4", "--epochs", "2", "--schedule", "constant"]
    assert train(data_dir, out, *args, "--lr", "0.05", "--lr-warmup", "1e", "--log-every", "1") == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = next(r["rounds_per_epoch"] for r in records if r["kind"] == "start")
    lrs = [r["lr"] for r in records if r["kind"] == "round"]
    expected = [0.05 * (1 + 3 * min(1, i / rounds)) for i in range(2 * rounds)]
    assert lrs == pytest.approx(expected) and rounds >= 3


TWO_LEVEL = [*SMALL, "--group-size", "2", "--avg-every-inner", "1", "--averaging", "diloco"]


@pytest.fixture(scope="module")
def two_level_inprocess(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "two-level"
    assert main(["train", *TWO_LEVEL, "--data", str(data_dir), "--out", str(out),
                 "--in-process", "--workers", "4"]) == 0  # fmt: skip
    return out


@pytest.mark.parametrize("launcher", ["gloo", "mpi"])
def test_two_level_on_process_subgroups_equals_in_process(
    data_dir, tmp_path, two_level_inprocess, launcher
):
    out = tmp_path / launcher
    train_on_processes(data_dir, out, 4, launcher, *TWO_LEVEL)
    # 4 processes: gloo's ring and MPI sum the 4 replicas in another order than the in-process
    # loop, so equal up to float32 rounding (2 processes, as in test_launch, are bitwise equal)
    got, want = final_state(out), final_state(two_level_inprocess)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-4)


def test_combine_averages_the_last_checkpoints_and_fits_weights(data_dir, tmp_path, capsys):
    from modelavg.combine import combine
    from modelavg.nets.dnn import load_model

    out = tmp_path / "run"
    args = ["--in-process", "--workers", "2", "--epochs", "3", "--keep-checkpoints", "0"]
    assert train(data_dir, out, *args) == 0
    assert main(["combine", str(out), "--last", "3"]) == 0
    names = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())[-3:]
    states = [torch.load(out / "checkpoints" / n / "shared.pt", weights_only=False)["model"]
              for n in names]  # fmt: skip
    combined = load_model(out / "combined.pt").state_dict()
    key = "layers.0.weight"
    torch.testing.assert_close(combined[key], sum(s[key] for s in states) / 3)
    by_hand = combine(states, torch.tensor([0.2, 0.3, 0.5]))[key]
    torch.testing.assert_close(
        by_hand, 0.2 * states[0][key] + 0.3 * states[1][key] + 0.5 * states[2][key]
    )
    assert (
        main(["combine", str(out), "--last", "3", "--fit-cv", "--out", str(tmp_path / "f.pt")]) == 0
    )
    report = torch.load(tmp_path / "f.pt", weights_only=False)["combine"]
    assert report["checkpoints"] == names and report["chosen"] == "fit"
    assert abs(sum(report["fit"]["weights"]) - 1) < 1e-9 and min(report["fit"]["weights"]) >= 0
    assert "held-out cv loss" in capsys.readouterr().out
    assert main(["combine", str(tmp_path / "nothing")]) == 2
