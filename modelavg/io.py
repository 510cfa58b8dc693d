"""Files a run writes: atomically replaced outputs, append-only JSONL logs, the --out check.

Every output is written to a temporary name in its directory, fsynced and renamed, so a kill at
any moment leaves the old file or the new one, never a torn one.

Example::

    atomic_save({"x": 1}, "exp/run/thing.pt")
    log = JsonlLog("exp/run/metrics.jsonl", active=comm.is_main)
    log.write({"kind": "epoch", "epoch": 1})
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, BinaryIO

import torch

from modelavg.errors import UsageError

CONFIG = "config.yaml"
_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
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
    atomic_write(path, lambda fh: fh.write(data))


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save, atomically."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> Path:
    """A matplotlib figure as PNG, atomically; the figure is closed."""
    from matplotlib import pyplot as plt

    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=dpi))
    plt.close(fig)
    return Path(path)


def write_config(cfg: Any, out: str | os.PathLike) -> None:
    """``out/config.yaml``: every option of the run, so ``--resume`` can reuse them."""
    import yaml

    atomic_write_bytes(yaml.safe_dump(asdict(cfg), sort_keys=False).encode(), Path(out) / CONFIG)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL file (blank lines skipped)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class JsonlLog:
    """An append-only JSONL log written by one process (``active``); each record gets a time.

    ``size``/``truncate`` let a resumed run cut the log back to where its checkpoint was taken.
    """

    def __init__(self, path: str | os.PathLike, active: bool) -> None:
        self.path, self.active = Path(path), active

    def write(self, record: dict) -> None:
        if self.active:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as fh:
                fh.write(json.dumps({"time": time.time(), **record}) + "\n")

    def size(self) -> int:
        return self.path.stat().st_size if self.active and self.path.exists() else 0

    def truncate(self, size: int) -> None:
        if self.active and self.path.exists():
            with self.path.open("r+") as fh:
                fh.truncate(size)


def check_out_dir(out: str | None, has_run: bool, resume: bool) -> None:
    """Refuse a missing, unwritable or already used --out before any work starts.

    ``has_run``: the directory holds a run (a committed checkpoint).
    """
    if out is None:
        raise UsageError("--out is required")
    path = Path(out)
    if resume and not has_run:
        raise UsageError(f"--resume: no checkpoint in {path / 'checkpoints'}")
    if not resume and has_run:
        raise UsageError(f"--out {path} already holds a run: pass --resume or choose another")
    parent = path if path.exists() else next(p for p in path.absolute().parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"--out {path}: not a writable directory")
