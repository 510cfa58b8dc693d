"""Fine-tuning on the engine: DNN workers, validation, the lr schedule, the divergence guard, and
checkpoints for a bitwise-identical resume.

One process hosts one worker (torchrun, mpirun, srun, ``--workers N``) or N logical workers
(``--in-process``); the loop is the same, it just steps each local replica in turn.

Example::

    comm = InProcessCommunicator(workers=2)
    train(TrainConfig(data="data/demo/train", out="exp/x"), comm)
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch

from modelavg import checkpoint as ckpt
from modelavg import elastic
from modelavg.analysis.live import noise_fields, noise_scale_check
from modelavg.averaging import algorithm_options, make_averager
from modelavg.averaging.base import averaged_copies, share_flat_storage_
from modelavg.averaging.schedule import UNEQUAL_REPLICAS, build_schedule, warmup_rounds
from modelavg.averaging.spread import replica_spread
from modelavg.comm.base import Communicator
from modelavg.comm.cast import reduced_precision
from modelavg.config import TrainConfig
from modelavg.data.training import TrainingData, load_training_data
from modelavg.engine import Engine, Progress
from modelavg.evaluate import frame_stats, summary
from modelavg.guard import DivergenceGuard
from modelavg.io import atomic_write_bytes, write_config
from modelavg.nets.dnn import DNN, save_model
from modelavg.optim import build_optimizer, set_lr
from modelavg.optim.schedules import SCHEDULES, Schedule, make_schedule, worker_lr_factor
from modelavg.preempt import Control
from modelavg.runlog import RunLog, prefixed
from modelavg.workers import DNNWorker


@dataclass
class Run:
    """Everything the loop carries: the workers, the algorithms and the position in training."""

    cfg: TrainConfig
    engine: Engine
    workers: list[DNNWorker]
    guard: DivergenceGuard
    schedule: Schedule
    log: RunLog
    rounds: int  # averaging rounds per epoch, the same on every worker
    accepted_model: dict  # the last model the schedule accepted (Newbob may reject epochs)
    class_counts: torch.Tensor  # training targets per class: the priors a decoder divides by
    control: Control  # preemption signals and --checkpoint-interval, agreed on by all processes
    epoch: int = 1
    round: int = 0  # first round to run in this epoch (non-zero after a mid-epoch resume)
    position: int = 0  # rounds done in all epochs: the clock of the --lr-warmup ramp
    spread: torch.Tensor | None = None  # every worker's ||theta_n - mean|| before the last sync

    @property
    def comm(self) -> Communicator:
        return self.engine.comm

    def frames(self, round_: int) -> int:
        """Frames all workers have trained on by the end of ``round_`` of this epoch."""
        return ((self.epoch - 1) * self.rounds + round_) * self.engine.frames_per_round

    @property
    def models(self) -> list[DNN]:
        return [w.module for w in self.workers]

    @property
    def lr(self) -> float:
        """The lr every worker uses: schedule x linear scaling (ramped) x divergence backoff."""
        ramp = warmup_rounds(self.cfg.lr_warmup, self.rounds, self.engine.frames_per_round)
        scale = worker_lr_factor(self.cfg, self.comm.num_workers, self.position, ramp)
        return self.schedule.lr * scale * self.guard.lr_scale


def train(cfg: TrainConfig, comm: Communicator) -> dict:
    """Run training, write --out (main process); SIGTERM/SIGUSR1: checkpoint, exit 75."""
    with Control(comm, cfg.checkpoint_every, cfg.checkpoint_interval) as control:
        run = start(cfg, comm, control)
        while run.epoch <= cfg.epochs:
            train_epoch(run)
            if end_epoch(run):
                break
        return finish(run)


def train_epoch(run: Run) -> None:
    """The epoch's rounds on the engine; between rounds: guard, logs, CV points, checkpoints."""
    cfg = run.cfg
    start_epoch(run)
    bar = Progress(
        run.rounds,
        run.engine.frames_per_round,
        cfg.progress and run.comm.is_main,
        initial=run.round,
        desc=f"epoch {run.epoch}/{cfg.epochs}",
    )

    def logs(round_: int) -> bool:
        return round_ % cfg.log_every == 0 or round_ == run.rounds

    def before_sync(round_: int) -> None:
        if logs(round_):
            run.spread = replica_spread(run.comm, run.models)

    def after_round(round_: int) -> None:
        polled = run.control.poll(run.guard.diverged(run.models))  # the round's one device read
        check_divergence(run, round_, diverged=polled[2])
        if logs(round_):
            log_round(run, round_, bar)
        if cfg.cv_every and round_ % cfg.cv_every == 0 and round_ < run.rounds:
            log_cv(run, round_)
        run.control.after_round(round_, run.rounds, partial(save_checkpoint, run), polled)
        run.position = (run.epoch - 1) * run.rounds + round_
        for w in run.workers if cfg.lr_warmup != "0" else []:  # the lr ramp moves every round
            set_lr(w.optimizer, run.lr)
        bar.update()

    run.engine.run_epoch(run.workers, run.epoch, run.rounds, run.round, after_round, before_sync)
    bar.close()


