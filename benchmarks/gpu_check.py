"""The one-call GPU check (issue 23): environment, the CUDA tests, a correctness matrix, a sync
audit and the paper network's throughput, into one JSON summary.

A lent GPU machine gives 15 minutes in all, so this runs in one call, well under 8 minutes, with
the torch found there and no network; each step runs in its own process under a time limit, so a
crash or a hang (NCCL) costs that step only and the summary still comes back. ``--device cpu
--quick`` runs the same code on a CPU in well under a minute (tests/test_gpu_check.py), so its
bugs are found before any GPU time is spent.

    scripts/gpu_check.sh [--device cuda] [--quick] [--out DIR]     # summary: DIR/summary.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# seconds each step may take on a GPU (twice that with --quick on a loaded CPU), and in all
LIMITS = {"env": 30, "cuda_tests": 100, "matrix": 130, "audit": 60, "speed": 150}
BUDGET_S = 450  # the device call gets about 480 s; a rerun must still fit in 15 minutes
CUDA_TESTS = ["tests/test_cuda.py", "tests/test_ngsgd.py"]


def environment() -> dict:
    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cpus": os.cpu_count(),
        "mpirun": shutil.which("mpirun"),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env |= {"gpus": torch.cuda.device_count(), "gpu": props.name}
        env |= {"gpu_memory_gib": round(props.total_memory / 2**30, 1)}
        for name, probe in (
            ("nccl", lambda: torch.cuda.nccl.version()),
            ("blas", lambda: torch.backends.cuda.preferred_blas_library().name),
            ("capability", lambda: torch.cuda.get_device_capability(0)),
        ):
            try:
                env[name] = str(probe())
            except Exception as exc:  # another torch: record, go on
                env[name] = f"unknown ({type(exc).__name__})"
    try:
        from mpi4py import MPI

        env["mpi_query_cuda_support"] = hasattr(MPI, "Query_cuda_support")
    except ImportError:
        env["mpi4py"] = None
    for module in ("kaldiio", "yaml", "tqdm", "numpy", "pytest"):
        try:
            __import__(module)
        except ImportError:
            env.setdefault("missing", []).append(module)
    env["ok"] = "missing" not in env
    return env


def cuda_tests(device: str, timeout: float) -> dict:
    if not device.startswith("cuda"):
        return {"ok": True, "skipped": "--device cpu"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"]
    env = {**os.environ, "MODELAVG_TEST_CUDA": "1"}
    proc = subprocess.run(
        [*cmd, *CUDA_TESTS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    lines = proc.stdout.strip().splitlines()
    failures = [x for x in lines if x.startswith(("FAILED", "ERROR"))]
    return {"ok": proc.returncode == 0, "result": lines[-1] if lines else "", "failed": failures}


# -- the steps that train (each in a child process) --------------------------------------------


def learnable_data(work: Path, quick: bool) -> Path:
    """Gaussian clusters in utterances (tests/conftest.py's), small in --quick."""
    os.environ["MODELAVG_TEST_CUDA"] = "1"  # conftest hides GPUs otherwise
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_data_dir

    if quick:
        return make_data_dir(work / "learnable", utts=40, classes=4, dim=6)
    return make_data_dir(work / "learnable", utts=400, classes=40, dim=40)


def matrix_options(quick: bool) -> dict:
    """A constant lr, so a run resumed with more epochs continues the same schedule."""
    common = {"schedule": "constant", "lr": 0.1, "threads": 1 if quick else None}
    if quick:
        return {**common, "hidden_layers": 2, "hidden_dim": 32, "context": 1, "minibatch": 16}
    return {**common, "hidden_layers": 2, "hidden_dim": 256, "context": 5, "minibatch": 256}


def step_matrix(work: Path, device: str, quick: bool) -> dict:
    from gpu_runs import matrix

    options = {**matrix_options(quick), "avg_every": 4, "tensorboard": False}
    return matrix(work, learnable_data(work, quick), device, options)


def step_audit(work: Path, device: str, quick: bool) -> dict:
    """Host reads (modelavg.audit) and, on CUDA, synchronising calls (sync debug mode) per step
    and per round of one epoch, SGD, NG-SGD and an RBM's CD-1 steps (no sync in the loop); then
    whether the steps run under torch.use_deterministic_algorithms."""
    import torch
    from gpu_runs import flags, read_run, train_cli

    from modelavg.audit import DeviceAudit

    data = learnable_data(work, quick)
    base = {**matrix_options(quick), "avg_every": 4, "workers": 2, "in_process": True}
    base |= {"epochs": 1, "device": device, "log_every": 10**6, "tensorboard": False}
    result: dict = {}
    rbm = {k: base[k] for k in ("avg_every", "workers", "in_process", "device", "log_every")}
    rbm |= {"hidden_layers": 1, "hidden_dim": 32, "context": 1, "minibatch": 16, "rbm_iter": 1}
    runs = {
        "sgd": ("train", {**base, "optimizer": "sgd"}),
        "ngsgd": ("train", {**base, "optimizer": "ngsgd"}),
        "pretrain": ("pretrain", {**rbm, "tensorboard": False}),
    }
    loop = ("modelavg/engine", "workers.py", "nets/rbm.py")
    for opt, (command, options) in runs.items():
        out = work / f"audit_{opt}"
        cuda = device.startswith("cuda")
        with DeviceAudit(device) as audit, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            code = train_cli(out, data, *flags(options), command=command)["code"]
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
        start = next(r for r in read_run(out)["records"] if r["kind"] == "start")
        rounds = start["rounds_per_epoch"]
        steps = rounds * base["avg_every"] * base["workers"]
        syncs = Counter(site(w) for w in caught if "synchronizing" in str(w.message))
        in_loop = sum(n for s, n in syncs.items() if any(part in s for part in loop))
        reads = sum(audit.host_reads.values())
        outside = ("modelavg/evaluate.py", "modelavg/data/", "modelavg/train.py")  # CV, set-up, log
        loop_reads = sum(n for s, n in audit.host_reads.items() if not s.startswith(outside))
        result[opt] = {
            "ok": code == 0 and in_loop == 0,
            "rounds": rounds,
            "steps": steps,
            "host_reads": reads,
            "host_reads_per_round": reads / rounds,
            "round_loop_host_reads": loop_reads,
            "host_reads_top": dict(audit.host_reads.most_common(8)),
            "transfers_top": dict(audit.transfers.most_common(8)),
            "cuda_syncs": sum(syncs.values()),
            "cuda_syncs_per_step": sum(syncs.values()) / steps,
            "cuda_syncs_in_the_step_loop": in_loop,
            "cuda_syncs_top": dict(syncs.most_common(8)),
        }
    for opt in ("sgd", "pretrain"):  # at most one read a round (the log line's), none a step
        result[opt]["ok"] &= result[opt]["round_loop_host_reads"] <= result[opt]["rounds"]
    result["ngsgd"]["ok"] &= result["ngsgd"]["cuda_syncs_per_step"] <= 2  # ~1: one fetch a step
    result["determinism"] = determinism(work, data, base)
    result["ok"] = all(result[opt]["ok"] for opt in runs)
    return result


def site(warning: warnings.WarningMessage) -> str:
    path = Path(warning.filename)
    return f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{warning.lineno}"


def determinism(work: Path, data: Path, base: dict) -> dict:
    """Which ops refuse torch.use_deterministic_algorithms (reported, not a failure)."""
    import torch
    from gpu_runs import flags, train_cli

    found = {}
    torch.use_deterministic_algorithms(True)
    try:
        for opt in ("sgd", "ngsgd"):
            run = train_cli(work / f"det_{opt}", data, *flags({**base, "optimizer": opt}))
            found[opt] = "ok" if run["code"] == 0 else f"exit {run['code']}"
    except RuntimeError as exc:
        found["error"] = str(exc).splitlines()[0][:300]
    finally:
        torch.use_deterministic_algorithms(False)
    return found


def step_speed(work: Path, device: str, quick: bool) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_engine import synthetic_data
    from gpu_runs import PAPER_NET, QUICK_NET, micro, throughput

    net = QUICK_NET if quick else PAPER_NET
    frames = 4_000 if quick else 300_000
    data = synthetic_data(work / "random", frames, classes=net["num_classes"])
    result = {"throughput": throughput(work, data, device, quick), "micro": micro(device, quick)}
    return {**result, "ok": result["throughput"]["ok"] and result["micro"]["ok"]}


STEP_FUNCTIONS = {"matrix": step_matrix, "audit": step_audit, "speed": step_speed}


def run_step(name: str, work: Path, device: str, quick: bool, timeout: float) -> dict:
    """``name`` in a child process (this file with --step), its JSON result read back."""
    result_file = work / f"{name}.json"
    cmd = [sys.executable, __file__, "--step", name, "--device", device, "--out", str(work)]
    env = {**os.environ}
    if name == "audit":  # cuBLAS is deterministic only with a fixed workspace (set before CUDA)
        env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    log = (work / f"{name}.log").open("w")
    # its own process group: on a timeout the workers it spawned go too
    proc = subprocess.Popen(
        [*cmd, *(["--quick"] if quick else [])],
        stdout=log,
        stderr=log,
        env=env,
        start_new_session=True,
    )
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        partial = {p.name: json.loads(p.read_text()) for p in (work / name).glob("*.partial.json")}
        error = f"timed out after {timeout:g} s (see {name}.log)"
        return {"ok": False, "error": error, "partial": partial}
    if not result_file.exists():
        return {"ok": False, "error": f"exit {code}, no result (see {name}.log)"}
    return json.loads(result_file.read_text())


def child(name: str, work: Path, device: str, quick: bool) -> int:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    step_dir = work / name
    step_dir.mkdir(parents=True, exist_ok=True)
    try:
        result = STEP_FUNCTIONS[name](step_dir, device, quick)
    except Exception as exc:
        tb = traceback.format_exc().strip().splitlines()[-6:]
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500], "traceback": tb}
    (work / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes (the CPU dry run)")
    parser.add_argument("--out", default=None, help="output dir (default: $OUT/gpu_check)")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds in all")
    parser.add_argument("--step", choices=tuple(STEP_FUNCTIONS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = Path(args.out or Path(os.environ.get("OUT", ".")) / "gpu_check")
    work.mkdir(parents=True, exist_ok=True)
    if args.step:
        return child(args.step, work, args.device, args.quick)
    summary: dict = {"device": args.device, "quick": args.quick, "steps": {}}
    t_start = time.perf_counter()
    deadline = t_start + args.budget * (2 if args.quick else 1)
    steps = {"env": lambda limit: environment()}
    steps["cuda_tests"] = lambda limit: cuda_tests(args.device, limit)
    for name in STEP_FUNCTIONS:
        steps[name] = lambda limit, name=name: run_step(name, work, args.device, args.quick, limit)
    for name, fn in steps.items():
        t0 = time.perf_counter()
        limit = min(LIMITS[name] * (2 if args.quick else 1), deadline - t0)
        try:
            result = fn(limit) if limit >= 5 else {"ok": False, "error": "no time left"}
        except Exception as exc:
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
        result["seconds"] = round(time.perf_counter() - t0, 1)
        result.setdefault("ok", False)
        summary["steps"][name] = result
        print(f"gpu_check: {name}: {'ok' if result['ok'] else 'FAILED'} ({result['seconds']} s)")
        (work / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    summary["seconds"] = round(time.perf_counter() - t_start, 1)
    summary["ok"] = all(step["ok"] for step in summary["steps"].values())
    (work / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"gpu_check: {'ok' if summary['ok'] else 'FAILED'}; summary in {work / 'summary.json'}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
