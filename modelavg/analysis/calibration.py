"""The time model (:mod:`modelavg.analysis.timemodel`) fitted to the paper's measured table.

The paper's speedup figure gives, per GPU count, the epoch time and its MPI part. The MPI column
fixes the link: MPI_N = R_N t(N) is linear in (host staging, latency, 1/bandwidth). The rest fixes
the compute: T_N - MPI_N = T_1 (1 + o) / N + s for N > 1. The fit uses relative errors (every N
weighs the same); the paper's K=20 point at 16 GPUs and the drafts' butterfly columns (one
pairwise exchange per averaging) are held out as checks. The fitted values and
what they say are in docs/RESULTS.md ("Time model calibrated on the paper's own timing data").

    python -m modelavg.analysis.calibration    # the fit, then predictions up to N = 64

Example::

    cal = calibration_report()
    print(cal.table())
    cal.link_fit.link, cal.compute.step_seconds    # a Link and a step time for epoch_time
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from modelavg.analysis.timemodel import (
    PAPER_AVG_EVERY,
    PAPER_BUTTERFLY_EPOCH_MIN,
    PAPER_BUTTERFLY_MPI_MIN,
    PAPER_EPOCH_MIN,
    PAPER_FRAMES_PER_EPOCH,
    PAPER_GPUS,
    PAPER_K20_GPUS,
    PAPER_K20_SPEEDUP,
    PAPER_MINIBATCH,
    PAPER_MODEL_BYTES,
    PAPER_MPI_MIN,
    EpochTime,
    Link,
    efficiency,
    epoch_time,
    predict_table,
    speedup,
)

K20_PEAK_FLOPS = 3.52e12  # fp32 peak of an NVIDIA K20


def averaging_rounds(
    frames_per_epoch: float, workers: int, minibatch: int, avg_every: int
) -> float:
    """R_N = F / (N B K): how many allreduces one epoch does."""
    return frames_per_epoch / (workers * minibatch * avg_every)


def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact non-negative least squares for a few columns: best feasible LS fit over column subsets.

    The NNLS optimum is the unconstrained LS solution on its set of non-zero coefficients, so the
    best candidate with all coefficients >= 0 is the optimum (2^columns solves; columns <= 3 here).
    """
    cols = a.shape[1]
    best, best_cost = np.zeros(cols), float(b @ b)
    for k in range(1, cols + 1):
        for subset in itertools.combinations(range(cols), k):
            sub = a[:, subset]
            scale = np.linalg.norm(sub, axis=0)
            if (scale == 0).any():
                continue
            x = np.linalg.lstsq(sub / scale, b, rcond=None)[0] / scale
            if (x < 0).any():
                continue
            r = b - sub @ x
            if float(r @ r) < best_cost:
                best = np.zeros(cols)
                best[list(subset)] = x
                best_cost = float(r @ r)
    return best


@dataclass(frozen=True)
class LinkFit:
    """A link fitted to measured MPI time per epoch, with the fit's relative errors per row."""

    link: Link
    staging_s: float  # per-allreduce constant 2 M / beta_h (0 for a plain ring)
    workers: tuple[int, ...]
    rel_errors: tuple[float, ...]  # (predicted - measured) / measured MPI time, per N > 1 row

    @property
    def max_abs_rel_error(self) -> float:
        return max(abs(e) for e in self.rel_errors)


def fit_link(
    workers: Sequence[int],
    mpi_s: Sequence[float],
    *,
    frames_per_epoch: float,
    minibatch: int,
    avg_every: int,
    model_bytes: float,
    host_staged: bool = True,
) -> LinkFit:
    """Fit latency, bandwidth (and host staging) to MPI seconds per epoch; rows with N = 1 skipped.

    MPI_N = R_N t(N) is linear in (staging, alpha, 1/beta), so minimising the squared *relative*
    errors (every N weighs the same) under non-negativity is a small exact NNLS, no iteration.
    """
    pairs = [(n, m) for n, m in zip(workers, mpi_s, strict=True) if n > 1]
    if len(pairs) < (3 if host_staged else 2):
        raise ValueError(f"need more rows with N > 1 than {len(pairs)} to fit the link")
    ns = np.array([p[0] for p in pairs], dtype=float)
    meas = np.array([p[1] for p in pairs], dtype=float)
    rounds = frames_per_epoch / (ns * minibatch * avg_every)
    columns = [np.ones_like(ns)] if host_staged else []
    columns += [2 * (ns - 1), 2 * (ns - 1) / ns * model_bytes]
    design = np.stack(columns, axis=1) * (rounds / meas)[:, None]
    x = _nnls(design, np.ones_like(ns))
    staging = float(x[0]) if host_staged else 0.0
    latency, inv_bw = float(x[-2]), float(x[-1])
    host_bw = 2 * model_bytes / staging if staging > 0 else None
    link = Link(latency, 1.0 / inv_bw if inv_bw > 0 else math.inf, host_bw)
    pred = np.array(
        [r * link.allreduce_seconds(model_bytes, int(n)) for r, n in zip(rounds, ns, strict=True)]
    )
    errors = tuple(float(e) for e in (pred - meas) / meas)
    return LinkFit(link, staging, tuple(int(n) for n in ns), errors)