def start(cfg: TrainConfig, comm: Communicator, control: Control) -> Run:
    """Data, workers, algorithms; then either the initial validation or a resume."""
    data = load_training_data(cfg, comm)
    reduce = reduced_precision(comm, cfg.avg_dtype)  # --avg-dtype: the reduction's dtype
    with comm.one_voice():  # an algorithm may refuse this N (butterfly: powers of 2 only)
        averager = make_averager(cfg.averaging, reduce, **algorithm_options(cfg))
    engine = Engine(comm, averager, cfg.round_steps, cfg.minibatch, cfg.seed, cfg.buffer_frames)
    workers = make_workers(cfg, engine, data)
    with comm.one_voice():  # option errors come before its only collective (process subgroups)
        opts = [w.optimizer for w in workers]
        engine.schedule = build_schedule(cfg, averager, opts, data.rounds, engine.frames_per_round)
    run = Run(
        cfg=cfg,
        engine=engine,
        workers=workers,
        guard=DivergenceGuard(cfg.max_rollbacks, cfg.rollback_lr_factor),
        schedule=make_schedule(cfg),
        log=RunLog(Path(cfg.out) / "metrics.jsonl", comm.is_main, cfg.tensorboard),
        rounds=data.rounds,
        accepted_model=copy.deepcopy(workers[0].module.state_dict()),
        class_counts=data.class_counts,
        control=control,
    )
    if cfg.noise_scale:
        noise_scale_check(len(workers[0].table))
    if cfg.resume:
        with comm.one_voice():
            restore(run)
    else:
        write_run_header(run, data)
        cv0 = validate(run)
        run.log.write({"kind": "epoch", "epoch": 0, **prefixed("cv", cv0), **extras(run)})
        if cfg.schedule == "newbob":
            run.schedule = replace(run.schedule, best_loss=cv0["cross_entropy"])
        averager.start(run.models)  # a resumed averager has its state from the checkpoint
    run.guard.remember(run.models)
    return run


def start_epoch(run: Run) -> None:
    run.engine.timer.reset()
    run.position = (run.epoch - 1) * run.rounds + run.round
    for w in run.workers:
        set_lr(w.optimizer, run.lr)
        fresh = run.round == 0 and run.cfg.ng_reset == "epoch"
        if fresh and hasattr(w.optimizer, "reset_preconditioners"):
            w.optimizer.reset_preconditioners()  # the paper: a new process, new NG state, per epoch


def check_divergence(run: Run, round_: int, diverged: bool) -> None:
    """NaN/Inf after averaging: back to the last good model with a lower lr (all workers agree)."""
    if not diverged:
        run.guard.remember(run.models)
        return
    with run.comm.one_voice():  # the verdict is the same everywhere: one line if it gives up
        run.guard.roll_back(run.models, [w.optimizer for w in run.workers], run.accepted_model)
    run.engine.averager.start(run.models)
    for w in run.workers:
        set_lr(w.optimizer, run.lr)
    record = {"kind": "rollback", "epoch": run.epoch, "round": round_, "lr": run.lr}
    run.log.write({**record, "rollbacks": run.guard.rollbacks})
    if run.comm.is_main:
        print(
            f"epoch {run.epoch} round {round_}: NaN/Inf after averaging; rolled back to the last "
            f"good model, lr now {run.lr:.4g}",
            flush=True,
        )


