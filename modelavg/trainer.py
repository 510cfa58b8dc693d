"""The worker loop: local minibatch steps, averaging every K, validation and checkpoint per epoch.

One process hosts one worker (torchrun, mpirun, srun, ``--workers N``) or N logical workers
(``--in-process``); the loop is the same, it just steps each local replica in turn.

Example::

    comm = InProcessCommunicator(workers=2)
    train(TrainConfig(data="data/demo/train", out="exp/x"), comm)
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from modelavg import checkpoint as ckpt
from modelavg.averaging import Averager, make_averager
from modelavg.comm.base import Communicator
from modelavg.config import TrainConfig
from modelavg.data.frames import FrameTable
from modelavg.data.shards import epoch_order, minibatches, rounds_per_epoch
from modelavg.dataset import TrainingData, load_training_data
from modelavg.evaluate import frame_stats, summary
from modelavg.model import DNN, save_model
from modelavg.optim import build_optimizer, set_lr
from modelavg.optim.schedules import SCHEDULES, Schedule


@dataclass
class Replica:
    """One worker's model, optimiser and shards."""

    worker: int
    model: DNN
    optimizer: torch.optim.Optimizer
    train: FrameTable
    cv: FrameTable
    stats: torch.Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.float64))


def train(cfg: TrainConfig, comm: Communicator) -> dict:
    """Run training; returns the final CV summary. The main process writes everything in --out."""
    out = Path(cfg.out)
    data = load_training_data(cfg, comm)
    replicas = make_replicas(cfg, comm, data)
    models = [r.model for r in replicas]
    averager = make_averager(cfg.averaging, comm, **averaging_options(cfg))
    schedule = make_schedule(cfg)
    log = MetricsLog(out / "metrics.jsonl", comm.is_main)
    rounds = rounds_per_epoch(data.shard_frames, cfg.avg_every, cfg.minibatch)
    epoch, start_round = 1, 0
    if cfg.resume:
        epoch, start_round, schedule = restore(cfg, comm, replicas, averager, log)
    else:
        write_run_header(cfg, comm, data, rounds, log)
        cv0 = validate(replicas, cfg, comm)
        log.write({"kind": "epoch", "epoch": 0, **prefixed("cv", cv0)})
        if cfg.schedule == "newbob":
            schedule = schedule.__class__(**{**asdict(schedule), "best_loss": cv0["cross_entropy"]})
    averager.start(models)
    accepted_model = copy.deepcopy(models[0].state_dict())
    lr_scale = comm.num_workers if cfg.lr_scaling == "linear" else 1
    timer = Timer(comm.device)

    while epoch <= cfg.epochs:
        for r in replicas:
            set_lr(r.optimizer, schedule.lr * lr_scale)
            if (
                start_round == 0
                and cfg.ng_reset == "epoch"
                and hasattr(r.optimizer, "reset_preconditioners")
            ):
                r.optimizer.reset_preconditioners()
        timer.reset()
        batches = [epoch_batches(cfg, r, epoch, start_round) for r in replicas]
        bar = progress_bar(cfg, comm, epoch, rounds, start_round)
        for round_ in range(start_round, rounds):
            with timer("compute"):
                for replica, stream in zip(replicas, batches, strict=True):
                    for _ in range(cfg.avg_every):
                        local_step(replica, next(stream), cfg.context)
            with timer("averaging"):
                averager.sync(models)
            if (round_ + 1) % cfg.log_every == 0 or round_ + 1 == rounds:
                log_round(
                    log, comm, replicas, timer, epoch, round_ + 1, schedule.lr * lr_scale, bar
                )
            mid_epoch = round_ + 1 < rounds
            if cfg.checkpoint_every and (round_ + 1) % cfg.checkpoint_every == 0 and mid_epoch:
                save_checkpoint(cfg, comm, replicas, averager, schedule, log, epoch, round_ + 1)
            bar.update(1)
        bar.close()

        cv = validate(replicas, cfg, comm)
        schedule, accepted, stop = schedule.after_epoch(cv["cross_entropy"])
        if accepted:
            accepted_model = copy.deepcopy(models[0].state_dict())
        else:  # Newbob rejection: every replica continues from the last accepted model
            for m in models:
                m.load_state_dict(accepted_model)
            averager.start(models)
        leftover = comm.sum_stats(
            [
                torch.tensor(float(len(r.train) - rounds * cfg.avg_every * cfg.minibatch))
                for r in replicas
            ]
        )
        log.write(
            {
                "kind": "epoch",
                "epoch": epoch,
                "accepted": accepted,
                "lr_next": schedule.lr,
                "leftover_frames": int(leftover),
                **prefixed("cv", cv),
                **timer.totals(),
            }
        )
        report_epoch(comm, epoch, cv, accepted, timer)
        epoch, start_round = epoch + 1, 0
        save_checkpoint(cfg, comm, replicas, averager, schedule, log, epoch, 0)
        if stop:
            break

    for m in models:
        m.load_state_dict(accepted_model)
    final = validate(replicas, cfg, comm)
    if comm.is_main:
        save_model(out / "final.pt", models[0], extra={"cv": final})
        ckpt.atomic_write_bytes(json.dumps(final, indent=2).encode(), out / "final_cv.json")
    comm.barrier()
    return final


