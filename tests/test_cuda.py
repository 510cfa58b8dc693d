"""CUDA tests: run by scripts/gpu_check.sh (MODELAVG_TEST_CUDA=1 pytest -m cuda); skipped
without a GPU. The CPU suite hides GPUs (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import SMALL

from modelavg import checkpoint as ckpt
from modelavg.cli import main
from modelavg.nets.rbm import RBM, CD1Trainer

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TWO = ["--in-process", "--workers", "2", "--schedule", "constant", "--lr", "0.1"]


def train(data_dir, out, *args: str) -> None:
    assert main(["train", "--data", str(data_dir), "--out", str(out), *SMALL, *TWO, *args]) == 0


def state(out) -> dict:
    return torch.load(out / "final.pt", map_location="cpu", weights_only=False)["state_dict"]


def test_rng_state_saved_on_the_gpu_restores():
    ckpt.set_rng_state(torch.get_rng_state().cuda())


def test_rbm_trainer_state_round_trips_on_the_gpu():
    rbm = RBM(6, 4, "gaussian").cuda()
    trainer = CD1Trainer(rbm)
    trainer.step(torch.randn(10, 6, device="cuda"))
    saved = {k: v.cuda() if torch.is_tensor(v) else v for k, v in trainer.state_dict().items()}
    CD1Trainer(rbm).load_state_dict(saved)


@pytest.mark.parametrize("optimizer", ["sgd", "ngsgd"])
def test_cuda_resume_is_bitwise_and_close_to_the_cpu(data_dir, tmp_path, optimizer):
    opt = ["--optimizer", optimizer, "--ng-rank-in", "4", "--ng-rank-out", "8"]
    train(data_dir, tmp_path / "gpu", *opt, "--device", "cuda")
    train(data_dir, tmp_path / "cpu", *opt, "--device", "cpu")
    train(data_dir, tmp_path / "resumed", *opt, "--device", "cuda", "--epochs", "1")
    train(data_dir, tmp_path / "resumed", *opt, "--device", "cuda", "--resume")
    gpu, cpu, resumed = (state(tmp_path / d) for d in ("gpu", "cpu", "resumed"))
    assert all(torch.equal(gpu[k], resumed[k]) for k in gpu)
    assert all(torch.allclose(gpu[k], cpu[k], rtol=1e-3, atol=1e-4) for k in gpu)


def test_a_cpu_checkpoint_resumes_on_the_gpu(data_dir, tmp_path):
    train(data_dir, tmp_path / "x", "--device", "cpu", "--epochs", "1")
    train(data_dir, tmp_path / "x", "--device", "cuda", "--resume")


def test_two_gloo_processes_on_one_gpu_equal_two_in_process_workers(data_dir, tmp_path):
    train(data_dir, tmp_path / "inproc", "--device", "cuda")
    args = [a for a in TWO if a != "--in-process"]
    common = ["--data", str(data_dir), *SMALL, *args, "--device", "cuda", "--backend", "gloo"]
    assert main(["train", "--out", str(tmp_path / "gloo"), *common]) == 0
    a, b = state(tmp_path / "inproc"), state(tmp_path / "gloo")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_and_tf32_train_on_the_gpu(data_dir, tmp_path):
    for precision in ("bf16", "tf32"):
        train(data_dir, tmp_path / precision, "--device", "cuda", "--precision", precision)
