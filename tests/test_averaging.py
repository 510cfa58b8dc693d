"""The averaging math: mean of replicas, K=1 equals synchronous SGD, BMUF reduces to averaging."""

import copy

import torch
from torch import nn

from modelavg.averaging import BlockMomentumAverager, ModelAverager
from modelavg.averaging.base import flatten
from modelavg.comm import InProcessCommunicator


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Sigmoid(), nn.Linear(7, 3)).double()


def test_model_averager_sets_every_replica_to_the_mean():
    models = [mlp(s) for s in range(3)]
    expected = torch.stack([flatten(m) for m in models]).mean(0)
    ModelAverager(InProcessCommunicator(3)).sync(models)
    for m in models:
        torch.testing.assert_close(flatten(m), expected, rtol=1e-15, atol=1e-15)


def test_k1_averaging_equals_synchronous_sgd_on_the_mean_gradient():
    n, lr, steps = 4, 0.3, 5
    g = torch.Generator().manual_seed(1)
    data = [
        [
            (
                torch.randn(8, 5, generator=g, dtype=torch.float64),
                torch.randint(0, 3, (8,), generator=g),
            )
            for _ in range(n)
        ]
        for _ in range(steps)
    ]
    replicas = [mlp() for _ in range(n)]
    opts = [torch.optim.SGD(m.parameters(), lr=lr) for m in replicas]
    averager = ModelAverager(InProcessCommunicator(n))
    sync_model = mlp()
    for batch in data:
        for m, opt, (x, y) in zip(replicas, opts, batch, strict=True):  # K = 1 local step each
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        averager.sync(replicas)
        grads = []  # synchronous SGD: one step on the gradient averaged over the N minibatches
        for x, y in batch:
            sync_model.zero_grad()
            nn.functional.cross_entropy(sync_model(x), y).backward()
            grads.append([p.grad.clone() for p in sync_model.parameters()])
        with torch.no_grad():
            for i, p in enumerate(sync_model.parameters()):
                p -= lr * torch.stack([gr[i] for gr in grads]).mean(0)
    torch.testing.assert_close(flatten(replicas[0]), flatten(sync_model), rtol=1e-12, atol=1e-12)


def test_bmuf_with_zero_momentum_is_model_averaging():
    models = [mlp(s) for s in range(3)]
    plain = copy.deepcopy(models)
    bmuf = BlockMomentumAverager(InProcessCommunicator(3), block_momentum=0.0, block_lr=1.0)
    bmuf.start(models)
    for m in models:  # pretend local training moved each replica
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 * torch.randn_like(p))
    for m, p in zip(models, plain, strict=True):
        p.load_state_dict(m.state_dict())
    bmuf.sync(models)
    ModelAverager(InProcessCommunicator(3)).sync(plain)
    torch.testing.assert_close(flatten(models[0]), flatten(plain[0]))


def test_bmuf_momentum_accumulates_and_state_round_trips():
    comm = InProcessCommunicator(2)
    models = [mlp(), mlp()]
    bmuf = BlockMomentumAverager(comm, block_momentum=0.5, nesterov=False)
    bmuf.start(models)
    w0 = flatten(models[0]).clone()
    step = torch.full_like(w0, 0.01)

    def local_move():
        for m in models:
            with torch.no_grad():
                from modelavg.averaging.base import unflatten_

                unflatten_(flatten(m) + step, m)

    local_move()
    bmuf.sync(models)
    torch.testing.assert_close(flatten(models[0]), w0 + step)  # Delta = G
    saved = copy.deepcopy(bmuf.state_dict())
    local_move()
    bmuf.sync(models)
    torch.testing.assert_close(flatten(models[0]), w0 + step + 1.5 * step)  # Delta = 0.5G + G
    restored = BlockMomentumAverager(comm, block_momentum=0.5, nesterov=False)
    restored.load_state_dict(saved)
    assert torch.equal(restored.delta, saved["delta"])
    assert BlockMomentumAverager(InProcessCommunicator(4)).block_momentum == 0.75


def test_nesterov_bmuf_measures_the_block_update_from_the_look_ahead_start():
    """Chen & Huo's NBM by hand: one block with local progress g, then blocks without any. The
    momentum must decay (x bm per block): replicas sit at W0 + g (1 + bm + bm^2) after two
    blocks; measuring G from W instead of the start point gives W0 + g (1 + 2 bm + 2 bm^2)."""
    from modelavg.averaging.base import unflatten_

    bm = 0.75
    comm = InProcessCommunicator(2)
    models = [mlp(), mlp()]
    bmuf = BlockMomentumAverager(comm, block_momentum=bm, nesterov=True)
    bmuf.start(models)
    w0 = flatten(models[0]).clone()
    g = torch.full_like(w0, 0.01)
    with torch.no_grad():
        for m in models:
            unflatten_(flatten(m) + g, m)
    bmuf.sync(models)  # G = g: W1 = W0 + g, start = W1 + bm g
    torch.testing.assert_close(flatten(models[0]), w0 + (1 + bm) * g)
    bmuf.sync(models)  # no local progress: G = 0, Delta = bm g
    torch.testing.assert_close(flatten(models[0]), w0 + (1 + bm + bm**2) * g)
    for _ in range(60):
        bmuf.sync(models)
    torch.testing.assert_close(flatten(models[0]), w0 + g / (1 - bm), rtol=1e-6, atol=1e-6)