def local_step(replica: Replica, idx: torch.Tensor, context: int) -> None:
    """One minibatch of local SGD (or NG-SGD): no communication."""
    x, y = replica.train.minibatch(idx, context)
    logits = replica.model(x)
    loss = F.cross_entropy(logits, y)
    replica.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    replica.optimizer.step()
    with torch.no_grad():
        replica.stats += torch.stack(
            [
                loss.double() * len(y),
                (logits.argmax(1) == y).sum().double(),
                torch.tensor(float(len(y)), dtype=torch.float64, device=loss.device),
            ]
        )


def epoch_batches(cfg: TrainConfig, replica: Replica, epoch: int, start_round: int):
    order = epoch_order(replica.train.lengths, cfg.seed, epoch, replica.worker, cfg.buffer_frames)
    device = replica.train.feats.device
    for idx in minibatches(order, cfg.minibatch, skip=start_round * cfg.avg_every):
        yield idx.to(device)


def validate(replicas: list[Replica], cfg: TrainConfig, comm: Communicator) -> dict:
    """CV cross-entropy and frame accuracy over every worker's CV shard, summed across workers."""
    return summary(comm.sum_stats([frame_stats(r.model, r.cv, cfg.context) for r in replicas]))


# -- set-up ------------------------------------------------------------------------------------


def make_replicas(cfg: TrainConfig, comm: Communicator, data: TrainingData) -> list[Replica]:
    """Identical initial models on every worker (same seed, then broadcast from process 0)."""
    torch.manual_seed(cfg.seed)
    model = data.initial_model.to(comm.device)
    with torch.no_grad():
        from modelavg.averaging.base import flatten, unflatten_

        flat = flatten(model)
        comm.broadcast_(flat)
        unflatten_(flat, model)
    replicas = []
    for i, worker in enumerate(comm.worker_ids):
        m = copy.deepcopy(model)
        replicas.append(
            Replica(
                worker,
                m,
                build_optimizer(m, cfg),
                data.train[i],
                data.cv[i],
                torch.zeros(3, dtype=torch.float64, device=comm.device),
            )
        )
    return replicas


def averaging_options(cfg: TrainConfig) -> dict:
    if cfg.averaging == "bmuf":
        return {"block_momentum": cfg.block_momentum, "block_lr": cfg.block_lr}
    return {}


def make_schedule(cfg: TrainConfig) -> Schedule:
    if cfg.schedule == "exponential":
        return SCHEDULES["exponential"](
            lr0=cfg.lr, epochs=cfg.epochs, final_ratio=cfg.final_lr_ratio
        )
    if cfg.schedule == "newbob":
        return SCHEDULES["newbob"](
            lr=cfg.lr,
            epochs=cfg.epochs,
            start_halving=cfg.newbob_start,
            end_halving=cfg.newbob_end,
            halving_factor=cfg.halving_factor,
        )
    return SCHEDULES["constant"](lr=cfg.lr, epochs=cfg.epochs)


# -- checkpoints -------------------------------------------------------------------------------


def save_checkpoint(cfg, comm, replicas, averager: Averager, schedule, log, epoch, round_) -> None:
    """Everything a bitwise-identical resume needs, written atomically; LATEST moves last."""
    root = Path(cfg.out) / "checkpoints"
    name = ckpt.checkpoint_name(epoch, round_)
    shared = None
    if comm.is_main:
        shared = {
            "epoch": epoch,
            "round": round_,
            "model": replicas[0].model.state_dict(),
            "schedule": {"type": cfg.schedule, **asdict(schedule)},
            "averager": averager.state_dict(),
            "metrics_bytes": log.size(),
        }
    workers = {
        r.worker: {
            "optimizer": r.optimizer.state_dict(),
            "stats": r.stats,
            "rng": torch.get_rng_state(),
        }
        for r in replicas
    }
    ckpt.save_files(root, name, shared, workers)
    comm.barrier()
    if comm.is_main:
        ckpt.commit(root, name)
    comm.barrier()


