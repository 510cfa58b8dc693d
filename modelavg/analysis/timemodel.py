"""Time model for parallel training by periodic model averaging, and the paper's timing data.

Why: the project's machines cannot show wall-clock speedup beyond 2 workers, so the scale study
runs N logical workers (same maths) and predicts time with this model from a measured minibatch
step time and a link (allreduce) model. :mod:`modelavg.analysis.calibration` fits the same model
to the paper's own timings (its speedup figure) to show what it explains and what it does not.

Notation: N workers, B frames per minibatch, K minibatches per averaging, F frames per epoch,
M model bytes, alpha latency, beta link bandwidth, beta_h host copy (PCIe) bandwidth::

    steps per worker    S_N  = F / (N B)                  (continuous: no rounding)
    averaging rounds    R_N  = S_N / K
    ring allreduce      t(N) = 2 (N-1) alpha + 2 (N-1)/N M / beta            (0 for N = 1)
    host staged         t(N) += 2 M / beta_h    (GPU->host->GPU: the paper's MPI was not CUDA-aware)
    pairwise exchange   x    = alpha + M / beta (+ 2 M / beta_h)   (butterfly mixing, full duplex)
    epoch time          T_N  = S_N t_step (1 + o) + R_N t(N) + s            (o = s = 0 for N = 1)

A run whose period varies (a K = 1 warm-up, adaptive K, two-level groups of G) is priced by the
averagings it logged instead of R_N: R_full t(N) + R_group t(G); overlapped averaging hides up to
K t_step of each allreduce behind the next round's steps; butterfly mixing pays x per sync instead
of t(N) (its one allreduce per epoch end is not priced: one in hundreds of syncs).

``o`` (parallel compute overhead) and ``s`` (fixed per-epoch cost) only apply to N > 1: the
paper's multi-GPU runs spend more time per frame than its 1-GPU run, plus a per-epoch cost that
does not shrink with N (fitted values: docs/RESULTS.md, "Time model calibrated on the paper's own
timing data"). Everything here is pure Python: no torch, no torch.distributed.

Example::

    link = Link(latency_s=1e-4, bandwidth_Bps=10e9)
    predict_table(0.17, PAPER_MODEL_BYTES, link, PAPER_FRAMES_PER_EPOCH, avg_every=10)
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

# --- The paper's setup and timing data ---
# The data of the paper's figure "Scaling factor and speedup factor vs #GPUs" (the authors'
# `time.dat`): training time per epoch and its MPI (allreduce) part on 1..32 K20 GPUs, averaging
# every K=10 minibatches of 1024 frames. The units are not stated; they are minutes: in seconds one
# step would need many times a K20's peak FLOP rate (`calibration.Calibration.peak_fraction`).
PAPER_GPUS = (1, 2, 4, 8, 16, 32)
PAPER_EPOCH_MIN = (254.5, 183.4, 96.0, 51.0, 27.3, 15.24)
PAPER_MPI_MIN = (0.0, 19.9, 12.9, 7.62, 4.31, 2.31)
# The paper's table "Comparing different averaging frequencies": 16 GPUs averaging every K=20
# minibatches -> speedup 10.07 (held out from the fit).
PAPER_K20_GPUS = 16
PAPER_K20_SPEEDUP = 10.07
PAPER_MINIBATCH = 1024
PAPER_AVG_EVERY = 10  # the code uses frames-per-reduce ~ K*B; 10000 vs 10240 changes R_N by 2.4%
PAPER_TRAIN_HOURS = 286.0  # Switchboard train_nodup, per the comment in the authors' run.sh
PAPER_CV_FRACTION = 0.1  # the paper holds out 10% of the utterances for cross-validation
FRAME_RATE_HZ = 100.0  # 10 ms frame shift


def dnn_param_count(input_dim: int, hidden_dim: int, hidden_layers: int, output_dim: int) -> int:
    """Weights plus biases of an MLP: the number of floats one model average moves."""
    dims = [input_dim] + [hidden_dim] * hidden_layers + [output_dim]
    return sum((a + 1) * b for a, b in itertools.pairwise(dims))


def frames_per_epoch(
    hours: float, cv_fraction: float = PAPER_CV_FRACTION, frame_rate_hz: float = FRAME_RATE_HZ
) -> float:
    """Training frames in one epoch: audio hours minus the CV hold-out, at the frame rate."""
    return hours * 3600.0 * frame_rate_hz * (1.0 - cv_fraction)


PAPER_MODEL_PARAMS = dnn_param_count(440, 2048, 6, 8806)  # the paper's DNN: 39,928,422
PAPER_MODEL_BYTES = 4 * PAPER_MODEL_PARAMS  # fp32: 159.7 MB = 152.3 MiB per allreduce
PAPER_FRAMES_PER_EPOCH = frames_per_epoch(PAPER_TRAIN_HOURS)  # 92,664,000 (assumption, see above)


# The butterfly columns of the same `time.dat` (cut from the paper's plot): the drafts' pairwise
# mixing, one partner per averaging; held out from the fit.
PAPER_BUTTERFLY_EPOCH_MIN = (254.5, 175.6, 90.0, 46.8, 25.2, 14.12)
PAPER_BUTTERFLY_MPI_MIN = (0.0, 12.1, 6.69, 3.39, 2.17, 1.16)


# --- Communication ---
def allreduce_seconds(
    num_bytes: float,
    workers: int,
    latency_s: float,
    bandwidth_Bps: float,
    algorithm: str = "ring",
    host_bandwidth_Bps: float | None = None,
) -> float:
    """Time of one allreduce of ``num_bytes`` over ``workers``; 0 for a single worker.

    ring:        2(N-1) latency + 2(N-1)/N bytes / bandwidth  (reduce-scatter + allgather; the
                 bandwidth term tends to 2 bytes/bandwidth, so large N costs little more)
    host_staged: ring + 2 bytes / host_bandwidth  (copy to host and back: no CUDA-aware MPI)
    """
    if workers < 1 or num_bytes < 0 or latency_s < 0 or bandwidth_Bps <= 0:
        raise ValueError(f"bad allreduce arguments: {num_bytes=} {workers=} {latency_s=}")
    if algorithm not in ("ring", "host_staged"):
        raise ValueError(f"unknown allreduce algorithm {algorithm!r} (ring, host_staged)")
    if (algorithm == "host_staged") != (host_bandwidth_Bps is not None):
        raise ValueError("host_bandwidth_Bps is required by, and only used with, host_staged")
    if workers == 1:
        return 0.0
    n = workers
    t = 2 * (n - 1) * latency_s + 2 * (n - 1) / n * num_bytes / bandwidth_Bps
    if host_bandwidth_Bps is not None:
        if host_bandwidth_Bps <= 0:
            raise ValueError(f"host_bandwidth_Bps must be > 0, got {host_bandwidth_Bps}")
        t += 2 * num_bytes / host_bandwidth_Bps
    return t


@dataclass(frozen=True)
class Link:
    """An interconnect: per-message latency, link bandwidth, optional host-staging bandwidth."""

    latency_s: float
    bandwidth_Bps: float
    host_bandwidth_Bps: float | None = None

    @property
    def algorithm(self) -> str:
        return "ring" if self.host_bandwidth_Bps is None else "host_staged"

    def allreduce_seconds(self, num_bytes: float, workers: int) -> float:
        lat, bw, host = self.latency_s, self.bandwidth_Bps, self.host_bandwidth_Bps
        return allreduce_seconds(num_bytes, workers, lat, bw, self.algorithm, host)

    def exchange_seconds(self, num_bytes: float) -> float:
        """One pairwise exchange (butterfly mixing): both partners send and receive the model
        at once on a full-duplex link, latency + M / beta, plus the host staging if any."""
        staging = 2 * num_bytes / self.host_bandwidth_Bps if self.host_bandwidth_Bps else 0.0
        return self.latency_s + num_bytes / self.bandwidth_Bps + staging


# --- Epoch time ---
class Syncs(NamedTuple):
    """The averagings a run made: over all workers, and inside groups of ``group_size``."""

    full: float
    group: float = 0.0
    group_size: int = 1


@dataclass(frozen=True)
class EpochTime:
    """One epoch on ``workers`` workers: compute, communication and other (fixed) time."""

    workers: int
    steps: float  # minibatches per worker
    rounds: float  # averagings over all workers
    compute_s: float
    comm_s: float
    other_s: float
    total_s: float
    comm_share: float  # comm_s / total_s


def epoch_time(
    frames_per_epoch: float,
    workers: int,
    minibatch: int,
    avg_every: int,
    step_seconds: float,
    model_bytes: float,
    link: Link,
    *,
    parallel_overhead: float = 0.0,
    parallel_fixed_s: float = 0.0,
    syncs: Syncs | None = None,
    averaging: str = "model",
) -> EpochTime:
    """T_N = S_N step (1 + o) + R_N allreduce(N) + s, with S_N = F/(N B), R_N = S_N/K.

    Blocking allreduces, as in the paper, unless ``averaging`` is ``overlap`` (each allreduce
    runs beside the next round's K steps: only max(0, allreduce - K step) shows) or
    ``butterfly`` (one pairwise exchange per sync instead of an allreduce). ``syncs``: the
    averagings the run made instead of R_N, group ones priced on the same link (an upper bound
    where a group shares a node's faster links). ``parallel_overhead`` (o) and
    ``parallel_fixed_s`` (s) apply only when workers > 1.
    """
    if workers < 1 or minibatch < 1 or avg_every < 1:
        raise ValueError(
            f"need workers, minibatch, avg_every >= 1: {workers}, {minibatch}, {avg_every}"
        )
    steps = frames_per_epoch / (workers * minibatch)
    syncs = syncs or Syncs(steps / avg_every)
    parallel = workers > 1
    compute = steps * step_seconds * (1.0 + (parallel_overhead if parallel else 0.0))
    hidden = avg_every * step_seconds if averaging == "overlap" else 0.0
    if averaging == "butterfly" and parallel:
        per_sync = link.exchange_seconds(model_bytes)
    else:
        per_sync = link.allreduce_seconds(model_bytes, workers)
    comm = syncs.full * max(0.0, per_sync - hidden)
    comm += syncs.group * link.allreduce_seconds(model_bytes, syncs.group_size)
    other = parallel_fixed_s if parallel else 0.0
    total = compute + comm + other
    return EpochTime(
        workers, steps, syncs.full, compute, comm, other, total, comm / total if total else 0.0
    )


def speedup(t1: float, tn: float) -> float:
    """T_1 / T_N (the paper's definition)."""
    return t1 / tn


def efficiency(t1: float, tn: float, workers: int) -> float:
    """Speedup / N (the paper's "scaling factor")."""
    return t1 / (tn * workers)


DEFAULT_WORKERS = (1, 2, 4, 8, 16, 32, 64)


def predict_table(
    step_seconds: float,
    model_bytes: float,
    link: Link,
    frames_per_epoch: float,
    avg_every: int = PAPER_AVG_EVERY,
    minibatch: int = PAPER_MINIBATCH,
    workers: Sequence[int] = DEFAULT_WORKERS,
    *,
    parallel_overhead: float = 0.0,
    parallel_fixed_s: float = 0.0,
) -> list[dict[str, float]]:
    """One row per N: epoch time, its parts, comm share, speedup and efficiency versus N = 1."""
    over = {"parallel_overhead": parallel_overhead, "parallel_fixed_s": parallel_fixed_s}

    def one(n: int) -> EpochTime:
        f, b, k = frames_per_epoch, minibatch, avg_every
        return epoch_time(f, n, b, k, step_seconds, model_bytes, link, **over)

    t1 = one(1).total_s
    rows = []
    for n in workers:
        e = one(n)
        rows.append(
            {
                "workers": n,
                "avg_every": avg_every,
                "epoch_s": e.total_s,
                "compute_s": e.compute_s,
                "comm_s": e.comm_s,
                "other_s": e.other_s,
                "comm_share": e.comm_share,
                "speedup": speedup(t1, e.total_s),
                "efficiency": efficiency(t1, e.total_s, n),
            }
        )
    return rows