@dataclass(frozen=True)
class ComputeFit:
    """Non-MPI time per epoch: T_1 for one GPU and T_1 (1 + o) / N + s for N > 1."""

    t1_s: float
    step_seconds: float  # T_1 / (F / B)
    parallel_overhead: float  # o
    parallel_fixed_s: float  # s


def fit_compute(
    workers: Sequence[int],
    epoch_s: Sequence[float],
    mpi_s: Sequence[float],
    *,
    frames_per_epoch: float,
    minibatch: int,
) -> ComputeFit:
    """Fit (T_N - MPI_N) = a / N + s to the N > 1 rows (relative errors, a, s >= 0); o = a/T_1 - 1.

    T_1 is the 1-GPU row itself: a single a/N + s curve through all rows cannot fit the paper.
    """
    rows = list(zip(workers, epoch_s, mpi_s, strict=True))
    t1 = [t - m for n, t, m in rows if n == 1]
    rest = [(n, t - m) for n, t, m in rows if n > 1]
    if len(t1) != 1 or len(rest) < 2:
        raise ValueError("need exactly one N = 1 row and at least two N > 1 rows")
    ns = np.array([r[0] for r in rest], dtype=float)
    meas = np.array([r[1] for r in rest], dtype=float)
    a, s = _nnls(np.stack([1 / ns, np.ones_like(ns)], axis=1) / meas[:, None], np.ones_like(ns))
    return ComputeFit(t1[0], t1[0] / (frames_per_epoch / minibatch), a / t1[0] - 1.0, float(s))


def _rel(pred: float, meas: float) -> float | None:
    """(pred - meas) / meas; 0 when both are 0 (the 1-GPU MPI time), None when undefined."""
    if meas == 0:
        return 0.0 if pred == 0 else None
    return (pred - meas) / meas