def restore(cfg, comm, replicas, averager, log) -> tuple[int, int, Schedule]:
    from modelavg.errors import UsageError

    ckpt_dir = ckpt.latest(Path(cfg.out) / "checkpoints")
    if ckpt_dir is None:
        raise UsageError(f"--resume: no checkpoint in {Path(cfg.out) / 'checkpoints'}")
    shared, workers = ckpt.load_files(ckpt_dir, [r.worker for r in replicas], comm.device)
    for r in replicas:
        r.model.load_state_dict(shared["model"])
        r.optimizer.load_state_dict(workers[r.worker]["optimizer"])
        r.stats = workers[r.worker]["stats"]
        torch.set_rng_state(workers[r.worker]["rng"])
    averager.load_state_dict(shared["averager"])
    state = dict(shared["schedule"])
    schedule = SCHEDULES[state.pop("type")](**state)
    log.truncate(shared["metrics_bytes"])
    return shared["epoch"], shared["round"], schedule


# -- reporting ---------------------------------------------------------------------------------


class Timer:
    """Wall-clock seconds per phase; synchronises the GPU so the split is honest."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.seconds = {"compute": 0.0, "averaging": 0.0}
        self._phase = ""

    def __call__(self, phase: str) -> Timer:
        self._phase = phase
        return self

    def __enter__(self) -> None:
        self._t0 = time.perf_counter()

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[self._phase] += time.perf_counter() - self._t0

    def totals(self) -> dict:
        total = sum(self.seconds.values())
        return {
            "compute_s": self.seconds["compute"],
            "averaging_s": self.seconds["averaging"],
            "averaging_share": self.seconds["averaging"] / total if total else 0.0,
        }


class MetricsLog:
    """metrics.jsonl, appended by the main process only."""

    def __init__(self, path: Path, active: bool) -> None:
        self.path, self.active = path, active

    def write(self, record: dict) -> None:
        if self.active:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as fh:
                fh.write(json.dumps({"time": time.time(), **record}) + "\n")

    def size(self) -> int:
        return self.path.stat().st_size if self.active and self.path.exists() else 0

    def truncate(self, size: int) -> None:
        if self.active and self.path.exists():
            with self.path.open("r+") as fh:
                fh.truncate(size)


def prefixed(prefix: str, stats: dict) -> dict:
    return {f"{prefix}_{k}": v for k, v in stats.items()}


def log_round(log, comm, replicas, timer, epoch, round_, lr, bar) -> None:
    """Reduce the training statistics since the last line and write them (all workers join)."""
    train = summary(comm.sum_stats([r.stats for r in replicas]))
    for r in replicas:
        r.stats.zero_()
    totals = timer.totals()
    log.write(
        {
            "kind": "round",
            "epoch": epoch,
            "round": round_,
            "lr": lr,
            **prefixed("train", train),
            **totals,
        }
    )
    bar.set_postfix(
        loss=f"{train['cross_entropy']:.3f}",
        acc=f"{train['frame_accuracy']:.3f}",
        avg=f"{100 * totals['averaging_share']:.1f}%",
    )


def progress_bar(cfg, comm, epoch, rounds, start_round) -> tqdm:
    frames_per_round = cfg.avg_every * cfg.minibatch * comm.num_workers
    return tqdm(
        total=rounds,
        initial=start_round,
        desc=f"epoch {epoch}/{cfg.epochs}",
        unit="fr",
        disable=not (cfg.progress and comm.is_main),
        leave=False,
        unit_scale=frames_per_round,
        dynamic_ncols=True,
    )


def report_epoch(comm, epoch, cv, accepted, timer) -> None:
    if comm.is_main:
        t = timer.totals()
        print(
            f"epoch {epoch}: cv loss {cv['cross_entropy']:.4f} "
            f"acc {100 * cv['frame_accuracy']:.2f}%"
            f" | {t['compute_s'] + t['averaging_s']:.1f} s, averaging "
            f"{100 * t['averaging_share']:.1f}%" + ("" if accepted else " | rejected"),
            flush=True,
        )


def write_run_header(cfg, comm, data, rounds, log) -> None:
    if comm.is_main:
        out = Path(cfg.out)
        ckpt.atomic_write_bytes(
            yaml.safe_dump(cfg.resolved(), sort_keys=False).encode(), out / "config.yaml"
        )
        log.write(
            {
                "kind": "start",
                "workers": comm.num_workers,
                "processes": comm.num_processes,
                "rounds_per_epoch": rounds,
                "shard_frames": data.shard_frames,
                "cv_frames": data.cv_frames,
                "num_classes": data.num_classes,
                "parameters": sum(p.numel() for p in data.initial_model.parameters()),
            }
        )
        print(
            f"{comm.num_workers} workers, {rounds} averaging rounds of {cfg.avg_every} x "
            f"{cfg.minibatch} frames per epoch; shards {min(data.shard_frames)}-"
            f"{max(data.shard_frames)} frames; {data.num_classes} classes",
            flush=True,
        )
