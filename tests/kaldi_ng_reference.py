"""A float64 NumPy transcription of Kaldi's online natural-gradient code, for tests only.

Written from the C++, line by line, independent of ``modelavg.optim`` (NumPy, not torch; Kaldi's
order of operations; its trace recovery, sorting, flooring and re-orthogonalisation):

* nnet2 (2014): ``OnlinePreconditioner`` in src/nnet2/nnet-precondition-online.cc at kaldi-asr
  commit 4300f99a7 (2014-10-17), and ``AffineComponentPreconditionedOnline::Update`` /
  ``GetScalingFactor`` in src/nnet2/nnet-component.cc there.
* nnet3: ``OnlineNaturalGradient`` in src/nnet3/natural-gradient-online.cc (master).

One thing cannot be transcribed: where the first minibatch has fewer rows than the rank, Kaldi
completes the basis with random rows (``OrthogonalizeRows`` of zero rows).  The estimate then
depends on that subspace, so the reference draws the same Gaussian columns as modelavg does.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch

from modelavg.optim.lowrank import _COMPLETION_SEED


def _compute_et(d: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    e = 1.0 / (beta / d + 1.0)
    sqrt_e = np.sqrt(e)
    return e, sqrt_e, 1.0 / sqrt_e


def _sort_svd(c: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SortSvd: greatest to least absolute value (its default)."""
    order = np.argsort(-np.abs(c), kind="stable")
    return c[order], u[:, order]


def _gram_schmidt_rows(m: np.ndarray) -> np.ndarray:
    """MatrixBase::OrthogonalizeRows (rows in order, repeated while most of a row cancels)."""
    m = m.copy()
    for i in range(m.shape[0]):
        while True:
            start = m[i] @ m[i]
            for j in range(i):
                m[i] -= (m[i] @ m[j]) * m[j]
            end = m[i] @ m[i]
            if end > 0.01 * start:
                m[i] /= math.sqrt(end)
                break
    return m


