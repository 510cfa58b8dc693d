"""CD-1 on a GPU without per-minibatch waits (GPU readiness item 14): a step reads nothing from
the host, its guard applies itself on the device, and the arithmetic is the host-side trainer's,
bit for bit (the reference below is that trainer: it reads the stds and branches on them)."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from modelavg.audit import DeviceAudit
from modelavg.averaging import ModelAverager
from modelavg.comm import InProcessCommunicator
from modelavg.config import PretrainConfig
from modelavg.errors import UsageError
from modelavg.nets.rbm import RBM, CD1Config, CD1Trainer, cd1_statistics, schedule
from modelavg.preempt import Control
from modelavg.pretrain import make_workers, start
from modelavg.pretrain_log import Window

pytestmark = pytest.mark.usefixtures("one_thread")


class HostReference:
    """CD-1 as the trainer did it with host reads: the error and both stds as Python floats, an
    ``if`` on the guard's test, the lr a Python float passed as ``alpha``."""

    def __init__(self, rbm: RBM, cfg: CD1Config, seed: int) -> None:
        self.rbm, self.cfg = rbm, cfg
        self.generator = torch.Generator().manual_seed(seed)
        self.lr, self.lr_scale, self.frames, self.period = cfg.lr, 1.0, 0, 0
        self.buffers = {n: torch.zeros_like(p) for n, p in rbm.named_parameters()}

    @torch.no_grad()
    def step(self, v: torch.Tensor) -> tuple[float, float, bool, float]:
        """(error, lr, guard fired, guard scale)"""
        cfg = self.cfg
        if self.frames // cfg.momentum_step_frames != self.period:
            self.period = self.frames // cfg.momentum_step_frames
            self.lr_scale = 1.0 if cfg.guard_lr_decay_resets else self.lr_scale
        momentum, lr = schedule(self.frames, cfg, self.lr)
        lr *= self.lr_scale
        stats = cd1_statistics(self.rbm, v, self.generator)
        recon = stats.reconstruction
        error = float((v - recon).pow(2).sum(dim=1).mean())
        self.frames += len(v)
        if self.rbm.gaussian:
            data_std, recon_std = float(v.std(correction=0)), float(recon.std(correction=0))
            if recon_std > cfg.guard_ratio * data_std:  # shrink, zero the momentum, lower lr
                scale = data_std / recon_std
                for p in self.rbm.parameters():
                    p.mul_(scale)
                for buf in self.buffers.values():
                    buf.zero_()
                if cfg.guard_lr_decay_resets:
                    self.lr_scale *= cfg.guard_lr_decay
                else:
                    self.lr *= cfg.guard_lr_decay
                return error, lr, True, scale
        grads = {"weight": stats.weight, "hidden_bias": stats.hidden_bias}
        grads["visible_bias"] = stats.visible_bias
        for name, p in self.rbm.named_parameters():
            buf = self.buffers[name]
            buf.mul_(momentum).add_(grads[name], alpha=lr)
            if name == "weight":
                buf.add_(p, alpha=-lr * cfg.l2)
            p.add_(buf)
        return error, lr, False, 1.0


def gaussian_data(n: int, dim: int) -> torch.Tensor:
    return torch.randn(n, dim)


def bernoulli_data(n: int, dim: int) -> torch.Tensor:
    return (torch.rand(n, dim) < 0.3).float()


CASES = {  # lr 3 blows the Gaussian RBM up again and again: the guard fires in many steps
    "gaussian-guard": ("gaussian", CD1Config(lr=3.0, momentum_step_frames=2000)),
    "gaussian-guard-lr-decay-kept": (
        "gaussian",
        CD1Config(lr=3.0, momentum_step_frames=2000, guard_lr_decay_resets=False),
    ),
    "gaussian-recipe": ("gaussian", CD1Config(lr=0.01, with_bug=False, momentum_step_frames=1000)),
    "bernoulli": ("bernoulli", CD1Config(lr=0.4, momentum_step_frames=1000)),
}