def end_epoch(run: Run) -> bool:
    """Validate, let the schedule accept or reject the epoch, log, checkpoint. True: stop."""
    cfg, comm = run.cfg, run.comm
    times = run.engine.timer.totals()  # the epoch's training, before validation
    cv = validate(run)
    run.schedule, accepted, stop = run.schedule.after_epoch(cv["cross_entropy"])
    if accepted:
        run.accepted_model = copy.deepcopy(run.models[0].state_dict())
    else:  # Newbob rejection: every replica continues from the last accepted model
        for m in run.models:
            m.load_state_dict(run.accepted_model)
        run.engine.averager.start(run.models)
        run.guard.remember(run.models)
    used = run.rounds * cfg.round_steps * cfg.minibatch
    left = [torch.tensor(float(len(w.table) - used), device=comm.device) for w in run.workers]
    record = {"kind": "epoch", "epoch": run.epoch, "frames": run.frames(run.rounds)}
    record |= {"accepted": accepted, "lr_next": run.schedule.lr, **run.engine.syncs}
    record |= {"leftover_frames": int(comm.sum_stats(left)), **prefixed("cv", cv)}
    run.log.write({**record, **extras(run), **times})
    if comm.is_main:
        seconds = times["compute_s"] + times["averaging_s"]
        print(
            f"epoch {run.epoch}: cv loss {cv['cross_entropy']:.4f} "
            f"acc {100 * cv['frame_accuracy']:.2f}% | {seconds:.1f} s, averaging "
            f"{100 * times['averaging_share']:.1f}%" + ("" if accepted else " | rejected"),
            flush=True,
        )
    run.epoch, run.round = run.epoch + 1, 0
    run.control.after_epoch(save_checkpoint(run, 0))
    return stop


def finish(run: Run) -> dict:
    """The last accepted model is the result: validate it and write final.pt."""
    for m in run.models:
        m.load_state_dict(run.accepted_model)
    final = validate(run)
    if run.comm.is_main:
        out = Path(run.cfg.out)
        save_model(out / "final.pt", run.models[0], {"cv": final, "class_counts": run.class_counts})
        atomic_write_bytes(json.dumps(final, indent=2).encode(), out / "final_cv.json")
        run.log.close()
        print(
            f"final: cv loss {final['cross_entropy']:.4f}, cv frame accuracy "
            f"{100 * final['frame_accuracy']:.2f}% on {final['frames']} frames; "
            f"model {out / 'final.pt'}",
            flush=True,
        )
    run.comm.barrier()
    return final


def validate(run: Run, mid_epoch: bool = False) -> dict:
    """CV cross-entropy and frame accuracy over every worker's CV shard, summed across workers.
    Mid-epoch under overlap or butterfly, of a copy of the replicas' mean (they differ there)."""
    models = run.models
    if mid_epoch and run.cfg.averaging in UNEQUAL_REPLICAS:
        models = averaged_copies(models, run.comm)
    shards = [w.cv for w in run.workers]
    stats = [frame_stats(m, cv, run.cfg.context) for m, cv in zip(models, shards, strict=True)]
    return summary(run.comm.sum_stats(stats))


def extras(run: Run) -> dict:
    """Analyses logged beside every validation (the main process; training is unchanged)."""
    if not (run.cfg.noise_scale and run.comm.is_main):
        return {}
    w = run.workers[0]
    return noise_fields(w.module, w.optimizer, w.table, run.cfg.context, run.cfg.seed)


# -- set-up ------------------------------------------------------------------------------------


def make_workers(cfg: TrainConfig, engine: Engine, data: TrainingData) -> list[DNNWorker]:
    """Identical initial models on every worker (same seed, then broadcast from process 0)."""
    comm = engine.comm
    torch.manual_seed(cfg.seed)
    model = data.initial_model.to(comm.device)
    engine.broadcast(model)
    workers = []
    for i, worker in enumerate(comm.worker_ids):
        m = copy.deepcopy(model)
        share_flat_storage_(m)  # averaging reduces the parameters in place
        optimizer = build_optimizer(m, cfg, comm.num_workers)
        shard, cv = data.train[i], data.cv[i]
        workers.append(DNNWorker(worker, m, optimizer, shard, cv, cfg.context, None, cfg.precision))
    return workers


# -- checkpoints -------------------------------------------------------------------------------


