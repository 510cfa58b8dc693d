"""Where the training loop touches the host, by call site: tensor factories without ``device=``,
device transfers, and host reads (``.item()``, ``bool()``, ``float()``, ``.tolist()``, ...).

On a GPU a host read of a device tensor waits for the stream, a pageable transfer does too, and a
tensor made without ``device=`` lands on the CPU (a device mismatch later, or a collective NCCL
refuses). A CPU run cannot see those waits, but it can see the calls: ``DeviceAudit`` counts them
by the innermost ``modelavg`` file:line that made them, so tests can hold the loop to a budget and
``benchmarks/gpu_check.py`` can print where the waits are.

Example::

    with DeviceAudit() as audit:
        worker.step(idx)
    assert not audit.host_reads and not audit.implicit_device
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

FACTORIES = {
    torch.tensor,
    torch.zeros,
    torch.ones,
    torch.empty,
    torch.full,
    torch.arange,
    torch.eye,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.randperm,
    torch.linspace,
    torch.scalar_tensor,
}
HOST_READS = {
    Tensor.item,
    Tensor.tolist,
    Tensor.__bool__,
    Tensor.__float__,
    Tensor.__int__,
    Tensor.__index__,
    Tensor.numpy,
}
TRANSFERS = {Tensor.to, Tensor.cpu, Tensor.cuda}
_PACKAGE = Path(__file__).resolve().parent
_ROOT = _PACKAGE.parent


def _names_a_device(args: tuple, kwargs: dict) -> bool:
    """Whether ``Tensor.to(...)`` was given a device (not only a dtype)."""
    if "device" in kwargs:
        return True
    return any(isinstance(a, (torch.device, str, int, Tensor)) for a in args[1:])


def call_site() -> str | None:
    """file:line of the innermost frame inside the modelavg package (this module excluded)."""
    frame = sys._getframe(2)
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if path.is_relative_to(_PACKAGE) and path.name != "audit.py":
            return f"{path.relative_to(_ROOT)}:{frame.f_lineno}"
        frame = frame.f_back
    return None


class DeviceAudit(TorchFunctionMode):
    """Counts, per modelavg call site, factories without ``device=`` (``implicit_device``),
    transfers (``transfers``: ``.to(device)``, ``.cpu()``, ``.cuda()``) and host reads
    (``host_reads``). Calls made outside modelavg (the test's own) are not counted. Given a GPU
    ``device``, only reads of tensors on it count (reads of host tensors do not wait)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.device = torch.device(device)
        self.implicit_device: Counter[str] = Counter()
        self.transfers: Counter[str] = Counter()
        self.host_reads: Counter[str] = Counter()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        kwargs = kwargs or {}
        counter = None
        if func in FACTORIES and kwargs.get("device") is None:
            counter = self.implicit_device
        elif func in HOST_READS and self._on_device(args[0]):
            counter = self.host_reads
        elif func in TRANSFERS and (func is not Tensor.to or _names_a_device(args, kwargs)):
            counter = self.transfers
        if counter is not None and (site := call_site()) is not None:
            counter[site] += 1
        return func(*args, **kwargs)

    def _on_device(self, tensor: Tensor) -> bool:
        return self.device.type == "cpu" or tensor.device.type == self.device.type

    def reset(self) -> None:
        for counter in (self.implicit_device, self.transfers, self.host_reads):
            counter.clear()

    def summary(self) -> dict[str, dict[str, int]]:
        return {
            "implicit_device": dict(self.implicit_device),
            "transfers": dict(self.transfers),
            "host_reads": dict(self.host_reads),
        }
