"""Frame-level evaluation: cross-entropy and frame accuracy, summable across workers.

Example::

    stats = frame_stats(model, table, context=5)   # tensor [loss_sum, correct, frames]
    summary(stats)                                 # {"cross_entropy": ..., "frame_accuracy": ...}
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modelavg.data.frames import FrameTable


@torch.no_grad()
def frame_stats(model: nn.Module, table: FrameTable, context: int, batch: int = 8192) -> torch.Tensor:
    """[sum of per-frame cross-entropy, correct frames, frames] in float64 (exact when summed)."""
    device = next(model.parameters()).device
    stats = torch.zeros(3, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    for lo in range(0, len(table), batch):
        idx = torch.arange(lo, min(lo + batch, len(table)), device=table.feats.device)
        x, y = table.minibatch(idx, context)
        logits = model(x.to(device))
        y = y.to(device)
        stats[0] += F.cross_entropy(logits, y, reduction="sum").double()
        stats[1] += (logits.argmax(1) == y).sum()
        stats[2] += len(y)
    model.train(was_training)
    return stats


def summary(stats: torch.Tensor) -> dict[str, float]:
    loss_sum, correct, frames = (float(v) for v in stats)
    frames_ = max(frames, 1.0)
    return {
        "cross_entropy": loss_sum / frames_,
        "frame_accuracy": correct / frames_,
        "frames": int(frames),
    }
