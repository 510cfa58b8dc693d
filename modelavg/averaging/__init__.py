"""Averaging algorithms behind one interface: plain model averaging, block momentum (BMUF),
DiLoCo's outer optimiser, plain averaging overlapped with the next round's computation, and
butterfly mixing with one partner per sync."""

from typing import Any

from modelavg.averaging.base import Averager
from modelavg.averaging.bmuf import BlockMomentumAverager
from modelavg.averaging.butterfly import ButterflyAverager
from modelavg.averaging.diloco import DiLoCoAverager
from modelavg.averaging.overlap import OverlapAverager
from modelavg.averaging.periodic import ModelAverager
from modelavg.comm.base import Communicator

ALGORITHMS = ("model", "bmuf", "diloco", "overlap", "butterfly")


def make_averager(name: str, comm: Communicator, **options) -> Averager:
    """``model``: the paper's plain averaging; ``bmuf``: block momentum (options: block_momentum,
    block_lr, nesterov); ``diloco``: outer Nesterov SGD (options: outer_lr, outer_momentum);
    ``overlap``: plain averaging applied one round late, its allreduce overlapping computation;
    ``butterfly``: the mean of a pair of workers, a different pair each sync (N a power of 2)."""
    if name == "model":
        return ModelAverager(comm)
    if name == "bmuf":
        return BlockMomentumAverager(comm, **options)
    if name == "diloco":
        return DiLoCoAverager(comm, **options)
    if name == "overlap":
        return OverlapAverager(comm)
    if name == "butterfly":
        return ButterflyAverager(comm)
    raise ValueError(f"unknown averaging algorithm {name!r}; choose from {ALGORITHMS}")


def algorithm_options(cfg: Any) -> dict:
    """The options of ``cfg.averaging``'s algorithm, from a TrainConfig."""
    if cfg.averaging == "bmuf":
        return {"block_momentum": cfg.block_momentum, "block_lr": cfg.block_lr}
    if cfg.averaging == "diloco":
        return {"outer_lr": cfg.outer_lr, "outer_momentum": cfg.outer_momentum}
    return {}


__all__ = [
    "ALGORITHMS",
    "algorithm_options",
    "Averager",
    "BlockMomentumAverager",
    "ButterflyAverager",
    "DiLoCoAverager",
    "ModelAverager",
    "OverlapAverager",
    "make_averager",
]
