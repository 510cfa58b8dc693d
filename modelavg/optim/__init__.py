"""Local optimisers: torch SGD (with optional momentum), Kaldi-style natural-gradient SGD, and
torch Adam/AdamW (DiLoCo's inner optimiser)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modelavg.optim.fisher import OnlineNaturalGradient
from modelavg.optim.ngsgd import NGSGD

__all__ = ["NGSGD", "OPTIMIZERS", "OnlineNaturalGradient", "build_optimizer", "set_lr"]


def _sgd(model: nn.Module, cfg: Any, workers: int) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)


def _ngsgd(model: nn.Module, cfg: Any, workers: int) -> torch.optim.Optimizer:
    return NGSGD(
        model,
        lr=cfg.lr,
        rank_in=cfg.ng_rank_in,
        rank_out=cfg.ng_rank_out,
        update_period=cfg.ng_update_period,
        num_samples_history=cfg.ng_samples_history,
        alpha=cfg.ng_alpha,
        max_change=cfg.max_change * (workers if cfg.max_change_scaling == "linear" else 1),
        momentum=cfg.momentum,
        variant=cfg.ng_variant,
    )


def _adam(model: nn.Module, cfg: Any, workers: int) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay or 0.0)


def _adamw(model: nn.Module, cfg: Any, workers: int) -> torch.optim.Optimizer:
    decay = 0.01 if cfg.weight_decay is None else cfg.weight_decay  # torch's default
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=decay)


# --optimizer: its choices come from here
OPTIMIZERS = {"sgd": _sgd, "ngsgd": _ngsgd, "adam": _adam, "adamw": _adamw}


def build_optimizer(model: nn.Module, cfg: Any, workers: int) -> torch.optim.Optimizer:
    """The optimiser named by ``cfg.optimizer`` for one of ``workers`` replicas; the trainer
    sets the lr every epoch."""
    return OPTIMIZERS[cfg.optimizer](model, cfg, workers)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