class KaldiPreconditioner:
    """nnet2's OnlinePreconditioner (``nnet3=False``) or nnet3's OnlineNaturalGradient."""

    def __init__(
        self,
        rank: int,
        update_period: int,
        num_samples_history: float = 2000.0,
        alpha: float = 4.0,
        *,
        nnet3: bool = False,
    ) -> None:
        self.rank, self.update_period, self.alpha = rank, update_period, alpha
        self.num_samples_history, self.epsilon = num_samples_history, 1.0e-10
        self.delta = 5.0e-4 if nnet3 else 1.0e-5
        self.nnet3 = nnet3
        self.t = 0 if nnet3 else -1
        self.num_updates_skipped = 0

    # --------------------------------------------------------------------------- shared parts
    def eta(self, n: int) -> float:
        ans = 1.0 - math.exp(-n / self.num_samples_history)
        return min(ans, 0.9) if self.nnet3 else ans

    def beta(self, d: np.ndarray, rho: float, dim: int) -> float:
        return rho * (1.0 + self.alpha) + self.alpha * d.sum() / dim

    def compute_zt(self, n, rho, d, inv_sqrt_e, k, el) -> np.ndarray:
        eta = self.eta(n)
        dr = d + rho
        etan, eta1 = eta / n, 1.0 - eta
        r = d.shape[0]
        z = np.zeros((r, r))
        for i in range(r):
            for j in range(i + 1):
                l_ij, k_ij = 0.5 * (el[i, j] + el[j, i]), 0.5 * (k[i, j] + k[j, i])
                z[i, j] = (
                    etan * etan * inv_sqrt_e[i] * k_ij * inv_sqrt_e[j]
                    + etan * eta1 * inv_sqrt_e[i] * l_ij * inv_sqrt_e[j] * dr[j]
                    + etan * eta1 * dr[i] * inv_sqrt_e[i] * l_ij * inv_sqrt_e[j]
                    + (eta1 * eta1 * dr[i] * dr[i] if i == j else 0.0)
                )
                z[j, i] = z[i, j]
        return z

    def compute_wt1(self, n, d, d1, rho, rho1, u, sqrt_c, inv_sqrt_e, w, j) -> np.ndarray:
        dim = w.shape[1]
        eta = self.eta(n)
        _, sqrt_e1, _ = _compute_et(d1, self.beta(d1, rho1, dim))
        b = j + ((1.0 - eta) / (eta / n) * (d + rho))[:, None] * w
        a = u.T.copy()
        for i in range(a.shape[0]):
            a[i] *= (eta / n) * sqrt_e1[i] / sqrt_c[i] * inv_sqrt_e
        return a @ b

    def reorthogonalize(self, d1, rho1, w1) -> np.ndarray:
        r, dim = w1.shape
        _, sqrt_e1, inv_sqrt_e1 = _compute_et(d1, self.beta(d1, rho1, dim))
        o = inv_sqrt_e1[:, None] * (w1 @ w1.T) * inv_sqrt_e1[None, :]
        if np.abs(np.tril(o - np.eye(r))).max() <= 1.0e-3:
            return w1
        try:
            c_inv = np.linalg.inv(np.linalg.cholesky(o))
            ok = not self.nnet3 or np.tril(c_inv).max() < 100.0
        except np.linalg.LinAlgError:
            ok = False
        if ok:
            return (sqrt_e1[:, None] * np.tril(c_inv) * inv_sqrt_e1[None, :]) @ w1
        if self.nnet3:
            return sqrt_e1[:, None] * _gram_schmidt_rows(w1)
        return sqrt_e1[:, None] * np.eye(r, dim)

    def _update(self, x, h, w, rho, d, tr_x=None):
        """The update branch; returns (P, tr(PPᵀ), tr(RRᵀ)) and commits W, d, ρ."""
        n, dim = x.shape
        r = self.rank
        eta = self.eta(n)
        j = h.T @ x
        if n > dim:
            lk = np.vstack([w, j]) @ j.T
            el, k = lk[:r], lk[r:]
        else:
            k, el = j @ j.T, h.T @ h
        e, _, inv_sqrt_e = _compute_et(d, self.beta(d, rho, dim))
        z = self.compute_zt(n, rho, d, inv_sqrt_e, k, el)
        scale = max(1.0, np.trace(z)) if self.nnet3 else 1.0
        c, u = np.linalg.eigh(z / scale)
        c, u = _sort_svd(c, u)
        c = c * scale
        must_reorth = c[0] > 1.0e6 * c[r - 1]
        c_floor = (rho * (1.0 - eta)) ** 2
        if (c < c_floor).any():
            must_reorth = True
        c = np.maximum(c, c_floor)
        p = x - h @ w
        tr_p = float((p * p).sum())
        if tr_x is None:  # nnet2 recovers tr(R Rᵀ) from P
            tr_x = tr_p + float(sum(el[i, i] * (2.0 - e[i]) for i in range(r)))
        sqrt_c = np.sqrt(c)
        rho1 = (eta / n * tr_x + (1 - eta) * (dim * rho + d.sum()) - sqrt_c.sum()) / (dim - r)
        d1 = sqrt_c - rho1
        floor_val = max(self.epsilon, self.delta * sqrt_c.max())
        rho1 = max(rho1, floor_val)
        d1 = np.maximum(d1, floor_val if self.nnet3 else self.epsilon)
        w1 = self.compute_wt1(n, d, d1, rho, rho1, u, sqrt_c, inv_sqrt_e, w, j)
        if must_reorth:
            w1 = self.reorthogonalize(d1, rho1, w1)
        self.w, self.d, self.rho = w1, d1, rho1
        return p, tr_p, tr_x

    # --------------------------------------------------------------------------- nnet2
    def _init_nnet2(self, r0: np.ndarray) -> None:
        n, dim = r0.shape
        r = self.rank
        vals, vecs = np.linalg.eigh(r0.T @ r0)
        top = min(r, n, dim)
        x = vecs[:, ::-1][:, :top].T
        ell = np.zeros(r)
        ell[:top] = vals[::-1][:top]
        if top < r:
            g = torch.Generator().manual_seed(_COMPLETION_SEED)
            extra = torch.randn(dim, r - top, generator=g, dtype=torch.float64).numpy().T
            x = _gram_schmidt_rows(np.vstack([x, extra]))
        ell /= n
        rho = ((r0 * r0).sum() / n - ell.sum()) / (dim - r)
        rho = max(rho, self.epsilon, self.delta * ell.max())
        d = np.maximum(ell - rho, self.epsilon)
        _, sqrt_e, _ = _compute_et(d, self.beta(d, rho, dim))
        self.w, self.d, self.rho, self.t = sqrt_e[:, None] * x, d, rho, 0

    def _nnet2(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        if self.t == -1:
            self._init_nnet2(x)
        w, d, rho = self.w, self.d.copy(), self.rho
        h = x @ w.T
        if self.num_updates_skipped < self.update_period - 1 and self.t >= 10:
            self.num_updates_skipped += 1
            tr_x = float((x * x).sum())
            p = x - h @ w
            tr_p = float((p * p).sum())
        else:
            p, tr_p, tr_x = self._update(x, h, w, rho, d)
            self.t += 1
            self.num_updates_skipped = 0
        return p, 1.0 if tr_p == 0.0 else math.sqrt(tr_x / tr_p)

    # --------------------------------------------------------------------------- nnet3
    def _init_default(self, dim: int) -> None:
        r = self.rank
        self.rho, self.d = self.epsilon, np.full(r, self.epsilon)
        x = np.zeros((r, dim))
        for row in range(r):
            cols = list(range(row, dim, r))
            norm = 1.0 / math.sqrt(1.1 * 1.1 + len(cols) - 1)
            for i, col in enumerate(cols):
                x[row, col] = norm * (1.1 if i == 0 else 1.0)
        self.w = math.sqrt(1.0 / (2.0 + (dim + r) * self.alpha / dim)) * x
        self.t = 0

    def _init_nnet3(self, x0: np.ndarray) -> None:
        other = copy.deepcopy(self)
        other._init_default(x0.shape[1])
        other.t = 1
        for _ in range(1 if x0.shape[0] <= other.rank else 3):
            other._nnet3(x0.copy())
        self.w, self.d, self.rho = other.w, other.d, other.rho

    def _nnet3(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        if self.t == 0:
            self._init_nnet3(x)
        w, d, rho = self.w, self.d.copy(), self.rho
        updating = self.t <= 10 or (self.t - 10) % self.update_period == 0
        initial = float((x * x).sum())
        h = x @ w.T
        if updating:
            p, _, _ = self._update(x, h, w, rho, d, tr_x=initial)
        else:
            p = x - h @ w
        scale = 1.0 if initial <= 0.0 else math.sqrt(initial / float((p * p).sum()))
        self.t += 1
        return p, scale

    def precondition_directions(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """(P, the squared row norms of P, γ), as Kaldi's PreconditionDirections."""
        p, scale = (self._nnet3 if self.nnet3 else self._nnet2)(np.array(x, dtype=np.float64))
        return p, (p * p).sum(axis=1), scale


def affine_update(
    in_value: np.ndarray,
    out_deriv: np.ndarray,
    pre_in: KaldiPreconditioner,
    pre_out: KaldiPreconditioner,
    learning_rate: float,
    max_change_per_sample: float,
) -> tuple[np.ndarray, np.ndarray, float]:
    """nnet2 AffineComponentPreconditionedOnline::Update: (ΔW, Δb, minibatch_scale) for the
    derivative of the objective ``out_deriv`` (Kaldi ascends; pass minus the loss's)."""
    n = in_value.shape[0]
    x = np.hstack([in_value, np.ones((n, 1))])
    p_in, in_rows, in_scale = pre_in.precondition_directions(x)
    p_out, out_rows, out_scale = pre_out.precondition_directions(out_deriv)
    scale = in_scale * out_scale
    minibatch_scale = 1.0
    if max_change_per_sample > 0.0:
        tot_change_norm = scale * learning_rate * np.sqrt(in_rows * out_rows).sum()
        max_change_norm = max_change_per_sample * n
        if tot_change_norm > max_change_norm:
            minibatch_scale = max_change_norm / tot_change_norm
    local_lrate = scale * minibatch_scale * learning_rate
    return (
        local_lrate * p_out.T @ p_in[:, :-1],
        local_lrate * p_out.T @ p_in[:, -1],
        minibatch_scale,
    )
