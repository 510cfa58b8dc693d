"""Engine throughput targets, measured side by side in one run (issue: core engine).

1. 2 gloo worker processes (1 thread each) against one single-thread worker, on the
   440-6x1024-2000 sigmoid DNN, minibatch 256, K=10: aggregate frames/s ratio (target >= 1.6) and
   the share of wall time spent averaging (target <= 3%), with the part of it that is the
   allreduce alone (both processes waiting at a barrier first): the rest is one worker waiting for
   the other, which grows with the machine's noise.
2. In-process mode: per-step cost of N logical workers against N separate single-worker steps
   (target <= 1.1).

Runs are interleaved (A B A B ...) and medians reported, since these machines are noisy. Times come
from the runs' own metrics.jsonl (the epoch's compute and averaging seconds), so process start-up
and validation are excluded.

    python benchmarks/bench_engine.py [--rounds 6] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from modelavg.data.kaldi import write_data_dir

MODEL = [
    "--hidden-layers",
    "6",
    "--hidden-dim",
    "1024",
    "--context",
    "5",
    "--activation",
    "sigmoid",
    "--minibatch",
    "256",
    "--avg-every",
    "10",
    "--epochs",
    "1",
    "--schedule",
    "constant",
    "--lr",
    "0.1",
    "--no-progress",
    "--threads",
    "1",
    "--log-every",
    "1000",
]


def synthetic_data(path: Path, frames: int, classes: int = 2000, dim: int = 40) -> Path:
    """Random 40-dim features in 500-frame utterances; the spliced input is 440-dim."""
    rng = np.random.default_rng(0)
    n_utts = frames // 500 + 1
    feats = {f"u{i:05d}": rng.standard_normal((500, dim), dtype=np.float32) for i in range(n_utts)}
    targets = {u: rng.integers(0, classes, 500).astype(np.int32) for u in feats}
    targets["u00000"][0] = classes - 1  # make the class count exact
    write_data_dir(path, feats, targets)
    return path


def run(data: Path, out: Path, *args: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "modelavg",
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--num-classes",
        "2000",
        *MODEL,
        *args,
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    start = next(x for x in lines if x["kind"] == "start")
    epoch = next(x for x in lines if x["kind"] == "epoch" and x["epoch"] == 1)
    frames = start["rounds_per_epoch"] * 10 * 256 * start["workers"]
    wall = epoch["compute_s"] + epoch["averaging_s"]
    return {
        "frames_per_s": frames / wall,
        "averaging_share": epoch["averaging_share"],
        "step_s": epoch["compute_s"] / (start["rounds_per_epoch"] * 10 * start["workers"]),
        "round_s": epoch["compute_s"] / start["rounds_per_epoch"],  # the main process's compute
        "parameters": start["parameters"],
    }


def allreduce_alone(rank: int, port: int, numel: int, result: Path) -> None:
    """One model-size allreduce with both processes already waiting (a barrier first): the
    averaging share's floor, without the wait for the slower worker that a training run adds."""
    import torch

    from modelavg.comm.torchdist import TorchDistCommunicator

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    comm = TorchDistCommunicator(rank, 2, "gloo")
    flat, seconds = torch.ones(numel), []
    for _ in range(12):
        comm.barrier()
        t0 = time.perf_counter()
        comm.allreduce_mean_([flat])
        seconds.append(time.perf_counter() - t0)
    if rank == 0:
        result.write_text(json.dumps(statistics.median(seconds[2:])))
    comm.close()


def measure_allreduce(numel: int, tmp: Path) -> float:
    import torch.multiprocessing as mp

    from modelavg.launch import free_port

    mp.spawn(allreduce_alone, args=(free_port(), numel, tmp / "allreduce.json"), nprocs=2)
    return json.loads((tmp / "allreduce.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="averaging rounds per run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--inprocess-workers", type=int, default=4)
    args = parser.parse_args()
    n_ip = args.inprocess_workers
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # shards of exactly `rounds` rounds when split n_ip ways (CV takes 10% more)
        frames = int(args.rounds * 10 * 256 * max(2, n_ip) * 1.12) + 2000
        data = synthetic_data(tmp / "data", frames)
        single, gloo, inproc = [], [], []
        for i in range(args.repeats):
            single.append(run(data, tmp / f"single{i}", "--workers", "1"))
            gloo.append(run(data, tmp / f"gloo{i}", "--workers", "2", "--backend", "gloo"))
            inproc.append(run(data, tmp / f"inproc{i}", "--workers", str(n_ip), "--in-process"))
        allreduce_s = measure_allreduce(gloo[0]["parameters"], tmp)

    med = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
    fps1, fps2 = med(single, "frames_per_s"), med(gloo, "frames_per_s")
    share = med(gloo, "averaging_share")
    step_ratio = med(inproc, "step_s") / med(single, "step_s")
    print(f"single worker, 1 thread:     {fps1:8.0f} frames/s")
    print(
        f"2 gloo workers, 1 thread:    {fps2:8.0f} frames/s aggregate, averaging "
        f"{100 * share:.2f}% of wall time"
    )
    print(
        f"ratio 2 gloo / 1 worker:     {fps2 / fps1:.2f}   (target >= 1.6)  "
        f"{'MET' if fps2 / fps1 >= 1.6 else 'NOT MET'}"
    )
    print(
        f"averaging share:             {100 * share:.2f}%  (target <= 3%)  "
        f"{'MET' if share <= 0.03 else 'NOT MET'}"
    )
    round_s = med(gloo, "round_s")
    print(
        f"  of which the allreduce alone: {1e3 * allreduce_s:.1f} ms per round = "
        f"{100 * allreduce_s / (round_s + allreduce_s):.2f}%; the rest: waiting for the other"
    )
    print(
        f"in-process {n_ip} workers, per-step cost / single-worker step: {step_ratio:.3f}  "
        f"(target <= 1.1)  {'MET' if step_ratio <= 1.1 else 'NOT MET'}"
    )


if __name__ == "__main__":
    main()
