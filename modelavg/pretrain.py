"""RBM (DBN) pretraining on the engine: Kaldi nnet1's recipe, one data shard per worker (paper §3).

The stack is trained layer by layer. For each layer every worker trains its replica of the RBM
with CD-1 on its own shard, and the replicas are averaged every K minibatches by the same engine
and averager that fine-tuning uses. Momentum buffers, the Gaussian layer's explosion guard and the
CD-1 sampling RNG stay local to each worker, like the NG-SGD state in training. A layer ends with
an averaging, so all replicas leave it identical.

The input of layer l (the spliced frame, normalised with all shards' mean/std, through the layers
< l) is computed per minibatch: a precomputed 2048-dim table per shard would cost 8 KB per frame.

``--lr-scaling`` defaults to ``none`` here: with the momentum buffers local, the average of N
replicas moves like one momentum-SGD run on the mean of N CD-1 gradients, and the recipe's RBM
steps are already too large to be multiplied by N (docs/RESULTS.md, "DBN pretraining"). The
momentum/lr ramp follows the *global* frame count, so an epoch sees the same schedule for any N.

Checkpoints (``--checkpoint-every``, and at every epoch's end) hold the finished layers, the
current RBM, the averager and every worker's CD-1 state, so ``--resume`` (or a torchrun restart)
continues to the bitwise-identical ``dbn.pt``; on another number of workers it continues from the
same layer and frame count with fresh CD-1 state (``modelavg.elastic``). Training's divergence
guard (roll back, lower the lr) does not apply: the Gaussian RBM has Kaldi's own explosion guard,
and a NaN/Inf in CD-1 ends the run with a one-line error, as Kaldi's trainer aborts.

Example::

    comm = InProcessCommunicator(workers=2)
    path = pretrain(PretrainConfig(data="data/train", out="exp/dbn", hidden_layers=6,
                                   hidden_dim=2048), comm)           # exp/dbn/dbn.pt
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from modelavg import checkpoint as ckpt
from modelavg import elastic
from modelavg.averaging import Averager, ModelAverager
from modelavg.averaging.spread import replica_spread
from modelavg.comm.base import Communicator
from modelavg.config import PretrainConfig
from modelavg.data.frames import FeatureTransform, FrameTable
from modelavg.data.kaldi import read_corpus
from modelavg.data.sharded import global_mean_std, shard_corpus
from modelavg.engine import Engine, Progress
from modelavg.errors import UsageError
from modelavg.nets.dbn import DBN, LayerPlan, pretraining_plan, save_dbn
from modelavg.nets.rbm import RBM, CD1Config, CD1Trainer
from modelavg.preempt import Control
from modelavg.pretrain_log import DBN_FILE, PretrainLog, Window
from modelavg.workers import RBMWorker

STATS_CHUNK = 4096  # frames per forward pass when computing mean activations


@dataclass
class PretrainData:
    tables: list[FrameTable]  # one per local worker
    shard_frames: list[int]  # every worker's, in global worker order
    rounds: int  # averaging rounds per epoch, the same for every worker
    features: FeatureTransform
    skipped_long: int  # utterances over --max-utt-frames


def load_pretrain_data(cfg: PretrainConfig, comm: Communicator) -> PretrainData:
    """Features only; the same partition and the same global statistics on every process."""
    with comm.one_voice():  # no collectives inside: every process fails alike or not at all
        if cfg.data is None and cfg.feats is None:
            raise UsageError("--data is required")
        corpus = read_corpus(
            cfg.data or ".", cfg.feats, need_targets=False, skip_bad_utts=cfg.skip_bad_utts
        )
        limit = cfg.max_utt_frames
        keep = [u for u, n in corpus.lengths.items() if not limit or n <= limit]
        if not keep:
            raise UsageError(f"{corpus.source}: all utterances exceed --max-utt-frames {limit}")
        skipped = len(corpus.lengths) - len(keep)
        corpus = corpus.subset(keep)
        shards = shard_corpus(
            corpus, comm.num_workers, comm.worker_ids, cfg.avg_every, cfg.minibatch
        )
    mean, std, frames = global_mean_std(comm, shards.tables)
    splice = 2 * cfg.context + 1
    device = comm.device
    features = FeatureTransform(
        cfg.context, mean.repeat(splice).to(device), std.repeat(splice).to(device), frames
    )
    tables = [t.to(device) for t in shards.tables]
    return PretrainData(tables, shards.shard_frames, shards.rounds, features, skipped)


@dataclass
class Run:
    """The position in the stack and what every layer shares."""

    cfg: PretrainConfig
    engine: Engine
    data: PretrainData
    plans: list[LayerPlan]
    log: PretrainLog
    stack: DBN  # finished layers: identical on every worker, one copy serves all local replicas
    control: Control  # preemption signals and --checkpoint-interval, agreed on by all processes
    layer: int = 0  # index of the layer being trained
    epoch: int = 1  # epoch of that layer
    round: int = 0  # first round to run in that epoch (non-zero after a mid-epoch resume)
    resumed: tuple | None = None  # the checkpoint (shared, worker states), until make_workers
    spread: torch.Tensor | None = None  # every worker's ||theta_n - mean|| before the last sync

    @property
    def comm(self) -> Communicator:
        return self.engine.comm

    def frames(self, round_: int) -> int:
        """Frames all workers have trained in this layer by ``round_`` of the current epoch."""
        return ((self.epoch - 1) * self.data.rounds + round_) * self.engine.frames_per_round


def pretrain(cfg: PretrainConfig, comm: Communicator, averager: Averager | None = None) -> Path:
    """Train the DBN; returns the path of ``dbn.pt``. The main process writes everything in --out.

    ``averager`` (default ``ModelAverager(comm)``) syncs the replicas; pass a subclass to observe
    the synchronisation points. SIGTERM/SIGUSR1: a checkpoint after the current round, then
    ``Preempted`` (exit 75).
    """
    with Control(comm, cfg.checkpoint_every, cfg.checkpoint_interval) as control:
        return pretrain_stack(start(cfg, comm, averager or ModelAverager(comm), control))


def pretrain_stack(run: Run) -> Path:
    """The layers from the run's position on, then dbn.pt."""
    cfg, comm = run.cfg, run.comm
    total = sum(p.epochs for p in run.plans) * run.data.rounds
    done = sum(p.epochs for p in run.plans[: run.layer]) + run.epoch - 1
    bar = Progress(
        total,
        run.engine.frames_per_round,
        cfg.progress and comm.is_main,
        initial=done * run.data.rounds + run.round,
    )
    while run.layer < len(run.plans):
        plan = run.plans[run.layer]
        workers = make_workers(run, plan)
        train_layer(run, plan, workers, bar)
        run.stack.append(workers[0].module)
        if comm.is_main:  # after every layer, so an interrupted run keeps the finished layers
            save_dbn(Path(cfg.out) / DBN_FILE, run.stack, run.data.features.state())
            run.log.plot()
        run.layer, run.epoch, run.round = run.layer + 1, 1, 0
        run.control.after_epoch(save_checkpoint(run, workers=[]))
    bar.close()
    run.log.close()
    comm.barrier()
    if comm.is_main:
        print(f"DBN of {cfg.hidden_layers} x {cfg.hidden_dim} RBMs: {Path(cfg.out) / DBN_FILE}")
    return Path(cfg.out) / DBN_FILE


