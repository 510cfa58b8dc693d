"""Atomic checkpoints: everything a resume needs, never half-written.

Layout under ``OUT/checkpoints/``::

    e003-r0000/shared.pt        global model, schedule, averager, metrics position (main process)
    e003-r0000/worker-0001.pt   one per worker: optimiser (momentum, NG-SGD state), RNG states
    LATEST                      name of the newest complete checkpoint, replaced atomically

Each file is written to a temporary name, fsynced and renamed; ``LATEST`` moves only after every
process has finished its files, so a kill at any moment leaves the previous checkpoint usable.

Example::

    atomic_save({"x": 1}, "out/thing.pt")
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from modelavg.errors import UsageError

LATEST = "LATEST"
_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write through ``write`` to a temporary file in the same directory, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs should be as readable as usual
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    _atomic_write(path, lambda fh: fh.write(data))


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save, atomically."""
    _atomic_write(path, lambda fh: torch.save(obj, fh))


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
