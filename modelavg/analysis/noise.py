"""Gradient noise scale: how many frames per update a task can use before more stop paying.

Why: N averaged workers of minibatch b make at best the progress of one worker with minibatch
N b (averaging after every step *is* that; averaging every K > 1 steps adds drift). Whether a
larger minibatch pays depends on the task, not the engine. McCandlish et al. (2018, "An
Empirical Model of Large-Batch Training") measure it with the simple noise scale

    B = tr(Sigma) / |G|^2        G: the full-data gradient, Sigma: the per-frame gradient covariance

and find that a minibatch of b frames needs S = S_min (1 + B/b) steps and E = E_min (1 + b/B)
frames to reach a given loss. N workers of minibatch b then need (1 + N b/B) / (1 + b/B) times
the frames of one worker, a sample efficiency of at most

    efficiency_ceiling = (1 + b/B) / (1 + N b/B)

which is also the best parallel efficiency (speedup / N) with free communication. It is a model,
not a theorem: it assumes the best lr at every step and a curvature like the identity, so a
tuned N-worker run can beat a given 1-worker run's ceiling by a little.

Estimate, with the unbiased two-batch-size estimators of McCandlish et al. (appendix A): the
squared norm of a minibatch gradient of b frames has expectation |G|^2 + tr(Sigma)/b, so from
M gradients of b frames and their mean (one gradient of M b frames)

    |G|^2      ~ (M b |G_Mb|^2 - b |G_b|^2) / (M b - b)
    tr(Sigma)  ~ (|G_b|^2 - |G_Mb|^2) / (1/b - 1/(M b))

each averaged over repeats before the ratio is taken (the ratio of means, as the paper does).

NG-SGD steps along P g, not g (P per layer: the Kronecker product of its two preconditioners,
times γ_in γ_out). Assuming, as natural gradient does, that P approximates the inverse curvature,
the same model holds with B_P = tr(P Sigma) / (G' P G): the estimators above applied to the
gradients seen through P^½ (``natural_gradient_metric``).

Example::

    est = estimate_noise_scale(model, table, context=5, small_batch=256, batches=16)
    est.noise_scale                      # frames
    efficiency_ceiling(est.noise_scale, minibatch=1024, workers=16)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from modelavg.data.frames import FrameTable
from modelavg.errors import UsageError
from modelavg.optim import NGSGD

SMALL_BATCH, BATCHES, REPEATS = 256, 16, 8  # 8 gradients of 4096 frames, each from 16 of 256
NOISE_FRAMES = SMALL_BATCH * BATCHES  # the fewest frames an estimate can draw from
NG_WARMUP = 50  # minibatches that warm NG-SGD's estimates for a model saved without them


@dataclass(frozen=True)
class NoiseScale:
    """The estimate: ``noise_scale`` = ``trace_cov`` / ``grad_sq`` (frames), with its spread."""

    grad_sq: float  # |G|^2, the squared norm of the full-data gradient
    trace_cov: float  # tr(Sigma), the per-frame gradient variance summed over parameters
    noise_scale: float  # B_simple in frames (inf when |G|^2 is not measurably > 0)
    stderr: float  # jackknife standard error of noise_scale over the repeats
    frames: int  # frames whose gradients were computed


def efficiency_ceiling(noise_scale: float, minibatch: int, workers: int) -> float:
    """Best sample (and parallel) efficiency of ``workers`` x ``minibatch`` against one worker:
    (1 + b/B) / (1 + N b/B). 1 for N = 1; 1/N when B is small against b (no gain from N)."""
    if math.isinf(noise_scale):
        return 1.0
    x = minibatch / noise_scale
    return (1 + x) / (1 + workers * x)


def workers_at_half_efficiency(noise_scale: float, minibatch: int) -> float:
    """N where the ceiling falls to 50%: (1 + x)/(1 + N x) = 1/2 with x = b/B gives N = B/b + 2."""
    return noise_scale / minibatch + 2


def noise_scale_needed(efficiency: float, minibatch: int, workers: int) -> float:
    """The smallest B whose ceiling reaches ``efficiency`` at N workers:
    (1 + x)/(1 + N x) = e with x = b/B gives B = b (e N - 1) / (1 - e)."""
    return minibatch * (efficiency * workers - 1) / (1 - efficiency)


def trajectory_efficiency_ceiling(
    frames: list[float],
    noise_scales: list[float],
    minibatch: int,
    workers: int,
    until: float | None = None,
) -> float:
    """The ceiling along a 1-worker run whose noise scale was B_k after frames[k], up to
    ``until`` frames (default: the last point). N workers together need 1/ceiling times the
    frames of each stretch; a stretch counts at the larger of its end points' B, so that the
    ceiling errs high where B changes fast between validations (e.g. right after the start):

        efficiency = (f_end - f_0) / sum_k (f_k+1 - f_k) / efficiency_ceiling(max(B_k, B_k+1))
    """
    if len(frames) != len(noise_scales) or len(frames) < 2:
        raise ValueError("need matching frames and noise scales, at least two points")
    end = frames[-1] if until is None else min(until, frames[-1])
    cost = 0.0
    for f0, f1, b0, b1 in zip(frames, frames[1:], noise_scales, noise_scales[1:], strict=False):
        if f0 >= end:
            break
        cost += (min(f1, end) - f0) / efficiency_ceiling(max(b0, b1), minibatch, workers)
    return (end - frames[0]) / cost


Metric = Callable[[Sequence[torch.Tensor]], torch.Tensor]
"""Maps the per-parameter gradients (in ``model.parameters()`` order) to one flat vector."""


def euclidean(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """The gradients as they are: plain SGD's metric."""
    return torch.cat([g.reshape(-1) for g in grads]).double()


