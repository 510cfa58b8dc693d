"""RBM (DBN) pretraining on the averaging engine: Kaldi nnet1's recipe, one data shard per worker.

The stack is trained layer by layer (brief §6). For each layer every worker trains its replica of
the RBM with CD-1 on its own shard (frame-shuffled with the trainer's ``epoch_order``), and the
replicas are averaged every K minibatches by the same ``ModelAverager`` that fine-tuning uses.
Momentum buffers, the Gaussian layer's explosion guard and the CD-1 sampling RNG stay local to each
worker, like the NG-SGD state in training. Every worker does the same number of averaging rounds
per epoch, and a layer ends with an averaging, so all replicas leave it identical.

The input of layer l is the spliced (+-C frames) frame, normalised with the global mean/std of all
workers' shards, passed through the finished layers < l (sigmoid probabilities), computed per
minibatch: a precomputed 2048-dim table per shard would cost 8 KB per frame.

Learning-rate scaling (``--lr-scaling``, default ``none``). With the momentum buffers local, the
*average* of the N replicas moves, to first order, like one momentum-SGD run on the mean of the N
workers' CD-1 gradients: N x B frames buy one step of the unscaled lr, so per frame the DBN learns
more slowly than the single-GPU recipe. ``linear`` multiplies the recipe lr by N (the paper's rule
for fine-tuning) to restore the per-frame progress, but the recipe's RBM steps are already large
(0.4 x 0.5 / (1 - 0.9) = 2 per averaged gradient for a Bernoulli layer, with --with-bug) and do
not survive being multiplied: on Fashion-MNIST (646 pixels of variance >= 0.15^2, 2 x 512 RBMs, K =
10) linear scaling fired the Gaussian guard 2/29/105/290 times for N = 2/4/8/16, doubled the
Bernoulli layer's reconstruction error already at N = 2, and left a DBN that fine-tunes no better
than chance (10%) at N = 8, while ``none`` degrades gently: CV accuracy after one fine-tuning epoch
77.1% (N = 1), 75.5/75.8/73.5/71.3% (N = 2/4/8/16) against 67.2% from a random initialisation.
Either way the momentum/lr ramp follows the *global* frame count, so an epoch sees the same
schedule for any N.

Example::

    comm = InProcessCommunicator(workers=2)
    path = pretrain(PretrainConfig(data="data/train", out="exp/dbn", hidden_layers=6,
                                   hidden_dim=2048), comm)           # exp/dbn/dbn.pt
"""

from __future__ import annotations

import copy
import io
import json
import os
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from modelavg.averaging import Averager, ModelAverager
from modelavg.averaging.base import flatten, unflatten_
from modelavg.comm.base import Communicator
from modelavg.config import ParallelOptions, check, opt, read_options
from modelavg.data.frames import FrameTable, mean_std, moment_sums
from modelavg.data.kaldi import Corpus, read_corpus
from modelavg.data.shards import epoch_order, minibatches, partition, rounds_per_epoch
from modelavg.errors import Infeasible, UsageError
from modelavg.io import atomic_write_bytes
from modelavg.nets.rbm import (
    DBN,
    RBM,
    CD1Config,
    CD1Trainer,
    LayerPlan,
    StepResult,
    pretraining_plan,
    save_dbn,
)

