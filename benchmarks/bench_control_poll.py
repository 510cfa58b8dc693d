"""What the per-round preemption/checkpoint poll costs: ``preempt.Control.poll`` (an allreduce of
two float64 values between the processes) against an allreduce of a model-sized buffer.

    python -m torch.distributed.run --standalone --nproc-per-node 2 \
        benchmarks/bench_control_poll.py [--polls 2000] [--floats 1000000]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from modelavg.comm.torchdist import TorchDistCommunicator
from modelavg.preempt import Control


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--polls", type=int, default=2000)
    parser.add_argument("--floats", type=int, default=1_000_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    comm = TorchDistCommunicator(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    with Control(comm, interval_s=600) as control:
        for _ in range(100):  # warm-up
            control.poll()
        t0 = time.perf_counter()
        for _ in range(args.polls):
            control.poll()
        poll_s = (time.perf_counter() - t0) / args.polls
    flat = torch.zeros(args.floats)
    for _ in range(3):
        comm.allreduce_mean_([flat])
    t0 = time.perf_counter()
    for _ in range(20):
        comm.allreduce_mean_([flat])
    model_s = (time.perf_counter() - t0) / 20
    if comm.is_main:
        print(
            f"{comm.num_processes} processes: poll {poll_s * 1e6:.0f} us; allreduce of "
            f"{args.floats:,} floats {model_s * 1e3:.2f} ms"
        )
    comm.close()


if __name__ == "__main__":
    main()
