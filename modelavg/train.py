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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from modelavg import checkpoint as ckpt
from modelavg.analysis.noise import (
    NOISE_FRAMES,
    estimate_noise_scales,
    euclidean,
    natural_gradient_metric,
)
from modelavg.averaging import Averager, make_averager
from modelavg.averaging.base import flatten, share_flat_storage_, unflatten_
from modelavg.comm.base import Communicator
from modelavg.config import TrainConfig
from modelavg.data.frames import FrameTable
from modelavg.data.shards import epoch_order, minibatches, rounds_per_epoch
from modelavg.data.training import TrainingData, load_training_data
from modelavg.errors import UsageError
from modelavg.evaluate import frame_stats, summary
from modelavg.guard import DivergenceGuard
from modelavg.io import atomic_write_bytes
from modelavg.nets.dnn import DNN, save_model
from modelavg.optim import build_optimizer, set_lr
from modelavg.optim.ngsgd import NGSGD
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


@dataclass
class Run:
    """Everything the loop carries: the workers, the algorithms and the position in training."""

    cfg: TrainConfig
    comm: Communicator
    replicas: list[Replica]
    averager: Averager
    guard: DivergenceGuard
    schedule: Schedule
    log: MetricsLog
    rounds: int  # averaging rounds per epoch, the same on every worker
    accepted_model: dict  # the last model the schedule accepted (Newbob may reject epochs)
    epoch: int = 1
    round: int = 0  # first round to run in this epoch (non-zero after a mid-epoch resume)
    timer: Timer | None = None

    @property
    def models(self) -> list[DNN]:
        return [r.model for r in self.replicas]

    @property
    def lr(self) -> float:
        """The lr every worker uses: schedule x linear scaling x divergence backoff."""
        scale = self.comm.num_workers if self.cfg.lr_scaling == "linear" else 1
        return self.schedule.lr * scale * self.guard.lr_scale


def train(cfg: TrainConfig, comm: Communicator) -> dict:
    """Run training; returns the final CV summary. The main process writes everything in --out."""
    run = start(cfg, comm)
    while run.epoch <= cfg.epochs:
        start_epoch(run)
        batches = [epoch_batches(cfg, r, run.epoch, run.round) for r in run.replicas]
        bar = progress_bar(cfg, comm, run.epoch, run.rounds, run.round)
        for round_ in range(run.round + 1, run.rounds + 1):
            with run.timer("compute"):
                for replica, stream in zip(run.replicas, batches, strict=True):
                    for _ in range(cfg.avg_every):
                        local_step(replica, next(stream), cfg.context)
            with run.timer("averaging"):
                run.averager.sync(run.models)
            check_divergence(run, round_)
            if round_ % cfg.log_every == 0 or round_ == run.rounds:
                log_round(run, round_, bar)
            if cfg.cv_every and round_ % cfg.cv_every == 0 and round_ < run.rounds:
                log_cv(run, round_)
            if cfg.checkpoint_every and round_ % cfg.checkpoint_every == 0 and round_ < run.rounds:
                save_checkpoint(run, round_)
            bar.update(1)
        bar.close()
        if end_epoch(run):
            break
    return finish(run)


def start(cfg: TrainConfig, comm: Communicator) -> Run:
    """Data, replicas, algorithms; then either the initial validation or a resume."""
    data = load_training_data(cfg, comm)
    replicas = make_replicas(cfg, comm, data)
    run = Run(
        cfg=cfg,
        comm=comm,
        replicas=replicas,
        averager=make_averager(cfg.averaging, comm, **averaging_options(cfg)),
        guard=DivergenceGuard(cfg.max_rollbacks, cfg.rollback_lr_factor),
        schedule=make_schedule(cfg),
        log=MetricsLog(Path(cfg.out) / "metrics.jsonl", comm.is_main),
        rounds=rounds_per_epoch(data.shard_frames, cfg.avg_every, cfg.minibatch),
        accepted_model=copy.deepcopy(replicas[0].model.state_dict()),
        timer=Timer(comm.device),
    )
    if cfg.noise_scale and len(replicas[0].train) < NOISE_FRAMES:
        raise UsageError(
            f"--noise-scale: a worker's shard holds {len(replicas[0].train)} frames, fewer than "
            f"the {NOISE_FRAMES} one estimate draws"
        )
    if cfg.resume:
        restore(run)
    else:
        write_run_header(run, data)
        cv0 = validate(run)
        run.log.write({"kind": "epoch", "epoch": 0, **prefixed("cv", cv0), **noise_fields(run)})
        if cfg.schedule == "newbob":
            run.schedule = replace(run.schedule, best_loss=cv0["cross_entropy"])
    run.averager.start(run.models)
    run.guard.remember(run.models)
    return run


def start_epoch(run: Run) -> None:
    run.timer.reset()
    for r in run.replicas:
        set_lr(r.optimizer, run.lr)
        fresh = run.round == 0 and run.cfg.ng_reset == "epoch"
        if fresh and hasattr(r.optimizer, "reset_preconditioners"):
            r.optimizer.reset_preconditioners()  # the paper: a new process, new NG state, per epoch