DBN_FILE = "dbn.pt"
LOG_FILE = "pretrain.jsonl"
PLOT_FILE = "pretrain.png"
FEATURE_TRANSFORM = "splice-global-cmvn"
STATS_CHUNK = 4096  # frames per forward pass when computing mean activations
LR_SCALING_DEFAULT = "none"  # "linear" breaks the RBMs from N = 2 on (module docstring)


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass
class PretrainConfig(ParallelOptions):
    # data
    data: str | None = opt(
        None, "training data directory (feats.scp; targets are not needed)", group="data"
    )
    feats: str | None = opt(None, "override feats.scp: a path or rspecifier", group="data")
    context: int = opt(
        5, "splice +-C frames around each frame (0 for non-sequential data)", group="data"
    )
    buffer_frames: int = opt(32768, "frame-shuffling buffer size per worker", group="data")
    max_utt_frames: int = opt(
        6000, "skip longer utterances, as nnet1 does (0 = keep all)", group="data"
    )
    skip_bad_utts: bool = opt(
        False, "drop (and count) unusable utterances instead of failing", group="data"
    )
    # model
    hidden_layers: int = opt(4, "RBMs in the stack (the recipe: 6)", group="model")
    hidden_dim: int = opt(1024, "hidden units per RBM (the recipe: 2048)", group="model")
    # RBM training
    rbm_iter: int = opt(
        1, "epochs per Bernoulli RBM; the Gaussian first RBM runs twice as many", group="rbm"
    )
    minibatch: int = opt(100, "frames per CD-1 minibatch", group="rbm")
    lr_scaling: str = opt(
        LR_SCALING_DEFAULT,
        "multiply the recipe lr (0.01, 0.4) by the number of workers",
        ("linear", "none"),
        "rbm",
    )
    with_bug: bool = opt(
        True, "Kaldi's --with-bug=true: momentum 0.9 from the first minibatch", group="rbm"
    )
    # parallelism
    avg_every: int = opt(10, "average the RBM replicas every K minibatches", group="parallel")
    # run
    out: str | None = opt(
        None, "output directory (dbn.pt, pretrain.jsonl, pretrain.png)", group="run"
    )
    seed: int = opt(777, "random seed (initialisation, CD-1 sampling, frame order)", group="run")
    log_every: int = opt(50, "write a pretrain.jsonl line every M averaging rounds", group="run")
    progress: bool = opt(True, "show a progress bar", group="run")


def pretrain_config_fields() -> list:
    """The fields that become ``modelavg pretrain`` options (same scheme as config_fields)."""
    return [f for f in fields(PretrainConfig) if f.default is not MISSING]


def load_pretrain_config(
    path: str | os.PathLike | None, overrides: dict[str, Any]
) -> PretrainConfig:
    """Defaults, then the YAML file (if any), then ``overrides`` (the command line); validated."""
    values = read_options(path, pretrain_config_fields())
    return validate(PretrainConfig(**{**values, **overrides}))


def validate(cfg: PretrainConfig) -> PretrainConfig:
    """Refuse impossible values with a message naming the option."""
    checks = [
        (cfg.hidden_layers >= 1, "--hidden-layers must be >= 1"),
        (cfg.hidden_dim >= 1, "--hidden-dim must be >= 1"),
        (cfg.rbm_iter >= 1, "--rbm-iter must be >= 1"),
        (cfg.minibatch >= 1, "--minibatch must be >= 1"),
        (cfg.avg_every >= 1, "--avg-every must be >= 1"),
        (cfg.workers is None or cfg.workers >= 1, "--workers must be >= 1"),
        (cfg.context >= 0, "--context must be >= 0"),
        (cfg.buffer_frames >= 1, "--buffer-frames must be >= 1"),
        (cfg.max_utt_frames >= 0, "--max-utt-frames must be >= 0"),
        (cfg.log_every >= 1, "--log-every must be >= 1"),
        (cfg.timeout > 0, "--timeout must be > 0"),
    ]
    return check(cfg, checks, pretrain_config_fields())


def check_out_dir(cfg: PretrainConfig) -> None:
    """Refuse a missing, unwritable or already used --out before any work starts."""
    if cfg.out is None:
        raise UsageError("--out is required")
    out = Path(cfg.out)
    if (out / DBN_FILE).exists():
        raise UsageError(f"--out {out} already holds a {DBN_FILE}: choose another directory")
    parent = out if out.exists() else next(p for p in out.absolute().parents if p.exists())
    if not os.access(parent, os.W_OK) or (out.exists() and not out.is_dir()):
        raise UsageError(f"--out {out}: not a writable directory")


# --------------------------------------------------------------------------------------------------
# Data: shards and the global input normalisation
# --------------------------------------------------------------------------------------------------


