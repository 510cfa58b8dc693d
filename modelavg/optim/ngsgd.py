"""Kaldi-style natural-gradient SGD (NG-SGD, Povey, Zhang & Khudanpur, arXiv 1410.7455).

Two pieces, following the brief's §5:

* :class:`OnlineNaturalGradient` - one online low-rank Fisher estimate for row vectors of
  dimension D, ``F_t = X_tᵀ D_t X_t + ρ_t I`` (X_t: R×D with orthonormal rows), smoothed to
  ``G_t = F_t + (α/D)·tr(F_t)·I = X_tᵀ D_t X_t + β_t I``.  A minibatch R (N×D) is preconditioned
  with the estimate from earlier minibatches, ``P = R - R W_tᵀ W_t = β_t R G_t⁻¹`` (Woodbury, with
  ``W_t = E_t^½ X_t``, ``e_i = d_i / (d_i + β_t)``), rescaled by ``γ = ‖R‖_F / ‖P‖_F``, and only
  then folded into the estimate.
* :class:`NGSGD` - the affine-layer update of every ``nn.Linear``: precondition the inputs
  ``x̃ = [x, 1]`` and the output derivatives, step ``-lr·γ_in·γ_out·P_outᵀ P_in``, capped by
  Kaldi's per-frame max-change.  Other parameters get plain SGD.

Design decisions (the brief's §8 asks for them to be explicit):

* Initialisation is nnet2's (the one the paper's nnet1 port uses): X_0 = the top-R eigenvectors of
  the first minibatch's scatter ``R_0ᵀR_0/N``.  It starts from a data-driven estimate at once
  instead of nnet3's arbitrary basis refined by three self-updates on the same minibatch.  As in
  both Kaldi versions the first minibatch is preconditioned with the estimate it initialised.
* Precision: the N×D and R×D products run in float32 (float64 when the data are float64); the R×R
  parts (Z, its eigendecomposition, d, ρ, the Cholesky re-orthogonalisation) in float64 on the
  CPU, as Kaldi does.
* Units: the trainer's loss is mean-reduced, so the captured ``dL/dy`` rows are per-frame
  derivatives divided by N.  NGSGD multiplies them by N (``reduction="mean"``) so that the Fisher
  statistics and max-change are per frame as in Kaldi, and divides the learning rate by N, so
  ``lr`` means exactly what it means for ``torch.optim.SGD`` on the mean loss: with
  preconditioning and max-change off, NGSGD *is* SGD.  Kaldi's summed-gradient learning rate
  ``lr_kaldi`` therefore corresponds to ``lr = N·lr_kaldi`` (0.32 at N=1024 → 328).
* Max-change uses the learning rate actually applied (Kaldi's intent), not the fork's lr-free
  bound (brief §5.4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

_NUM_INITIAL_UPDATES = 10  # update the estimate on every one of the first calls, then periodically
_CONDITION_THRESHOLD = 1.0e6  # re-orthogonalise when c_max > 1e6 · c_min
_ORTHONORMAL_TOLERANCE = 1.0e-3  # ... and X Xᵀ is further than this from I
_CPU64 = {"device": "cpu", "dtype": torch.float64}


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (fp16, bf16, fp32) is processed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gamma(rr: Tensor, pp: Tensor) -> Tensor:
    """γ = sqrt(‖R‖²/‖P‖²), or 1 when ‖P‖ = 0: keeps the Frobenius norm of the input."""
    return torch.where(pp > 0, (rr / pp.clamp_min(torch.finfo(pp.dtype).tiny)).sqrt(), 1.0)


class PreconditionParts(NamedTuple):
    """One call's results: P = β R G⁻¹ before γ, γ, and the squared row norms of P (what
    max-change needs)."""

    p: Tensor
    gamma: Tensor
    p_row_sq: Tensor


class OnlineNaturalGradient:
    """Online low-rank-plus-identity Fisher estimate and its Woodbury preconditioner (brief §5.2).

    ``precondition(x)`` returns ``γ·P`` with ``P = β R G⁻¹`` from the *current* estimate, then
    updates the estimate with ``x`` on each of the first 10 calls and on every
    ``update_period``-th call after that.  The rank is clamped to ``dim - 1`` (the ρ formula
    divides by D - R); a rank of 0 makes the preconditioner the identity.
    """

    def __init__(
        self,
        dim: int,
        rank: int,
        update_period: int = 4,
        num_samples_history: float = 2000.0,
        alpha: float = 4.0,
        epsilon: float = 1e-10,
        delta: float = 5e-4,
    ) -> None:
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
        self.reset()

    # ----------------------------------------------------------------------------- state
    def reset(self) -> None:
        """Forget the estimate: the next call re-initialises from its minibatch."""
        self._w: Tensor | None = None  # R×D, W = E^½ X, on the data's device
        self._d = torch.zeros(self.rank, **_CPU64)  # diagonal of D_t
        self._rho = 0.0
        self._t = 0  # number of calls so far

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
        return self._t

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

    def _e(self, d: Tensor, beta: float) -> Tensor:
        """e_i = 1 / (β/d_i + 1) = d_i / (d_i + β), so W = E^½ X gives β G⁻¹ = I - Wᵀ W."""
        return d / (d + beta)

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

    def metric_sqrt(self, a: Tensor) -> Tensor:
        """The rows of ``a`` (..×D) times (β G⁻¹)^½ = I - Xᵀ diag(1 - sqrt(β/(d+β))) X.

        β G⁻¹ is the linear map P = R (β G⁻¹) applies to each row before γ; its square root lets
        gradients be measured in the metric NG-SGD steps in (``modelavg.analysis.noise``).
        Read-only:
        the estimate is not updated. Identity for rank 0.
        """
        if self.rank == 0:
            return a
        x = self.basis().to(device=a.device, dtype=torch.float64)
        c = 1.0 - (self.beta / (self._d + self.beta)).sqrt().to(x)
        a64 = a.to(torch.float64)
        return a64 - ((a64 @ x.T) * c) @ x

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
        return {
            "dim": self.dim,
            "rank": self.rank,
            "t": self._t,
            "rho": self._rho,
            "d": self._d.clone(),
            "w": None if self._w is None else self._w.detach().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["dim"] != self.dim or state["rank"] != self.rank:
            raise ValueError(
                f"state is for dim={state['dim']} rank={state['rank']}, this "
                f"preconditioner has dim={self.dim} rank={self.rank}"
            )
        self._t = int(state["t"])
        self._rho = float(state["rho"])
        self._d = state["d"].to(**_CPU64).clone()
        self._w = None if state["w"] is None else state["w"].clone()

    # ----------------------------------------------------------------------------- public maths
    def precondition(self, x: Tensor) -> Tensor:
        """γ·β x G⁻¹ for the rows of x (N×D), same Frobenius norm as x; then update the estimate."""
        parts = self.precondition_parts(x)
        return parts.p * parts.gamma

    def precondition_unscaled(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(P, γ) with P = β x G⁻¹ before the norm-preserving scale γ; updates like precondition."""
        parts = self.precondition_parts(x)
        return parts.p, parts.gamma

    def precondition_parts(self, x: Tensor) -> PreconditionParts:
        """(P, γ, row norms of P) from the current estimate; then the estimate is updated."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected an N x {self.dim} matrix, got shape {tuple(x.shape)}")
        r = x.detach().to(_work_dtype(x.dtype))
        if r.shape[0] == 0 or self.rank == 0:
            self._t += int(r.shape[0] > 0)
            return PreconditionParts(r, r.new_ones(()), torch.linalg.vector_norm(r, dim=1) ** 2)
        if self._w is None:
            self._initialize(r)
        if self._w.device != r.device or self._w.dtype != r.dtype:  # e.g. after load_state_dict
            self._w = self._w.to(device=r.device, dtype=r.dtype)
        w = self._w
        h = r @ w.T  # H = R Wᵀ  (N×R)
        p = torch.addmm(r, h, w, alpha=-1.0)  # P = R - H W = β R G⁻¹
        p_row_sq = torch.linalg.vector_norm(p, dim=1).square()
        rr = torch.linalg.vector_norm(r).square()
        gamma = _gamma(rr, p_row_sq.sum())
        if self._should_update():
            self._update(r, h, w, float(rr))
        self._t += 1
        return PreconditionParts(p, gamma, p_row_sq)

    def _should_update(self) -> bool:
        """Call 0 initialised the estimate; then calls 1..9, then every update_period-th call."""
        t = self._t
        return t > 0 and (t < _NUM_INITIAL_UPDATES or t % self.update_period == 0)

    # ----------------------------------------------------------------------------- internals
    def _initialize(self, r: Tensor) -> None:
        """nnet2: X_0 = top-R eigenvectors of R_0ᵀR_0/N (eigenvalues L), ρ_0 = (tr/N - ΣL)/(D-R).

        ρ_0 is floored at max(ε, δ·max L), d_0 = L - ρ_0 at ε; when N < R the missing rows are a
        (seeded, deterministic) random orthonormal completion with eigenvalue 0.
        """
        n, dim, rank = r.shape[0], self.dim, self.rank
        r64 = r.to(**_CPU64)
        _, s, vh = torch.linalg.svd(r64, full_matrices=False)  # s descending
        k = min(rank, s.numel())
        x, ev = vh[:k], s[:k].square() / n
        if k < rank:
            x = torch.cat([x, _orthonormal_completion(x, rank - k, dim)])
            ev = torch.cat([ev, torch.zeros(rank - k, **_CPU64)])
        rho = (float(r64.square().sum()) / n - float(ev.sum())) / (dim - rank)
        rho = max(rho, self.epsilon, self.delta * float(ev.max()))
        d = (ev - rho).clamp_min(self.epsilon)
        e = self._e(d, self._beta(d, rho))
        self._d, self._rho = d, rho
        self._w = (e.sqrt()[:, None] * x).to(device=r.device, dtype=r.dtype)

    def _update(self, r: Tensor, h: Tensor, w: Tensor, rr: float) -> None:
        """Fold R_t into the estimate: F_{t+1} = (1-η)F_t + (η/N)RᵀR, projected to rank R.

        Y = X_t F_{t+1} = (η/N) E^{-½} J + (1-η)(D+ρI) X_t with J = Hᵀ R; its Gram matrix
        Z = Y Yᵀ = U C Uᵀ gives X_{t+1} = C^{-½} Uᵀ Y and the new eigenvalues √c.  tr(RᵀR) is
        passed in (computed directly for γ) rather than recovered from P as Kaldi does.
        """
        n, dim, rank = r.shape[0], self.dim, self.rank
        eta = 1.0 - math.exp(-n / self.num_samples_history)
        a = eta / n
        d, rho = self._d, self._rho
        e = self._e(d, self._beta(d, rho))
        j = h.T @ r  # R×D
        k = (j @ j.T).to(**_CPU64)
        el = (h.T @ h).to(**_CPU64)
        c, u = _eig_desc(_z_matrix(k, el, d, rho, e, eta, a))
        reorth = not float(c[-1]) > 0.0 or float(c[0]) > _CONDITION_THRESHOLD * float(c[-1])
        c_floor = (rho * (1.0 - eta)) ** 2
        if bool((c < c_floor).any()):
            c, reorth = c.clamp_min(c_floor), True
        sqrt_c = c.sqrt()
        rho_new = (a * rr + (1.0 - eta) * (dim * rho + float(d.sum())) - float(sqrt_c.sum())) / (
            dim - rank
        )
        rho_new = max(rho_new, self.epsilon, self.delta * float(sqrt_c.max()))
        d_new = (sqrt_c - rho_new).clamp_min(self.epsilon)
        e_new = self._e(d_new, self._beta(d_new, rho_new))
        # W_{t+1} = A B, A = (η/N) E_{t+1}^½ C^{-½} Uᵀ E_t^{-½}, B = J + ((1-η)/(η/N)) (D_t+ρ_t) W_t
        a_mat = a * (e_new.sqrt() * c.rsqrt())[:, None] * u.T * e.rsqrt()[None, :]
        b_mat = torch.addcmul(j, ((1.0 - eta) / a * (d + rho)).to(w)[:, None], w)
        w_new = a_mat.to(w) @ b_mat
        if reorth:
            w_new = _reorthogonalize(w_new, e_new)
        self._w, self._d, self._rho = w_new, d_new, rho_new


def _z_matrix(
    k: Tensor, el: Tensor, d: Tensor, rho: float, e: Tensor, eta: float, a: float
) -> Tensor:
    """Z = a² E^{-½}KE^{-½} + a(1-η)[E^{-½}LE^{-½}(D+ρ) + (D+ρ)E^{-½}LE^{-½}] + (1-η)²(D+ρ)².

    a = η/N; everything R×R in float64.
    """
    s = e.rsqrt()
    k_s = s[:, None] * k * s[None, :]
    l_s = s[:, None] * el * s[None, :]
    dr = d + rho
    z = a * a * k_s + a * (1.0 - eta) * (l_s * dr[None, :] + dr[:, None] * l_s)
    z = z + torch.diag((1.0 - eta) ** 2 * dr * dr)
    return 0.5 * (z + z.T)


def _eig_desc(z: Tensor) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of symmetric z (float64, CPU), eigenvalues descending.

    Like nnet3, z is divided by max(1, tr z) first so the solver sees O(1) numbers.
    """
    scale = max(1.0, float(z.trace()))
    c, u = torch.linalg.eigh(z / scale)
    return c.flip(0) * scale, u.flip(1)


