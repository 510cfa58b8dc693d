"""Overlapped against blocking averaging, side by side: frames/s as a ratio to the ceiling.

bench_peers.py's setting (440-6x1024-2000 sigmoid DNN, plain SGD, minibatch 256, constant lr, 2
gloo CPU processes x 1 thread, its learnable synthetic data, one epoch of ``--frames`` frames per
worker) and its runners, for:

- ceiling: modelavg with K = every step of the run, so one averaging at its end (no
  communication in the loop, the same loop otherwise);
- blocking: ``--averaging model`` at K = 1 and K = 10;
- overlap: ``--averaging overlap`` at K = 1 and K = 10 (each allreduce runs during the next
  round; the epoch's last one is waited for, and counted);
- DDP: a gradient allreduce every step (K = 1), bench_peers' loop.

Throughput is frames / the training loop's wall time on rank 0 (start-up and validation
excluded). Runs are interleaved (each repeat runs every configuration once, the order rotated)
and medians reported. Targets (issue 20 item 7): overlap at K=10 >= 0.99 of the ceiling, overlap
at K=1 >= DDP's frames/s.

    python benchmarks/bench_overlap.py [--repeats 2] [--frames 12800]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench_peers import MINIBATCH, median, run_modelavg, run_peer, synthetic_data

TARGET_K10 = 0.99  # overlap K=10 / ceiling


def configurations(steps: int) -> dict[str, tuple[int, tuple[str, ...]]]:
    """name -> (K, extra options of modelavg train; DDP's K is its own)."""
    return {
        "ceiling": (steps, ()),
        "blocking K=1": (1, ()),
        "blocking K=10": (10, ()),
        "overlap K=1": (1, ("--averaging", "overlap")),
        "overlap K=10": (10, ("--averaging", "overlap")),
        "DDP K=1": (1, ()),
    }


def measure(name: str, k: int, extra: tuple[str, ...], train: Path, cv: Path, out: Path, lr: float):
    if name.startswith("DDP"):
        return run_peer("ddp", k, train, cv, out, lr)
    return run_modelavg(k, train, cv, out, lr, *extra)


def report(results: dict[str, list[dict]]) -> list[str]:
    """Frames/s against the ceiling; and the local steps' own time against the ceiling's: a
    reduction running beside the steps (overlap) can still slow them down, sharing their cores."""
    ceiling = median(results["ceiling"], "fps")
    steps = median(results["ceiling"], "compute_s")
    lines = ["configuration   frames/s  x ceiling  comm share  steps' time x ceiling   CV acc"]
    for name, runs in results.items():
        fps, acc = median(runs, "fps"), 100 * median(runs, "cv_acc")
        share = f"{100 * median(runs, 'comm_share'):10.2f}%"
        share = "  in backward" if name.startswith("DDP") else share
        own = "-" if name.startswith("DDP") else f"{median(runs, 'compute_s') / steps:.3f}"
        lines.append(f"{name:14s} {fps:9.0f} {fps / ceiling:10.3f} {share} {own:>21s} {acc:7.2f}%")
    fps = {name: median(runs, "fps") for name, runs in results.items()}
    checks = [
        ("overlap K=10 / ceiling", fps["overlap K=10"] / ceiling, TARGET_K10),
        ("overlap K=1 / DDP K=1", fps["overlap K=1"] / fps["DDP K=1"], 1.0),
        ("blocking K=10 / ceiling (for reference)", fps["blocking K=10"] / ceiling, None),
    ]
    for label, ratio, goal in checks:
        met = "" if goal is None else ("  MET" if ratio >= goal else "  NOT MET")
        lines.append(f"{label}: {ratio:.3f}" + (f"  (target >= {goal}){met}" if goal else ""))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--frames", type=int, default=12800, help="frames per worker per run")
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--json", help="also write every run's numbers here")
    args = parser.parse_args()
    if args.frames % (10 * MINIBATCH):
        parser.error(f"--frames must be a multiple of 10 x {MINIBATCH}")
    configs = configurations(args.frames // MINIBATCH)
    names = list(configs)
    results: dict[str, list[dict]] = {name: [] for name in names}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        train, cv = synthetic_data(Path(tmp), args.frames)
        for rep in range(args.repeats):
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                out = Path(tmp) / f"{name.replace(' ', '_')}-{rep}"
                results[name].append(measure(name, *configs[name], train, cv, out, args.lr))
                shown = {key: round(v, 4) for key, v in results[name][-1].items()}
                print(f"  repeat {rep + 1} {name}: {shown}", flush=True)
    print(
        f"\n2 gloo CPU workers x 1 thread, 440-6x1024-2000 sigmoid, minibatch {MINIBATCH}, "
        f"{args.frames} frames per worker per run, lr {args.lr}; medians of {args.repeats} "
        f"interleaved repeats ({time.perf_counter() - t_start:.0f} s)"
    )
    print("\n".join(report(results)))
    if args.json:
        Path(args.json).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