@dataclass
class FeatureTransform:
    """Splice +-context frames, then (x - mean) * inv_std, exactly as the DNN's Normalize does.

    The statistics are per-frame ones repeated 2C+1 times (the spliced layout), so a fine-tuned
    DNN given this mean/std sees the very input the RBMs were trained on.
    """

    context: int
    mean: torch.Tensor  # ((2C+1) * D,)
    std: torch.Tensor
    frames: int  # frames the statistics were computed over

    def __post_init__(self) -> None:
        self.inv_std = 1.0 / self.std

    @property
    def spliced_dim(self) -> int:
        return self.mean.numel()

    def __call__(self, table: FrameTable, idx: torch.Tensor) -> torch.Tensor:
        return (table.splice(idx, self.context) - self.mean) * self.inv_std

    def state(self) -> dict[str, Any]:
        """Plain data for ``save_dbn`` (loads with weights_only=True)."""
        return {
            "type": FEATURE_TRANSFORM,
            "context": self.context,
            "input_dim": self.spliced_dim // (2 * self.context + 1),
            "mean": self.mean.detach().cpu().clone(),
            "std": self.std.detach().cpu().clone(),
            "frames": self.frames,
        }


@dataclass
class PretrainData:
    tables: list[FrameTable]  # one per local worker
    shard_frames: list[int]  # every worker's, in global worker order
    rounds: int  # averaging rounds per epoch, the same for every worker
    features: FeatureTransform
    skipped_long: int  # utterances over --max-utt-frames


def load_pretrain_data(cfg: PretrainConfig, comm: Communicator) -> PretrainData:
    """Features only; the same partition and the same global statistics on every process."""
    if cfg.data is None and cfg.feats is None:
        raise UsageError("--data is required")
    corpus = read_corpus(
        cfg.data or ".", cfg.feats, need_targets=False, skip_bad_utts=cfg.skip_bad_utts
    )
    limit = cfg.max_utt_frames
    feats = {u: m for u, m in corpus.feats.items() if not limit or len(m) <= limit}
    if not feats:
        raise UsageError(f"{corpus.source}: all utterances exceed --max-utt-frames {limit}")
    skipped = len(corpus.feats) - len(feats)
    corpus = Corpus(feats, None, corpus.source)  # targets (if any) are not needed

    shards = partition({u: len(m) for u, m in feats.items()}, comm.num_workers)
    shard_frames = [sum(len(feats[u]) for u in s) for s in shards]
    rounds = rounds_per_epoch(shard_frames, cfg.avg_every, cfg.minibatch)
    if rounds == 0:
        raise Infeasible(
            f"--avg-every {cfg.avg_every} x --minibatch {cfg.minibatch} frames exceeds the "
            f"smallest shard ({min(shard_frames)} frames with {comm.num_workers} workers): "
            "lower one of them or --workers"
        )
    tables = [FrameTable.from_corpus(corpus, shards[w]) for w in comm.worker_ids]
    sums = comm.sum_stats([moment_sums(t).to(comm.device) for t in tables]).cpu()
    mean, std = mean_std(sums)
    splice = 2 * cfg.context + 1
    features = FeatureTransform(
        cfg.context,
        mean.repeat(splice).to(comm.device),
        std.repeat(splice).to(comm.device),
        int(sums[0, 0]),
    )
    return PretrainData(
        [t.to(comm.device) for t in tables], shard_frames, rounds, features, skipped
    )


# --------------------------------------------------------------------------------------------------
# The layer loop
# --------------------------------------------------------------------------------------------------


@dataclass
class Window:
    """Per-worker sums since the last log line: summable across workers with one sum_stats."""

    error: float = 0.0  # sum over frames of the squared reconstruction error
    frames: int = 0
    guard_firings: int = 0
    lr: float = 0.0  # sums over steps, for the mean
    momentum: float = 0.0
    steps: int = 0

    def add(self, result: StepResult, frames: int) -> None:
        self.error += result.reconstruction_error * frames
        self.frames += frames
        self.guard_firings += int(result.guard_fired)
        self.lr += result.lr
        self.momentum += result.momentum
        self.steps += 1

    def tensor(self, device: torch.device) -> torch.Tensor:
        values = [self.error, self.frames, self.guard_firings, self.lr, self.momentum, self.steps]
        return torch.tensor(values, dtype=torch.float64, device=device)


@dataclass
class Replica:
    """One worker's copy of the RBM being trained, with its local CD-1 state and shard."""

    worker: int
    rbm: RBM
    trainer: CD1Trainer
    table: FrameTable
    window: Window = field(default_factory=Window)