@dataclass(frozen=True)
class Calibration:
    """The paper's table against the calibrated model (times in minutes, as in the paper)."""

    frames_per_epoch: float
    minibatch: int
    avg_every: int
    model_bytes: float
    link_fit: LinkFit  # the model used for the predictions
    ring_only: LinkFit  # plain ring, for comparison: what staging adds
    compute: ComputeFit
    rows: list[dict[str, float | None]]
    validation: dict[str, float]  # K=20 at 16 GPUs, not used in the fit
    butterfly: list[dict[str, float]]  # the butterfly columns, not used in the fit
    implied_flops: float  # 1-GPU rate at 6 flops per parameter per frame (fwd + bwd)

    @property
    def peak_fraction(self) -> float:
        """Share of a K20's fp32 peak: a sanity check of the time units (minutes)."""
        return self.implied_flops / K20_PEAK_FLOPS

    def table(self) -> str:
        """A plain-text report: fit parameters, then one line per N."""
        lk, c = self.link_fit.link, self.compute
        host = f"{lk.host_bandwidth_Bps / 1e9:.2f} GB/s" if lk.host_bandwidth_Bps else "none"
        lines = [
            f"frames/epoch {self.frames_per_epoch:.4g}, B={self.minibatch}, K={self.avg_every}, "
            f"model {self.model_bytes / 2**20:.1f} MiB; 1-GPU step {c.step_seconds * 1e3:.1f} ms "
            f"= {self.implied_flops / 1e12:.2f} TFLOP/s ({self.peak_fraction:.0%} of K20 peak)",
            f"link ({lk.algorithm}): latency {lk.latency_s * 1e3:.3f} ms, bandwidth "
            f"{lk.bandwidth_Bps / 1e9:.3f} GB/s, host staging {host} "
            f"({self.link_fit.staging_s * 1e3:.1f} ms/allreduce); MPI max |err| "
            f"{self.link_fit.max_abs_rel_error:.1%} "
            f"(plain ring: {self.ring_only.max_abs_rel_error:.1%})",
            f"compute: overhead o={c.parallel_overhead:.3f} for N>1, fixed s="
            f"{c.parallel_fixed_s / 60:.2f} min/epoch",
            " N  epoch  pred   err    MPI   pred   err   speedup pred   ar_s  pred  naive  err",
        ]
        for r in self.rows:
            lines.append(
                f"{r['workers']:2d} {r['epoch_min']:6.1f} {r['epoch_pred_min']:6.1f} "
                f"{r['epoch_rel_err']:+6.1%} {r['mpi_min']:5.2f} {r['mpi_pred_min']:6.2f} "
                f"{r['mpi_rel_err']:+6.1%} {r['speedup']:6.2f} {r['speedup_pred']:6.2f} "
                f"{r['allreduce_s']:6.3f} {r['allreduce_pred_s']:5.3f} "
                f"{r['naive_epoch_min']:6.1f} {r['naive_rel_err']:+6.1%}"
            )
        v = self.validation
        lines.append(
            f"held out: K=20, 16 GPUs speedup {v['speedup']:.2f}, "
            f"predicted {v['speedup_pred']:.2f} "
            f"({v['rel_err']:+.1%}); if the overhead were per averaging round: "
            f"{v['speedup_if_per_round']:.2f}"
        )
        lines.append("held out, butterfly: N  MPI  pred (staged, err)  pred (unstaged, err)  "
                     "speedup  pred")  # fmt: skip
        for b in self.butterfly:
            lines.append(
                f"{b['workers']:2d} {b['mpi_min']:5.2f} {b['mpi_pred_min']:6.2f} "
                f"{b['mpi_rel_err']:+6.1%} {b['mpi_unstaged_min']:6.2f} "
                f"{b['mpi_unstaged_rel_err']:+6.1%} {b['speedup']:6.2f} {b['speedup_pred']:6.2f}"
            )
        return "\n".join(lines)


