"""The averaging interface: what the replicas become at a synchronisation point.

The worker loop decides *when* (every K local minibatches); an ``Averager`` decides *what*. Plain
model averaging replaces every replica by the mean; block-momentum variants filter the mean update
through state of their own, which they save and restore with checkpoints.

Example::

    averager = ModelAverager(comm)
    averager.start(models)          # once, and again after a rollback
    ...local steps...
    averager.sync(models)           # every replica now holds the new global model
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

from modelavg.comm.base import Communicator


def share_flat_storage_(model: nn.Module) -> torch.Tensor:
    """Make every parameter a view into one contiguous buffer and return it.

    Averaging then reduces that buffer in place: no copy into a flat buffer and back each round.
    Optimisers keep working, since they update the same Parameter objects in place.
    """
    params = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for p in params:
        p.data = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    model._flat_parameters = flat
    return flat


def flatten(model: nn.Module) -> torch.Tensor:
    """All parameters of ``model`` in one contiguous buffer (one allreduce, not one per tensor).

    The model's own shared buffer when it has one (``share_flat_storage_``), else a new copy.
    """
    flat = getattr(model, "_flat_parameters", None)
    first = next(model.parameters())
    if flat is not None and first.data_ptr() == flat.data_ptr():
        return flat
    return parameters_to_vector(model.parameters())


def unflatten_(flat: torch.Tensor, model: nn.Module) -> None:
    """Copy ``flat`` into the parameters (a copy: torch's vector_to_parameters would make the
    parameters views of ``flat``, so replicas unflattened from one buffer would share storage)."""
    offset = 0
    for p in model.parameters():
        p.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def write_back(flats: list[torch.Tensor], models: list[nn.Module]) -> None:
    """Copy each flat buffer into its model, unless it is the model's own shared buffer."""
    for flat, model in zip(flats, models, strict=True):
        if flat is not getattr(model, "_flat_parameters", None):
            unflatten_(flat, model)


@torch.no_grad()
def averaged_copies(models: list[nn.Module], comm: Communicator) -> list[nn.Module]:
    """Copies of the local replicas, each holding the mean of all replicas (one allreduce,
    collective); the replicas stay as they are. The global model of an algorithm whose replicas
    differ mid-epoch (overlap, butterfly), for a mid-epoch validation."""
    copies = [copy.deepcopy(m) for m in models]
    flats = [parameters_to_vector(c.parameters()) for c in copies]
    comm.allreduce_mean_(flats)
    for flat, c in zip(flats, copies, strict=True):
        unflatten_(flat, c)
    return copies


class Averager(ABC):
    def __init__(self, comm: Communicator) -> None:
        self.comm = comm
        self.syncs = 0

    def start(self, models: list[nn.Module]) -> None:  # noqa: B027
        """Called when the replicas hold a fresh global model (start, resume, rollback)."""

    @abstractmethod
    def _sync(self, flats: list[torch.Tensor]) -> None:
        """Turn the local replicas' flat parameters (in place) into the new global model."""

    def sync(self, models: list[nn.Module]) -> None:
        with torch.no_grad():
            flats = [flatten(m) for m in models]
            self._sync(flats)
            write_back(flats, models)
        self.syncs += 1

    def average_like_(self, buffers: list[torch.Tensor]) -> None:
        """Average other per-worker buffers (one per local worker: optimiser moments) over the
        workers the last sync averaged the models over: all of them, unless overridden."""
        self.comm.allreduce_mean_(buffers)

    def settle(self, models: list[nn.Module]) -> None:  # noqa: B027
        """Make the replicas equal now, at an epoch's end; a sync that leaves them equal (all
        but overlapped averaging) has nothing left to do."""

    def state_dict(self) -> dict:
        """Global state (the same on every worker), saved once per checkpoint."""
        return {"syncs": self.syncs}

    def load_state_dict(self, state: dict) -> None:
        self.syncs = state["syncs"]

    def worker_state(self, i: int) -> dict:
        """State of local worker ``i`` a resume needs, saved in that worker's checkpoint file."""
        return {}

    def load_worker_state(self, i: int, model: nn.Module, state: dict) -> None:  # noqa: B027
        """Take over ``worker_state(i)`` (after ``load_state_dict``) for replica ``model``."""

    def load_resized_state(self, state: dict, models: list[nn.Module], workers_before: int) -> str:
        """Take over ``state``, saved by a job of ``workers_before`` workers, in a job of another
        size whose replicas hold the checkpoint's model (``--resume`` on another N).

        Default: restart from that model (``start``), keeping only the sync count, since an
        algorithm's state may depend on N. An algorithm whose state is global (one value for
        all workers, not per worker) overrides this to keep it. Returns ``"kept"`` or
        ``"restarted"``, for the log line that records the change of N.
        """
        self.syncs = state["syncs"]
        self.start(models)
        return "restarted"