def start(cfg: PretrainConfig, comm: Communicator, averager: Averager, control: Control) -> Run:
    data = load_pretrain_data(cfg, comm)
    engine = Engine(comm, averager, cfg.avg_every, cfg.minibatch, cfg.seed, cfg.buffer_frames)
    plans = pretraining_plan(
        data.features.spliced_dim, cfg.hidden_dim, cfg.hidden_layers, cfg.rbm_iter
    )
    log = PretrainLog(Path(cfg.out), comm.is_main, plans, cfg.tensorboard)
    run = Run(cfg, engine, data, plans, log, DBN(), control)
    if cfg.resume:
        with comm.one_voice():
            restore(run)
    else:
        dim = data.features.spliced_dim
        log.start(cfg, comm, data.rounds, data.shard_frames, data.skipped_long, dim, lr_scale(run))
    return run


def lr_scale(run: Run) -> int:
    return run.comm.num_workers if run.cfg.lr_scaling == "linear" else 1


def make_workers(run: Run, plan: LayerPlan) -> list[RBMWorker]:
    """Equal RBMs; each worker gets its own CD-1 trainer (momentum, guard state, sampling RNG),
    whose momentum/lr ramp starts at the layer's global frame count (0 at the layer's start)."""
    cfg, comm = run.cfg, run.comm
    rbm = initial_rbm(run, plan)
    config = CD1Config.for_visible_type(
        plan.visible_type, lr=plan.lr * lr_scale(run), with_bug=cfg.with_bug
    )
    features, stack = run.data.features, run.stack
    shared, states = run.resumed or ({"rbm": None}, {})
    resized = run.resumed is not None and not states  # no worker states: another N
    keys = (run.epoch, run.round) if resized and shared["rbm"] is not None else ()  # new streams
    workers = []
    for worker, table in zip(comm.worker_ids, run.data.tables, strict=True):
        local = copy.deepcopy(rbm)
        trainer = CD1Trainer(local, config, seed=stream_seed(cfg.seed, plan.index, worker, *keys))
        trainer.frames_seen = run.frames(run.round)
        workers.append(
            RBMWorker(
                worker,
                local,
                trainer,
                table,
                lambda t, idx: stack.transform(features(t, idx)),
                (comm.num_workers - 1) * cfg.minibatch,
            )
        )
    if resized:  # the fresh trainers stay; the replicas take the checkpoint's RBM, if any
        rbms, rounds, layer = [w.module for w in workers], run.data.rounds, run.layer + 1
        elastic.resize_layer(shared, run.cfg, run.engine, rbms, rounds, run.round, run.log, layer)
    elif run.resumed is not None:  # a checkpoint inside this layer, of the same workers
        for w in workers:
            w.module.load_state_dict(shared["rbm"])
            w.trainer.load_state_dict(states[w.worker]["trainer"])
            w.window = Window(**states[w.worker]["window"])
        run.engine.averager.load_state_dict(shared["averager"])
    run.resumed = None
    return workers