@dataclass
class Run:
    """What every layer shares: options, communicator, shards, averaging engine, outputs."""

    cfg: PretrainConfig
    comm: Communicator
    data: PretrainData
    averager: Averager
    log: PretrainLog
    bar: tqdm
    lr_scale: float


def pretrain(cfg: PretrainConfig, comm: Communicator, averager: Averager | None = None) -> Path:
    """Train the DBN; returns the path of ``dbn.pt``. The main process writes everything in --out.

    ``averager`` (default ``ModelAverager(comm)``) syncs the replicas; pass a subclass to observe
    the synchronisation points.
    """
    out = Path(cfg.out)
    data = load_pretrain_data(cfg, comm)
    plans = pretraining_plan(
        data.features.spliced_dim, cfg.hidden_dim, cfg.hidden_layers, cfg.rbm_iter
    )
    lr_scale = comm.num_workers if cfg.lr_scaling == "linear" else 1
    log = PretrainLog(out, comm.is_main)
    log.start(cfg, comm, data, plans, lr_scale)
    bar = progress_bar(cfg, comm, sum(p.epochs for p in plans) * data.rounds)
    run = Run(cfg, comm, data, averager or ModelAverager(comm), log, bar, lr_scale)
    stack = DBN()  # finished layers: identical on every worker, one copy serves all local replicas
    epochs_done = 0
    for plan in plans:
        replicas = make_replicas(run, plan, initial_rbm(run, plan, stack))
        train_layer(run, plan, replicas, stack, epochs_done)
        epochs_done += plan.epochs
        stack.append(replicas[0].rbm)
        if comm.is_main:  # after every layer, so an interrupted run keeps the finished layers
            save_dbn(out / DBN_FILE, stack, data.features.state())
            log.plot()
    bar.close()
    comm.barrier()
    return out / DBN_FILE


def initial_rbm(run: Run, plan: LayerPlan, stack: DBN) -> RBM:
    """W ~ N(0, 0.1^2) from (seed, layer); Bernoulli layers get b_v = logit(mean activation below).

    Broadcast from process 0 afterwards, as the trainer does, so replicas start equal even where
    RNGs differ across machines.
    """
    generator = torch.Generator().manual_seed(stream_seed(run.cfg.seed, plan.index))
    rbm = RBM(plan.visible_dim, plan.hidden_dim, plan.visible_type, generator=generator)
    rbm = rbm.to(run.comm.device)
    if plan.visible_type == "bernoulli":
        rbm.init_visible_bias_from_mean(mean_activation(run.comm, stack, run.data))
    with torch.no_grad():
        flat = flatten(rbm)
        run.comm.broadcast_(flat)
        unflatten_(flat, rbm)
    return rbm


@torch.no_grad()
def mean_activation(comm: Communicator, stack: DBN, data: PretrainData) -> torch.Tensor:
    """Mean of the top finished layer's probabilities over all workers' shards (float64 sums)."""
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


def make_replicas(run: Run, plan: LayerPlan, rbm: RBM) -> list[Replica]:
    """Equal RBMs; each worker gets its own CD-1 trainer (momentum, guard state, sampling RNG)."""
    lr = plan.lr * run.lr_scale
    config = CD1Config.for_visible_type(plan.visible_type, lr=lr, with_bug=run.cfg.with_bug)
    replicas = []
    for worker, table in zip(run.comm.worker_ids, run.data.tables, strict=True):
        local = copy.deepcopy(rbm)
        trainer = CD1Trainer(local, config, seed=stream_seed(run.cfg.seed, plan.index, worker))
        replicas.append(Replica(worker, local, trainer, table))
    return replicas


