"""NGSGD: hooks, the per-layer step against the dense formula, max-change, momentum,
reductions, checkpoints, misuse and devices."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelavg.optim import NGSGD, build_optimizer

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


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


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("variant", ["nnet2", "nnet3"])
def test_cuda_steps_match_cpu(variant: str) -> None:
    """The same steps on CUDA as on the CPU, up to float32 rounding."""
    cpu = _mlp(seed=2)
    gpu = copy.deepcopy(cpu).cuda()
    opt_cpu = NGSGD(cpu, lr=0.5, rank_in=4, rank_out=8, momentum=0.5, variant=variant)
    opt_gpu = NGSGD(gpu, lr=0.5, rank_in=4, rank_out=8, momentum=0.5, variant=variant)
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


@pytest.mark.parametrize("variant", ["nnet2", "nnet3"])
def test_build_optimizer_passes_the_variant(variant: str) -> None:
    cfg = SimpleNamespace(
        optimizer="ngsgd", lr=1.0, ng_rank_in=4, ng_rank_out=8, ng_update_period=4,
        ng_samples_history=2000.0, ng_alpha=4.0, max_change=0.075, max_change_scaling="none",
        momentum=0.0, ng_variant=variant,
    )  # fmt: skip
    model = _mlp(seed=1)
    opt = build_optimizer(model, cfg, workers=2)
    assert isinstance(opt, NGSGD)
    assert {p.variant for pair in opt.preconditioners().values() for p in pair} == {variant}
    x, y = _data(2048, seed=3)
    with torch.no_grad():
        start = float(F.cross_entropy(model(x), y))
    for i in range(0, 2048, 64):
        _train_step(model, opt, x[i : i + 64], y[i : i + 64])
    with torch.no_grad():
        assert float(F.cross_entropy(model(x), y)) < 0.8 * start
    with pytest.raises(ValueError, match="variant"):
        NGSGD(model, lr=0.1, variant="nnet1")
