"""A run's log: metrics.jsonl (or pretrain.jsonl) for tools, mirrored to TensorBoard scalars for
people (``--tensorboard``, on by default when the tensorboard package is installed).

The main process writes both. Each record's numbers become scalars named ``<kind>/<field>`` (for
example ``round/train_cross_entropy``, ``epoch/cv_frame_accuracy``, ``round/spread_max``), at
the step ``frames``: frames trained by all workers so far (in pretraining: into the layer, with
the layer in the name), so runs with different N or K line up on one axis.

Example::

    log = RunLog(Path("exp/x") / "metrics.jsonl", active=comm.is_main, tensorboard=True)
    log.write({"kind": "round", "frames": 51200, "train_cross_entropy": 2.31})
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any

from modelavg.errors import UsageError
from modelavg.io import JsonlLog

TENSORBOARD_DIR = "tensorboard"
SKIP = {"time", "kind", "epoch", "round", "layer", "frames", "accepted"}


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


class RunLog(JsonlLog):
    def __init__(self, path: str | os.PathLike, active: bool, tensorboard: bool | None) -> None:
        super().__init__(path, active)
        if tensorboard and not tensorboard_available():
            raise UsageError("--tensorboard: the tensorboard package is not installed")
        self.mirror = active and (tensorboard or (tensorboard is None and tensorboard_available()))
        self.writer = None  # made at the first record, so a run refused at start leaves no files

    def write(self, record: dict[str, Any]) -> None:
        super().write(record)
        if not self.mirror or "frames" not in record:
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(self.path).parent / TENSORBOARD_DIR))
        prefix = record["kind"] + (f"/layer{record['layer']}" if "layer" in record else "")
        for key, value in record.items():
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if key not in SKIP and number and math.isfinite(value):
                self.writer.add_scalar(f"{prefix}/{key}", value, record["frames"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def prefixed(prefix: str, stats: dict) -> dict:
    """``{"loss": x}`` -> ``{"cv_loss": x}``: one record holds train and CV statistics."""
    return {f"{prefix}_{k}": v for k, v in stats.items()}