def calibration_report(
    host_staged: bool = True,
    frames: float = PAPER_FRAMES_PER_EPOCH,
    minibatch: int = PAPER_MINIBATCH,
    avg_every: int = PAPER_AVG_EVERY,
    model_bytes: float = PAPER_MODEL_BYTES,
) -> Calibration:
    """Fit the model to the paper's table; per N: measured vs predicted epoch, MPI, speedup.

    ``naive_epoch_min`` = T_1/N + predicted MPI: the model without the N > 1 overheads, i.e. what
    perfect compute scaling plus the fitted link would give.
    """
    epoch_s = [t * 60 for t in PAPER_EPOCH_MIN]
    mpi_s = [m * 60 for m in PAPER_MPI_MIN]
    common = dict(frames_per_epoch=frames, minibatch=minibatch, avg_every=avg_every)
    lf = fit_link(PAPER_GPUS, mpi_s, **common, model_bytes=model_bytes, host_staged=host_staged)
    ring = fit_link(PAPER_GPUS, mpi_s, **common, model_bytes=model_bytes, host_staged=False)
    comp = fit_compute(PAPER_GPUS, epoch_s, mpi_s, frames_per_epoch=frames, minibatch=minibatch)
    over = {"parallel_overhead": comp.parallel_overhead, "parallel_fixed_s": comp.parallel_fixed_s}

    def predict(n: int, k: int, **kw: float) -> EpochTime:
        return epoch_time(frames, n, minibatch, k, comp.step_seconds, model_bytes, lf.link, **kw)

    t1, t1_pred = epoch_s[0], predict(1, avg_every).total_s
    rows: list[dict[str, float | None]] = []
    for n, t, m in zip(PAPER_GPUS, epoch_s, mpi_s, strict=True):
        e = predict(n, avg_every, **over)
        naive = t1 / n + e.comm_s
        rounds = averaging_rounds(frames, n, minibatch, avg_every)
        sp, sp_pred = speedup(t1, t), speedup(t1_pred, e.total_s)
        rows.append(
            {
                "workers": n,
                "epoch_min": t / 60,
                "epoch_pred_min": e.total_s / 60,
                "epoch_rel_err": _rel(e.total_s, t),
                "mpi_min": m / 60,
                "mpi_pred_min": e.comm_s / 60,
                "mpi_rel_err": _rel(e.comm_s, m),
                "speedup": sp,
                "speedup_pred": sp_pred,
                "speedup_rel_err": _rel(sp_pred, sp),
                "efficiency": efficiency(t1, t, n),
                "efficiency_pred": efficiency(t1_pred, e.total_s, n),
                "allreduce_s": m / rounds,
                "allreduce_pred_s": e.comm_s / rounds,
                "naive_epoch_min": naive / 60,
                "naive_rel_err": _rel(naive, t),
            }
        )

    # Held-out K=20 point, and the alternative reading of the overhead: work done once per averaging
    # round outside the MPI timer (e.g. host copies), which would halve with K=20.
    k2, n2 = 2 * avg_every, PAPER_K20_GPUS
    pred20 = speedup(t1_pred, predict(n2, k2, **over).total_s)
    per_round_s = comp.parallel_overhead * t1 / n2 * avg_every / k2
    alt = predict(n2, k2, parallel_fixed_s=comp.parallel_fixed_s).total_s + per_round_s
    validation = {
        "workers": n2,
        "avg_every": k2,
        "speedup": PAPER_K20_SPEEDUP,
        "speedup_pred": pred20,
        "rel_err": (pred20 - PAPER_K20_SPEEDUP) / PAPER_K20_SPEEDUP,
        "speedup_if_per_round": speedup(t1_pred, alt),
    }
    flops = 6 * (model_bytes / 4) * minibatch / comp.step_seconds
    unstaged = Link(lf.link.latency_s, lf.link.bandwidth_Bps)
    butterfly = []
    for n, t, m in zip(PAPER_GPUS, PAPER_BUTTERFLY_EPOCH_MIN, PAPER_BUTTERFLY_MPI_MIN, strict=True):
        if n == 1:
            continue
        e = predict(n, avg_every, averaging="butterfly", **over)
        bare = averaging_rounds(frames, n, minibatch, avg_every) * unstaged.exchange_seconds(
            model_bytes
        )
        butterfly.append(
            {
                "workers": n,
                "mpi_min": m,
                "mpi_pred_min": e.comm_s / 60,
                "mpi_rel_err": (e.comm_s / 60 - m) / m,
                "mpi_unstaged_min": bare / 60,
                "mpi_unstaged_rel_err": (bare / 60 - m) / m,
                "speedup": PAPER_EPOCH_MIN[0] / t,
                "speedup_pred": speedup(t1_pred, e.total_s),
            }
        )
    return Calibration(
        frames,
        minibatch,
        avg_every,
        model_bytes,
        lf,
        ring,
        comp,
        rows,
        validation,
        butterfly,
        flops,
    )


def main() -> None:
    """Print the fit, then predictions up to N = 64 with and without the paper's overheads."""
    cal = calibration_report()
    print(cal.table())
    ring = Link(cal.link_fit.link.latency_s, cal.link_fit.link.bandwidth_Bps)
    models = [
        ("the paper's cluster (fitted link with host staging, its overheads)", cal.link_fit.link,
         cal.compute.parallel_overhead, cal.compute.parallel_fixed_s),
        ("the same GPUs and link, ring allreduce without host staging, no extra overheads",
         ring, 0.0, 0.0),
    ]  # fmt: skip
    for title, link, overhead, fixed in models:
        print(f"\nprediction, K=10, B=1024, N up to 64: {title}")
        for row in predict_table(
            cal.compute.step_seconds,
            PAPER_MODEL_BYTES,
            link,
            PAPER_FRAMES_PER_EPOCH,
            parallel_overhead=overhead,
            parallel_fixed_s=fixed,
        ):
            print(
                f"N={row['workers']:2d} epoch {row['epoch_s'] / 60:6.1f} min, "
                f"comm {row['comm_share']:5.1%}, speedup {row['speedup']:5.2f}, "
                f"efficiency {row['efficiency']:5.1%}"
            )


if __name__ == "__main__":
    main()
