"""The R×R linear algebra of the online Fisher estimate (modelavg.optim.fisher), kept on the host
in float64, and the one start that touches the whole minibatch.

Everything here is a pure function of small matrices, so the estimate's update can fetch what it
needs from the device in one copy (K = J Jᵀ, L = Hᵀ H and W Wᵀ), work here, and send back one
R×R matrix: see ``fisher.apply_updates``.
"""

from __future__ import annotations

import torch
from torch import Tensor

_CONDITION_THRESHOLD = 1.0e6  # re-orthogonalise when c_max > 1e6 · c_min
_ORTHONORMAL_TOLERANCE = 1.0e-3  # ... and X Xᵀ is further than this from I
_NNET3_MAX_CHOLESKY_INVERSE = 100.0  # nnet3: larger entries of C⁻¹ mean Gram-Schmidt instead
_COMPLETION_SEED = 12345
_ZERO = 1.0e-10  # Gram eigenvalues below this share of the largest count as zero
CPU64 = {"device": "cpu", "dtype": torch.float64}


def top_rows(r: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The top-k right singular vectors of ``r`` (N×D) as rows (k'×D, float64, on r's device) and
    their squared singular values (k', float64, CPU), k' <= k dropping zero ones.

    From the eigendecomposition of the smaller Gram matrix, r rᵀ (N×N) or rᵀ r (D×D): a fraction
    of a full SVD's cost (1024×8806: about a tenth on the CPU), and it runs on the GPU.
    """
    r64 = r.to(torch.float64)
    n, dim = r64.shape
    small_side = r64.T @ r64 if dim <= n else r64 @ r64.T
    values, vectors = torch.linalg.eigh(small_side)  # ascending
    values, vectors = values.flip(0)[:k], vectors.flip(1)[:, :k]
    host = values.cpu()
    keep = int((host > _ZERO * max(float(host[0]), 0.0)).sum()) if host.numel() else 0
    values, vectors = host[:keep], vectors[:, :keep]
    if dim <= n:
        return vectors.T, values
    rows = vectors.T @ r64  # s_i v_iᵀ
    return rows / values.sqrt().to(rows)[:, None], values


def z_matrix(k: Tensor, el: Tensor, d: Tensor, rho: float, e: Tensor, eta: float, a: float):
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


def eig_desc(z: Tensor) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of symmetric z (float64, CPU), eigenvalues descending.

    Like nnet3, z is divided by max(1, tr z) first so the solver sees O(1) numbers.
    """
    scale = max(1.0, float(z.trace()))
    c, u = torch.linalg.eigh(z / scale)
    return c.flip(0) * scale, u.flip(1)


def needs_reorthogonalizing(c: Tensor) -> bool:
    """Kaldi's test on Z's eigenvalues: one not positive, or a condition number over 1e6."""
    return not float(c[-1]) > 0.0 or float(c[0]) > _CONDITION_THRESHOLD * float(c[-1])


def reorthogonalizing_map(ww: Tensor, e: Tensor, variant: str) -> Tensor | None:
    """The R×R map M with W ← M W restoring orthonormal rows of X = E^{-½}W, from the Gram
    matrix ``ww`` = W Wᵀ alone: O = X Xᵀ = C Cᵀ (Cholesky), M = E^½ C⁻¹ E^{-½}. The identity
    when O is already within 1e-3 of I; ``None`` where Kaldi falls back (Cholesky fails; for
    nnet3 also when C⁻¹ has an entry >= 100): see ``fallback_rows``.
    """
    s = e.rsqrt()
    o = s[:, None] * ww * s[None, :]
    eye = torch.eye(o.shape[0], **CPU64)
    if float((o - eye).abs().max()) <= _ORTHONORMAL_TOLERANCE:
        return eye
    chol, info = torch.linalg.cholesky_ex(o)
    c_inv = torch.linalg.solve_triangular(chol, eye, upper=False)
    ok = int(info) == 0 and bool(torch.isfinite(c_inv).all())
    if variant == "nnet3" and not float(c_inv.max()) < _NNET3_MAX_CHOLESKY_INVERSE:
        ok = False
    return e.sqrt()[:, None] * c_inv * s[None, :] if ok else None


def fallback_rows(w: Tensor, e: Tensor, variant: str) -> Tensor:
    """Kaldi's way out when Cholesky fails: nnet2 restarts from X = [I 0]; nnet3 orthonormalises
    the rows of W by Gram-Schmidt. Returns the new W (float64, CPU)."""
    if variant == "nnet3":
        q, upper = torch.linalg.qr(w.to(**CPU64).T)  # Gram-Schmidt: R's diagonal positive
        x = (q * torch.sign(torch.diagonal(upper))[None, :]).T
    else:
        x = torch.zeros(w.shape, **CPU64)
        x[:, : w.shape[0]] = torch.eye(w.shape[0], **CPU64)
    return e.sqrt()[:, None] * x


def orthonormal_completion(x: Tensor, m: int) -> Tensor:
    """m orthonormal rows orthogonal to the rows of x (float64, CPU), from a fixed-seed
    Gaussian."""
    g = torch.Generator().manual_seed(_COMPLETION_SEED)
    x = x.to(**CPU64)
    v = torch.randn(x.shape[1], m, generator=g, **CPU64)
    v = v - x.T @ (x @ v)
    q, _ = torch.linalg.qr(v)
    q = q - x.T @ (x @ q)  # second Gram-Schmidt pass for accuracy
    q, _ = torch.linalg.qr(q)
    return q.T


def special_orthonormal(rank: int, dim: int) -> Tensor:
    """nnet3's InitOrthonormalSpecial: row i has entries in columns i, i+R, i+2R, ..., the first
    1.1 and the rest 1, normalised; disjoint columns make the rows orthonormal, and the 1.1
    keeps no weighted sum of them constant."""
    x = torch.zeros(rank, dim, **CPU64)
    for i in range(rank):
        x[i, i::rank] = 1.0
        x[i, i] = 1.1
    return x / x.norm(dim=1, keepdim=True)