def _reorthogonalize(w: Tensor, e: Tensor) -> Tensor:
    """Restore orthonormal rows of X = E^{-½}W: O = X Xᵀ = C Cᵀ (Cholesky), W ← E^½ C⁻¹ E^{-½} W.

    If O is not positive definite, fall back to X = [I 0].
    """
    s = e.rsqrt()
    o = s[:, None] * (w @ w.T).to(**_CPU64) * s[None, :]
    eye = torch.eye(o.shape[0], **_CPU64)
    if float((o - eye).abs().max()) <= _ORTHONORMAL_TOLERANCE:
        return w
    chol, info = torch.linalg.cholesky_ex(o)
    if int(info) != 0 or not bool(torch.isfinite(chol).all()):
        x = torch.zeros(w.shape, **_CPU64)
        x[:, : w.shape[0]] = eye
        return (e.sqrt()[:, None] * x).to(w)
    c_inv = torch.linalg.solve_triangular(chol, eye, upper=False)
    return (e.sqrt()[:, None] * c_inv * s[None, :]).to(w) @ w


def _orthonormal_completion(x: Tensor, m: int, dim: int) -> Tensor:
    """m orthonormal rows orthogonal to the rows of x (float64), from a fixed-seed Gaussian."""
    g = torch.Generator().manual_seed(12345)
    v = torch.randn(dim, m, generator=g, **_CPU64)
    v = v - x.T @ (x @ v)
    q, _ = torch.linalg.qr(v)
    q = q - x.T @ (x @ q)  # second Gram-Schmidt pass for accuracy
    q, _ = torch.linalg.qr(q)
    return q.T