def train_layer(
    run: Run, plan: LayerPlan, replicas: list[Replica], stack: DBN, epochs_done: int
) -> None:
    """plan.epochs epochs of: K local CD-1 steps per worker, then average (a layer ends synced)."""
    cfg, comm, rounds = run.cfg, run.comm, run.data.rounds
    timer = PhaseTimer(comm.device)
    models = [r.rbm for r in replicas]
    other_frames = (comm.num_workers - 1) * cfg.minibatch
    frames_per_round = cfg.avg_every * cfg.minibatch * comm.num_workers
    run.averager.start(models)
    run.log.layer_start(plan)
    for epoch in range(1, plan.epochs + 1):
        run.bar.set_description(f"layer {plan.index + 1}/{cfg.hidden_layers} epoch {epoch}")
        streams = [layer_batches(cfg, r, stack, run.data, epochs_done + epoch) for r in replicas]
        for round_ in range(1, rounds + 1):
            with timer("compute"):
                for replica, stream in zip(replicas, streams, strict=True):
                    for _ in range(cfg.avg_every):
                        local_step(replica, next(stream), other_frames)
            with timer("averaging"):
                run.averager.sync(models)
            if round_ % cfg.log_every == 0 or round_ == rounds:
                frames = ((epoch - 1) * rounds + round_) * frames_per_round
                log_round(run, replicas, timer, plan, (epoch, round_, frames))
            run.bar.update(1)
    run.log.layer_end(plan, timer)


def layer_batches(
    cfg: PretrainConfig, replica: Replica, stack: DBN, data: PretrainData, epoch_key: int
):
    """This worker's minibatches of layer input: splice, normalise, up through the finished layers.

    ``epoch_key`` counts epochs over the whole stack, so every layer sees fresh frame orders.
    """
    order = epoch_order(
        replica.table.lengths, cfg.seed, epoch_key, replica.worker, cfg.buffer_frames
    )
    device = replica.table.feats.device
    for idx in minibatches(order, cfg.minibatch):
        yield stack.transform(data.features(replica.table, idx.to(device)))


def local_step(replica: Replica, v: torch.Tensor, other_frames: int) -> None:
    """One CD-1 update, no communication; the ramp then counts the other workers' frames too."""
    result = replica.trainer.step(v)
    replica.trainer.frames_seen += other_frames
    replica.window.add(result, len(v))


def stream_seed(seed: int, *keys: int) -> int:
    """An independent 63-bit seed per (seed, layer[, worker]): same on every process."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(2, np.uint64)[0] >> 1)


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------


class PhaseTimer:
    """Seconds in compute and in averaging; synchronises the GPU so the split is honest."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = {"compute": 0.0, "averaging": 0.0}
        self._phase = ""

    def __call__(self, phase: str) -> PhaseTimer:
        self._phase = phase
        return self

    def __enter__(self) -> None:
        self._t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[self._phase] += time.perf_counter() - self._t0

    def totals(self) -> dict[str, float]:
        total = sum(self.seconds.values())
        return {
            "compute_s": self.seconds["compute"],
            "averaging_s": self.seconds["averaging"],
            "averaging_share": self.seconds["averaging"] / total if total else 0.0,
        }


def log_round(
    run: Run,
    replicas: list[Replica],
    timer: PhaseTimer,
    plan: LayerPlan,
    where: tuple[int, int, int],
) -> None:
    """Reduce every worker's window (all processes join) and write one line; where = (epoch,
    round, frames into the layer over all workers)."""
    comm = run.comm
    error, n, guards, lr, momentum, steps = comm.sum_stats(
        [r.window.tensor(comm.device) for r in replicas]
    ).tolist()
    for r in replicas:
        r.window = Window()
    epoch, round_, frames = where
    record = {
        "kind": "round",
        "layer": plan.index + 1,
        "epoch": epoch,
        "round": round_,
        "frames": frames,
        "reconstruction_error": error / n,
        "lr": lr / steps,
        "momentum": momentum / steps,
        "guard_firings": int(guards),
        **timer.totals(),
    }
    run.log.write(record)
    run.bar.set_postfix(err=f"{error / n:.4g}", guard=int(guards))


def progress_bar(cfg: PretrainConfig, comm: Communicator, total_rounds: int) -> tqdm:
    frames_per_round = cfg.avg_every * cfg.minibatch * comm.num_workers
    return tqdm(
        total=total_rounds,
        unit="fr",
        unit_scale=frames_per_round,
        leave=False,
        disable=not (cfg.progress and comm.is_main),
        dynamic_ncols=True,
    )


