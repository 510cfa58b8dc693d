"""NG-SGD: the online preconditioner against dense formulas, and the NGSGD optimiser."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelavg.optim.ngsgd import NGSGD, OnlineNaturalGradient

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small matrices: threads only add contention (tests run beside others on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _covariance_sampler(dim: int, top: list[float], seed: int = 0):
    """Rows ~ N(0, Q diag(λ) Qᵀ) with λ = top + [1, 1, ...]; returns (sample(n, dtype), Q_top)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=F64))
    lam = torch.ones(dim, dtype=F64)
    lam[: len(top)] = torch.tensor(top, dtype=F64)

    def sample(n: int, dtype: torch.dtype = F64) -> torch.Tensor:
        z = torch.randn(n, dim, generator=g, dtype=F64)
        return ((z * lam.sqrt()) @ q.T).to(dtype)

    return sample, q[:, : len(top)].T


def _max_principal_angle(basis: torch.Tensor, target: torch.Tensor) -> float:
    """Largest principal angle between span(target rows) and span(basis rows)."""
    q, _ = torch.linalg.qr(basis.T)
    cos = torch.linalg.svdvals(target @ q).clamp(max=1.0)
    return float(torch.arccos(cos.min()))


# ------------------------------------------------------------------------ OnlineNaturalGradient
@pytest.mark.parametrize(("dtype", "tol"), [(F64, 1e-10), (torch.float32, 1e-5)], ids=str)
def test_unscaled_output_is_beta_r_g_inverse(dtype: torch.dtype, tol: float) -> None:
    sample, _ = _covariance_sampler(60, [50.0, 30.0, 20.0, 10.0, 5.0])
    ong = OnlineNaturalGradient(60, 8, num_samples_history=200.0)
    for _ in range(25):  # past the 10 initial updates, into the periodic ones
        ong.precondition(sample(32, dtype))
    g, beta = ong.smoothed_fisher(), ong.beta  # the state *before* the next call
    x = sample(32, dtype)
    p, gamma = ong.precondition_unscaled(x)
    ref = beta * x.to(F64) @ torch.linalg.inv(g)
    assert p.dtype == dtype
    assert float((p.to(F64) - ref).norm() / ref.norm()) < tol
    assert float(gamma) == pytest.approx(float(x.norm() / p.norm()), rel=1e-5)


def test_smoothed_fisher_matches_definition() -> None:
    """G = F + (α/D)·tr(F)·I with F = Xᵀ D X + ρ I."""
    sample, _ = _covariance_sampler(30, [20.0, 8.0])
    ong = OnlineNaturalGradient(30, 4, alpha=4.0)
    for _ in range(5):
        ong.precondition(sample(16))
    x = ong.basis()
    f = x.T @ torch.diag(ong.d) @ x + ong.rho * torch.eye(30, dtype=F64)
    g = f + 4.0 / 30 * f.trace() * torch.eye(30, dtype=F64)
    torch.testing.assert_close(ong.smoothed_fisher(), g, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x @ x.T, torch.eye(4, dtype=F64), rtol=0, atol=1e-6)


def test_subspace_converges_to_top_eigenvectors() -> None:
    sample, top = _covariance_sampler(40, [12.0, 9.0, 7.0, 5.0], seed=1)
    ong = OnlineNaturalGradient(40, 4, update_period=1, num_samples_history=500.0)
    angles = []
    for i in range(300):
        ong.precondition(sample(8, torch.float32))
        if i in (0, 30, 299):
            angles.append(_max_principal_angle(ong.basis(), top))
    assert angles[0] > 0.5  # 8 samples in 40 dimensions: a poor first estimate
    assert angles[2] < angles[1] < angles[0]
    assert angles[2] < 0.35
    d = ong.d  # eigenvalues of F minus ρ: about λ - 1
    torch.testing.assert_close(d, torch.tensor([11.0, 8.0, 6.0, 4.0], dtype=F64), rtol=0.35, atol=0)


