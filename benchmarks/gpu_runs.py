"""The training runs of the GPU check (benchmarks/gpu_check.py): the correctness matrix and the
throughput of the paper's network, plus micro-benchmarks of the costs the design depends on.

Every function returns a JSON-able dict and raises only on a bug of its own; a failed comparison
is ``"ok": False`` with the numbers, so the summary shows what disagreed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from modelavg.cli import main
from modelavg.comm.torchdist import TorchDistCommunicator
from modelavg.config import load_config
from modelavg.launch import free_port
from modelavg.nets.dbn import load_dbn
from modelavg.train import train

CV_RTOL = 1e-3  # CPU against GPU: relative difference of the final CV cross-entropy


def train_cli(out: Path, data: Path, *args: str, command: str = "train") -> dict:
    """``modelavg train`` (or ``pretrain``) in this process (it spawns workers itself for a
    multi-process run); returns the exit code, the metrics records and the final CV."""
    log, err = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(err):
        code = main([command, "--data", str(data), "--out", str(out), "--no-progress", *args])
    seconds = round(time.perf_counter() - t0, 1)
    return {"code": code, "seconds": seconds, "error": err.getvalue()[-300:], **read_run(out)}


def read_run(out: Path) -> dict:
    metrics = out / "metrics.jsonl" if (out / "metrics.jsonl").exists() else out / "pretrain.jsonl"
    records = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    final = out / "final_cv.json"
    return {"records": records, "cv": json.loads(final.read_text()) if final.exists() else None}


def final_state(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "final.pt", map_location="cpu", weights_only=False)["state_dict"]


def same_model(a: Path, b: Path) -> bool:
    sa, sb = final_state(a), final_state(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def max_param_diff(a: Path, b: Path) -> float:
    sa, sb = final_state(a), final_state(b)
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


def cv_close(a: dict, b: dict) -> tuple[bool, float]:
    if not (a["cv"] and b["cv"]):
        return False, float("nan")
    x, y = a["cv"]["cross_entropy"], b["cv"]["cross_entropy"]
    rel = abs(x - y) / max(abs(y), 1e-12)
    return rel < CV_RTOL, rel


class PhantomPeer(TorchDistCommunicator):
    """Rank 0 of a one-process group posing as one of two: each reduction is a real collective
    of the backend (NCCL on one GPU) whose result is then doubled, as if a twin had sent the
    same buffer. Every collective call site of training thus runs on the real backend."""

    def __init__(self, backend: str, device: torch.device) -> None:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
        super().__init__(0, 1, backend, device, timeout_s=120)
        self.num_processes = 2

    def _allreduce_sum_async_(self, tensor: torch.Tensor) -> Callable[[], None]:
        """Every reduction starts here (blocking ones too): double it once it is done."""
        done = super()._allreduce_sum_async_(tensor)

        def finish() -> None:
            done()
            tensor.mul_(2)

        return finish


def flags(options: dict) -> list[str]:
    """{"hidden_dim": 32, "in_process": True} -> ["--hidden-dim", "32", "--in-process"]"""
    out: list[str] = []
    for key, value in options.items():
        name = key.replace("_", "-")
        if isinstance(value, bool):
            out.append(f"--{name}" if value else f"--no-{name}")
        elif value is not None:
            out += [f"--{name}", str(value)]
    return out


def phantom_run(out: Path, data: Path, device: torch.device, options: dict) -> dict:
    backend = "nccl" if device.type == "cuda" else "gloo"
    run = {"data": str(data), "out": str(out), "progress": False, "tensorboard": False}
    cfg = load_config(None, {**options, **run, "device": str(device)})
    comm = PhantomPeer(backend, device)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            train(cfg, comm)
    finally:
        comm.close()
    epochs = [r for r in read_run(out)["records"] if r["kind"] == "epoch"]
    losses = [r["cv_cross_entropy"] for r in epochs]
    ok = all(x < float("inf") for x in losses) and losses[-1] < losses[0]  # NaN fails too
    ok = ok and all("leftover_frames" in r for r in epochs[1:])
    return {"ok": ok, "backend": backend, "cv_losses": losses}


def matrix(work: Path, data: Path, device: str, options: dict, epochs: int = 2) -> dict:
    """R0 CPU vs R1 device (tolerance); R2 2 gloo processes on the device vs R1 (bitwise); R3 a
    phantom second rank on the real backend; R5 resume vs R1 (bitwise); R6 NG-SGD device vs
    CPU (tolerance) and its resume (bitwise); R7 RBM pretraining (``pretraining``)."""
    two = ["--workers", "2", "--seed", "5", *flags(options)]
    full, half = [*two, "--epochs", str(epochs)], [*two, "--epochs", str(epochs - 1)]
    inproc, on, cpu = ["--in-process"], ["--device", device], ["--device", "cpu"]
    ng = ["--optimizer", "ngsgd", "--ng-rank-in", "4", "--ng-rank-out", "8"]
    runs = {
        "R0": (full, inproc, cpu),
        "R1": (full, inproc, on),
        "R2": (full, on, ["--backend", "gloo"]),  # spawned processes
        "R5": (half, inproc, on),
        "R6cpu": (full, inproc, ng, cpu),
        "R6": (full, inproc, ng, on),
        "R6r": (half, inproc, ng, on),
    }
    r = {name: train_cli(work / name, data, *sum(parts, [])) for name, parts in runs.items()}
    r["R5"] = train_cli(work / "R5", data, *full, *inproc, *on, "--resume")
    r["R6r"] = train_cli(work / "R6r", data, *full, *inproc, *ng, *on, "--resume")
    res: dict = {"codes": {k: v["code"] for k, v in r.items()}}
    res["seconds"] = {k: v["seconds"] for k, v in r.items()}
    if any(res["codes"].values()):
        return {**res, "ok": False}
    ok, rel = cv_close(r["R1"], r["R0"])
    res["R1_vs_R0_cpu"] = {"ok": ok, "cv_rel_diff": rel}
    res["R2_gloo_processes_eq_R1"] = {"ok": same_model(work / "R2", work / "R1")}
    res["R5_resume_eq_R1"] = {"ok": same_model(work / "R5", work / "R1")}
    ok, rel = cv_close(r["R6"], r["R6cpu"])
    res["R6_ngsgd_vs_cpu"] = {"ok": ok, "cv_rel_diff": rel}
    res["R6_ngsgd_resume_eq"] = {"ok": same_model(work / "R6r", work / "R6")}
    res["R7_pretraining"] = pretraining(work / "R7", data, device)
    try:
        phantom = {**options, "workers": None, "epochs": epochs, "seed": 5}
        res["R3_phantom_peer"] = phantom_run(work / "R3", data, torch.device(device), phantom)
    except Exception as exc:  # a collective the real backend refuses: the finding itself
        res["R3_phantom_peer"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    res["ok"] = all(v["ok"] for v in res.values() if isinstance(v, dict) and "ok" in v)
    return res


def pretraining(work: Path, data: Path, device: str) -> dict:
    """RBM pretraining, 2 in-process workers: the device's reconstruction errors near the CPU's
    (CD-1 samples from another generator there: 5%), and a resume from a checkpoint inside the
    second RBM to the bitwise-identical dbn.pt."""
    args = ["--workers", "2", "--in-process", "--hidden-layers", "2", "--hidden-dim", "32"]
    args += ["--context", "1", "--minibatch", "16", "--rbm-iter", "1", "--no-tensorboard"]
    args += ["--checkpoint-every", "5", "--keep-checkpoints", "0", "--seed", "5"]
    runs = {"device": device, "cpu": "cpu"}
    cli = {
        name: train_cli(work / name, data, *args, "--device", d, command="pretrain")
        for name, d in runs.items()
    }
    codes = {name: r["code"] for name, r in cli.items()}
    if any(codes.values()):
        return {"ok": False, "codes": codes, "error": "; ".join(r["error"] for r in cli.values())}
    errors = {
        name: [r["reconstruction_error"] for r in run["records"] if r["kind"] == "layer"]
        for name, run in cli.items()
    }
    pairs = zip(errors["device"], errors["cpu"], strict=True)
    close = all(abs(a - b) <= 0.05 * abs(b) for a, b in pairs)
    root = work / "device" / "checkpoints"
    inside = sorted(p.name for p in root.iterdir() if p.name.startswith("l02-") and p.is_dir())
    resumed = work / "resumed"
    shutil.copytree(work / "device", resumed)
    (resumed / "dbn.pt").unlink()
    (resumed / "checkpoints" / "LATEST").write_text(inside[len(inside) // 2])
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["pretrain", "--resume", "--out", str(resumed), "--no-progress"])
    a, b = (load_dbn(p / "dbn.pt")[0].state_dict() for p in (work / "device", resumed))
    same = code == 0 and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return {"ok": close and same, "reconstruction_errors": errors, "resume_eq": same}


PAPER_NET = {"hidden_layers": 6, "hidden_dim": 2048, "context": 5, "num_classes": 8806}
QUICK_NET = {"hidden_layers": 2, "hidden_dim": 32, "context": 1, "num_classes": 20}
CASES = {  # name: options; K = 10 throughout (the paper's averaging share at K = 10)
    "sgd_fp32_mb256": {"minibatch": 256},
    "sgd_fp32_mb1024": {"minibatch": 1024},
    "sgd_tf32_mb1024": {"minibatch": 1024, "precision": "tf32"},
    "sgd_bf16_mb1024": {"minibatch": 1024, "precision": "bf16"},
    "ngsgd_fp32_mb1024": {"minibatch": 1024, "optimizer": "ngsgd"},
    "ngsgd_bf16_mb1024": {"minibatch": 1024, "optimizer": "ngsgd", "precision": "bf16"},
    "inprocess4_fp32_mb1024": {"minibatch": 1024, "workers": 4, "in_process": True},
    "gloo2_fp32_mb1024": {"minibatch": 1024, "workers": 2, "backend": "gloo"},
}
QUICK_CASES = ("sgd_fp32_mb256", "sgd_bf16_mb1024", "ngsgd_fp32_mb1024", "inprocess4_fp32_mb1024")


def throughput(work: Path, data: Path, device: str, quick: bool) -> dict:
    """Frames/s of one epoch per case (compute + averaging time from metrics.jsonl, so start-up
    and validation are excluded), the averaging share, and peak GPU memory (in-process cases)."""
    net = QUICK_NET if quick else PAPER_NET
    common = {**net, "avg_every": 10, "epochs": 1, "lr": 0.01, "lr_scaling": "none"}
    common |= {"log_every": 10**6, "device": device, "tensorboard": False}
    common |= {"threads": 1} if quick else {}
    results = {}
    for name in QUICK_CASES if quick else CASES:
        options = common | CASES[name]
        if quick:
            options["minibatch"] = min(options["minibatch"], 64)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        run = train_cli(work / name, data, *flags(options))
        epoch = next((r for r in run["records"] if r["kind"] == "epoch" and r["epoch"] == 1), {})
        seconds = epoch.get("compute_s", 0.0) + epoch.get("averaging_s", 0.0)
        results[name] = {
            "ok": run["code"] == 0 and seconds > 0,
            "frames_per_s": epoch.get("frames", 0) / seconds if seconds else 0.0,
            "averaging_share": epoch.get("averaging_share"),
            "compute_s": epoch.get("compute_s"),
            "averaging_s": epoch.get("averaging_s"),
        }
        if device.startswith("cuda") and not CASES[name].get("backend"):
            results[name]["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        (work / "throughput.partial.json").write_text(json.dumps(results))  # if time runs out
    results["ok"] = all(v["ok"] for v in results.values())
    return results


def timed_ms(fn, device: torch.device, repeats: int = 3) -> float:
    """Median wall milliseconds of ``fn()`` (after one warm-up call), the device synchronised."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - t0))
    return sorted(times)[len(times) // 2]


def micro(device: str, quick: bool) -> dict:
    """NG-SGD's per-step eigendecompositions (7 layers, ranks 20 and 80) and its initialisation
    (full SVD against the Gram matrix's eigh), CPU and device; on CUDA also a model-sized staged
    copy (pageable against pinned) and an empty synchronize."""
    devices = [torch.device("cpu")] + ([torch.device(device)] if device != "cpu" else [])
    rows, cols = (64, 256) if quick else (1024, 8806)
    out: dict = {}
    g = torch.Generator().manual_seed(0)
    for d in devices:
        for rank in (20, 80):
            a = torch.randn(7, rank, rank, dtype=torch.float64, generator=g).to(d)
            a = a @ a.mT
            out[f"eigh_7x{rank}_{d.type}_ms"] = timed_ms(lambda a=a: torch.linalg.eigh(a), d)
        r = torch.randn(rows, cols, dtype=torch.float64, generator=g).to(d)
        svd = lambda r=r: torch.linalg.svd(r, full_matrices=False)  # noqa: E731
        out[f"init_svd_{rows}x{cols}_{d.type}_ms"] = timed_ms(svd, d, repeats=1)
        gram = lambda r=r: torch.linalg.eigh(r @ r.T)  # noqa: E731
        out[f"init_gram_eigh_{rows}x{cols}_{d.type}_ms"] = timed_ms(gram, d)
    if device.startswith("cuda"):
        d = torch.device(device)
        flat = torch.empty(40 * 2**20, device=d)  # 160 MiB, about the paper net's parameters
        pageable, pinned = torch.empty(flat.shape), torch.empty(flat.shape, pin_memory=True)
        out["copy_160MiB_pageable_ms"] = timed_ms(lambda: pageable.copy_(flat), d)
        out["copy_160MiB_pinned_ms"] = timed_ms(lambda: pinned.copy_(flat, non_blocking=True), d)
        out["empty_synchronize_us"] = 1e3 * timed_ms(torch.cuda.synchronize, d, repeats=20)
    out["ok"] = True
    return out
