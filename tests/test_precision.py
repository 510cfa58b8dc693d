"""--precision (bf16 autocast for the local steps) and --avg-dtype (the averaging's reduction in
bf16/fp16), on the CPU (issue 23)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SMALL

from modelavg.averaging.periodic import ModelAverager
from modelavg.cli import main
from modelavg.comm.cast import ReducedPrecision
from modelavg.comm.inprocess import InProcessCommunicator
from modelavg.guard import DivergenceGuard
from modelavg.nets.dnn import DNN, DNNSpec

pytestmark = pytest.mark.usefixtures("one_thread")

TWO = ["--in-process", "--workers", "2", "--epochs", "1"]


def train(data_dir, out, *options: str) -> list[dict]:
    assert main(["train", "--data", str(data_dir), "--out", str(out), *SMALL, *TWO, *options]) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_bf16_local_steps_train_with_fp32_parameters(data_dir, tmp_path):
    fp32 = train(data_dir, tmp_path / "fp32")
    bf16 = train(data_dir, tmp_path / "bf16", "--precision", "bf16")
    epochs = [r for r in bf16 if r["kind"] == "epoch"]
    assert epochs[-1]["cv_cross_entropy"] < 0.5 * epochs[0]["cv_cross_entropy"]
    fp32_cv = [r for r in fp32 if r["kind"] == "epoch"][-1]["cv_cross_entropy"]
    assert epochs[-1]["cv_cross_entropy"] != fp32_cv  # autocast did change the arithmetic
    assert abs(epochs[-1]["cv_cross_entropy"] - fp32_cv) < 0.1 * fp32_cv
    state = torch.load(tmp_path / "bf16" / "final.pt", weights_only=False)["state_dict"]
    assert all(v.dtype == torch.float32 for v in state.values())


def test_a_bf16_reduction_rounds_each_replica_and_keeps_fp32_buffers():
    a, b = torch.randn(1000), torch.randn(1000)
    flats = [a.clone(), b.clone()]
    ReducedPrecision(InProcessCommunicator(2), torch.bfloat16).allreduce_mean_(flats)
    expected = (a.bfloat16() + b.bfloat16()).float() / 2
    assert all(f.dtype == torch.float32 and torch.equal(f, expected) for f in flats)
    assert not torch.equal(flats[0], (a + b) / 2)


def test_the_guard_catches_an_average_that_overflows_fp16():
    models = [DNN(DNNSpec(4, 0, 1, 8, 3)) for _ in range(2)]
    with torch.no_grad():
        models[0].linears()[0].weight.fill_(7e4)  # finite in fp32, beyond fp16's 65504
    guard = DivergenceGuard()
    assert guard.healthy(models)
    ModelAverager(ReducedPrecision(InProcessCommunicator(2), torch.float16)).sync(models)
    assert not guard.healthy(models)


def test_fp16_averaging_trains_and_is_logged_in_the_config(data_dir, tmp_path):
    records = train(data_dir, tmp_path / "fp16", "--avg-dtype", "fp16", "--precision", "bf16")
    assert records[-1]["cv_cross_entropy"] < 0.5 * records[1]["cv_cross_entropy"]
    assert "avg_dtype: fp16" in (tmp_path / "fp16" / "config.yaml").read_text()
