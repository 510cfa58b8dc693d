"""Peers on one model, data and machine: modelavg vs PyTorch's PeriodicModelAverager vs DDP.

All systems train the 440-6x1024-2000 sigmoid DNN with plain SGD (minibatch 256, constant lr, no
lr scaling) on the same learnable synthetic data, as 2 gloo CPU processes with 1 thread each, from
the same initial model, with the same shards and frame order (modelavg's own data pipeline):

- modelavg: ``python -m modelavg train --workers 2 --avg-every K`` (reads its metrics.jsonl);
- PMA: ``torch.distributed.algorithms.model_averaging.averagers.PeriodicModelAverager(period=K,
  warmup_steps=K-1)`` after every ``optimizer.step()`` in a minimal loop of this file; the warm-up
  makes it average after minibatches K, 2K, ... like modelavg (with 0: after 1, K+1, ...);
- DDP: ``DistributedDataParallel``, a gradient allreduce every step (same maths as K=1).

Every run processes the same frames per worker (``--frames``, one epoch), so CV frame accuracy and
cross-entropy are compared after an equal number of frames. Throughput is frames / the training
loop's wall time on rank 0: start-up and validation are excluded, every per-step cost (modelavg's
divergence guard included) is counted. For modelavg that is the ``train_s`` of its epoch record:
the wall time of the epoch's round loop.
Communication share: the averaging calls' time over the loop time on rank 0, which includes
waiting for the slower worker; for DDP, whose allreduce overlaps the backward pass, the exposed
part, 1 - (PMA's compute seconds per step) / (DDP's seconds per step) in the same repeat.

Runs are interleaved (each repeat runs every configuration once, the order rotated) and medians
reported; the K=10 trio the targets are about runs ``--repeats`` times, the other K
``--other-repeats`` times, to stay near 4 minutes on 2 cores.

    python benchmarks/bench_peers.py [--repeats 3] [--other-repeats 1] [--ks 1 10 50]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODEL = {"hidden_layers": 6, "hidden_dim": 1024, "context": 5, "activation": "sigmoid"}
CLASSES, DIM, MINIBATCH, WORKERS, SEED = 2000, 40, 256, 2, 777
TARGET_PMA, TARGET_DDP = 0.98, 1.3  # modelavg frames/s vs PMA at equal K, vs DDP, at K=10


# -- data ------------------------------------------------------------------------------------


def synthetic_data(root: Path, frames_per_worker: int) -> tuple[Path, Path]:
    """Learnable senone-like data: Zipf-distributed classes in runs of ~10 frames, each class a
    Gaussian cluster in 40 dims. Each worker's shard holds frames_per_worker plus < 256 frames,
    so every K in --ks does exactly frames_per_worker / 256 minibatches."""
    from modelavg.data.kaldi import write_data_dir

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(CLASSES, DIM)).astype(np.float32) * 1.5
    prior = 1.0 / np.arange(1, CLASSES + 1)
    prior /= prior.sum()
    utts_per_shard = math.ceil(frames_per_worker / 500)
    length = math.ceil((frames_per_worker + 1) / utts_per_shard)

    def utterances(prefix: str, count: int) -> tuple[dict, dict]:
        feats, targets = {}, {}
        for u in range(count):
            runs = rng.choice(CLASSES, size=length // 10 + 1, p=prior)
            y = np.repeat(runs, 10)[:length]
            feats[f"{prefix}{u:04d}"] = centers[y] + rng.normal(size=(length, DIM)).astype(
                np.float32
            )
            targets[f"{prefix}{u:04d}"] = y.astype(np.int32)
        return feats, targets

    train_feats, train_targets = utterances("tr", WORKERS * utts_per_shard)
    write_data_dir(root / "train", train_feats, train_targets)
    write_data_dir(root / "cv", *utterances("cv", 10))
    return root / "train", root / "cv"


# -- the peers' training loop (run as one of 2 gloo processes) -------------------------------


def peer_worker(args: argparse.Namespace) -> None:
    """PMA or DDP on modelavg's data pipeline; rank 0 writes the result as JSON."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.nn.parallel import DistributedDataParallel

    from modelavg.averaging.base import flatten, unflatten_
    from modelavg.comm.torchdist import TorchDistCommunicator
    from modelavg.config import TrainConfig
    from modelavg.data.shards import epoch_order, minibatches, rounds_per_epoch
    from modelavg.data.training import load_training_data
    from modelavg.evaluate import frame_stats, summary

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    k = args.avg_every if args.system == "pma" else 1
    cfg = TrainConfig(
        data=args.data, cv=args.cv, num_classes=CLASSES, workers=world, minibatch=MINIBATCH,
        avg_every=k, lr=args.lr, seed=SEED, **MODEL,
    )  # fmt: skip
    comm = TorchDistCommunicator(rank, world, "gloo")
    data = load_training_data(cfg, comm)
    torch.manual_seed(cfg.seed)
    model = copy.deepcopy(data.initial_model)
    with torch.no_grad():  # identical start on every rank, as modelavg broadcasts it
        flat = flatten(model)
        dist.broadcast(flat, 0)
        unflatten_(flat, model)
    table, cv = data.train[0], data.cv[0]
    steps = rounds_per_epoch(data.shard_frames, k, MINIBATCH) * k
    net = DistributedDataParallel(model) if args.system == "ddp" else model
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    averager = PeriodicModelAverager(period=k, warmup_steps=k - 1) if args.system == "pma" else None

    def validate() -> dict:
        return summary(comm.sum_stats([frame_stats(model, cv, cfg.context)]))

    validate()
    t0, comm_s = time.perf_counter(), 0.0
    order = epoch_order(table.lengths, cfg.seed, 1, rank, cfg.buffer_frames)
    for step, idx in enumerate(minibatches(order, MINIBATCH)):
        if step == steps:
            break
        x, y = table.minibatch(idx, cfg.context)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if averager is not None:
            ta = time.perf_counter()
            averager.average_parameters(model.parameters())
            comm_s += time.perf_counter() - ta
    loop_s = time.perf_counter() - t0
    cv_result = validate()
    if rank == 0:
        result = {
            "frames": steps * MINIBATCH * world,
            "loop_s": loop_s,
            "comm_s": comm_s,
            "compute_step_s": (loop_s - comm_s) / steps,
            "step_s": loop_s / steps,
            "cv_acc": cv_result["frame_accuracy"],
            "cv_loss": cv_result["cross_entropy"],
        }
        Path(args.result).write_text(json.dumps(result))
    comm.close()


