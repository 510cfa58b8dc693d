"""Per-step time of NGSGD versus torch.optim.SGD on the paper's DNN shape (scaled to 1024 units).

A step is forward + cross-entropy + zero_grad + backward + optimizer.step() on a
440-6x1024-2000 sigmoid DNN at minibatch 256 (synthetic inputs).  The two optimisers alternate
step by step in one process (order flipped every step) so that machine noise hits both alike;
the medians and their ratio are printed per thread setting.  Target: NGSGD <= 1.3x SGD.
Also printed: the ratio of means (which includes NG's estimate updates, one step in
``update_period``) and, at one thread, the ratio of the thread's CPU-time medians, which is the
least disturbed by other processes on a shared machine.

    python benchmarks/bench_ngsgd.py                 # 1 thread, then torch's default
    python benchmarks/bench_ngsgd.py --threads 1 --steps 50 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from modelavg.optim import NGSGD
from modelavg.optim.fisher import VARIANTS


def build_dnn(inputs: int, hidden: int, layers: int, outputs: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    dims = [inputs] + [hidden] * layers
    body: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:], strict=True):
        body += [nn.Linear(a, b), nn.Sigmoid()]
    return nn.Sequential(*body, nn.Linear(dims[-1], outputs))


def make_step(
    model: nn.Module, opt: torch.optim.Optimizer, x, y
) -> Callable[[], tuple[float, float]]:
    """One training step; returns (wall seconds, this thread's CPU seconds)."""

    def step() -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.thread_time()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - wall, time.thread_time() - cpu

    return step


def measure(args: argparse.Namespace, threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    shape = (args.inputs, args.hidden, args.layers, args.outputs)
    sgd_model, ng_model = build_dnn(*shape, seed=0), build_dnn(*shape, seed=0)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=args.lr)
    ng = NGSGD(ng_model, lr=args.lr, update_period=args.update_period, variant=args.variant)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.inputs, generator=g)
    y = torch.randint(0, args.outputs, (args.batch,), generator=g)
    steps = {"sgd": make_step(sgd_model, sgd, x, y), "ngsgd": make_step(ng_model, ng, x, y)}
    for _ in range(args.warmup):  # NG updates its estimates on each of its first 10-11 calls
        steps["sgd"]()
        steps["ngsgd"]()
    times: dict[str, list[tuple[float, float]]] = {"sgd": [], "ngsgd": []}
    for i in range(args.steps):
        order = ("sgd", "ngsgd") if i % 2 == 0 else ("ngsgd", "sgd")
        for name in order:
            times[name].append(steps[name]())
    wall = {k: statistics.median(t[0] for t in v) for k, v in times.items()}
    mean = {k: statistics.fmean(t[0] for t in v) for k, v in times.items()}
    cpu = {k: statistics.median(t[1] for t in v) for k, v in times.items()}
    result = {"threads": threads, "sgd_ms": 1e3 * wall["sgd"], "ngsgd_ms": 1e3 * wall["ngsgd"]}
    result["ratio"] = wall["ngsgd"] / wall["sgd"]
    # the mean includes NG's estimate updates (every update_period-th step), the median not
    result["mean_ratio"] = mean["ngsgd"] / mean["sgd"]
    if threads == 1:  # CPU time of the one compute thread: robust to other load on the machine
        result["cpu_ratio"] = cpu["ngsgd"] / cpu["sgd"]
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inputs", type=int, default=440)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--outputs", type=int, default=2000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--update-period", type=int, default=4)
    p.add_argument(
        "--variant", choices=VARIANTS, default="nnet2", help="Fisher estimate (docs/NGSGD.md)"
    )
    p.add_argument("--steps", type=int, default=30, help="timed steps per optimiser")
    p.add_argument("--warmup", type=int, default=12)
    p.add_argument(
        "--threads",
        type=int,
        nargs="*",
        default=None,
        help="thread counts to run (default: 1 and torch's default)",
    )
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    default_threads = torch.get_num_threads()
    results = [measure(args, t) for t in (args.threads or [1, default_threads])]
    print(
        f"{args.inputs}-{args.layers}x{args.hidden}-{args.outputs} sigmoid DNN, minibatch "
        f"{args.batch}, medians of {args.steps} interleaved steps (torch {torch.__version__})"
    )
    header = ("threads", "SGD ms", "NGSGD ms", "ratio", "mean ratio", "CPU ratio")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (7, 8, 8, 6, 10, 9), strict=True)))
    for r in results:
        cpu = f"{r['cpu_ratio']:>9.3f}" if "cpu_ratio" in r else f"{'-':>9}"
        print(
            f"{r['threads']:>7} {r['sgd_ms']:>8.1f} {r['ngsgd_ms']:>8.1f} {r['ratio']:>6.3f} "
            f"{r['mean_ratio']:>10.3f} {cpu}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
