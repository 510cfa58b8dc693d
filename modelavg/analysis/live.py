"""Analyses a training run logs beside every validation, without changing the training.

With ``--noise-scale``: the gradient noise scale of worker 0's model on its shard, and with
NG-SGD, once its Fisher estimates exist, the same in NG-SGD's own metric (``noise_scale_ng``).
The estimate draws its own random frames and runs on a hook-free copy of the model, so the
trained model is bitwise the same with or without it.

Example::

    fields = noise_fields(model, optimizer, table, context=5, seed=777)  # {"noise_scale": ...}
"""

from __future__ import annotations

import torch

from modelavg.analysis.noise import (
    NOISE_FRAMES,
    estimate_noise_scales,
    euclidean,
    natural_gradient_metric,
)
from modelavg.data.frames import FrameTable
from modelavg.errors import UsageError
from modelavg.nets.dnn import DNN


def noise_scale_check(shard_frames: int) -> None:
    """Refuse ``--noise-scale`` on shards too small for one estimate, before training starts."""
    if shard_frames < NOISE_FRAMES:
        raise UsageError(
            f"--noise-scale: a worker's shard holds {shard_frames} frames, fewer than "
            f"the {NOISE_FRAMES} one estimate draws"
        )


def noise_fields(
    model: DNN, optimizer: torch.optim.Optimizer, table: FrameTable, context: int, seed: int
) -> dict[str, float]:
    """``noise_scale``/``noise_stderr`` (and ``_ng`` in NG-SGD's metric, when it has one)."""
    copy = DNN(model.spec).to(next(model.parameters()).device)  # without the optimiser's hooks
    copy.load_state_dict(model.state_dict())
    metrics = {"": euclidean}
    if getattr(optimizer, "estimates_ready", False):
        metrics["_ng"] = natural_gradient_metric(copy, optimizer.preconditioners())
    fields: dict[str, float] = {}
    for suffix, est in estimate_noise_scales(copy, table, context, metrics, seed=seed).items():
        fields |= {f"noise_scale{suffix}": est.noise_scale, f"noise_stderr{suffix}": est.stderr}
    return fields
