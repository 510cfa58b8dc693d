"""OnlineNaturalGradient against dense formulas: the Woodbury preconditioner, the smoothed
Fisher, convergence to the top eigenvectors, γ, state, variants, and the read-only metric."""

from __future__ import annotations

import copy

import pytest
import torch

from modelavg.optim import OnlineNaturalGradient
from modelavg.optim.fisher import special_orthonormal

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


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
    p, gamma, _ = ong.precondition_parts(x)
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


@pytest.mark.parametrize("variant", ["nnet2", "nnet3"])
def test_rank_clamp_variants_and_bad_arguments(variant: str) -> None:
    ong = OnlineNaturalGradient(10, 50, variant=variant)
    assert ong.rank == 9  # clamped to D - 1
    for _ in range(14):
        out = ong.precondition(torch.randn(6, 10))
        assert torch.isfinite(out).all()
    x = ong.basis()
    torch.testing.assert_close(x @ x.T, torch.eye(9, dtype=F64), rtol=0, atol=1e-6)
    assert ong.num_calls == 14
    with pytest.raises(ValueError, match="variant"):
        OnlineNaturalGradient(10, 4, variant="nnet1")
    other = "nnet3" if variant == "nnet2" else "nnet2"
    with pytest.raises(ValueError, match="variant"):
        OnlineNaturalGradient(10, 50, variant=other).load_state_dict(ong.state_dict())


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


def test_metric_sqrt_squares_to_the_preconditioner_and_gamma_is_as_expected() -> None:
    """(β G⁻¹)^½ twice is the map P = β R G⁻¹ (read-only); rows drawn from the estimated
    Fisher F get the γ that expected_gamma predicts."""
    sample, _ = _covariance_sampler(60, [50.0, 30.0, 20.0, 10.0, 5.0])
    ong = OnlineNaturalGradient(60, 8, num_samples_history=200.0)
    for _ in range(25):
        ong.precondition(sample(32))
    frozen = copy.deepcopy(ong)
    x = sample(32)
    sqrt = ong.metric_sqrt(x.device)
    twice = sqrt(sqrt(x))
    p = ong.precondition_parts(x).p
    torch.testing.assert_close(twice, p, rtol=1e-10, atol=1e-10)

    basis = frozen.basis()
    f = basis.T @ torch.diag(frozen.d) @ basis + frozen.rho * torch.eye(60, dtype=F64)
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(20000, 60, generator=g, dtype=F64) @ torch.linalg.cholesky(f).T
    expected = frozen.expected_gamma()
    assert float(frozen.precondition_parts(rows).gamma) == pytest.approx(expected, rel=0.02)
    assert expected > 1.0  # P shrinks the rows it preconditions

    identity = OnlineNaturalGradient(5, 0)
    assert torch.equal(identity.metric_sqrt(x.device)(x[:, :5]), x[:, :5])
    assert identity.expected_gamma() == 1


def test_nnet3_start_is_the_special_orthonormal_matrix() -> None:
    """nnet3's fixed start: rows on disjoint columns i, i+R, ...; first entry 1.1, then 1."""
    x = special_orthonormal(3, 8)
    torch.testing.assert_close(x @ x.T, torch.eye(3, dtype=F64), rtol=0, atol=1e-15)
    row = torch.tensor([1.1, 0, 0, 1, 0, 0, 1, 0], dtype=F64)
    torch.testing.assert_close(x[0], row / row.norm())
    assert torch.equal(
        x[2] != 0, torch.tensor([False, False, True, False, False, True] + [False] * 2)
    )
