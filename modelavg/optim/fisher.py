"""The online low-rank Fisher estimate of Kaldi's NG-SGD, for one side of one layer.

Povey, Zhang & Khudanpur (arXiv 1410.7455) as Kaldi implements it: ``F_t = X_tᵀ D_t X_t + ρ_t I``
for rows of dimension D (X_t: R×D with orthonormal rows), smoothed to ``G_t = F_t +
(α/D)·tr(F_t)·I = X_tᵀ D_t X_t + β_t I``.  A minibatch R (N×D) is preconditioned with the
estimate from earlier minibatches, ``P = R - R W_tᵀ W_t = β_t R G_t⁻¹`` (Woodbury, with
``W_t = E_t^½ X_t``, ``e_i = d_i / (d_i + β_t)``), rescaled by ``γ = ‖R‖_F / ‖P‖_F``, and only
then folded into the estimate.

``variant`` follows one of Kaldi's two versions exactly (docs/NGSGD.md lists the differences):
``"nnet2"`` (default), ``OnlinePreconditioner`` of src/nnet2/nnet-precondition-online.cc as of
2014, the code the paper ported to nnet1; ``"nnet3"``, ``OnlineNaturalGradient`` of
src/nnet3/natural-gradient-online.cc.

Precision and place: the N×D and R×D products run in float32 (float64 for float64 data) on the
data's device; the R×R parts (Z, its eigendecomposition, d, ρ, the re-orthogonalisation) in
float64 on the host (modelavg.optim.lowrank). An update fetches its R×R inputs in one copy, and
``apply_updates`` does that for all of a step's updates at once: NG-SGD waits for the device at
most once per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from modelavg.optim import lowrank
from modelavg.optim.lowrank import CPU64 as _CPU64
from modelavg.optim.lowrank import special_orthonormal

VARIANTS = ("nnet2", "nnet3")
_DELTA = {"nnet2": 1.0e-5, "nnet3": 5.0e-4}  # floor on ρ relative to the largest eigenvalue
_NUM_INITIAL_UPDATES = 10  # Kaldi updates on every one of the first calls, then periodically
_NNET3_INIT_PASSES = 3  # nnet3: self-updates on the first minibatch (1 when N <= R)
_NNET3_MAX_ETA = 0.9


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (fp16, bf16, fp32) is processed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Staged(NamedTuple):
    """An update waiting for ``apply_updates``: B = J + ((1-η)/(η/N))(D+ρ)W (R×D) and
    [K = J Jᵀ, L = Hᵀ H, B Bᵀ, tr RᵀR] flattened, both still on the device; N."""

    b: Tensor
    small: Tensor
    n: int


class _Plan(NamedTuple):
    """The host's half of an update: W_{t+1} = map·B (map R×R, float64 on the host);
    ``fallback`` (E_{t+1}) when Kaldi's fallback re-orthogonalisation must follow."""

    map: Tensor
    fallback: Tensor | None


class PreconditionParts(NamedTuple):
    """One call's results: P = β R G⁻¹ before γ, γ, and the squared row norms of P (what
    max-change needs)."""

    p: Tensor
    gamma: Tensor
    p_row_sq: Tensor


