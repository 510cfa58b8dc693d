"""modelavg's worker loop against a plain PyTorch loop, in one process: what bench_peers cannot
separate from machine noise.

bench_peers compares systems run as separate process pairs, whose frames/s vary by 15-20% from
run to run on a shared host. This script measures, on bench_peers' model and data, the two costs
modelavg adds to a plain loop, in one process with the steps alternating so noise hits both alike:

- per step: ``trainer.local_step`` (forward, loss, backward, SGD step, running loss/accuracy
  statistics) against forward, loss, backward, ``torch.optim.SGD.step`` on a copy of the model;
- per averaging round: the divergence guard (``healthy`` then ``remember`` on the flat buffer).

    python benchmarks/bench_loop_overhead.py [--steps 40]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import bench_peers as peers  # noqa: E402 - the same model, data and seed

from modelavg.comm.inprocess import InProcessCommunicator  # noqa: E402
from modelavg.config import TrainConfig  # noqa: E402
from modelavg.data.shards import epoch_order, minibatches  # noqa: E402
from modelavg.data.training import load_training_data  # noqa: E402
from modelavg.guard import DivergenceGuard  # noqa: E402
from modelavg.train import local_step, make_replicas  # noqa: E402


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="alternating step pairs (5 warm-up)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # as modelavg's launcher does
    with tempfile.TemporaryDirectory() as tmp:
        train, cv = peers.synthetic_data(Path(tmp), 12800)
        cfg = TrainConfig(
            data=str(train), cv=str(cv), num_classes=peers.CLASSES, workers=1,
            minibatch=peers.MINIBATCH, lr=0.5, seed=peers.SEED, **peers.MODEL,
        )  # fmt: skip
        comm = InProcessCommunicator(workers=1)
        data = load_training_data(cfg, comm)
    replica = make_replicas(cfg, comm, data)[0]
    model = copy.deepcopy(data.initial_model)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    table = replica.train
    order = epoch_order(table.lengths, cfg.seed, 1, 0, cfg.buffer_frames)
    batches = list(minibatches(order, cfg.minibatch))

    def plain_step(idx: torch.Tensor) -> None:
        x, y = table.minibatch(idx, cfg.context)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    ours, plain = [], []
    for i in range(args.steps + 5):
        idx = batches[i % len(batches)]
        ours.append(timed(lambda idx=idx: local_step(replica, idx, cfg.context)))
        plain.append(timed(lambda idx=idx: plain_step(idx)))
    ours, plain = statistics.median(ours[5:]), statistics.median(plain[5:])

    guard = DivergenceGuard(cfg.max_rollbacks, cfg.rollback_lr_factor)
    guard.remember([replica.model])

    def guard_round() -> None:  # what check_divergence does after a healthy round
        assert guard.healthy([replica.model])
        guard.remember([replica.model])

    guard_s = statistics.median(timed(guard_round) for _ in range(20))
    params = sum(p.numel() for p in replica.model.parameters())
    print(f"{params} parameters, minibatch {cfg.minibatch}, 1 thread, medians of {args.steps}")
    print(f"step: modelavg local_step {1e3 * ours:.1f} ms, plain loop {1e3 * plain:.1f} ms, "
          f"ratio {ours / plain:.3f}")  # fmt: skip
    print(f"divergence guard per averaging round: {1e3 * guard_s:.2f} ms "
          f"({100 * guard_s / (10 * ours):.2f}% of a K=10 round)")  # fmt: skip


if __name__ == "__main__":
    main()