def test_gamma_preserves_frobenius_norm() -> None:
    sample, _ = _covariance_sampler(50, [40.0, 10.0])
    ong = OnlineNaturalGradient(50, 5)
    for _ in range(15):
        x = sample(20, torch.float32)
        out = ong.precondition(x)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert float(out.norm()) == pytest.approx(float(x.norm()), rel=1e-5)
        assert float((out - x).norm()) > 1e-3 * float(x.norm())  # it did change direction
    zero = torch.zeros(7, 50)
    assert torch.equal(ong.precondition(zero), zero)  # γ = 1 when P = 0


def test_update_schedule_and_rank_clamp() -> None:
    ong = OnlineNaturalGradient(10, 50, update_period=4)
    assert ong.rank == 9  # clamped to D - 1
    calls_with_update = []
    for i in range(20):
        before = None if not ong.initialized else ong.state_dict()["w"]
        ong.precondition(torch.randn(6, 10))
        after = ong.state_dict()["w"]
        if before is not None and not torch.equal(before, after):
            calls_with_update.append(i)
    assert calls_with_update == [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16]
    assert ong.num_calls == 20


def test_fewer_rows_than_rank_and_identity_cases() -> None:
    ong = OnlineNaturalGradient(30, 10)
    out = ong.precondition(torch.randn(3, 30))  # N < R: orthonormal completion at init
    assert torch.isfinite(out).all()
    x = ong.basis()
    torch.testing.assert_close(x @ x.T, torch.eye(10, dtype=F64), rtol=0, atol=1e-6)
    for _ in range(12):
        assert torch.isfinite(ong.precondition(torch.randn(3, 30))).all()
    one = OnlineNaturalGradient(1, 5)  # D = 1: rank 0, the identity
    v = torch.randn(4, 1)
    assert one.rank == 0 and torch.equal(one.precondition(v), v)
    with pytest.raises(ValueError, match="N x 30"):
        ong.precondition(torch.randn(3, 29))


def test_state_dict_restores_bitwise_and_reset_reinitialises() -> None:
    sample, _ = _covariance_sampler(40, [30.0, 10.0])
    data = [sample(16, torch.float32) for _ in range(25)]
    ong = OnlineNaturalGradient(40, 6)
    for x in data[:12]:
        ong.precondition(x)
    saved = copy.deepcopy(ong.state_dict())
    first = [ong.precondition(x) for x in data[12:]]
    restored = OnlineNaturalGradient(40, 6)
    restored.load_state_dict(saved)
    second = [restored.precondition(x) for x in data[12:]]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    restored.reset()
    assert not restored.initialized and restored.num_calls == 0
    fresh = OnlineNaturalGradient(40, 6)
    assert torch.equal(restored.precondition(data[0]), fresh.precondition(data[0]))
    with pytest.raises(ValueError, match="rank"):
        OnlineNaturalGradient(40, 5).load_state_dict(saved)


# ------------------------------------------------------------------------ NGSGD
def _mlp(seed: int = 0, dims: tuple[int, ...] = (12, 32, 32, 5)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


def _data(n: int, seed: int = 0, dims: tuple[int, int] = (12, 5)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dims[0], generator=g)
    teacher = torch.randn(dims[0], dims[1], generator=g)
    y = (x @ teacher + 0.5 * torch.randn(n, dims[1], generator=g)).argmax(1)
    return x, y


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x, y) -> float:
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)  # the trainer's order: after forward, before backward
    loss.backward()
    opt.step()
    return float(loss.detach())


