"""RBM pretraining math: CD-1 against exact log-likelihood gradients, schedule, guard, DBN files."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

from modelavg.errors import UsageError
from modelavg.nets.dbn import (
    DBN,
    dbn_to_linear_layers,
    kaldi_softmax_init,
    kaldi_weight_std,
    load_dbn,
    pretraining_plan,
    save_dbn,
)
from modelavg.nets.rbm import RBM, CD1Config, CD1Trainer, cd1_statistics, ramp_momentum, schedule

Grads = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (weight, hidden_bias, visible_bias)


# --------------------------------------------------------------------------------------------------
# Exact gradients by enumeration (float64)
# --------------------------------------------------------------------------------------------------


def binary_states(n: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=n)), dtype=torch.float64)


def hidden_state_probs(ph: torch.Tensor, hs: torch.Tensor) -> torch.Tensor:
    """P(h = s | v) for every frame (rows of ph) and every binary state s (rows of hs)."""
    return torch.exp(torch.log(ph) @ hs.T + torch.log1p(-ph) @ (1 - hs).T)


def exact_bernoulli(rbm: RBM, q: torch.Tensor) -> tuple[Grads, Grads]:
    """(d log-lik, expected CD-1 update) for data distribution q over all 2^V visible states.

    d/dW E_q[log p(v)] = E_q[p(h|v) v^T] - E_model[h v^T], model by summing all 2^(V+H) states.
    Expected CD-1 replaces the model term by E_{v~q, s~p(h|v)}[p(h|v-) v-^T], v- = sigmoid(W^T s+b).
    """
    vs, hs = binary_states(rbm.visible_dim), binary_states(rbm.hidden_dim)
    w, bh, bv = rbm.weight, rbm.hidden_bias, rbm.visible_bias
    neg_energy = (vs @ bv)[:, None] + (hs @ bh)[None, :] + vs @ w.T @ hs.T
    joint = torch.softmax(neg_energy.flatten(), 0).view_as(neg_energy)
    ph = torch.sigmoid(vs @ w.T + bh)
    pos = ((ph * q[:, None]).T @ vs, q @ ph, q @ vs)
    model = (hs.T @ joint.T @ vs, joint.sum(0) @ hs, joint.sum(1) @ vs)
    r = q @ hidden_state_probs(ph, hs)  # marginal probability of each sampled hidden state
    v_neg = torch.sigmoid(hs @ w + bv)
    ph_neg = torch.sigmoid(v_neg @ w.T + bh)
    neg = ((ph_neg * r[:, None]).T @ v_neg, r @ ph_neg, r @ v_neg)
    return _diff(pos, model), _diff(pos, neg)


def exact_gaussian(rbm: RBM, x: torch.Tensor) -> tuple[Grads, Grads]:
    """Same for unit-variance Gaussian visibles on the finite data set x.

    Integrating v out analytically: p(h) ∝ exp(b_h.h + |b_v + W^T h|^2 / 2) and
    p(v | h) = N(mu_h, I), mu_h = b_v + W^T h, so E_model[h v^T] = sum_h p(h) h mu_h^T.
    """
    hs = binary_states(rbm.hidden_dim)
    w, bh, bv = rbm.weight, rbm.hidden_bias, rbm.visible_bias
    mu = bv + hs @ w
    p = torch.softmax(hs @ bh + 0.5 * mu.pow(2).sum(1), 0)
    ph = torch.sigmoid(x @ w.T + bh)
    pos = (ph.T @ x / len(x), ph.mean(0), x.mean(0))
    model = ((hs * p[:, None]).T @ mu, p @ hs, p @ mu)
    r = hidden_state_probs(ph, hs).mean(0)
    ph_neg = torch.sigmoid(mu @ w.T + bh)
    neg = ((ph_neg * r[:, None]).T @ mu, r @ ph_neg, r @ mu)
    return _diff(pos, model), _diff(pos, neg)


def _diff(a: Grads, b: Grads) -> Grads:
    return tuple(x - y for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


def as_grads(stats) -> Grads:
    return stats.weight, stats.hidden_bias, stats.visible_bias


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cd1_follows_exact_gradient_bernoulli(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    rbm = RBM(4, 3, "bernoulli", weight_std=0.5, generator=gen).double()
    with torch.no_grad():
        rbm.hidden_bias.normal_(0, 0.5, generator=gen)
        rbm.visible_bias.normal_(0, 0.5, generator=gen)
    q = torch.softmax(2 * torch.randn(16, generator=gen, dtype=torch.float64), 0)
    data = binary_states(4)[torch.multinomial(q, 50_000, replacement=True, generator=gen)]
    measured = as_grads(cd1_statistics(rbm, data, gen))
    exact, expected_cd1 = exact_bernoulli(rbm, q)
    for got, cd1, true in zip(measured, expected_cd1, exact, strict=True):
        torch.testing.assert_close(got, cd1, atol=0.02, rtol=0)  # the estimator is CD-1
        assert cosine(got, true) > 0.8  # and CD-1 points along the log-likelihood gradient


@pytest.mark.parametrize("seed", [0, 1])
def test_cd1_follows_exact_gradient_gaussian(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    rbm = RBM(3, 4, "gaussian", weight_std=0.3, generator=gen).double()
    with torch.no_grad():
        rbm.hidden_bias.normal_(0, 0.5, generator=gen)
    shift = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    coin = (torch.rand(60, 1, generator=gen) > 0.5).double()
    x = torch.randn(60, 3, generator=gen, dtype=torch.float64) + shift * coin
    measured = as_grads(cd1_statistics(rbm, x.repeat(500, 1), gen))
    exact, expected_cd1 = exact_gaussian(rbm, x)
    for got, cd1, true in zip(measured, expected_cd1, exact, strict=True):
        torch.testing.assert_close(got, cd1, atol=0.02, rtol=0)
        assert cosine(got, true) > 0.8


# --------------------------------------------------------------------------------------------------
# Update rule, training progress
# --------------------------------------------------------------------------------------------------


def test_update_rule_is_momentum_lr_l2_formula() -> None:
    torch.manual_seed(0)
    rbm = RBM(6, 5, "bernoulli")
    cfg = CD1Config(lr=0.4, with_bug=False)
    trainer = CD1Trainer(rbm, cfg, seed=3)
    replay_gen = torch.Generator().manual_seed(3)
    shadow = copy.deepcopy(rbm)
    bufs = {n: torch.zeros_like(p) for n, p in shadow.named_parameters()}
    for _ in range(3):
        v = (torch.rand(100, 6) < 0.3).float()
        result = trainer.step(v)
        grads = dict(zip(bufs, as_grads(cd1_statistics(shadow, v, replay_gen)), strict=True))
        assert result.momentum == pytest.approx(0.5) and result.lr == pytest.approx(0.4 * 0.5)
        with torch.no_grad():
            for name, p in shadow.named_parameters():
                l2 = cfg.l2 * p if name == "weight" else 0.0
                bufs[name] = 0.5 * bufs[name] + 0.2 * (grads[name] - l2)
                p.add_(bufs[name])
    for (name, mine), theirs in zip(rbm.named_parameters(), shadow.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, msg=name)
        torch.testing.assert_close(trainer.buffers[name], bufs[name])
    assert trainer.frames_seen == 300


def _bernoulli_data(gen: torch.Generator, protos: torch.Tensor, n: int) -> torch.Tensor:
    x = protos[torch.randint(0, len(protos), (n,), generator=gen)]
    return (x + (torch.rand(x.shape, generator=gen) < 0.05).float()) % 2


def test_reconstruction_error_falls_bernoulli() -> None:
    gen = torch.Generator().manual_seed(0)
    protos = (torch.rand(4, 20, generator=gen) > 0.5).float()
    rbm = RBM(20, 16, "bernoulli", generator=gen)
    rbm.init_visible_bias_from_mean(_bernoulli_data(gen, protos, 5000).mean(0))
    trainer = CD1Trainer(rbm, seed=1)
    held_out = _bernoulli_data(gen, protos, 2000)
    before = rbm.reconstruction_error(held_out)
    errors = [
        trainer.step(_bernoulli_data(gen, protos, 100)).reconstruction_error for _ in range(300)
    ]
    assert rbm.reconstruction_error(held_out) < 0.4 * before
    assert sum(errors[-20:]) < 0.4 * sum(errors[:20])


def test_reconstruction_error_falls_gaussian() -> None:
    gen = torch.Generator().manual_seed(0)
    mixing = torch.randn(8, 16, generator=gen)

    def data(n: int) -> torch.Tensor:  # binary causes -> real-valued features, normalised
        z = (torch.rand(n, 8, generator=gen) < 0.5).float()
        x = z @ mixing + 0.3 * torch.randn(n, 16, generator=gen)
        return (x - 0.5 * mixing.sum(0)) / (0.5 * mixing.pow(2).sum(0) + 0.09).sqrt()

    rbm = RBM(16, 32, "gaussian", generator=gen)
    trainer = CD1Trainer(rbm, seed=2)  # recipe lr 0.01
    held_out = data(2000)
    before = rbm.reconstruction_error(held_out)
    results = [trainer.step(data(100)) for _ in range(1000)]
    errors = [r.reconstruction_error for r in results]
    assert rbm.reconstruction_error(held_out) < 0.3 * before
    assert sum(errors[-50:]) / 50 < 0.6 * errors[0]  # CD-1's own (sampled) reconstruction
    assert not any(r.guard_fired for r in results)


# --------------------------------------------------------------------------------------------------
# Weight-explosion guard
# --------------------------------------------------------------------------------------------------


def test_guard_rescales_parameters_and_resets_momentum() -> None:
    torch.manual_seed(0)
    rbm = RBM(10, 12, "gaussian")
    trainer = CD1Trainer(rbm, CD1Config(lr=0.01), seed=5)
    for _ in range(3):
        trainer.step(torch.randn(100, 10))
    assert all(b.abs().sum() > 0 for b in trainer.buffers.values())
    with torch.no_grad():
        rbm.weight.mul_(30.0)  # reconstruction std now far above the data's
        rbm.visible_bias.fill_(0.5)
        rbm.hidden_bias.fill_(-0.2)
    before = [p.clone() for p in rbm.parameters()]
    v = torch.randn(100, 10)
    replay = torch.Generator().manual_seed(0)
    replay.set_state(trainer.generator.get_state())
    recon = cd1_statistics(copy.deepcopy(rbm), v, replay).reconstruction
    _, lr_before = trainer.current_schedule()

    result = trainer.step(v)

    expected_scale = float(v.std(correction=0) / recon.std(correction=0))
    assert result.guard_fired
    assert result.guard_scale == pytest.approx(expected_scale, rel=1e-5) and expected_scale < 0.5
    for p, p0 in zip(rbm.parameters(), before, strict=True):
        torch.testing.assert_close(p, p0 * expected_scale)  # rescaled, no CD-1 update on top
    assert all(b.abs().sum() == 0 for b in trainer.buffers.values())
    assert trainer.current_schedule()[1] == pytest.approx(0.9 * lr_before)
    assert trainer.frames_seen == 400


def test_guard_fires_when_huge_lr_explodes_gaussian_rbm() -> None:
    torch.manual_seed(0)
    rbm = RBM(16, 32, "gaussian")
    trainer = CD1Trainer(rbm, CD1Config(lr=10.0), seed=0)
    recon_stds, fired = [], 0
    for _ in range(100):
        v = torch.randn(100, 16)
        fired += trainer.step(v).guard_fired
        recon_stds.append(float(rbm.reconstruct(v).std()))
    assert fired > 5
    assert all(torch.isfinite(p).all() for p in rbm.parameters())
    assert max(recon_stds[-20:]) < 5.0  # the guard keeps pulling the model back


def test_guard_is_gaussian_only() -> None:
    torch.manual_seed(0)
    rbm = RBM(8, 8, "bernoulli", weight_std=5.0)
    trainer = CD1Trainer(rbm, CD1Config(lr=50.0), seed=0)
    for _ in range(20):
        assert not trainer.step((torch.rand(100, 8) < 0.1).float()).guard_fired


def test_guard_lr_decay_lasts_until_next_ramp_step_by_default() -> None:
    torch.manual_seed(0)
    for resets in (True, False):
        cfg = CD1Config(lr=0.01, momentum_step_frames=300, guard_lr_decay_resets=resets)
        rbm = RBM(10, 12, "gaussian", weight_std=20.0)
        trainer = CD1Trainer(rbm, cfg, seed=0)
        assert trainer.step(torch.randn(100, 10)).guard_fired
        for _ in range(3):  # 100 -> 400 frames crosses the 300-frame ramp boundary
            assert not trainer.step(torch.randn(100, 10)).guard_fired
        expected = 0.01 * (1 - ramp_momentum(400, cfg)) * (1.0 if resets else 0.9)
        assert trainer.current_schedule()[1] == pytest.approx(expected)


# --------------------------------------------------------------------------------------------------
# Momentum / lr ramp
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frames", "ramp"),
    [(0, 0.5), (499_999, 0.5), (500_000, 0.51), (10_000_000, 0.7), (20_000_000, 0.9), (10**9, 0.9)],
)
def test_ramp_values(frames: int, ramp: float) -> None:
    fixed = CD1Config(lr=0.4, with_bug=False)
    buggy = CD1Config(lr=0.4)  # Kaldi default --with-bug=true
    assert ramp_momentum(frames, fixed) == pytest.approx(ramp)
    assert schedule(frames, fixed) == pytest.approx((ramp, 0.4 * (1 - ramp)))
    assert schedule(frames, buggy) == pytest.approx((0.9, 0.4 * (1 - ramp)))


def test_trainer_follows_ramp_by_frames() -> None:
    cfg = CD1Config(lr=0.4, with_bug=False, momentum_step_frames=200, momentum_steps=4)
    trainer = CD1Trainer(RBM(5, 4), cfg, seed=0)
    got = [trainer.step((torch.rand(100, 5) < 0.5).float()).momentum for _ in range(10)]
    assert got == pytest.approx([0.5, 0.5, 0.6, 0.6, 0.7, 0.7, 0.8, 0.8, 0.9, 0.9])


def test_recipe_defaults() -> None:
    gaussian = CD1Config.for_visible_type("gaussian")
    bernoulli = CD1Config.for_visible_type("bernoulli", with_bug=False)
    assert (gaussian.lr, bernoulli.lr, gaussian.l2) == (0.01, 0.4, 2e-4)
    assert gaussian.with_bug and not bernoulli.with_bug
    plan = pretraining_plan(440, hidden_dim=2048, depth=6, rbm_iter=1)
    assert [(p.visible_type, p.lr, p.epochs) for p in plan[:2]] == [
        ("gaussian", 0.01, 2),
        ("bernoulli", 0.4, 1),
    ]
    assert [p.visible_dim for p in plan] == [440] + [2048] * 5
    assert all(p.visible_type == "bernoulli" for p in plan[1:])


def test_trainer_state_dict_resumes_identically() -> None:
    torch.manual_seed(0)
    rbm = RBM(10, 12, "gaussian")
    trainer = CD1Trainer(rbm, seed=7)
    for _ in range(5):
        trainer.step(torch.randn(100, 10))
    state = trainer.state_dict()
    twin_rbm = copy.deepcopy(rbm)
    twin = CD1Trainer(twin_rbm, CD1Config(lr=1.0), seed=99)
    twin.load_state_dict(copy.deepcopy(state))
    assert twin.config == trainer.config and twin.frames_seen == 500
    v = torch.randn(100, 10)
    assert trainer.step(v) == twin.step(v)
    for a, b in zip(rbm.parameters(), twin_rbm.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# RBM init, DBN, files, conversion
# --------------------------------------------------------------------------------------------------


def test_rbm_init_and_visible_bias_from_mean() -> None:
    rbm = RBM(300, 200, "bernoulli", generator=torch.Generator().manual_seed(0))
    assert rbm.weight.shape == (200, 300)
    assert float(rbm.weight.std()) == pytest.approx(0.1, rel=0.02)
    assert rbm.hidden_bias.abs().sum() == 0 and rbm.visible_bias.abs().sum() == 0
    p = torch.rand(300) * 0.98 + 0.01
    p[:2] = torch.tensor([0.0, 1.0])  # dead / saturated units stay finite
    rbm.init_visible_bias_from_mean(p)
    assert torch.isfinite(rbm.visible_bias).all()
    torch.testing.assert_close(torch.sigmoid(rbm.visible_bias[2:]), p[2:])
    with pytest.raises(ValueError):
        RBM(3, 2, "gaussian").init_visible_bias_from_mean(torch.full((3,), 0.5))


def _dbn(gen: torch.Generator) -> DBN:
    rbms = [
        RBM(7, 6, "gaussian", generator=gen),
        RBM(6, 5, generator=gen),
        RBM(5, 4, generator=gen),
    ]
    with torch.no_grad():
        for rbm in rbms:
            rbm.hidden_bias.normal_(generator=gen)
            rbm.visible_bias.normal_(generator=gen)
    return DBN(rbms)


def test_dbn_transform_and_linear_layers_match_rbm_up_pass() -> None:
    gen = torch.Generator().manual_seed(0)
    dbn = _dbn(gen)
    x = torch.randn(20, 7, generator=gen)
    layers = dbn_to_linear_layers(dbn)
    assert [(lin.in_features, lin.out_features) for lin in layers] == [(7, 6), (6, 5), (5, 4)]
    h, up = x, x
    for lin, rbm in zip(layers, dbn, strict=True):
        h, up = torch.sigmoid(lin(h)), rbm.hidden_probs(up)
        torch.testing.assert_close(h, up)
    torch.testing.assert_close(h, dbn.transform(x))
    with pytest.raises(ValueError):
        dbn.append(RBM(3, 2))


def test_save_load_round_trip(tmp_path) -> None:
    dbn = _dbn(torch.Generator().manual_seed(1))
    transform = {"mean": torch.arange(7.0), "std": torch.ones(7), "context": 5}
    path = tmp_path / "sub" / "final.dbn"
    save_dbn(path, dbn, transform)
    save_dbn(path, dbn, transform)  # overwrite in place
    assert sorted(p.name for p in path.parent.iterdir()) == ["final.dbn"]  # no temp files left
    loaded, loaded_transform = load_dbn(path)
    assert [(r.visible_dim, r.hidden_dim, r.visible_type) for r in loaded] == [
        (7, 6, "gaussian"),
        (6, 5, "bernoulli"),
        (5, 4, "bernoulli"),
    ]
    for a, b in zip(dbn.parameters(), loaded.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(loaded_transform["mean"], transform["mean"])
    assert loaded_transform["context"] == 5


def test_load_dbn_rejects_other_files(tmp_path) -> None:
    with pytest.raises(UsageError, match="no such"):
        load_dbn(tmp_path / "missing.dbn")
    other = tmp_path / "model.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(UsageError, match="not a"):
        load_dbn(other)
    garbage = tmp_path / "garbage.dbn"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(UsageError):
        load_dbn(garbage)


def test_kaldi_softmax_init() -> None:
    assert kaldi_weight_std(2048, 8806) == pytest.approx(0.0475, abs=5e-5)
    assert kaldi_weight_std(440, 2048) == pytest.approx(0.099, abs=5e-4)
    assert kaldi_weight_std(2048, 2048) == pytest.approx(0.077, abs=5e-4)
    layer = kaldi_softmax_init(512, 1024, generator=torch.Generator().manual_seed(0))
    weight = layer.weight.detach()
    assert weight.shape == (1024, 512) and layer.bias.abs().sum() == 0
    expected = 3.5 * math.sqrt(2 / (512 + 1024))
    assert float(weight.std()) == pytest.approx(expected, rel=0.01)
    assert abs(float(weight.mean())) < 0.01 * expected