class PretrainLog:
    """pretrain.jsonl (one whole line per write, appended) and pretrain.png; main process only."""

    def __init__(self, out: Path, active: bool) -> None:
        self.out, self.active = out, active
        self.path = out / LOG_FILE
        self.curves: dict[int, list[tuple[int, float]]] = {}  # layer -> (frames, error)
        self.labels: dict[int, str] = {}
        self._layer_guards = 0

    def start(
        self,
        cfg: PretrainConfig,
        comm: Communicator,
        data: PretrainData,
        plans: list[LayerPlan],
        lr_scale: float,
    ) -> None:
        record = {
            "kind": "start",
            "time": time.time(),
            "workers": comm.num_workers,
            "processes": comm.num_processes,
            "rounds_per_epoch": data.rounds,
            "shard_frames": data.shard_frames,
            "skipped_long_utts": data.skipped_long,
            "input_dim": data.features.spliced_dim,
            "lr_scale": lr_scale,
            "plan": [asdict(p) for p in plans],
            "config": asdict(cfg),
        }
        if not self.active:
            return
        atomic_write_bytes((json.dumps(record) + "\n").encode(), self.path)  # a fresh file
        n = data.skipped_long
        skipped = f"; {n} utterances over --max-utt-frames skipped" if n else ""
        print(
            f"{comm.num_workers} workers, {data.rounds} averaging rounds of {cfg.avg_every} "
            f"x {cfg.minibatch} frames per epoch; shards {min(data.shard_frames)}-"
            f"{max(data.shard_frames)} frames; input {data.features.spliced_dim}, "
            f"{len(plans)} x {cfg.hidden_dim} RBMs, lr x {lr_scale}{skipped}",
            flush=True,
        )

    def write(self, record: dict[str, Any]) -> None:
        if record.get("kind") == "round":
            layer = record["layer"]
            self.curves.setdefault(layer, []).append(
                (record["frames"], record["reconstruction_error"])
            )
            self._layer_guards += record["guard_firings"]
        if self.active:
            line = json.dumps({"time": time.time(), **record}) + "\n"
            with self.path.open("a") as fh:
                fh.write(line)

    def layer_start(self, plan: LayerPlan) -> None:
        self._layer_guards = 0
        self.labels[plan.index + 1] = (
            f"layer {plan.index + 1} ({plan.visible_type} {plan.visible_dim}x{plan.hidden_dim})"
        )

    def layer_end(self, plan: LayerPlan, timer: PhaseTimer) -> None:
        curve = self.curves.get(plan.index + 1, [])
        first, last = (curve[0][1], curve[-1][1]) if curve else (float("nan"),) * 2
        totals = timer.totals()
        self.write(
            {
                "kind": "layer",
                "layer": plan.index + 1,
                "visible_type": plan.visible_type,
                "epochs": plan.epochs,
                "frames": curve[-1][0] if curve else 0,
                "first_reconstruction_error": first,
                "reconstruction_error": last,
                "guard_firings": self._layer_guards,
                **totals,
            }
        )
        if self.active:
            seconds = totals["compute_s"] + totals["averaging_s"]
            print(
                f"{self.labels[plan.index + 1]}: reconstruction error {first:.4g} -> {last:.4g}, "
                f"{plan.epochs} epoch(s), {self._layer_guards} guard firings, {seconds:.1f} s, "
                f"averaging {100 * totals['averaging_share']:.1f}%",
                flush=True,
            )

    def plot(self) -> None:
        """Reconstruction error per layer against frames into that layer (log scale), atomically."""
        if not self.active:
            return
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for layer, curve in sorted(self.curves.items()):
            frames, errors = zip(*curve, strict=True)
            ax.plot(frames, errors, marker=".", label=self.labels.get(layer, f"layer {layer}"))
        ax.set_xlabel("frames into the layer (all workers)")
        ax.set_ylabel("CD-1 reconstruction error per frame")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        atomic_write_bytes(buf.getvalue(), self.out / PLOT_FILE)


# --------------------------------------------------------------------------------------------------
# Entry point for the CLI
# --------------------------------------------------------------------------------------------------


def run_pretraining(cfg: PretrainConfig, penv: Any) -> Path:
    """Set threads, join the job (or host N in-process workers), pretrain, leave the job."""
    from modelavg import launch

    with launch.joined(cfg, penv) as comm:
        path = pretrain(cfg, comm)
    if comm.is_main:
        print(f"DBN of {cfg.hidden_layers} x {cfg.hidden_dim} RBMs: {path}", flush=True)
    return path