# -- launching and reading runs --------------------------------------------------------------


def run_peer(system: str, k: int, train: Path, cv: Path, out: Path, lr: float) -> dict:
    """Two processes of this file's peer loop, rendezvous over env:// like modelavg's spawner."""
    from modelavg.launch import free_port

    out.mkdir(parents=True)
    port = str(free_port())
    cmd = [sys.executable, __file__, "--peer", system, "--avg-every", str(k), "--lr", str(lr)]
    cmd += ["--data", str(train), "--cv", str(cv), "--result", str(out / "result.json")]
    procs = []
    for rank in range(WORKERS):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(WORKERS)}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True))
    errors = [p.communicate()[1] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"{system} K={k} failed:\n" + "\n".join(e[-2000:] for e in errors))
    r = json.loads((out / "result.json").read_text())
    return {
        "fps": r["frames"] / r["loop_s"],
        "comm_share": r["comm_s"] / r["loop_s"],
        "cv_acc": r["cv_acc"],
        "cv_loss": r["cv_loss"],
        "compute_step_s": r["compute_step_s"],
        "step_s": r["step_s"],
    }


def run_modelavg(k: int, train: Path, cv: Path, out: Path, lr: float, *extra: str) -> dict:
    """One 2-process gloo run of ``modelavg train`` (``extra``: more options)."""
    cmd = [sys.executable, "-m", "modelavg", "train", "--data", str(train), "--cv", str(cv), *extra]
    cmd += ["--out", str(out), "--workers", str(WORKERS), "--backend", "gloo", "--threads", "1"]
    cmd += ["--num-classes", str(CLASSES), "--avg-every", str(k), "--minibatch", str(MINIBATCH)]
    cmd += ["--epochs", "1", "--schedule", "constant", "--lr", str(lr), "--lr-scaling", "none"]
    cmd += ["--seed", str(SEED), "--no-progress", "--log-every", "1000000"]
    for key, value in MODEL.items():
        cmd += ["--" + key.replace("_", "-"), str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as for the peers' processes
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"modelavg K={k} failed:\n{done.stderr[-2000:]}")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    start = next(x for x in lines if x["kind"] == "start")
    e1 = next(x for x in lines if x["kind"] == "epoch" and x["epoch"] == 1)
    loop = e1["train_s"]  # the epoch's round loop: steps, averaging, divergence checks
    return {
        "fps": start["rounds_per_epoch"] * k * MINIBATCH * WORKERS / loop,
        "comm_share": e1["averaging_s"] / loop,
        "compute_s": e1["compute_s"],  # the local steps alone
        "cv_acc": e1["cv_frame_accuracy"],
        "cv_loss": e1["cv_cross_entropy"],
    }


# -- the benchmark ---------------------------------------------------------------------------


def plan(ks: list[int]) -> list[tuple[str, int]]:
    return [("modelavg", k) for k in ks] + [("pma", k) for k in ks] + [("ddp", 1)]


