"""Shared fixtures: small synthetic Kaldi data directories written with kaldiio."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from modelavg.data.kaldi import write_data_dir

# --device auto would turn the CPU suite into a GPU suite on a GPU machine (and two NCCL ranks on
# one GPU); the CUDA tests (-m cuda) run with MODELAVG_TEST_CUDA=1. Set before CUDA initialises,
# and inherited by the worker processes tests spawn.
if os.environ.get("MODELAVG_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def make_data_dir(
    path: Path,
    utts: int = 40,
    classes: int = 4,
    dim: int = 6,
    seed: int = 0,
    lengths: list[int] | None = None,
) -> Path:
    """Gaussian clusters, one per class, in utterances of varying length."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(123).normal(size=(classes, dim)) * 1.5
    feats, targets = {}, {}
    for u in range(utts):
        n = lengths[u] if lengths else int(rng.integers(40, 160))
        y = np.repeat(rng.integers(0, classes, size=n // 10 + 1), 10)[:n]  # runs, like phones
        feats[f"utt{u:04d}"] = (centers[y] + rng.normal(size=(n, dim))).astype(np.float32)
        targets[f"utt{u:04d}"] = y.astype(np.int32)
    write_data_dir(path, feats, targets)
    return path


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return make_data_dir(tmp_path_factory.mktemp("data") / "train")


SMALL = [
    "--hidden-layers",
    "2",
    "--hidden-dim",
    "32",
    "--context",
    "1",
    "--minibatch",
    "16",
    "--avg-every",
    "2",
    "--epochs",
    "2",
    "--no-progress",
    "--threads",
    "1",
]

# a 2 x 16 DBN on context 1, averaged every 2 minibatches of 16, a log line every 5 rounds
PRETRAIN_SMALL = [
    "--hidden-layers=2",
    "--hidden-dim=16",
    "--context=1",
    "--minibatch=16",
    "--avg-every=2",
    "--log-every=5",
    "--threads=1",
    "--no-progress",
]


@pytest.fixture(scope="module")
def one_thread():
    """Small matrices: threads only add contention (tests run beside others on 2 cores).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
