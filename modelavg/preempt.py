"""Preemption and timed checkpoints: when every worker stops or checkpoints together.

A scheduler about to preempt a job sends SIGTERM (Slurm: ``scancel --signal=TERM``, or
``sbatch --signal=TERM@120`` before the time limit; torchrun forwards its own SIGTERM) or
SIGUSR1. The handler only raises a flag: the process finishes its round. Signals reach the
processes at different moments, and ``--checkpoint-interval`` is a wall clock each process reads
differently, so after every round one small collective makes the decision common: stop if any
process was signalled, checkpoint if rank 0's clock says one is due. Then every worker writes
its part of one checkpoint and the job exits with ``Preempted``'s code (75).

Example::

    with Control(comm, every=0, interval_s=600) as control:
        ...a round...
        control.after_round(round_, rounds, save_checkpoint)  # may raise Preempted
"""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch

from modelavg.comm.base import Communicator
from modelavg.errors import Preempted, Reported, UsageError

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
UNITS = {"s": 1, "m": 60, "h": 3600}


def interval_seconds(value: Any) -> float:
    """--checkpoint-interval: ``600s``, ``10m``, ``1h`` or plain seconds; 0 turns it off."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([smh]?)\s*", str(value))
    if m is None:
        raise UsageError(f"--checkpoint-interval {value}: give seconds (600s), minutes or hours")
    return float(m.group(1)) * UNITS[m.group(2) or "s"]


class Control:
    """Signal handlers for SIGTERM/SIGUSR1 while the context is open, and the per-round poll."""

    def __init__(self, comm: Communicator, every: int = 0, interval_s: float = 0.0) -> None:
        self.comm, self.every, self.interval_s = comm, every, interval_s
        self.signal: int | None = None
        self.last = time.monotonic()
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> Control:
        if threading.current_thread() is threading.main_thread():  # where Python runs handlers
            self.previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
            for s in SIGNALS:  # a blocking call in gloo or MPI resumes instead of failing (EINTR)
                signal.siginterrupt(s, False)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal = signum

    def checkpointed(self) -> None:
        """A checkpoint was just written: the interval starts again."""
        self.last = time.monotonic()

    def poll(self, flag: torch.Tensor | None = None) -> tuple[bool, bool, bool]:
        """(stop, checkpoint due, ``flag`` set), equal on every process: one tiny allreduce per
        call when the job has several processes, none otherwise. ``flag`` (a 0-dim device
        tensor, the same on every process) rides along, so the round reads the device once."""
        elapsed = time.monotonic() - self.last
        due = self.comm.is_main and 0 < self.interval_s <= elapsed
        if self.comm.num_processes == 1:  # nothing to agree on: no device round trip (a GPU wait)
            return self.signal is not None, due, flag is not None and bool(flag)
        flags = torch.tensor(
            [float(self.signal is not None), float(due), 0.0],
            dtype=torch.float64,
            device=self.comm.device,
        )
        if flag is not None:
            flags[2] = flag
        others = [torch.zeros_like(flags)] * (self.comm.local_workers - 1)
        stop, due, flagged = (bool(x) for x in self.comm.sum_stats([flags, *others]).tolist())
        return stop, due, flagged

    def after_round(
        self,
        round_: int,
        rounds: int,
        save: Callable[[int], str],
        polled: tuple[bool, bool, bool] | None = None,
    ) -> None:
        """Checkpoint (``save(round_)``, which returns the name) every ``every`` rounds, when the
        interval is due, or when a process was signalled, then stop if it was. Apart from a
        stop, the epoch's last round is left to the checkpoint at the epoch's end. ``polled``:
        this round's ``poll()``, when the caller made it already."""
        stop, due, _ = polled or self.poll()
        periodic = self.every and round_ % self.every == 0
        if stop or ((periodic or due) and round_ < rounds):
            name = save(round_)
        if stop:
            self.stop(name)

    def after_epoch(self, checkpoint: str) -> None:
        """Right after the epoch's checkpoint: stop if a signal came during the epoch's end
        (validation can take a while)."""
        if self.poll()[0]:
            self.stop(checkpoint)

    def stop(self, checkpoint: str) -> None:
        """End this process after the preemption checkpoint: the main process says so in one
        line, the others exit with the same code silently."""
        if not self.comm.is_main:
            raise Reported(Preempted.exit_code)
        why = signal.Signals(self.signal).name if self.signal else "a signal to another worker"
        raise Preempted(f"preempted ({why}): wrote checkpoint {checkpoint}; continue with --resume")