def check_divergence(run: Run, round_: int) -> None:
    """NaN/Inf after averaging: back to the last good model with a lower lr (all workers agree)."""
    if run.guard.healthy(run.models):
        run.guard.remember(run.models)
        return
    run.guard.roll_back(run.models, [r.optimizer for r in run.replicas], run.accepted_model)
    run.averager.start(run.models)
    for r in run.replicas:
        set_lr(r.optimizer, run.lr)
    run.log.write(
        {
            "kind": "rollback",
            "epoch": run.epoch,
            "round": round_,
            "lr": run.lr,
            "rollbacks": run.guard.rollbacks,
        }
    )
    if run.comm.is_main:
        print(
            f"epoch {run.epoch} round {round_}: NaN/Inf after averaging; rolled back to the last "
            f"good model, lr now {run.lr:.4g}",
            flush=True,
        )


def end_epoch(run: Run) -> bool:
    """Validate, let the schedule accept or reject the epoch, log, checkpoint. True: stop."""
    cfg, comm = run.cfg, run.comm
    times = run.timer.totals()  # the epoch's training, before validation
    cv = validate(run)
    run.schedule, accepted, stop = run.schedule.after_epoch(cv["cross_entropy"])
    if accepted:
        run.accepted_model = copy.deepcopy(run.models[0].state_dict())
    else:  # Newbob rejection: every replica continues from the last accepted model
        for m in run.models:
            m.load_state_dict(run.accepted_model)
        run.averager.start(run.models)
        run.guard.remember(run.models)
    used = run.rounds * cfg.avg_every * cfg.minibatch
    leftover = comm.sum_stats([torch.tensor(float(len(r.train) - used)) for r in run.replicas])
    run.log.write(
        {
            "kind": "epoch",
            "epoch": run.epoch,
            "accepted": accepted,
            "lr_next": run.schedule.lr,
            "leftover_frames": int(leftover),
            **prefixed("cv", cv),
            **noise_fields(run),
            **times,
        }
    )
    report_epoch(comm, run.epoch, cv, accepted, times)
    run.epoch, run.round = run.epoch + 1, 0
    save_checkpoint(run, 0)
    return stop


def finish(run: Run) -> dict:
    """The last accepted model is the result: validate it and write final.pt."""
    for m in run.models:
        m.load_state_dict(run.accepted_model)
    final = validate(run)
    if run.comm.is_main:
        out = Path(run.cfg.out)
        save_model(out / "final.pt", run.models[0], extra={"cv": final})
        atomic_write_bytes(json.dumps(final, indent=2).encode(), out / "final_cv.json")
    run.comm.barrier()
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


def validate(run: Run) -> dict:
    """CV cross-entropy and frame accuracy over every worker's CV shard, summed across workers."""
    stats = [frame_stats(r.model, r.cv, run.cfg.context) for r in run.replicas]
    return summary(run.comm.sum_stats(stats))


# -- set-up ------------------------------------------------------------------------------------