def save_checkpoint(run: Run, round_: int) -> str:
    """Everything a bitwise-identical resume needs, atomically (LATEST moves last); its name."""
    shared = {
        "workers": run.comm.num_workers,
        "epoch": run.epoch,
        "round": round_,
        "model": run.models[0].state_dict(),
        "accepted_model": run.accepted_model,
        "schedule": {"type": run.cfg.schedule, **asdict(run.schedule)},
        "averager": run.engine.averager.state_dict(),
        "sync_schedule": run.engine.schedule.state_dict(),
        "syncs": run.engine.syncs,
        "guard": run.guard.state_dict(),
        "metrics_bytes": run.log.size(),
    }
    workers = {
        w.worker: {"optimizer": w.optimizer.state_dict(), "stats": w.stats}
        | {"rng": torch.get_rng_state(), "averager": run.engine.averager.worker_state(i)}
        for i, w in enumerate(run.workers)
    }
    root = Path(run.cfg.out) / "checkpoints"
    name = ckpt.checkpoint_name(run.epoch, round_)
    ckpt.save(run.comm, root, name, shared, workers, run.cfg.keep_checkpoints)
    run.control.checkpointed()
    return name


def restore(run: Run) -> None:
    """Load the newest complete checkpoint into ``run``; one of another N: ``elastic.resize``."""
    root = Path(run.cfg.out) / "checkpoints"
    shared, workers = ckpt.restore(root, run.comm, resize=True)
    run.engine.averager.load_state_dict(shared["averager"])
    for i, w in enumerate(run.workers):
        ckpt.load_module(w.module, shared["model"], ckpt.latest(root))
        if workers:  # the same workers: a bitwise-identical resume
            state = workers[w.worker]
            w.optimizer.load_state_dict(state["optimizer"])
            w.stats = state["stats"]
            ckpt.set_rng_state(state["rng"])
            run.engine.averager.load_worker_state(i, w.module, state.get("averager", {}))
    run.engine.schedule.load_state_dict(shared.get("sync_schedule", {}))
    done = (shared["epoch"] - 1) * run.rounds + shared["round"]  # older checkpoints: one a round
    run.engine.syncs.update(shared.get("syncs", {"syncs": done}))
    run.guard.load_state_dict(shared["guard"])
    state = dict(shared["schedule"])
    run.schedule = SCHEDULES[state.pop("type")](**state)
    run.accepted_model, run.epoch = shared["accepted_model"], shared["epoch"]
    run.log.truncate(shared["metrics_bytes"])
    run.round = elastic.resize(shared, run.cfg, run.engine, run.models, run.rounds, run.log)


# -- reporting ---------------------------------------------------------------------------------


def log_cv(run: Run, round_: int) -> None:
    """A mid-epoch validation point of the learning curve (of the replicas' mean)."""
    cv, frames = validate(run, mid_epoch=True), run.frames(round_)
    record = {"kind": "cv", "epoch": run.epoch, "round": round_, "frames": frames}
    record |= {"frames_per_worker": frames // run.comm.num_workers, **run.engine.syncs}
    run.log.write({**record, **prefixed("cv", cv), **extras(run)})


def log_round(run: Run, round_: int, bar: Progress) -> None:
    """Reduce the training statistics since the last line and write them (all workers join)."""
    train = summary(run.engine.reduce_stats(run.workers))
    totals = run.engine.timer.totals()
    record = {"kind": "round", "epoch": run.epoch, "round": round_, "frames": run.frames(round_)}
    period = run.engine.schedule.period((run.epoch - 1) * run.rounds + round_)
    record |= {"lr": run.lr, **period, **run.engine.syncs}
    run.engine.schedule.observe(train["cross_entropy"], run.lr)  # auto K: the next period
    record["frames_per_s"] = (round_ - run.round) * run.engine.frames_per_round / totals["train_s"]
    spread = run.spread.tolist()
    record |= {"spread_min": min(spread), "spread_mean": sum(spread) / len(spread)}
    run.log.write({**record, "spread_max": max(spread), **prefixed("train", train), **totals})
    bar.note(
        loss=f"{train['cross_entropy']:.3f}",
        acc=f"{train['frame_accuracy']:.3f}",
        avg=f"{100 * totals['averaging_share']:.1f}%",
    )


def write_run_header(run: Run, data: TrainingData) -> None:
    cfg, comm = run.cfg, run.comm
    if not comm.is_main:
        return
    run.log.truncate(0)  # a fresh start (e.g. restarted before its first checkpoint)
    write_config(cfg, cfg.out)
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
        f"{comm.num_workers} workers, {run.rounds} averaging rounds of {cfg.round_steps} x "
        f"{cfg.minibatch} frames per epoch; shards {min(data.shard_frames)}-"
        f"{max(data.shard_frames)} frames; {data.num_classes} classes",
        flush=True,
    )
