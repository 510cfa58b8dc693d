"""What pretraining reports: pretrain.jsonl (one line per log interval and per layer), the console
lines, and pretrain.png (reconstruction error per layer). Written by the main process only.

A resumed run cuts the log back to its checkpoint and re-reads it, so the plot and the per-layer
summaries continue as if the run had never stopped.

Example::

    log = PretrainLog(Path("exp/dbn"), active=comm.is_main, plans=plans)
    log.layer_start(plans[0]); log.write({"kind": "round", "layer": 1, ...}); log.plot()
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from modelavg.comm.base import Communicator
from modelavg.config import PretrainConfig
from modelavg.io import atomic_write_bytes, read_jsonl, save_figure, write_config
from modelavg.nets.dbn import LayerPlan
from modelavg.nets.rbm import StepResult
from modelavg.runlog import RunLog

DBN_FILE = "dbn.pt"
LOG_FILE = "pretrain.jsonl"
PLOT_FILE = "pretrain.png"


@dataclass
class Window:
    """Per-worker sums since the last log line: summable across workers with one sum_stats.
    What a step leaves on the device (error, guard firings, lr) is summed there: 0-dim tensors
    (plain numbers before the first step), read once per log line."""

    error: float | torch.Tensor = 0.0  # sum over frames of the squared reconstruction error
    frames: int = 0
    guard_firings: int | torch.Tensor = 0
    lr: float | torch.Tensor = 0.0  # sums over steps, for the mean
    momentum: float = 0.0
    steps: int = 0

    def add(self, result: StepResult, frames: int) -> None:
        self.error = self.error + result.reconstruction_error.double() * frames  # float64 sums
        self.frames += frames
        self.guard_firings = self.guard_firings + result.guard_fired
        self.lr = self.lr + result.lr
        self.momentum += result.momentum
        self.steps += 1

    def tensor(self, device: torch.device) -> torch.Tensor:
        values = [self.error, self.frames, self.guard_firings, self.lr, self.momentum, self.steps]
        return torch.stack([torch.as_tensor(x, dtype=torch.float64, device=device) for x in values])


class PretrainLog(RunLog):
    def __init__(
        self, out: Path, active: bool, plans: list[LayerPlan], tensorboard: bool | None
    ) -> None:
        super().__init__(out / LOG_FILE, active, tensorboard)
        self.out, self.plans = out, plans
        self.curves: dict[int, list[tuple[int, float]]] = {}  # layer -> (frames, error)
        self._layer_guards = 0

    def label(self, layer: int) -> str:
        p = self.plans[layer - 1]
        return f"layer {layer} ({p.visible_type} {p.visible_dim}x{p.hidden_dim})"

    def start(
        self,
        cfg: PretrainConfig,
        comm: Communicator,
        rounds: int,
        shard_frames: list[int],
        skipped_long: int,
        input_dim: int,
        lr_scale: float,
    ) -> None:
        record = {
            "kind": "start",
            "time": time.time(),
            "workers": comm.num_workers,
            "processes": comm.num_processes,
            "rounds_per_epoch": rounds,
            "shard_frames": shard_frames,
            "skipped_long_utts": skipped_long,
            "input_dim": input_dim,
            "lr_scale": lr_scale,
            "plan": [asdict(p) for p in self.plans],
            "config": asdict(cfg),
        }
        if not self.active:
            return
        atomic_write_bytes((json.dumps(record) + "\n").encode(), self.path)  # a fresh file
        write_config(cfg, self.out)
        skipped = (
            f"; {skipped_long} utterances over --max-utt-frames skipped" if skipped_long else ""
        )
        print(
            f"{comm.num_workers} workers, {rounds} averaging rounds of {cfg.avg_every} "
            f"x {cfg.minibatch} frames per epoch; shards {min(shard_frames)}-"
            f"{max(shard_frames)} frames; input {input_dim}, "
            f"{len(self.plans)} x {cfg.hidden_dim} RBMs, lr x {lr_scale}{skipped}",
            flush=True,
        )

    def write(self, record: dict[str, Any]) -> None:
        if record.get("kind") == "round":
            curve = self.curves.setdefault(record["layer"], [])
            curve.append((record["frames"], record["reconstruction_error"]))
            self._layer_guards += record["guard_firings"]
        super().write(record)

    def resume(self, size: int) -> None:
        """Cut the log back to ``size`` bytes (the checkpoint's) and re-read what it holds."""
        self.truncate(size)
        if not (self.active and self.path.exists()):
            return
        for record in read_jsonl(self.path):
            if record["kind"] == "round":
                curve = self.curves.setdefault(record["layer"], [])
                curve.append((record["frames"], record["reconstruction_error"]))
        last = max(self.curves, default=None)
        self._layer_guards = sum(
            r["guard_firings"]
            for r in read_jsonl(self.path)
            if r["kind"] == "round" and r["layer"] == last
        )

    def layer_start(self, plan: LayerPlan) -> None:
        self._layer_guards = 0

    def layer_end(self, plan: LayerPlan, totals: dict[str, float]) -> None:
        curve = self.curves.get(plan.index + 1, [])
        first, last = (curve[0][1], curve[-1][1]) if curve else (float("nan"),) * 2
        self.write(
            {
                "kind": "layer",
                "layer": plan.index + 1,
                "visible_type": plan.visible_type,
                "epochs": plan.epochs,
                "frames": curve[-1][0] if curve else 0,
                "first_reconstruction_error": first,
                "reconstruction_error": last,
                "guard_firings": self._layer_guards,
                **totals,
            }
        )
        if self.active:
            seconds = totals["compute_s"] + totals["averaging_s"]
            print(
                f"{self.label(plan.index + 1)}: reconstruction error {first:.4g} -> {last:.4g}, "
                f"{plan.epochs} epoch(s), {self._layer_guards} guard firings, {seconds:.1f} s, "
                f"averaging {100 * totals['averaging_share']:.1f}%",
                flush=True,
            )

    def plot(self) -> None:
        """Reconstruction error per layer against frames into that layer (log scale)."""
        if not self.active:
            return
        from matplotlib import pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for layer, curve in sorted(self.curves.items()):
            frames, errors = zip(*curve, strict=True)
            ax.plot(frames, errors, marker=".", label=self.label(layer))
        ax.set_xlabel("frames into the layer (all workers)")
        ax.set_ylabel("CD-1 reconstruction error per frame")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        save_figure(fig, self.out / PLOT_FILE, dpi=100)