class OnlineNaturalGradient:
    """Online low-rank-plus-identity Fisher estimate and its Woodbury preconditioner.

    ``precondition(x)`` returns ``γ·P`` with ``P = β R G⁻¹`` from the *current* estimate, then
    updates the estimate with ``x`` when the variant's schedule says so (``_should_update``).
    The rank is clamped to ``dim - 1`` (the ρ formula divides by D - R); a rank of 0 makes the
    preconditioner the identity.  ``delta=None`` takes the variant's δ.
    """

    def __init__(
        self,
        dim: int,
        rank: int,
        update_period: int = 4,
        num_samples_history: float = 2000.0,
        alpha: float = 4.0,
        epsilon: float = 1e-10,
        delta: float | None = None,
        variant: str = "nnet2",
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        delta = _DELTA[variant] if delta is None else delta
        if dim < 1 or rank < 0 or update_period < 1:
            raise ValueError(
                f"need dim >= 1, rank >= 0, update_period >= 1; got {dim}, {rank}, {update_period}"
            )
        if num_samples_history <= 0 or alpha < 0 or epsilon <= 0 or delta < 0:
            raise ValueError("need num_samples_history > 0, alpha >= 0, epsilon > 0, delta >= 0")
        self.dim = dim
        self.rank = min(rank, dim - 1)
        self.update_period = update_period
        self.num_samples_history = float(num_samples_history)
        self.alpha = float(alpha)
        self.epsilon = float(epsilon)
        self.delta = float(delta)
        self.variant = variant
        self.reset()

    # ----------------------------------------------------------------------------- state
    def reset(self) -> None:
        """Forget the estimate: the next call re-initialises from its minibatch."""
        self._w: Tensor | None = None  # R×D, W = E^½ X, on the data's device
        self._staged: _Staged | None = None  # an update waiting for apply_updates
        self._d = torch.zeros(self.rank, **_CPU64)  # diagonal of D_t
        self._rho = 0.0
        self._calls = 0  # non-empty minibatches seen (nnet3 schedules by this)
        self._updates = 0  # updates of the estimate (nnet2 schedules by this ...)
        self._skipped = 0  # ... and by the calls since the last update

    @property
    def initialized(self) -> bool:
        return self._w is not None

    @property
    def ready(self) -> bool:
        """Whether ``metric_sqrt`` and ``expected_gamma`` can be read: an estimate exists, or
        rank 0 (the identity) needs none."""
        return self.initialized or self.rank == 0

    @property
    def num_calls(self) -> int:
        return self._calls

    @property
    def num_updates(self) -> int:
        """Updates of the estimate by ``precondition`` (nnet3's initial self-updates excluded)."""
        return self._updates

    @property
    def rho(self) -> float:
        return self._rho

    @property
    def d(self) -> Tensor:
        return self._d.clone()

    @property
    def beta(self) -> float:
        """β = ρ(1+α) + (α/D)·Σd: the identity part of G = Xᵀ D X + β I."""
        return self._beta(self._d, self._rho)

    def _beta(self, d: Tensor, rho: float) -> float:
        return rho * (1.0 + self.alpha) + self.alpha / self.dim * float(d.sum())

    @staticmethod
    def _e(d: Tensor, beta: float) -> Tensor:
        """e_i = 1 / (β/d_i + 1) = d_i / (d_i + β), so W = E^½ X gives β G⁻¹ = I - Wᵀ W."""
        return d / (d + beta)

    def _eta(self, n: int) -> float:
        """η = 1 - exp(-N/S), the weight of this minibatch; nnet3 caps it at 0.9."""
        eta = 1.0 - math.exp(-n / self.num_samples_history)
        return min(eta, _NNET3_MAX_ETA) if self.variant == "nnet3" else eta

    def basis(self) -> Tensor:
        """X = E^{-½} W (R×D, float64): the orthonormal rows spanning the estimated subspace."""
        self._require_init()
        e = self._e(self._d, self.beta)
        return self._w.to(**_CPU64) * e.rsqrt()[:, None]

    def smoothed_fisher(self) -> Tensor:
        """G = Xᵀ D X + β I (D×D, float64), built explicitly from the state for dense checks."""
        x = self.basis()
        eye = torch.eye(self.dim, **_CPU64)
        return x.T @ (self._d[:, None] * x) + self.beta * eye

    def metric_sqrt(self, device: torch.device) -> Callable[[Tensor], Tensor]:
        """The map a -> the rows of ``a`` (..×D) times (β G⁻¹)^½ = I - Xᵀ diag(1 - sqrt(β/(d+β))) X,
        with X on ``device`` once (the noise scale applies it to many chunks).

        β G⁻¹ is the linear map P = R (β G⁻¹) applies to each row before γ; its square root lets
        gradients be measured in the metric NG-SGD steps in (``modelavg.analysis.noise``).
        Read-only: the estimate is not updated (a later update does not reach the map). Identity
        for rank 0.
        """
        if self.rank == 0:
            return lambda a: a
        x = self.basis().to(device=device)
        c = 1.0 - (self.beta / (self._d + self.beta)).sqrt().to(x)
        return lambda a: a.double() - ((a.double() @ x.T) * c) @ x

    def expected_gamma(self) -> float:
        """γ for rows whose second moment is the estimated Fisher F = Xᵀ diag(d+ρ) X + ρ(I - XᵀX):
        γ² = tr F / tr(M F M) with M = β G⁻¹ (eigenvalues β/(d+β) on the subspace, 1 off it).
        Read-only; 1 for rank 0."""
        if self.rank == 0:
            return 1.0
        self._require_init()
        d, rho, beta = self._d, self._rho, self.beta
        off = rho * (self.dim - self.rank)
        trace_f = float((d + rho).sum()) + off
        trace_mfm = float(((beta / (d + beta)).square() * (d + rho)).sum()) + off
        return math.sqrt(trace_f / trace_mfm)

    def _require_init(self) -> None:
        if self._w is None:
            raise RuntimeError("OnlineNaturalGradient has no estimate yet: call precondition first")

    def state_dict(self) -> dict[str, Any]:
        """Tensors are cloned, so the dict is a snapshot; restoring it continues bitwise."""
        apply_updates([self])
        return {
            "dim": self.dim,
            "rank": self.rank,
            "variant": self.variant,
            "counters": (self._calls, self._updates, self._skipped),
            "rho": self._rho,
            "d": self._d.clone(),
            "w": None if self._w is None else self._w.detach().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        theirs = (state["dim"], state["rank"], state["variant"])
        if theirs != (self.dim, self.rank, self.variant):
            raise ValueError(
                f"state is for dim, rank, variant = {theirs}, this preconditioner has "
                f"{(self.dim, self.rank, self.variant)}"
            )
        self._calls, self._updates, self._skipped = (int(c) for c in state["counters"])
        self._rho = float(state["rho"])
        self._d = state["d"].to(**_CPU64).clone()
        self._w = None if state["w"] is None else state["w"].clone()
        self._staged = None

    # ----------------------------------------------------------------------------- public maths
    def precondition(self, x: Tensor) -> Tensor:
        """γ·β x G⁻¹ for the rows of x (N×D), same Frobenius norm as x; then update the estimate."""
        parts = self.precondition_parts(x)
        return parts.p * parts.gamma

    def precondition_parts(self, x: Tensor, defer: bool = False) -> PreconditionParts:
        """(P, γ, row norms of P) from the current estimate; then the estimate takes in x: at
        once, or with ``defer`` at the caller's ``apply_updates`` (one device wait for all of a
        step's preconditioners)."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected an N x {self.dim} matrix, got shape {tuple(x.shape)}")
        apply_updates([self])  # a deferred update the caller did not apply
        r = x.detach().to(work_dtype(x.dtype))
        if r.shape[0] == 0 or self.rank == 0:
            self._calls += int(r.shape[0] > 0)
            return PreconditionParts(r, r.new_ones(()), torch.linalg.vector_norm(r, dim=1) ** 2)
        rr = torch.linalg.vector_norm(r).square()
        if self._w is None:  # the variant's start from the first minibatch
            init = self._initialize_nnet3 if self.variant == "nnet3" else self._initialize_nnet2
            init(r, rr)
        if self._w.device != r.device or self._w.dtype != r.dtype:  # e.g. after load_state_dict
            self._w = self._w.to(device=r.device, dtype=r.dtype)
        w = self._w
        h = r @ w.T  # H = R Wᵀ  (N×R)
        p = torch.addmm(r, h, w, alpha=-1.0)  # P = R - H W = β R G⁻¹
        p_row_sq = torch.linalg.vector_norm(p, dim=1).square()
        pp = p_row_sq.sum()  # γ = sqrt(‖R‖²/‖P‖²) keeps the Frobenius norm; 1 when P = 0
        gamma = torch.where(pp > 0, (rr / pp.clamp_min(torch.finfo(pp.dtype).tiny)).sqrt(), 1.0)
        if self._should_update():
            self._stage(r, h, rr)
            if not defer:
                apply_updates([self])
            self._updates += 1
            self._skipped = 0
        else:
            self._skipped += 1
        self._calls += 1
        return PreconditionParts(p, gamma, p_row_sq)

    def _should_update(self) -> bool:
        """nnet2 counts updates and skips: every call until 10 updates, then one call in
        ``update_period`` (calls 0-9, 9+P, 9+2P, ...).  nnet3 counts calls: 0-10, 10+P, ..."""
        if self.variant == "nnet3":
            t = self._calls
            return t <= _NUM_INITIAL_UPDATES or (t - _NUM_INITIAL_UPDATES) % self.update_period == 0
        return self._updates < _NUM_INITIAL_UPDATES or self._skipped >= self.update_period - 1

    # ----------------------------------------------------------------------------- internals
    def _initialize_nnet2(self, r: Tensor, rr: Tensor) -> None:
        """X_0 = top-R eigenvectors of R_0ᵀR_0/N (eigenvalues L), ρ_0 = (tr/N - ΣL)/(D-R).

        ρ_0 is floored at max(ε, δ·max L), then d_0 = L - ρ_0 at ε.  When R_0 has fewer than R
        independent rows the missing ones are a seeded orthonormal completion with eigenvalue 0
        (Kaldi's are random).  The eigenvectors come from the smaller Gram matrix (``top_rows``).
        """
        n, dim, rank = r.shape[0], self.dim, self.rank
        x, ev = lowrank.top_rows(r, min(rank, n, dim))
        ev = ev / n
        if ev.numel() < rank:
            x = torch.cat([x, lowrank.orthonormal_completion(x, rank - ev.numel()).to(x)])
            ev = torch.cat([ev, torch.zeros(rank - ev.numel(), **_CPU64)])
        rho = (float(rr) / n - float(ev.sum())) / (dim - rank)
        rho = max(rho, self.epsilon, self.delta * float(ev.max()))
        d = (ev - rho).clamp_min(self.epsilon)
        self._set_basis(x, d, rho, r)

    def _initialize_nnet3(self, r: Tensor, rr: Tensor) -> None:
        """nnet3's InitDefault (ρ = d = ε, X = ``special_orthonormal``), then self-updates on
        the first minibatch: three, or one when N <= R (one already spans its rows)."""
        x = special_orthonormal(self.rank, self.dim)
        self._set_basis(x, torch.full((self.rank,), self.epsilon, **_CPU64), self.epsilon, r)
        for _ in range(1 if r.shape[0] <= self.rank else _NNET3_INIT_PASSES):
            self._stage(r, r @ self._w.T, rr)
            apply_updates([self])

    def _set_basis(self, x: Tensor, d: Tensor, rho: float, like: Tensor) -> None:
        e = self._e(d, self._beta(d, rho))
        self._d, self._rho = d, rho
        self._w = (e.sqrt().to(x)[:, None] * x).to(like)

    def _stage(self, r: Tensor, h: Tensor, rr: Tensor) -> None:
        """The device's half of an update: B = J + ((1-η)/(η/N))(D_t+ρ_t)W_t with J = Hᵀ R (the
        factor is known on the host already), and the R×R products the host needs."""
        w, n = self._w, r.shape[0]
        eta = self._eta(n)
        coef = ((1.0 - eta) / (eta / n) * (self._d + self._rho)).to(w, non_blocking=True)
        j = h.T @ r  # R×D
        b = torch.addcmul(j, coef[:, None], w)
        b64 = b.to(torch.float64)  # W_{t+1} = A B can cancel: its Gram matrix and product in fp64
        small = [(j @ j.T).double(), (h.T @ h).double(), b64 @ b64.T, rr.reshape(1).double()]
        self._staged = _Staged(b, torch.cat([t.reshape(-1) for t in small]), n)

    def _plan(self, k: Tensor, el: Tensor, bb: Tensor, rr: float, n: int) -> _Plan:
        """Fold R_t into the estimate: F_{t+1} = (1-η)F_t + (η/N)RᵀR, projected to rank R.

        Y = X_t F_{t+1} = (η/N) E^{-½} J + (1-η)(D+ρI) X_t with J = Hᵀ R; its Gram matrix
        Z = Y Yᵀ = U C Uᵀ gives X_{t+1} = C^{-½} Uᵀ Y and the new eigenvalues √c.  As in both
        Kaldi versions d_{t+1} = √c - ρ_{t+1} takes ρ_{t+1} before its floor.  tr(RᵀR) is passed
        in (nnet2 recovers it from P; the same number).  Sets d and ρ; returns how W changes.
        """
        n_dim, rank = self.dim, self.rank
        eta = self._eta(n)
        a = eta / n
        d, rho = self._d, self._rho
        e = self._e(d, self._beta(d, rho))
        c, u = lowrank.eig_desc(lowrank.z_matrix(k, el, d, rho, e, eta, a))
        reorth = lowrank.needs_reorthogonalizing(c)
        c_floor = (rho * (1.0 - eta)) ** 2
        if bool((c < c_floor).any()):
            c, reorth = c.clamp_min(c_floor), True
        sqrt_c = c.sqrt()
        rho_new = (a * rr + (1.0 - eta) * (n_dim * rho + float(d.sum())) - float(sqrt_c.sum())) / (
            n_dim - rank
        )
        floor = max(self.epsilon, self.delta * float(sqrt_c.max()))
        d_new = (sqrt_c - rho_new).clamp_min(floor if self.variant == "nnet3" else self.epsilon)
        rho_new = max(rho_new, floor)
        e_new = self._e(d_new, self._beta(d_new, rho_new))
        # W_{t+1} = A B, A = (η/N) E_{t+1}^½ C^{-½} Uᵀ E_t^{-½}; W_{t+1} W_{t+1}ᵀ = A B Bᵀ Aᵀ
        a_mat = a * (e_new.sqrt() * c.rsqrt())[:, None] * u.T * e.rsqrt()[None, :]
        self._d, self._rho = d_new, rho_new
        if not reorth:
            return _Plan(a_mat, None)
        fix = lowrank.reorthogonalizing_map(a_mat @ bb @ a_mat.T, e_new, self.variant)
        return _Plan(a_mat, e_new) if fix is None else _Plan(fix @ a_mat, None)

    def _apply(self, plan: _Plan, map_: Tensor) -> None:
        """W_{t+1} = map·B on the device (map already there)."""
        b = self._staged.b
        w_new = (map_ @ b.to(torch.float64)).to(b.dtype)
        if plan.fallback is not None:  # rare: Kaldi's fallback needs W_{t+1} on the host
            w_new = lowrank.fallback_rows(w_new, plan.fallback, self.variant).to(w_new)
        self._w, self._staged = w_new, None


def apply_updates(preconditioners: Iterable[OnlineNaturalGradient]) -> None:
    """Fold every staged minibatch into its estimate: one device-to-host copy for all of them
    (the only wait for the device), the R×R work on the host, one host-to-device copy back."""
    staged = [pre for pre in preconditioners if pre._staged is not None]
    if not staged:
        return
    host = torch.cat([pre._staged.small for pre in staged]).cpu()
    plans, offset = [], 0
    for pre in staged:
        size = pre.rank * pre.rank
        k, el, bb = host[offset : offset + 3 * size].view(3, pre.rank, pre.rank)
        rr = float(host[offset + 3 * size])
        plans.append(pre._plan(k, el, bb, rr, pre._staged.n))
        offset += 3 * size + 1
    w = staged[0]._w
    back = torch.cat([plan.map.reshape(-1) for plan in plans])
    back = back.to(device=w.device, non_blocking=True)
    offset = 0
    for pre, plan in zip(staged, plans, strict=True):
        size = pre.rank * pre.rank
        pre._apply(plan, back[offset : offset + size].view(pre.rank, pre.rank))
        offset += size