def natural_gradient_metric(model: nn.Module, preconditioners: dict) -> Metric:
    """NG-SGD's metric: for each preconditioned ``nn.Linear`` of ``model`` (``NGSGD.
    preconditioners()`` of a model with the same layer names), its gradient [dW | db] becomes

        sqrt(γ_in γ_out) (β_out G_out⁻¹)^½ [dW | db] (β_in G_in⁻¹)^½

    (γ: each side's ``expected_gamma``), other parameters stay as they are. The estimates are
    read, never updated; they must be initialised (one training step)."""
    names = [name for name, _ in model.named_parameters()]
    device = next(model.parameters()).device
    layers = {}  # index of the weight -> (index of the bias or None, in map, out map, scale)
    for name, (pre_in, pre_out) in preconditioners.items():
        if not (pre_in.ready and pre_out.ready):
            raise ValueError(f"layer {name!r}: NG-SGD estimates not initialised yet")
        bias = f"{name}.bias"
        scale = math.sqrt(pre_in.expected_gamma() * pre_out.expected_gamma())
        layers[names.index(f"{name}.weight")] = (
            names.index(bias) if bias in names else None,
            pre_in.metric_sqrt(device),  # on the device once, not per chunk
            pre_out.metric_sqrt(device),
            scale,
        )
    biases = {b for b, *_ in layers.values() if b is not None}

    def metric(grads: Sequence[torch.Tensor]) -> torch.Tensor:
        parts = []
        for i, g in enumerate(grads):
            if i in biases:
                continue
            if i not in layers:
                parts.append(g.reshape(-1).double())
                continue
            b, sqrt_in, sqrt_out, scale = layers[i]
            full = g if b is None else torch.cat([g, grads[b][:, None]], dim=1)  # O x (I+1)
            z = sqrt_out(sqrt_in(full).T).T
            parts.append(scale * z.reshape(-1))
        return torch.cat(parts)

    return metric


def warmed_natural_gradient_metric(
    model: nn.Module,
    table: FrameTable,
    context: int,
    minibatch: int,
    steps: int = NG_WARMUP,
    seed: int = 0,
) -> Metric:
    """NG-SGD's metric at ``model`` where no optimiser state was saved (a model file): Fisher
    estimates of the trainer's default ranks, warmed on ``steps`` random minibatches of
    ``table`` by NG-SGD steps of lr 0, which update the estimates and leave the weights."""
    if steps < 1:
        raise UsageError(f"noise scale: --ng-warmup must be >= 1, got {steps}")
    work = copy.deepcopy(model)
    opt = NGSGD(work, lr=0.0, max_change=0.0)
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    for _ in range(steps):
        idx = torch.randint(len(table), (minibatch,), generator=generator)
        x, y = table.minibatch(idx.to(table.feats.device), context)
        opt.zero_grad()
        F.cross_entropy(work(x.to(device)), y.to(device)).backward()
        opt.step()
    return natural_gradient_metric(model, opt.preconditioners())


def gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The gradients of the mean cross-entropy over one minibatch, per parameter."""
    loss = F.cross_entropy(model(x), y)
    return torch.autograd.grad(loss, list(model.parameters()))


def estimate_noise_scale(
    model: nn.Module,
    table: FrameTable,
    context: int,
    small_batch: int = SMALL_BATCH,
    batches: int = BATCHES,
    repeats: int = REPEATS,
    seed: int = 0,
) -> NoiseScale:
    """McCandlish's B_simple at ``model``'s parameters on ``table``'s frames: ``repeats`` times,
    ``batches`` gradients of ``small_batch`` random frames and their mean (see the module doc)."""
    metrics = {"euclidean": euclidean}
    return estimate_noise_scales(
        model, table, context, metrics, small_batch, batches, repeats, seed
    )["euclidean"]


def estimate_noise_scales(
    model: nn.Module,
    table: FrameTable,
    context: int,
    metrics: dict[str, Metric],
    small_batch: int = SMALL_BATCH,
    batches: int = BATCHES,
    repeats: int = REPEATS,
    seed: int = 0,
) -> dict[str, NoiseScale]:
    """``estimate_noise_scale`` in each of ``metrics`` at once, from the same gradients."""
    big = small_batch * batches
    if batches < 2 or small_batch < 1 or repeats < 1:
        raise UsageError("noise scale: need --batches >= 2, --small-batch >= 1, --repeats >= 1")
    if len(table) < big:
        raise UsageError(
            f"noise scale: {len(table)} frames, fewer than one big batch of {batches} x "
            f"{small_batch}"
        )
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    grad_sq = {name: [] for name in metrics}
    trace_cov = {name: [] for name in metrics}
    for _ in range(repeats):
        idx = torch.randperm(len(table), generator=generator)[:big]
        total = dict.fromkeys(metrics)
        small_sq = dict.fromkeys(metrics, 0.0)
        for chunk in idx.split(small_batch):
            x, y = table.minibatch(chunk.to(table.feats.device), context)
            grads = gradients(model, x.to(device), y.to(device))
            for name, metric in metrics.items():
                g = metric(grads)
                small_sq[name] += float(g @ g) / batches
                total[name] = g if total[name] is None else total[name] + g
        for name in metrics:
            mean = total[name] / batches
            big_sq = float(mean @ mean)
            grad_sq[name].append(
                (big * big_sq - small_batch * small_sq[name]) / (big - small_batch)
            )
            trace_cov[name].append((small_sq[name] - big_sq) / (1 / small_batch - 1 / big))
    model.train(was_training)
    return {
        name: NoiseScale(
            grad_sq=sum(grad_sq[name]) / repeats,
            trace_cov=sum(trace_cov[name]) / repeats,
            noise_scale=ratio_of_means(trace_cov[name], grad_sq[name]),
            stderr=jackknife_stderr(trace_cov[name], grad_sq[name]),
            frames=big * repeats,
        )
        for name in metrics
    }


def ratio_of_means(num: list[float], den: list[float]) -> float:
    d = sum(den)
    return sum(num) / d if d > 0 else math.inf


def jackknife_stderr(num: list[float], den: list[float]) -> float:
    """Standard error of sum(num)/sum(den) by leaving one repeat out at a time (inf if any
    leave-one-out denominator is not positive, or nan with a single repeat)."""
    n = len(num)
    if n < 2:
        return math.nan
    loo = [ratio_of_means(num[:i] + num[i + 1 :], den[:i] + den[i + 1 :]) for i in range(n)]
    if any(math.isinf(v) for v in loo):
        return math.inf
    mean = sum(loo) / n
    return math.sqrt((n - 1) / n * sum((v - mean) ** 2 for v in loo))


def report(
    name: str, est: NoiseScale, minibatch: int, workers: list[int], metric: str = "euclidean"
) -> dict:
    """The estimate and its efficiency ceilings, as one JSON-able dict."""
    ceiling = {n: efficiency_ceiling(est.noise_scale, minibatch, n) for n in workers}
    return {
        "model": name,
        "metric": metric,
        "noise_scale": est.noise_scale,
        "stderr": est.stderr,
        "grad_sq": est.grad_sq,
        "trace_cov": est.trace_cov,
        "frames": est.frames,
        "minibatch": minibatch,
        "efficiency_ceiling": ceiling,
        "workers_at_half_efficiency": workers_at_half_efficiency(est.noise_scale, minibatch),
    }


def format_report(r: dict) -> str:
    ceiling = r["efficiency_ceiling"]
    cells = " ".join(f"{n:>6}" for n in ceiling)
    effs = " ".join(f"{100 * e:5.1f}%" for e in ceiling.values())
    return "\n".join(
        [
            f"{r['model']}: gradient noise scale"
            + (" in NG-SGD's metric" if r["metric"] == "ngsgd" else "")
            + f" {r['noise_scale']:,.0f} frames "
            f"(+- {r['stderr']:,.0f}; |G|^2 {r['grad_sq']:.4g}, tr(Sigma) {r['trace_cov']:.4g}, "
            f"{r['frames']:,} frames)",
            f"  best sample efficiency of N workers x minibatch {r['minibatch']} against one:",
            f"  N          {cells}",
            f"  efficiency {effs}",
            f"  >= 50% up to N = {r['workers_at_half_efficiency']:.1f}",
        ]
    )