def initial_rbm(run: Run, plan: LayerPlan) -> RBM:
    """W ~ N(0, 0.1^2) from (seed, layer); Bernoulli layers get b_v = logit(mean activation
    below); then broadcast from process 0, so replicas start equal on any machines."""
    generator = torch.Generator().manual_seed(stream_seed(run.cfg.seed, plan.index))
    rbm = RBM(plan.visible_dim, plan.hidden_dim, plan.visible_type, generator=generator)
    rbm = rbm.to(run.comm.device)
    if plan.visible_type == "bernoulli":
        rbm.init_visible_bias_from_mean(mean_activation(run))
    run.engine.broadcast(rbm)
    return rbm


@torch.no_grad()
def mean_activation(run: Run) -> torch.Tensor:
    """Mean of the top finished layer's probabilities over all workers' shards (float64 sums)."""
    comm, stack, data = run.comm, run.stack, run.data
    per_worker = []
    for table in data.tables:
        sums = torch.zeros(stack.output_dim + 1, dtype=torch.float64, device=comm.device)
        for lo in range(0, len(table), STATS_CHUNK):
            idx = torch.arange(lo, min(lo + STATS_CHUNK, len(table)), device=comm.device)
            sums[:-1] += stack.transform(data.features(table, idx)).double().sum(0)
            sums[-1] += len(idx)
        per_worker.append(sums)
    total = comm.sum_stats(per_worker)
    return (total[:-1] / total[-1]).float()


def train_layer(run: Run, plan: LayerPlan, workers: list[RBMWorker], bar: Progress) -> None:
    """The layer's epochs of: K local CD-1 steps per worker, then average (a layer ends synced)."""
    cfg, engine, rounds = run.cfg, run.engine, run.data.rounds
    epochs_before = sum(p.epochs for p in run.plans[: plan.index])
    if run.epoch == 1 and run.round == 0:
        engine.averager.start([w.module for w in workers])
        run.log.layer_start(plan)
    engine.timer.reset()

    def logs(round_: int) -> bool:
        return round_ % cfg.log_every == 0 or round_ == rounds

    def before_sync(round_: int) -> None:
        if logs(round_):
            run.spread = replica_spread(run.comm, [w.module for w in workers])

    def save(round_: int) -> str:
        run.round = round_
        return save_checkpoint(run, workers)

    def after_round(round_: int) -> None:
        if logs(round_):
            log_round(run, workers, plan, round_, bar)
        run.control.after_round(round_, rounds, save)
        bar.update()

    while run.epoch <= plan.epochs:
        bar.describe(f"layer {plan.index + 1}/{len(run.plans)} epoch {run.epoch}")
        start = run.round
        epoch_key = epochs_before + run.epoch
        engine.run_epoch(workers, epoch_key, rounds, start, after_round, before_sync)
        run.epoch, run.round = run.epoch + 1, 0
        if run.epoch <= plan.epochs:
            run.control.after_epoch(save_checkpoint(run, workers))
    run.log.layer_end(plan, engine.timer.totals())


