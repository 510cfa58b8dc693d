"""Averaging algorithms behind one interface: plain model averaging and block momentum (BMUF)."""

from modelavg.averaging.base import Averager
from modelavg.averaging.bmuf import BlockMomentumAverager
from modelavg.averaging.periodic import ModelAverager
from modelavg.comm.base import Communicator

ALGORITHMS = ("model", "bmuf")


def make_averager(name: str, comm: Communicator, **options) -> Averager:
    """``model``: the paper's plain averaging; ``bmuf``: block momentum (options: block_momentum,
    block_lr, nesterov)."""
    if name == "model":
        return ModelAverager(comm)
    if name == "bmuf":
        return BlockMomentumAverager(comm, **options)
    raise ValueError(f"unknown averaging algorithm {name!r}; choose from {ALGORITHMS}")


__all__ = ["ALGORITHMS", "Averager", "BlockMomentumAverager", "ModelAverager", "make_averager"]
