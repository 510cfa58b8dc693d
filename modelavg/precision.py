"""Arithmetic precision of the local steps (``--precision``) and of the averaging
(``--avg-dtype``).

``fp32`` is the paper's. ``tf32`` lets CUDA matrix products round their inputs to TF32 (about
8x the fp32 rate on Hopper); ``bf16`` runs forward and loss under autocast (matrix products in
bfloat16, the parameters, their updates and the averaged model stay fp32). NG-SGD processes its
bf16 captures in fp32. Validation always runs in fp32, so CV numbers compare across precisions.

Example::

    set_matmul_precision("tf32", device)
    with autocast("bf16", device):
        loss = F.cross_entropy(model(x), y)
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

PRECISIONS = ("fp32", "tf32", "bf16")
AVG_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def set_matmul_precision(precision: str, device: torch.device) -> None:
    """TF32 matrix products on CUDA for ``tf32``, exact fp32 ones otherwise (process-wide)."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """bf16 autocast around a local step's forward and loss; nothing for fp32 and tf32."""
    if precision != "bf16":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