def log_round(
    run: Run, workers: list[RBMWorker], plan: LayerPlan, round_: int, bar: Progress
) -> None:
    """Reduce every worker's window (all processes join) and write one line."""
    error, n, guards, lr, momentum, steps = run.engine.reduce_stats(workers).tolist()
    record = {
        "kind": "round",
        "layer": plan.index + 1,
        "epoch": run.epoch,
        "round": round_,
        "frames": run.frames(round_),
        "reconstruction_error": error / n,
        "lr": lr / steps,
        "momentum": momentum / steps,
        "guard_firings": int(guards),
        **run.engine.timer.totals(),
    }
    spread = run.spread.tolist()
    record |= {"spread_min": min(spread), "spread_mean": sum(spread) / len(spread)}
    record["spread_max"] = max(spread)
    run.log.write(record)
    bar.note(err=f"{error / n:.4g}", guard=str(int(guards)))


def stream_seed(seed: int, *keys: int) -> int:
    """An independent 63-bit seed per (seed, layer[, worker]): same on every process."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(2, np.uint64)[0] >> 1)


# -- checkpoints -------------------------------------------------------------------------------


def save_checkpoint(run: Run, workers: list[RBMWorker]) -> str:
    """The finished layers, the position, and (inside a layer) its RBM and every worker's CD-1
    state; at a layer boundary (no workers) the next layer's start is recomputed on resume.
    Returns the checkpoint's name. A diverged RBM (NaN/Inf; the replicas are equal after a round's
    averaging) is refused: the run ends with the one-line error, the last checkpoint intact."""
    name = ckpt.checkpoint_name(run.epoch, run.round, layer=run.layer + 1)
    if workers and not all(p.isfinite().all() for p in workers[0].module.parameters()):
        raise UsageError(
            f"layer {run.layer + 1}: the RBM diverged (NaN/Inf in CD-1) before checkpoint {name}; "
            "keep --lr-scaling none or use fewer workers"
        )
    shared = {
        "workers": run.comm.num_workers,
        "layer": run.layer,
        "epoch": run.epoch,
        "round": run.round,
        "stack": [rbm.state_dict() for rbm in run.stack],
        "rbm": workers[0].module.state_dict() if workers else None,
        "averager": run.engine.averager.state_dict() if workers else None,
        "log_bytes": run.log.size(),
    }
    states = {w: {} for w in run.comm.worker_ids}  # a layer boundary: nothing per worker
    for w in workers:
        states[w.worker] = {"trainer": w.trainer.state_dict(), "window": vars(w.window).copy()}
    root = Path(run.cfg.out) / "checkpoints"
    ckpt.save(run.comm, root, name, shared, states, run.cfg.keep_checkpoints)
    run.control.checkpointed()
    return name


def restore(run: Run) -> None:
    """Continue from the newest checkpoint: the finished layers, the position, the log. One of
    another N (no worker states) continues at the round with as many frames done."""
    root = Path(run.cfg.out) / "checkpoints"
    shared, states = ckpt.restore(root, run.comm, resize=True)
    where, current = ckpt.latest(root), [] if shared["rbm"] is None else [shared["rbm"]]
    started = shared["stack"] + current
    if len(started) > len(run.plans):
        raise UsageError(
            f"{where}: has layer {len(started)}, more than --hidden-layers {len(run.plans)}"
        )
    for plan, state in zip(run.plans, started, strict=False):  # every layer fits this run
        rbm = RBM(plan.visible_dim, plan.hidden_dim, plan.visible_type).to(run.comm.device)
        ckpt.load_module(rbm, state, where)
        if plan.index < shared["layer"]:
            run.stack.append(rbm)
    run.layer, run.epoch = shared["layer"], shared["epoch"]
    mapped = elastic.resized_round(shared["round"], shared["workers"], run.engine)
    run.round = min(run.data.rounds, mapped)  # the same round on the same N
    if shared["rbm"] is not None or not states:  # inside a layer, or of another N
        run.resumed = (shared, states)
    run.log.resume(shared["log_bytes"])