class _WithExtra(nn.Module):
    """An MLP plus a parameter outside any nn.Linear (gets plain SGD)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp()
        self.temperature = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.temperature


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_without_preconditioning_equals_torch_sgd(momentum: float) -> None:
    a, b = _WithExtra(), _WithExtra()
    b.load_state_dict(a.state_dict())
    opt_a = NGSGD(a, lr=0.3, max_change=0.0, momentum=momentum, precondition=False)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.3, momentum=momentum)
    x, y = _data(64)
    for i in range(6):
        for opt in (opt_a, opt_b):
            opt.param_groups[0]["lr"] = 0.3 / (i + 1)  # the trainer changes lr between epochs
        _train_step(a, opt_a, x, y)
        _train_step(b, opt_b, x, y)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def _reference_linear_step(opt: NGSGD, model: nn.Sequential, x, y, lr: float, idx: int):
    """Dense Kaldi update of layer idx from copies of the preconditioners: returns (ΔW, Δb, m)."""
    acts = {}

    def capture(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        acts["x"] = inputs[0].detach()
        output.register_hook(lambda g: acts.__setitem__("g", g))

    handle = model[idx].register_forward_hook(capture)
    F.cross_entropy(model(x), y).backward()
    handle.remove()
    opt.zero_grad(set_to_none=True)  # discard this pass (and the optimiser's captures)
    n = x.shape[0]
    pre_in, pre_out = (copy.deepcopy(p) for p in opt.preconditioners()[str(idx)])
    xt = torch.cat([acts["x"], torch.ones(n, 1, dtype=F64)], 1)
    delta = acts["g"] * n  # per-frame derivatives of the mean loss
    p_in = pre_in.precondition(xt)  # γ_in P_in
    p_out = pre_out.precondition(delta)
    bound = lr / n * float(torch.dot(p_in.norm(dim=1), p_out.norm(dim=1)))
    m = min(1.0, opt.max_change * n / bound)
    step = -lr / n * m * p_out.T @ p_in
    return step[:, :-1], step[:, -1], m, bound


@pytest.mark.parametrize(
    ("n", "lr", "capped"), [(64, 0.2, False), (64, 500.0, True), (16, 0.05, False)]
)
def test_step_matches_dense_formula_and_max_change(n: int, lr: float, capped: bool) -> None:
    """ΔW = -(lr/N)·m·(γ_out P_out)ᵀ(γ_in P_in), with fewer and with more rows than R_in + R_out.

    In float64 (the preconditioners follow the data's dtype) so rounding does not hide errors.
    """
    model = _mlp().double()
    opt = NGSGD(model, lr=lr, rank_in=4, rank_out=8, max_change=0.075)
    for seed in range(12):  # get the estimates going
        x, y = _data(n, seed)
        _train_step(model, opt, x.double(), y)
    opt.param_groups[0]["lr"] = lr
    x, y = _data(n, 99)
    x = x.double()
    refs = {}
    for idx in (0, 2, 4):
        refs[idx] = _reference_linear_step(opt, model, x, y, lr, idx)
    before = {
        idx: (model[idx].weight.detach().clone(), model[idx].bias.detach().clone()) for idx in refs
    }
    _train_step(model, opt, x, y)
    scales = opt.last_max_change_scales()
    for idx, (dw, db, m, bound) in refs.items():
        w0, b0 = before[idx]
        got_w, got_b = model[idx].weight.detach() - w0, model[idx].bias.detach() - b0
        scale = float(torch.cat([dw.flatten(), db]).norm())
        assert float((got_w - dw).norm()) < 1e-9 * scale
        assert float((got_b - db).norm()) < 1e-9 * scale
        assert scales[str(idx)] == pytest.approx(m, rel=1e-9)
        change = float(torch.cat([got_w.flatten(), got_b]).norm())
        if capped:
            assert bound > 0.075 * n and m < 1.0
            assert change <= 0.075 * n * (1 + 1e-9)  # the bound caps ‖Δ[W b]‖_F
        else:
            assert m == 1.0


def test_autograd_does_not_form_the_weight_gradients_ng_replaces() -> None:
    """The NG product replaces Δᵀx̃, so backward skips it; requires_grad is back after forward."""
    model = nn.Sequential(nn.Linear(12, 32), nn.Sigmoid(), nn.Linear(32, 5, bias=False))
    opt = NGSGD(model, lr=0.1, rank_in=4, rank_out=4)
    x, y = _data(32)
    before = [p.detach().clone() for p in model.parameters()]
    loss = F.cross_entropy(model(x), y)
    assert all(p.requires_grad for p in model.parameters())
    loss.backward()
    assert model[0].weight.grad is None and model[2].weight.grad is None
    assert model[0].bias.grad is not None  # keeps the first layer's graph alive (x needs none)
    opt.step()
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_max_change_scales_the_step_exactly() -> None:
    """With a huge lr the applied step is (max_change·N/bound) times the uncapped one."""
    model, (x, y) = _mlp().double(), _data(64)
    x = x.double()
    free_model = copy.deepcopy(model)
    capped = NGSGD(model, lr=1e4, rank_in=4, rank_out=8, max_change=0.075)
    free = NGSGD(free_model, lr=1e4, rank_in=4, rank_out=8, max_change=0.0)
    start = [p.clone() for p in model.parameters()]
    _train_step(model, capped, x, y)
    _train_step(free_model, free, x, y)
    scales = capped.last_max_change_scales()
    assert set(scales) == {"0", "2", "4"} and all(0 < m < 1e-2 for m in scales.values())
    assert all(m == 1.0 for m in free.last_max_change_scales().values())
    pairs = zip(model.named_parameters(), free_model.parameters(), start, strict=True)
    for (name, p), q, p0 in pairs:
        m = scales[name.split(".")[0]]
        torch.testing.assert_close(p - p0, m * (q - p0), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("n", [64, 16])
def test_first_momentum_step_equals_plain_step(n: int) -> None:
    """buf = direction on the first step, so μ does not matter yet (materialised vs in place)."""
    a, b = _mlp(), _mlp()
    opt_a = NGSGD(a, lr=0.5, rank_in=4, rank_out=8, momentum=0.9)
    opt_b = NGSGD(b, lr=0.5, rank_in=4, rank_out=8)
    for seed in range(3):
        x, y = _data(n, seed)
        _train_step(a, opt_a, x, y)
        _train_step(b, opt_b, x, y)
        if seed == 0:
            for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
                torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    assert any(not torch.allclose(pa, pb) for pa, pb in pairs)  # μ matters later


def test_sum_reduction_with_lr_over_n_equals_mean() -> None:
    a, b = _mlp(), _mlp()
    opt_a = NGSGD(a, lr=2.0, rank_in=4, rank_out=8)
    opt_b = NGSGD(b, lr=2.0 / 64, rank_in=4, rank_out=8, reduction="sum")
    for seed in range(15):
        x, y = _data(64, seed)
        _train_step(a, opt_a, x, y)
        loss = F.cross_entropy(b(x), y, reduction="sum")
        opt_b.zero_grad()
        loss.backward()
        opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)


def test_checkpoint_continues_bitwise() -> None:
    model = _mlp()
    opt = NGSGD(model, lr=1.0, rank_in=4, rank_out=8, momentum=0.5)
    batches = [_data(64, seed) for seed in range(20)]
    for x, y in batches[:11]:
        _train_step(model, opt, x, y)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    for x, y in batches[11:]:
        _train_step(model, opt, x, y)
    model2 = _mlp(seed=5)
    opt2 = NGSGD(model2, lr=0.1, rank_in=4, rank_out=8, momentum=0.5)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    assert opt2.param_groups[0]["lr"] == 1.0
    for x, y in batches[11:]:
        _train_step(model2, opt2, x, y)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_reset_preconditioners() -> None:
    model = _mlp()
    opt = NGSGD(model, lr=1.0, rank_in=4, rank_out=8)
    _train_step(model, opt, *_data(32))
    assert all(p.initialized for pair in opt.preconditioners().values() for p in pair)
    opt.reset_preconditioners()
    assert not any(p.initialized for pair in opt.preconditioners().values() for p in pair)


def test_ngsgd_trains_an_mlp() -> None:
    x, y = _data(2048, seed=3)
    model = _mlp(seed=1)
    opt = NGSGD(model, lr=1.0, rank_in=4, rank_out=8)
    with torch.no_grad():
        start = float(F.cross_entropy(model(x), y))
    for _ in range(4):
        opt.reset_preconditioners()  # as the paper does every epoch
        for i in range(0, 2048, 64):
            _train_step(model, opt, x[i : i + 64], y[i : i + 64])
    with torch.no_grad():
        end = float(F.cross_entropy(model(x), y))
    assert math.isfinite(end) and end < 0.6 * start


def test_misuse_raises_clear_errors_and_eval_is_ignored() -> None:
    model = _mlp()
    opt = NGSGD(model, lr=0.1, rank_in=4, rank_out=8)
    x, y = _data(16)
    with torch.no_grad():
        model(x)  # evaluation: not captured
    model.eval()
    _train_step(model, opt, x, y)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="one forward and one backward"):
        model(x)  # gradient accumulation
    opt.zero_grad()  # discards the pending gradient ...
    _train_step(model, opt, x, y)  # ... so training goes on

    shared = nn.Linear(5, 5)
    twice = nn.Sequential(shared, nn.Sigmoid(), shared)
    opt2 = NGSGD(twice, lr=0.1)
    with pytest.raises(RuntimeError, match="more than once"):
        twice(torch.randn(4, 5)).sum().backward()

    opt.remove_hooks()
    with pytest.raises(RuntimeError, match="no captured"):
        _train_step(model, opt, x, y)
    del opt2


def test_inplace_activation_and_sequence_inputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(inplace=True), nn.Linear(16, 3, bias=False))
    opt = NGSGD(model, lr=0.5, rank_in=3, rank_out=4)
    x = torch.randn(4, 20, 6)  # (batch, time, features): 80 rows per layer
    y = torch.randint(0, 3, (4, 20))
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x).reshape(-1, 3), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_steps_match_cpu() -> None:
    """The same steps on CUDA as on the CPU, up to float32 rounding."""
    cpu = _mlp(seed=2)
    gpu = copy.deepcopy(cpu).cuda()
    opt_cpu = NGSGD(cpu, lr=0.5, rank_in=4, rank_out=8, momentum=0.5)
    opt_gpu = NGSGD(gpu, lr=0.5, rank_in=4, rank_out=8, momentum=0.5)
    for seed in range(12):
        x, y = _data(64, seed)
        _train_step(cpu, opt_cpu, x, y)
        _train_step(gpu, opt_gpu, x.cuda(), y.cuda())
    for p, q in zip(cpu.parameters(), gpu.parameters(), strict=True):
        torch.testing.assert_close(p, q.cpu(), rtol=1e-3, atol=1e-4)
    # W (R x D) lives with the data; the R-vector D and the scalars stay float64 on the CPU
    assert all(
        pre.state_dict()["w"].is_cuda for pair in opt_gpu.preconditioners().values() for pre in pair
    )


def test_metric_sqrt_squares_to_the_preconditioner_and_gamma_is_as_expected() -> None:
    """(β G⁻¹)^½ twice is the map P = β R G⁻¹ (read-only); rows drawn from the estimated
    Fisher F get the γ that expected_gamma predicts."""
    sample, _ = _covariance_sampler(60, [50.0, 30.0, 20.0, 10.0, 5.0])
    ong = OnlineNaturalGradient(60, 8, num_samples_history=200.0)
    for _ in range(25):
        ong.precondition(sample(32))
    frozen = copy.deepcopy(ong)
    x = sample(32)
    twice = ong.metric_sqrt(ong.metric_sqrt(x))
    p, _ = ong.precondition_unscaled(x)
    torch.testing.assert_close(twice, p, rtol=1e-10, atol=1e-10)

    basis = frozen.basis()
    f = basis.T @ torch.diag(frozen.d) @ basis + frozen.rho * torch.eye(60, dtype=F64)
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(20000, 60, generator=g, dtype=F64) @ torch.linalg.cholesky(f).T
    expected = frozen.expected_gamma()
    assert float(frozen.precondition_parts(rows).gamma) == pytest.approx(expected, rel=0.02)
    assert expected > 1.0  # P shrinks the rows it preconditions

    identity = OnlineNaturalGradient(5, 0)
    assert torch.equal(identity.metric_sqrt(x[:, :5]), x[:, :5]) and identity.expected_gamma() == 1