def schedule(ks: list[int], repeats: int, other_repeats: int) -> list[tuple[int, str, int]]:
    """(repeat, system, K) in run order: interleaved, rotated each repeat against slow drift."""
    runs = []
    for rep in range(max(repeats, other_repeats)):
        wanted = [
            (s, k)
            for s, k in plan(ks)
            if (rep < repeats if (s == "ddp" or k == 10) else rep < other_repeats)
        ]
        shift = rep % len(wanted)
        runs += [(rep, s, k) for s, k in wanted[shift:] + wanted[:shift]]
    return runs


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def report(results: dict[tuple[str, int], list[dict]], ks: list[int]) -> list[str]:
    """One line per system and K, every number also as a ratio to modelavg at the same K."""
    lines = [
        "system      K   frames/s  x modelavg  comm share   CV acc  x modelavg  CV loss  x modelavg"
    ]
    ddp = results[("ddp", 1)]
    ddp_share = 1 - median(results[("pma", 10 if 10 in ks else ks[0])], "compute_step_s") / median(
        ddp, "step_s"
    )
    for k in ks:
        ref = results[("modelavg", k)]
        fps0, acc0, loss0 = median(ref, "fps"), median(ref, "cv_acc"), median(ref, "cv_loss")
        for system, runs, share in [
            ("modelavg", ref, median(ref, "comm_share")),
            ("PMA", results[("pma", k)], median(results[("pma", k)], "comm_share")),
            ("DDP", ddp, ddp_share),
        ]:
            if system == "DDP" and k not in (1, 10):
                continue
            fps, acc, loss = median(runs, "fps"), median(runs, "cv_acc"), median(runs, "cv_loss")
            lines.append(
                f"{system:9s} {k:3d} {fps:10.0f} {fps / fps0:10.3f} {100 * share:10.2f}% "
                f"{100 * acc:7.2f}% {acc / acc0:10.3f} {loss:8.4f} {loss / loss0:10.4f}"
                + ("   (DDP: exposed comm, estimated)" if system == "DDP" else "")
            )
    return lines


def targets(results: dict[tuple[str, int], list[dict]]) -> list[str]:
    fps = {key: median(runs, "fps") for key, runs in results.items()}
    ma = fps[("modelavg", 10)]
    checks = [
        ("modelavg / PMA frames/s at K=10", ma / fps[("pma", 10)], TARGET_PMA),
        ("modelavg / DDP frames/s at K=10", ma / fps[("ddp", 1)], TARGET_DDP),
    ]
    return [
        f"{name}: {ratio:.3f} (target >= {goal})  {'MET' if ratio >= goal else 'NOT MET'}"
        for name, ratio, goal in checks
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of the K=10 trio")
    parser.add_argument("--other-repeats", type=int, default=1, help="runs of the other K")
    parser.add_argument("--frames", type=int, default=12800, help="frames per worker per run")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--json", help="also write every run's numbers here")
    parser.add_argument("--peer", choices=["pma", "ddp"], help=argparse.SUPPRESS)
    parser.add_argument("--avg-every", type=int, default=10, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--cv", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        args.system = args.peer
        peer_worker(args)
        return
    if 10 not in args.ks or any(args.frames % (k * MINIBATCH) for k in args.ks):
        parser.error(f"--ks must include 10 and each K x {MINIBATCH} must divide --frames")
    results: dict[tuple[str, int], list[dict]] = {key: [] for key in plan(args.ks)}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        train, cv = synthetic_data(Path(tmp), args.frames)
        for rep, system, k in schedule(args.ks, args.repeats, args.other_repeats):
            out = Path(tmp) / f"{system}-{k}-{rep}"
            run = run_modelavg if system == "modelavg" else _peer(system)
            results[(system, k)].append(run(k, train, cv, out, args.lr))
            shown = {key: round(v, 4) for key, v in results[(system, k)][-1].items()}
            print(f"  repeat {rep + 1} {system} K={k}: {shown}", flush=True)
    print(
        f"\n2 gloo CPU workers x 1 thread, 440-6x1024-2000 sigmoid, minibatch {MINIBATCH}, "
        f"{args.frames} frames per worker per run, lr {args.lr}; medians of {args.repeats} "
        f"interleaved repeats at K=10 and DDP, {args.other_repeats} at other K "
        f"({time.perf_counter() - t_start:.0f} s)"
    )
    print("\n".join(report(results, args.ks)))
    print("\n".join(targets(results)))
    if args.json:
        Path(args.json).write_text(json.dumps({f"{s}-{k}": v for (s, k), v in results.items()}))


def _peer(system: str):
    return lambda k, train, cv, out, lr: run_peer(system, k, train, cv, out, lr)


if __name__ == "__main__":
    main()
