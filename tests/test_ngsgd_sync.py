"""NG-SGD on a GPU without per-layer waits (issue 23): the Fisher estimates start from a Gram
matrix's eigendecomposition, and a step fetches all of its estimate updates in one copy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from modelavg.audit import HOST_READS
from modelavg.optim import NGSGD
from modelavg.optim.lowrank import top_rows

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


@pytest.mark.parametrize("shape", [(12, 40), (64, 20), (30, 30)], ids=str)
def test_the_gram_start_spans_the_top_singular_vectors(shape):
    r = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    k = min(shape) // 2
    rows, values = top_rows(r, k)
    _, s, vh = torch.linalg.svd(r, full_matrices=False)
    torch.testing.assert_close(values, s[:k] ** 2)
    torch.testing.assert_close(rows.T @ rows, vh[:k].T @ vh[:k])  # the same subspace
    torch.testing.assert_close(rows @ rows.T, torch.eye(k, dtype=F64))


def test_the_gram_start_drops_directions_the_minibatch_lacks():
    base = torch.randn(3, 40, dtype=F64)
    r = torch.cat([base, 2 * base, base - base[:1]])  # 9 rows of rank 3 (one row is zero)
    rows, values = top_rows(r, 8)
    assert rows.shape == (3, 40) and values.numel() == 3


class DeviceWaits(TorchFunctionMode):
    """Copies to the host, and host reads of float32 tensors: in a float32 model those live on
    the device (the estimate's own host state is float64 by construction)."""

    def __init__(self) -> None:
        super().__init__()
        self.fetches = self.reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.fetches += func is torch.Tensor.cpu
        self.reads += func in HOST_READS and args[0].dtype == torch.float32
        return func(*args, **(kwargs or {}))


def test_an_ngsgd_step_waits_for_the_device_at_most_once(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Sigmoid(), nn.Linear(16, 16), nn.Sigmoid())
    model.append(nn.Linear(16, 4))
    opt = NGSGD(model, lr=0.1, rank_in=3, rank_out=4)
    x, y = torch.randn(32, 6), torch.randint(0, 4, (32,))

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # the start from the first minibatch reads once per estimate
    steps = 12
    with DeviceWaits() as waits:
        for _ in range(steps):
            step()
    assert waits.reads == 0
    assert 1 <= waits.fetches <= steps  # one copy per step that updates (most of the first ten)