# ================================================================================== the optimiser
@dataclass
class _Capture:
    """One forward of one layer: its input rows, and later the derivative of its output."""

    x: Tensor
    grad: Tensor | None = None


@dataclass
class _Layer:
    name: str
    module: nn.Linear
    pre_in: OnlineNaturalGradient
    pre_out: OnlineNaturalGradient
    capture: _Capture | None = None
    handles: list[Any] = field(default_factory=list)
    weight_grad_off: bool = False  # autograd was told not to form weight.grad for this forward
    last_scale: Tensor | None = field(default=None, repr=False)


class NGSGD(torch.optim.Optimizer):
    """Natural-gradient SGD on every ``nn.Linear`` of ``model``, plain SGD on other parameters.

    For a layer y = W x + b with inputs x̃ = [x, 1] (N×(I+1)) and per-frame output derivatives Δ
    (N×O), each side is preconditioned by its own :class:`OnlineNaturalGradient`
    (P_in, γ_in; P_out, γ_out) and the step is (brief §5.3)

        [ΔW, Δb] = -(lr/N) · m · γ_in γ_out · P_outᵀ P_in,

    with the bias taken from the preconditioned ones-column and the max-change factor
    m = min(1, max_change·N / bound), bound = (lr/N)·γ_in γ_out·Σ_i ‖p_in,i‖·‖p_out,i‖ (a bound
    on ‖ΔW‖_F).  ``lr`` is the learning rate of ``torch.optim.SGD`` on the mean loss (see the
    module docstring; ``reduction="sum"`` drops the 1/N for a summed loss).

    Activations are captured by a forward hook (input) and a tensor hook on the output (dL/dy);
    unlike a full backward hook this keeps in-place activations after the layer legal.  One
    forward and one backward per ``step()``; gradient accumulation raises.

    Cost: P_outᵀ P_in is a matrix product of exactly the shape of the weight gradient Δᵀx̃, and
    it replaces it.  So while a layer is trained by NG the forward pre-hook has autograd skip
    ``weight.grad`` (``requires_grad`` is off only while the layer's forward records the graph,
    and only when the output still needs a gradient through the input or the bias).  The extra
    work per layer is then forming P_in and P_out, about 2·N·(R_in·(I+1) + R_out·O) multiply-adds
    against the 3·N·O·(I+1) of forward and backward.  ``weight.grad`` of such layers stays
    ``None``: gradient clipping, L2 terms added to ``.grad`` and DDP's gradient allreduce do not
    reach NG layers (NG-SGD is a local optimiser here, as in the paper: replicas are averaged).

    ``momentum`` (0 in Kaldi's NG component and in the paper) follows torch.optim.SGD:
    buf = μ·buf + d, p -= lr·buf, with d the gradient, or for a Linear layer the scaled
    natural-gradient direction m·γ_in·γ_out·P_outᵀP_in/N.  ``precondition=False`` keeps only
    max-change; with ``max_change=0`` as well the update is exactly torch.optim.SGD's (autograd's
    gradients, no hooks needed).

    Example::

        opt = NGSGD(model, lr=0.5)          # Kaldi defaults: ranks 20/80, max-change 0.075
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        rank_in: int = 20,
        rank_out: int = 80,
        update_period: int = 4,
        num_samples_history: float = 2000.0,
        alpha: float = 4.0,
        max_change: float = 0.075,
        momentum: float = 0.0,
        *,
        precondition: bool = True,
        reduction: str = "mean",
    ) -> None:
        if lr < 0 or momentum < 0 or max_change < 0:
            raise ValueError(
                f"need lr, momentum, max_change >= 0; got {lr}, {momentum}, {max_change}"
            )
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, {"lr": lr, "momentum": momentum})
        self.max_change = float(max_change)
        self.precondition = precondition
        self.reduction = reduction
        config = {
            "update_period": update_period,
            "num_samples_history": num_samples_history,
            "alpha": alpha,
        }
        self._layers: list[_Layer] = []
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and module.weight.requires_grad:
                dim_in = module.in_features + (module.bias is not None)
                layer = _Layer(
                    name,
                    module,
                    OnlineNaturalGradient(dim_in, rank_in, **config),
                    OnlineNaturalGradient(module.out_features, rank_out, **config),
                )
                if self._uses_captures:
                    layer.handles = [
                        module.register_forward_pre_hook(
                            self._make_pre_hook(layer), with_kwargs=True
                        ),
                        module.register_forward_hook(
                            self._make_forward_hook(layer), with_kwargs=True
                        ),
                    ]
                self._layers.append(layer)
        self._by_weight = {id(layer.module.weight): layer for layer in self._layers}
        self._biases = {
            id(layer.module.bias) for layer in self._layers if layer.module.bias is not None
        }

    @property
    def _uses_captures(self) -> bool:
        """False only for plain SGD (no preconditioning, no max-change): autograd's grads do."""
        return self.precondition or self.max_change > 0

    # ----------------------------------------------------------------------------- hooks
    @staticmethod
    def _make_pre_hook(layer: _Layer):
        def hook(module: nn.Module, args: tuple[Tensor, ...], kwargs: dict[str, Any]) -> None:
            weight, bias = module.weight, module.bias
            x = args[0] if args else kwargs["input"]
            keeps_graph = x.requires_grad or (bias is not None and bias.requires_grad)
            if torch.is_grad_enabled() and weight.requires_grad and keeps_graph:
                weight.requires_grad_(False)  # NG forms the weight step from P_out, P_in
                layer.weight_grad_off = True

        return hook

    def _make_forward_hook(self, layer: _Layer):
        def hook(
            module: nn.Module, args: tuple[Tensor, ...], kwargs: dict[str, Any], output: Tensor
        ) -> Tensor | None:
            if layer.weight_grad_off:
                module.weight.requires_grad_(True)
                layer.weight_grad_off = False
            if not (torch.is_grad_enabled() and output.requires_grad):
                return None  # evaluation, or a frozen sub-graph: nothing to train
            if layer.capture is not None and layer.capture.grad is not None:
                raise RuntimeError(
                    f"NGSGD: layer {layer.name!r} ran forward again after its backward without "
                    "step(); NGSGD supports one forward and one backward per step (no gradient "
                    "accumulation)"
                )
            capture = _Capture((args[0] if args else kwargs["input"]).detach())
            layer.capture = capture
            if output._is_view():
                # N-D inputs give a view of the 2-D product; an in-place op on a view (say
                # ReLU(inplace=True)) re-routes autograd around hooks registered on it.
                output = output.clone()
            output.register_hook(self._make_grad_hook(layer, capture))
            return output

        return hook

    @staticmethod
    def _make_grad_hook(layer: _Layer, capture: _Capture):
        def hook(grad: Tensor) -> None:
            if layer.capture is not capture or capture.grad is not None:
                raise RuntimeError(
                    f"NGSGD: layer {layer.name!r} was called more than once per step (shared "
                    "layer, or several backward passes); NGSGD needs exactly one call"
                )
            capture.grad = grad.detach()

        return hook

    def remove_hooks(self) -> None:
        """Detach from the model; later steps would then raise for lack of captures."""
        for layer in self._layers:
            for handle in layer.handles:
                handle.remove()
            layer.handles = []
            layer.capture = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Also drop captures whose backward already ran (their gradient is being discarded)."""
        super().zero_grad(set_to_none=set_to_none)
        for layer in self._layers:
            if layer.capture is not None and layer.capture.grad is not None:
                layer.capture = None

    # ----------------------------------------------------------------------------- state
    def reset_preconditioners(self) -> None:
        """Re-initialise every Fisher estimate (the paper's implementation does so every epoch)."""
        for layer in self._layers:
            layer.pre_in.reset()
            layer.pre_out.reset()

    @property
    def estimates_ready(self) -> bool:
        """Whether every preconditioner has its estimate (after the first step; after a reset
        not until the next)."""
        return self.precondition and all(
            pre.ready for layer in self._layers for pre in (layer.pre_in, layer.pre_out)
        )

    def preconditioners(self) -> dict[str, tuple[OnlineNaturalGradient, OnlineNaturalGradient]]:
        """{layer name: (input-side, output-side)} preconditioners."""
        return {layer.name: (layer.pre_in, layer.pre_out) for layer in self._layers}

    def last_max_change_scales(self) -> dict[str, float]:
        """{layer name: m} of the last step (1.0 = max-change not active)."""
        return {
            layer.name: float(layer.last_scale)
            for layer in self._layers
            if layer.last_scale is not None
        }

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state plus the preconditioners (kept out of ``state``, which
        ``Optimizer.load_state_dict`` would cast to the parameters' dtype)."""
        state = super().state_dict()
        state["ngsgd"] = {
            layer.name: {"in": layer.pre_in.state_dict(), "out": layer.pre_out.state_dict()}
            for layer in self._layers
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        ngsgd = state_dict.pop("ngsgd", None)
        super().load_state_dict(state_dict)
        if ngsgd is None:
            return
        missing = {layer.name for layer in self._layers} - set(ngsgd)
        if missing:
            raise ValueError(f"NGSGD state has no preconditioners for layers {sorted(missing)}")
        for layer in self._layers:
            layer.pre_in.load_state_dict(ngsgd[layer.name]["in"])
            layer.pre_out.load_state_dict(ngsgd[layer.name]["out"])

    # ----------------------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                layer = self._by_weight.get(id(p))
                if layer is not None:
                    self._linear_step(layer, lr, momentum)
                elif p.grad is not None and id(p) not in self._biases:
                    self._sgd(p, p.grad, lr, momentum)
        for layer in self._layers:
            layer.capture = None
        return loss

    def _sgd(self, p: Tensor, direction: Tensor, lr: float, momentum: float) -> None:
        """torch.optim.SGD's update: buf = μ·buf + g (buf = g at first), p -= lr·buf."""
        if momentum:
            buf = self.state[p].get("momentum_buffer")
            if buf is None:
                buf = self.state[p]["momentum_buffer"] = direction.detach().clone()
            else:
                buf.mul_(momentum).add_(direction)
            direction = buf
        p.add_(direction, alpha=-lr)

    def _linear_step(self, layer: _Layer, lr: float, momentum: float) -> None:
        """One layer's NG (or max-change-only) step; a layer the backward did not reach is left."""
        weight, bias = layer.module.weight, layer.module.bias
        capture = layer.capture
        if not self._uses_captures:
            if weight.grad is not None:
                self._sgd(weight, weight.grad, lr, momentum)  # exactly torch.optim.SGD
            if bias is not None and bias.grad is not None:
                self._sgd(bias, bias.grad, lr, momentum)
            return
        if capture is None or capture.grad is None:
            if weight.grad is not None:
                raise RuntimeError(
                    f"NGSGD: layer {layer.name!r} has a gradient but no captured forward/backward "
                    "(hooks removed, forward under no_grad, or the module's forward() bypassed, "
                    "as in nn.MultiheadAttention.out_proj)"
                )
            return
        dtype = _work_dtype(weight.dtype)
        x = capture.x.reshape(-1, layer.module.in_features).to(dtype)
        n = x.shape[0]
        per_frame = float(n) if self.reduction == "mean" else 1.0
        delta = capture.grad.reshape(-1, layer.module.out_features).to(dtype) * per_frame
        if bias is not None:
            x = torch.cat([x, x.new_ones(n, 1)], dim=1)  # x̃ = [x, 1]
        if self.precondition:
            p_in, g_in, in_sq = layer.pre_in.precondition_parts(x)
            p_out, g_out, out_sq = layer.pre_out.precondition_parts(delta)
            s = g_in * g_out
        else:
            p_in, p_out, s = x, delta, x.new_ones(())
            in_sq = torch.linalg.vector_norm(x, dim=1).square()
            out_sq = torch.linalg.vector_norm(delta, dim=1).square()
        layer.last_scale = self._max_change_scale(in_sq, out_sq, s, lr / per_frame, n)
        # direction = k·P_outᵀ P_in (weight.grad units), k = 1/N for a mean loss
        coef = s * layer.last_scale / per_frame
        i = layer.module.in_features
        train_bias = bias is not None and bias.requires_grad
        if momentum:
            direction = (p_out * coef.to(p_out)).T @ p_in
            self._sgd(weight, direction[:, :i].to(weight.dtype), lr, momentum)
            if train_bias:
                self._sgd(bias, direction[:, i].to(bias.dtype), lr, momentum)
        else:  # weight += (-lr·coef·P_out)ᵀ P_in in one fused product
            scaled = (p_out * (-lr * coef).to(p_out)).T
            weight.addmm_(scaled.to(weight.dtype), p_in[:, :i].to(weight.dtype))
            if train_bias:
                bias.addmv_(scaled.to(bias.dtype), p_in[:, i].to(bias.dtype))

    def _max_change_scale(
        self, in_sq: Tensor, out_sq: Tensor, s: Tensor, lr_frame: float, n: int
    ) -> Tensor:
        """m = min(1, max_change·N / bound), bound = lr_frame·s·Σ_i ‖p_in,i‖·‖p_out,i‖ ≥ ‖ΔW‖_F.

        ``in_sq``/``out_sq`` are the squared row norms of P_in and P_out (before γ).
        """
        one = s.new_ones(())
        if self.max_change <= 0:
            return one
        bound = lr_frame * s * (in_sq * out_sq).sqrt().sum()
        limit = self.max_change * n
        return torch.where(bound > limit, limit / bound.clamp_min(limit), one)
