"""Atomic checkpoints: everything a resume needs, never half-written.

Layout under ``OUT/checkpoints/``::

    e003-r0000/shared.pt        global model, schedule, averager, metrics position (main process)
    e003-r0000/worker-0001.pt   one per worker: optimiser (momentum, NG-SGD state), RNG states
    LATEST                      name of the newest complete checkpoint, replaced atomically

Each file is written to a temporary name, fsynced and renamed; ``LATEST`` moves only after every
process has finished its files, so a kill at any moment leaves the previous checkpoint usable.

Example::

    save_files(root, checkpoint_name(2, 0), shared, workers)   # every process, its own files
    commit(root, checkpoint_name(2, 0))                          # main process, after a barrier
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from modelavg.errors import UsageError
from modelavg.io import atomic_save, atomic_write_bytes

LATEST = "LATEST"


def checkpoint_name(epoch: int, round_: int) -> str:
    """Checkpoint taken before ``round_`` of ``epoch`` (round 0 of epoch e+1 = end of epoch e)."""
    return f"e{epoch:03d}-r{round_:05d}"


def worker_file(ckpt_dir: Path, worker: int) -> Path:
    return ckpt_dir / f"worker-{worker:04d}.pt"


def save_files(root: Path, name: str, shared: dict | None, workers: dict[int, dict]) -> Path:
    """Write this process's part of checkpoint ``name`` (shared is given by the main process)."""
    ckpt_dir = root / name
    if shared is not None:
        atomic_save(shared, ckpt_dir / "shared.pt")
    for worker, state in workers.items():
        atomic_save(state, worker_file(ckpt_dir, worker))
    return ckpt_dir


def commit(root: Path, name: str, keep: int | None = None) -> None:
    """Point LATEST at ``name`` (main process, after every process has saved); prune old ones."""
    atomic_write_bytes(name.encode(), root / LATEST)
    if keep:
        done = sorted(p for p in root.iterdir() if p.is_dir() and p.name[0] == "e")
        for old in done[:-keep]:
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)


def latest(root: Path) -> Path | None:
    pointer = root / LATEST
    if not pointer.exists():
        return None
    ckpt_dir = root / pointer.read_text().strip()
    return ckpt_dir if (ckpt_dir / "shared.pt").exists() else None


def load_files(ckpt_dir: Path, workers: list[int], device: torch.device) -> tuple[dict, dict]:
    """The shared state and this process's workers' states of a checkpoint."""

    def load(path: Path) -> dict:
        try:
            return torch.load(path, map_location=device, weights_only=False)
        except FileNotFoundError:
            raise UsageError(
                f"{path}: missing; was the checkpoint written with a different number of workers?"
            ) from None
        except Exception as exc:
            raise UsageError(f"{path}: unreadable checkpoint ({type(exc).__name__})") from None

    return load(ckpt_dir / "shared.pt"), {w: load(worker_file(ckpt_dir, w)) for w in workers}