def make_replicas(cfg: TrainConfig, comm: Communicator, data: TrainingData) -> list[Replica]:
    """Identical initial models on every worker (same seed, then broadcast from process 0)."""
    torch.manual_seed(cfg.seed)
    model = data.initial_model.to(comm.device)
    with torch.no_grad():
        flat = flatten(model)
        comm.broadcast_(flat)
        unflatten_(flat, model)
    replicas = []
    for i, worker in enumerate(comm.worker_ids):
        m = copy.deepcopy(model)
        share_flat_storage_(m)  # averaging reduces the parameters in place
        replicas.append(
            Replica(
                worker,
                m,
                build_optimizer(m, cfg, comm.num_workers),
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


def save_checkpoint(run: Run, round_: int) -> None:
    """Everything a bitwise-identical resume needs, written atomically; LATEST moves last."""
    root = Path(run.cfg.out) / "checkpoints"
    name = ckpt.checkpoint_name(run.epoch, round_)
    shared = None
    if run.comm.is_main:
        shared = {
            "epoch": run.epoch,
            "round": round_,
            "model": run.models[0].state_dict(),
            "accepted_model": run.accepted_model,
            "schedule": {"type": run.cfg.schedule, **asdict(run.schedule)},
            "averager": run.averager.state_dict(),
            "guard": run.guard.state_dict(),
            "metrics_bytes": run.log.size(),
        }
    workers = {
        r.worker: {
            "optimizer": r.optimizer.state_dict(),
            "stats": r.stats,
            "rng": torch.get_rng_state(),
        }
        for r in run.replicas
    }
    ckpt.save_files(root, name, shared, workers)
    run.comm.barrier()
    if run.comm.is_main:
        ckpt.commit(root, name)
    run.comm.barrier()


def restore(run: Run) -> None:
    """Load the newest complete checkpoint into ``run`` (models, optimisers, schedule, position)."""
    ckpt_dir = ckpt.latest(Path(run.cfg.out) / "checkpoints")
    if ckpt_dir is None:
        raise UsageError(f"--resume: no checkpoint in {Path(run.cfg.out) / 'checkpoints'}")
    shared, workers = ckpt.load_files(ckpt_dir, [r.worker for r in run.replicas], run.comm.device)
    for r in run.replicas:
        r.model.load_state_dict(shared["model"])
        r.optimizer.load_state_dict(workers[r.worker]["optimizer"])
        r.stats = workers[r.worker]["stats"]
        torch.set_rng_state(workers[r.worker]["rng"])
    run.averager.load_state_dict(shared["averager"])
    run.guard.load_state_dict(shared["guard"])
    state = dict(shared["schedule"])
    run.schedule = SCHEDULES[state.pop("type")](**state)
    run.accepted_model = shared["accepted_model"]
    run.epoch, run.round = shared["epoch"], shared["round"]
    run.log.truncate(shared["metrics_bytes"])


# -- reporting ---------------------------------------------------------------------------------


class Timer:
    """Wall-clock seconds per phase; synchronises the GPU so the split is honest."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.seconds = {"compute": 0.0, "averaging": 0.0}
        self._phase = ""
        self._started = time.perf_counter()

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
            # wall time since reset: compute, averaging and everything between (guard, logs)
            "train_s": time.perf_counter() - self._started,
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


def log_cv(run: Run, round_: int) -> None:
    """A mid-epoch validation point of the learning curve (the models are equal after averaging)."""
    rounds_done = (run.epoch - 1) * run.rounds + round_
    frames = rounds_done * run.cfg.avg_every * run.cfg.minibatch
    cv = validate(run)
    record = {"kind": "cv", "epoch": run.epoch, "round": round_, "frames_per_worker": frames}
    run.log.write({**record, **prefixed("cv", cv), **noise_fields(run)})


def noise_fields(run: Run) -> dict:
    """With --noise-scale: the gradient noise scale of the first worker's model on its shard
    (the main process only; the models are equal after averaging), and with NG-SGD, once its
    estimates exist, the same in NG-SGD's metric (``noise_scale_ng``). Its own random draws,
    so training is unchanged."""
    if not (run.cfg.noise_scale and run.comm.is_main):
        return {}
    replica = run.replicas[0]
    model = DNN(replica.model.spec).to(run.comm.device)  # a copy without the optimiser's hooks
    model.load_state_dict(replica.model.state_dict())
    metrics = {"": euclidean}
    if isinstance(replica.optimizer, NGSGD) and replica.optimizer.estimates_ready:
        metrics["_ng"] = natural_gradient_metric(model, replica.optimizer.preconditioners())
    ests = estimate_noise_scales(model, replica.train, run.cfg.context, metrics, seed=run.cfg.seed)
    fields = {}
    for suffix, est in ests.items():
        fields |= {f"noise_scale{suffix}": est.noise_scale, f"noise_stderr{suffix}": est.stderr}
    return fields


def log_round(run: Run, round_: int, bar: tqdm) -> None:
    """Reduce the training statistics since the last line and write them (all workers join)."""
    train = summary(run.comm.sum_stats([r.stats for r in run.replicas]))
    for r in run.replicas:
        r.stats.zero_()
    totals = run.timer.totals()
    run.log.write(
        {
            "kind": "round",
            "epoch": run.epoch,
            "round": round_,
            "lr": run.lr,
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


def report_epoch(comm, epoch, cv, accepted, t: dict) -> None:
    if comm.is_main:
        print(
            f"epoch {epoch}: cv loss {cv['cross_entropy']:.4f} "
            f"acc {100 * cv['frame_accuracy']:.2f}%"
            f" | {t['compute_s'] + t['averaging_s']:.1f} s, averaging "
            f"{100 * t['averaging_share']:.1f}%" + ("" if accepted else " | rejected"),
            flush=True,
        )


def write_run_header(run: Run, data: TrainingData) -> None:
    cfg, comm = run.cfg, run.comm
    if not comm.is_main:
        return
    run.log.truncate(0)  # a fresh start (e.g. restarted before its first checkpoint)
    atomic_write_bytes(
        yaml.safe_dump(cfg.resolved(), sort_keys=False).encode(), Path(cfg.out) / "config.yaml"
    )
    run.log.write(
        {
            "kind": "start",
            "workers": comm.num_workers,
            "processes": comm.num_processes,
            "rounds_per_epoch": run.rounds,
            "shard_frames": data.shard_frames,
            "cv_frames": data.cv_frames,
            "num_classes": data.num_classes,
            "parameters": sum(p.numel() for p in data.initial_model.parameters()),
        }
    )
    print(
        f"{comm.num_workers} workers, {run.rounds} averaging rounds of {cfg.avg_every} x "
        f"{cfg.minibatch} frames per epoch; shards {min(data.shard_frames)}-"
        f"{max(data.shard_frames)} frames; {data.num_classes} classes",
        flush=True,
    )
