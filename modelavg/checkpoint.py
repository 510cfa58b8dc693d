"""Atomic checkpoints: everything a resume needs, never half-written.

Layout under ``OUT/checkpoints/`` (pretraining names add the layer: ``l02-e001-r00000``)::

    e003-r00000/shared.pt       global model, schedule, averager, log position (main process)
    e003-r00000/worker-0001.pt  one per worker: optimiser (momentum, NG-SGD state), RNG states
    LATEST                      name of the newest complete checkpoint, replaced atomically

Each file is written to a temporary name, fsynced and renamed; ``LATEST`` moves only after every
process has finished its files, so a kill at any moment leaves the previous checkpoint usable.

Example::

    save(comm, root, checkpoint_name(2, 0), shared, workers, keep=2)   # every process
    shared, workers = restore(root, comm.worker_ids, comm.device)
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from modelavg.comm.base import Communicator
from modelavg.errors import UsageError
from modelavg.io import atomic_save, atomic_write_bytes

LATEST = "LATEST"


def checkpoint_name(epoch: int, round_: int, layer: int | None = None) -> str:
    """Checkpoint taken before ``round_`` of ``epoch`` (round 0 of epoch e+1 = end of epoch e),
    of ``layer`` when pretraining; names sort in training order."""
    name = f"e{epoch:03d}-r{round_:05d}"
    return name if layer is None else f"l{layer:02d}-{name}"


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


def commit(root: Path, name: str, keep: int = 0) -> None:
    """Point LATEST at ``name`` (main process, after every process has saved); then delete all
    but the newest ``keep`` checkpoints (0: keep all), never the one LATEST names."""
    atomic_write_bytes(name.encode(), root / LATEST)
    if keep:
        done = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        for old in done[:-keep]:
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)


def save(comm: Communicator, root: Path, name: str, shared: dict | None, workers: dict, keep: int):
    """Every process writes its part; once all have, the main process commits (collective).

    ``shared`` is used on the main process only; ``workers``: this process's workers' states.
    """
    save_files(root, name, shared if comm.is_main else None, workers)
    comm.barrier()
    if comm.is_main:
        commit(root, name, keep)
    comm.barrier()


def restore(root: Path, comm: Communicator, resize: bool = False) -> tuple[dict, dict]:
    """The newest complete checkpoint under ``root``: shared state and this process's workers'
    states. A checkpoint of another number of workers is refused, or with ``resize`` returned
    without worker states (the caller starts its workers afresh from the shared state)."""
    ckpt_dir = latest(root)
    if ckpt_dir is None:
        raise UsageError(f"--resume: no checkpoint in {root}")
    shared = load(ckpt_dir / "shared.pt", comm.device)
    if shared["workers"] != comm.num_workers:
        if resize:
            return shared, {}
        raise UsageError(
            f"{ckpt_dir}: written by {shared['workers']} workers, this job has "
            f"{comm.num_workers}: resume with --workers {shared['workers']}"
        )
    return shared, {w: load(worker_file(ckpt_dir, w), comm.device) for w in comm.worker_ids}


def load_module(module: torch.nn.Module, state: dict, where: Path) -> None:
    """``module.load_state_dict(state)``; a checkpoint of other model options (--hidden-dim,
    --context, ...) is a one-line error naming the checkpoint and the first mismatch."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines()[1:] if line.strip()] or [str(e)]
        size = re.search(r"for (\S+): .*?Size\((\[.*?\])\).*?Size\((\[.*?\])\)", lines[0])
        detail = f"{size[1]} is {size[2]} there, {size[3]} here" if size else lines[0].rstrip(". ")
        raise UsageError(
            f"{where}: does not fit this run's model ({detail}); resume with the model options "
            "the run was started with"
        ) from None


def set_rng_state(state: torch.Tensor) -> None:
    """Restore the CPU generator from a checkpoint (loaded with map_location, it may sit on a
    GPU, where ``torch.set_rng_state`` refuses it)."""
    torch.set_rng_state(state.cpu())


def latest(root: Path) -> Path | None:
    pointer = root / LATEST
    if not pointer.exists():
        return None
    ckpt_dir = root / pointer.read_text().strip()
    return ckpt_dir if (ckpt_dir / "shared.pt").exists() else None


def load(path: Path, device: torch.device) -> dict:
    """One checkpoint file, onto ``device``; a missing or unreadable one is a one-line error."""
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except FileNotFoundError:
        raise UsageError(f"{path}: missing from the checkpoint") from None
    except Exception as exc:
        raise UsageError(f"{path}: unreadable checkpoint ({type(exc).__name__})") from None