@pytest.mark.parametrize("case", CASES)
def test_cd1_steps_equal_the_host_side_trainer_bit_for_bit(case: str) -> None:
    visible_type, cfg = CASES[case]
    torch.manual_seed(0)
    rbm = RBM(16, 24, visible_type)
    reference = HostReference(copy.deepcopy(rbm), cfg, seed=3)
    trainer = CD1Trainer(rbm, cfg, seed=3)
    data = gaussian_data if visible_type == "gaussian" else bernoulli_data
    window, errors, fired = Window(), [], 0
    for i in range(300):
        if i == 150:  # a resume mid-way (the guard's lr decays are in the state)
            rbm = copy.deepcopy(rbm)
            state = trainer.state_dict()
            trainer = CD1Trainer(rbm, CD1Config(lr=1.0), seed=99)
            trainer.load_state_dict(state)
        v = data(100, 16)
        result = trainer.step(v)
        error, lr, guard_fired, scale = reference.step(v)
        got = (result.reconstruction_error.item(), result.lr.item(), bool(result.guard_fired))
        assert got == (error, lr, guard_fired), i
        assert result.guard_scale.item() == scale, i
        window.add(result, len(v))
        errors.append(error)
        fired += guard_fired
    assert fired > 10 if case.startswith("gaussian-guard") else fired == 0
    theirs_all = reference.rbm.parameters()
    for (name, mine), theirs in zip(rbm.named_parameters(), theirs_all, strict=True):
        assert torch.equal(mine, theirs), name
        assert torch.equal(trainer.buffers[name], reference.buffers[name]), name
    next_lr = schedule(reference.frames, cfg, reference.lr)[1] * reference.lr_scale
    assert trainer.current_schedule()[1].item() == next_lr
    # the window's float64 sums: the per-step errors summed as before, the firings counted
    total = 0.0
    for e in errors:
        total += e * 100
    sums = window.tensor(torch.device("cpu")).tolist()
    assert sums[:3] == [total, 30_000, fired] and sums[5] == 300


@pytest.mark.parametrize("case", ["gaussian-guard", "bernoulli"])
def test_a_cd1_step_reads_nothing_from_the_host(case: str) -> None:
    visible_type, cfg = CASES[case]
    torch.manual_seed(0)
    trainer = CD1Trainer(RBM(16, 24, visible_type, weight_std=3.0), cfg, seed=0)
    data = gaussian_data if visible_type == "gaussian" else bernoulli_data
    batches = [data(100, 16) for _ in range(20)]
    window = Window()
    with DeviceAudit() as audit:
        for v in batches:
            window.add(trainer.step(v), len(v))
    assert audit.summary() == {"implicit_device": {}, "transfers": {}, "host_reads": {}}
    fired = int(window.guard_firings)
    assert fired > 0 if visible_type == "gaussian" else fired == 0  # both sides of the guard ran


@pytest.fixture
def workers(data_dir, tmp_path):
    small = dict(hidden_layers=2, hidden_dim=16, context=1, minibatch=16, avg_every=2)
    small |= dict(workers=2, in_process=True, progress=False, tensorboard=False)
    cfg = PretrainConfig(data=str(data_dir), out=str(tmp_path), **small)
    comm = InProcessCommunicator(2)
    run = start(cfg, comm, ModelAverager(comm), Control(comm))
    return make_workers(run, run.plans[0])


def test_a_pretraining_worker_reads_the_host_only_for_its_log_line(workers) -> None:
    idx = torch.arange(16)
    with DeviceAudit() as audit:
        for _ in range(4):
            workers[0].step(idx)
    assert audit.summary() == {"implicit_device": {}, "transfers": {}, "host_reads": {}}
    with DeviceAudit() as audit:
        stats = workers[0].take_stats()
    assert sum(audit.host_reads.values()) == 1  # the NaN/Inf check, on the error's sum
    assert stats[1:3].tolist() == [64, 0] and stats[5].item() == 4  # frames, firings, steps


@pytest.mark.parametrize("bad", [torch.nan, torch.inf])
def test_a_nan_or_inf_in_cd1_ends_the_run_at_the_next_log_line(workers, bad) -> None:
    worker = replace(workers[0], layer_input=lambda table, idx: torch.full((16, 18), bad))
    worker.step(torch.arange(16))  # not read here, and bernoulli is not handed a NaN
    workers[1].step(torch.arange(16))
    with pytest.raises(UsageError, match="worker 0: the RBM diverged"):
        worker.take_stats()
    assert workers[1].take_stats()[5].item() == 1  # the other worker logs its step
