"""The worker loop both drivers run on: K local steps per worker, then one averaging (paper §2).

A driver (``train`` for fine-tuning, ``pretrain`` for RBMs) owns the models and what happens
between rounds; the engine owns the part they share: the initial broadcast, every worker's frame
order, the round loop with its compute/averaging timer, and the progress display.

Example::

    engine = Engine(comm, averager, avg_every=10, minibatch=256, seed=777, buffer_frames=32768)
    engine.broadcast(model)                            # identical start everywhere
    engine.run_epoch(workers, epoch_key=1, rounds=120, after_round=lambda r: None)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from tqdm import tqdm

from modelavg.averaging import Averager
from modelavg.averaging.base import flatten, unflatten_
from modelavg.averaging.schedule import FixedK
from modelavg.comm.base import Communicator
from modelavg.data.frames import FrameTable
from modelavg.data.shards import epoch_order, minibatches


class Worker(Protocol):
    """One replica as the engine sees it."""

    worker: int  # global worker id: seeds its frame order
    module: nn.Module  # what the averager syncs
    table: FrameTable  # its shard

    def step(self, idx: torch.Tensor) -> None:
        """One local minibatch (frame indices into ``table``); no communication."""

    def take_stats(self) -> torch.Tensor:
        """Counters since the last call (float64, summable across workers), then zero them."""


@dataclass
class Engine:
    comm: Communicator
    averager: Averager
    avg_every: int
    minibatch: int
    seed: int
    buffer_frames: int
    # syncs inside a round (warm-up, two-level, adaptive K); default: one sync after K steps
    schedule: FixedK | None = None
    timer: Timer = field(init=False)
    # averagings so far, over all workers and inside groups: what a time model prices
    syncs: dict[str, int] = field(default_factory=lambda: {"syncs": 0, "group_syncs": 0})

    def __post_init__(self) -> None:
        self.timer = Timer(self.comm.device)
        if self.schedule is None:
            self.schedule = FixedK(self.averager, self.avg_every)

    @property
    def frames_per_round(self) -> int:
        """Frames all workers together consume in one averaging round."""
        return self.avg_every * self.minibatch * self.comm.num_workers

    @torch.no_grad()
    def broadcast(self, module: nn.Module) -> None:
        """Overwrite ``module``'s parameters with process 0's: replicas start equal even where
        random number generators differ across machines."""
        flat = flatten(module)
        self.comm.broadcast_(flat)
        unflatten_(flat, module)

    def batches(self, worker: Worker, epoch_key: int, start_round: int) -> Iterator[torch.Tensor]:
        """The worker's minibatches of frame indices for one epoch, from ``start_round`` on."""
        order = epoch_order(
            worker.table.lengths, self.seed, epoch_key, worker.worker, self.buffer_frames
        )
        # one host-to-device copy per epoch: a copy per minibatch would wait for the GPU each time
        order = torch.from_numpy(order).to(worker.table.feats.device)
        yield from minibatches(order, self.minibatch, skip=start_round * self.avg_every)

    def run_epoch(
        self,
        workers: list[Worker],
        epoch_key: int,
        rounds: int,
        start_round: int = 0,
        after_round: Callable[[int], None] = lambda round_: None,
        before_sync: Callable[[int], None] = lambda round_: None,
    ) -> None:
        """Rounds ``start_round + 1 .. rounds`` of: K local steps on every worker, one averaging,
        then ``after_round(round_)`` (logging, validation, checkpoints: the driver's business).
        ``before_sync(round_)`` sees the replicas as local training left them before the round's
        last sync. The schedule may sync inside a round too; it sees round
        ``(epoch_key - 1) * rounds + round_`` (the round's index in training for a 1-based
        epoch). The epoch ends with the replicas equal (``Averager.settle``)."""
        streams = [self.batches(w, epoch_key, start_round) for w in workers]
        modules = [w.module for w in workers]
        for round_ in range(start_round + 1, rounds + 1):
            segments = self.schedule.segments((epoch_key - 1) * rounds + round_)
            for i, (steps, averager) in enumerate(segments, 1):
                with self.timer("compute"):
                    for w, stream in zip(workers, streams, strict=True):
                        for _ in range(steps):
                            w.step(next(stream))
                if i == len(segments):
                    before_sync(round_)
                with self.timer("averaging"):
                    averager.sync(modules)
                    whole = averager.comm.num_workers == self.comm.num_workers
                    self.syncs["syncs" if whole else "group_syncs"] += 1
                    if round_ == rounds and i == len(segments):
                        self.averager.settle(modules)
            after_round(round_)

    def reduce_stats(self, workers: list[Worker]) -> torch.Tensor:
        """Every worker's counters since the last call, summed over all workers (collective)."""
        return self.comm.sum_stats([w.take_stats() for w in workers])


class Timer:
    """Wall-clock seconds per phase since ``reset``; synchronises the GPU's current stream so the
    split is honest (only that stream: an allreduce started on NCCL's runs on)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.seconds = {"compute": 0.0, "averaging": 0.0}
        self._phase = ""
        self._started = time.perf_counter()

    def __call__(self, phase: str) -> Timer:
        self._phase = phase
        return self

    def __enter__(self) -> None:
        self._t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        self.seconds[self._phase] += time.perf_counter() - self._t0

    def totals(self) -> dict[str, float]:
        total = sum(self.seconds.values())
        return {
            "compute_s": self.seconds["compute"],
            "averaging_s": self.seconds["averaging"],
            "averaging_share": self.seconds["averaging"] / total if total else 0.0,
            # wall time since reset: compute, averaging and everything between (logs, checks)
            "train_s": time.perf_counter() - self._started,
        }


class Progress:
    """A tqdm bar on a terminal; elsewhere (logs, CI, nohup) one plain line per ``note``.

    ``update`` counts rounds; ``note`` attaches the latest statistics (called once per log
    interval), which a plain-text log prints as a line instead of redrawing a bar.
    """

    def __init__(
        self, total: int, frames_per_round: int, enabled: bool, initial: int = 0, desc: str = ""
    ) -> None:
        self.enabled = enabled
        self.interactive = enabled and sys.stderr.isatty()
        self.total, self.done, self.desc = total, initial, desc
        self.frames_per_round = frames_per_round
        self.bar = (
            tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit="fr",
                unit_scale=frames_per_round,
                leave=False,
                dynamic_ncols=True,
            )
            if self.interactive
            else None
        )

    def describe(self, desc: str) -> None:
        self.desc = desc
        if self.bar is not None:
            self.bar.set_description(desc)

    def update(self, rounds: int = 1) -> None:
        self.done += rounds
        if self.bar is not None:
            self.bar.update(rounds)

    def note(self, **stats: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**stats)
        elif self.enabled:
            values = " ".join(f"{k}={v}" for k, v in stats.items())
            print(
                f"{self.desc}: {self.done}/{self.total} rounds "
                f"({self.done * self.frames_per_round:,} frames) {values}",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
