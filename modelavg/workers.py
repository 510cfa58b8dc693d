"""The engine's workers: one replica each, with its shard and its local optimiser.

``DNNWorker`` does one SGD/NG-SGD minibatch of fine-tuning per step, ``RBMWorker`` one CD-1
update of the RBM being pretrained. Neither communicates: the engine averages their modules.

Example::

    w = DNNWorker(0, model, optimizer, train_table, cv_table, context=5, stats=zeros(3))
    w.step(torch.tensor([0, 5, 9]))         # frame indices into w.table
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from modelavg.data.frames import FrameTable
from modelavg.errors import UsageError
from modelavg.nets.dnn import DNN
from modelavg.nets.rbm import RBM, CD1Trainer
from modelavg.precision import autocast, set_matmul_precision
from modelavg.pretrain_log import Window


@dataclass
class DNNWorker:
    """One worker's model, optimiser and shards; the engine's ``Worker``."""

    worker: int
    module: DNN
    optimizer: torch.optim.Optimizer
    table: FrameTable
    cv: FrameTable
    context: int
    stats: torch.Tensor | None = None  # [summed loss, correct, frames] (zeros on the device)
    precision: str = "fp32"  # --precision: bf16 autocasts forward and loss

    def __post_init__(self) -> None:
        set_matmul_precision(self.precision, self.table.feats.device)  # the same for every worker
        if self.stats is None:
            self.stats = torch.zeros(3, dtype=torch.float64, device=self.table.feats.device)

    def step(self, idx: torch.Tensor) -> None:
        """One minibatch of local SGD (or NG-SGD): no communication."""
        x, y = self.table.minibatch(idx, self.context)
        with autocast(self.precision, x.device):
            logits = self.module(x)
            loss = F.cross_entropy(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():  # [summed loss, correct, frames], on the device: no host sync
            self.stats[0] += loss.double() * len(y)
            self.stats[1] += (logits.argmax(1) == y).sum()
            self.stats[2] += len(y)

    def take_stats(self) -> torch.Tensor:
        stats = self.stats.clone()
        self.stats.zero_()
        return stats


@dataclass
class RBMWorker:
    """One worker's replica of the RBM being trained; the engine's ``Worker``."""

    worker: int
    module: RBM
    trainer: CD1Trainer
    table: FrameTable
    # frame indices -> this layer's input (splice, normalise, up through the finished layers)
    layer_input: Callable[[FrameTable, torch.Tensor], torch.Tensor]
    other_frames: int  # frames the other workers consume per minibatch: the ramp counts them too
    window: Window = field(default_factory=Window)

    def step(self, idx: torch.Tensor) -> None:
        """One CD-1 update; its numbers stay on the device until ``take_stats``: no host read."""
        v = self.layer_input(self.table, idx)
        result = self.trainer.step(v)
        self.trainer.frames_seen += self.other_frames
        self.window.add(result, len(v))

    def take_stats(self) -> torch.Tensor:
        """The window's sums, once per log line. A NaN/Inf in a CD-1 step since (Kaldi aborts)
        makes the error's sum NaN/Inf: it ends the run here, with this worker's one host read."""
        stats = self.window.tensor(self.table.feats.device)
        self.window = Window()
        if not torch.isfinite(stats[0]).item():
            raise UsageError(
                f"worker {self.worker}: the RBM diverged (NaN/Inf in CD-1); keep --lr-scaling "
                "none or use fewer workers"
            )
        return stats
