"""Configuration: option groups composed into one dataclass per command, saved with every run.

Every field is a command-line option (``avg_every`` -> ``--avg-every``) whose help, group, choices
and limits are declared on the field; a YAML file given with ``--config`` sets fields by their
underscore names and the command line overrides it. ``modelavg train`` and ``modelavg pretrain``
share the parallel, data and run groups, so an option means the same in both.

Example::

    cfg = TrainConfig(data="data/demo/train", out="exp/x", workers=2)
    cfg = load_config("my.yaml", overrides={"lr": 0.1})                 # validated
    cfg = load_config(None, {"data": "d", "out": "o"}, PretrainConfig)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from modelavg.averaging import ALGORITHMS
from modelavg.averaging.optstate import POLICIES
from modelavg.averaging.schedule import period_or_auto, warmup_parser
from modelavg.errors import UsageError
from modelavg.optim import OPTIMIZERS
from modelavg.optim.schedules import SCHEDULES
from modelavg.precision import AVG_DTYPES, PRECISIONS
from modelavg.preempt import interval_seconds


def opt(
    default: Any,
    help: str,
    choices: tuple | None = None,
    group: str = "training",
    *,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
    open_high: bool = False,
    parse: Callable[[Any], Any] | None = None,
) -> Any:
    """A config field: its default, help text, argparse group, and the values it accepts
    (``parse``: converts a command-line or YAML value, raising UsageError on a bad one)."""
    limits = (low, high, open_low, open_high)
    meta = {"help": help, "choices": choices, "group": group, "limits": limits, "parse": parse}
    return field(default=default, metadata=meta)


@dataclass
class ParallelOptions:
    """How a job's workers are started, talk, and how often they average."""

    workers: int | None = opt(
        None, "workers (default: from torchrun/mpirun/srun, else 1)", group="parallel", low=1
    )
    in_process: bool = opt(
        False, "run the workers as logical workers inside one process", group="parallel"
    )
    backend: str = opt("auto", "communication backend", ("auto", "gloo", "nccl", "mpi"), "parallel")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N", group="parallel")
    threads: int | None = opt(
        None, "torch threads per process (default: cores / local processes)", group="parallel"
    )
    timeout: float = opt(
        300.0,
        "seconds a collective may wait for a missing worker",
        group="parallel",
        low=0,
        open_low=True,
    )
    avg_every: int = opt(10, "average the replicas every K minibatches", group="parallel", low=1)


@dataclass
class DataOptions:
    """Where the frames come from and how a worker visits them."""

    data: str | None = opt(None, "training data directory (feats.scp, targets.scp)", group="data")
    feats: str | None = opt(None, "override feats.scp: a path or rspecifier", group="data")
    context: int = opt(
        5, "splice +-C frames around each frame (0 for non-sequential data)", group="data", low=0
    )
    buffer_frames: int = opt(32768, "frame-shuffling buffer size per worker", group="data", low=1)
    skip_bad_utts: bool = opt(
        False, "drop (and count) unusable utterances instead of failing", group="data"
    )


@dataclass
class RunOptions:
    """Outputs, reproducibility, logging and checkpoints."""

    out: str | None = opt(None, "output directory", group="run")
    seed: int = opt(777, "random seed (initialisation and frame order)", group="run")
    resume: bool = opt(False, "continue from the last checkpoint in --out", group="run")
    log_every: int = opt(
        50, "write a log line (and a progress line) every M averaging rounds", group="run", low=1
    )
    checkpoint_every: int = opt(
        0, "also checkpoint every M averaging rounds (0 = epochs only)", group="run", low=0
    )
    checkpoint_interval: float = opt(
        0.0,
        "also checkpoint once this much wall time has passed since the last checkpoint: 600s, "
        "10m, 1h (0 = off): a preempted or killed job loses at most that much",
        group="run",
        parse=interval_seconds,
    )
    keep_checkpoints: int = opt(
        2,
        "checkpoints kept in --out/checkpoints, newest first (0 = all); resume needs only the "
        "newest",
        group="run",
        low=0,
    )
    progress: bool = opt(True, "show progress (a bar on a terminal, else lines)", group="run")
    tensorboard: bool | None = opt(
        None,
        "mirror the log to TensorBoard scalars in OUT/tensorboard (None: when the tensorboard "
        "package is installed)",
        group="run",
    )


@dataclass
class TrainConfig(RunOptions, ParallelOptions, DataOptions):
    # data (beside DataOptions)
    cv: str | None = opt(
        None,
        "validation data directory; default: the last 10%% of --data's utterances",
        group="data",
    )
    targets: str | None = opt(
        None,
        "override targets.scp: a path or rspecifier, e.g. 'ark:gunzip -c ali.1.gz|'",
        group="data",
    )
    cv_feats: str | None = opt(None, "override the CV set's feats.scp", group="data")
    cv_targets: str | None = opt(None, "override the CV set's targets.scp", group="data")
    cv_fraction: float = opt(
        0.1,
        "share of --data held out when --cv is not given",
        group="data",
        low=0,
        high=1,
        open_low=True,
        open_high=True,
    )
    num_classes: int | None = opt(
        None, "output classes (default: from the data)", group="data", low=1
    )
    # model
    hidden_layers: int = opt(4, "hidden layers", group="model", low=0)
    hidden_dim: int = opt(1024, "units per hidden layer", group="model", low=1)
    activation: str = opt("sigmoid", "hidden activation", ("sigmoid", "tanh", "relu"), "model")
    init: str | None = opt(
        None, "initialise hidden layers from a DBN (dbn.pt) or a model file", group="model"
    )
    # optimisation
    optimizer: str = opt("sgd", "local optimiser", tuple(OPTIMIZERS))
    lr: float = opt(0.5, "learning rate of one worker (see --lr-scaling)", low=0, open_low=True)
    lr_scaling: str = opt(
        "linear", "multiply --lr by the number of workers (paper §2.4)", ("linear", "none")
    )
    lr_warmup: str = opt(
        "0",
        "linear scaling: raise the factor on --lr from 1 to N over this many frames (500000) "
        "or epochs (2e), round by round (gradual warm-up)",
        parse=warmup_parser("--lr-warmup"),
    )
    momentum: float = opt(0.0, "SGD momentum", low=0, high=1, open_high=True)
    weight_decay: float | None = opt(
        None, "adam/adamw: weight decay (default: 0.01 for adamw, 0 for adam)", low=0
    )
    minibatch: int = opt(256, "frames per minibatch", low=1)
    precision: str = opt("fp32", "local steps: fp32, tf32 (CUDA matmul), bf16 autocast", PRECISIONS)
    epochs: int = opt(10, "epochs (the maximum, for newbob)", low=1)
    schedule: str = opt("exponential", "learning-rate schedule", tuple(SCHEDULES))
    final_lr_ratio: float = opt(0.01, "exponential: last epoch's lr / first epoch's lr")
    newbob_start: float = opt(0.01, "newbob: start halving below this relative CV improvement")
    newbob_end: float = opt(0.001, "newbob: stop below this relative CV improvement")
    halving_factor: float = opt(0.5, "newbob: lr multiplier once halving")
    # natural gradient
    ng_rank_in: int = opt(20, "NG-SGD rank of the input-side Fisher factor", group="ngsgd")
    ng_rank_out: int = opt(80, "NG-SGD rank of the output-side Fisher factor", group="ngsgd")
    ng_update_period: int = opt(
        4,
        "NG-SGD: after the first 10 updates, update the Fisher estimate every N minibatches",
        group="ngsgd",
        low=1,
    )
    ng_samples_history: float = opt(
        2000.0, "NG-SGD: frames of history in the estimate", group="ngsgd"
    )
    ng_alpha: float = opt(4.0, "NG-SGD: identity smoothing of the Fisher estimate", group="ngsgd")
    ng_variant: str = opt(
        "nnet2",
        "NG-SGD Fisher estimate: Kaldi nnet2's OnlinePreconditioner as of 2014 (the paper's) "
        "or nnet3's OnlineNaturalGradient (docs/NGSGD.md)",
        ("nnet2", "nnet3"),
        "ngsgd",
    )
    max_change: float = opt(
        0.075, "NG-SGD: max parameter change per frame (0 = off)", group="ngsgd", low=0
    )
    max_change_scaling: str = opt(
        "none",
        "NG-SGD: multiply --max-change by the number of workers, as --lr-scaling linear does "
        "the lr (the paper's code: its max-change ignored the global lr, so the cap grew with "
        "lr x N)",
        ("none", "linear"),
        "ngsgd",
    )
    ng_reset: str = opt(
        "epoch",
        "NG-SGD: reset the Fisher estimates every epoch (paper) or never",
        ("epoch", "never"),
        "ngsgd",
    )
    # averaging (beside ParallelOptions)
    avg_every: int | str = opt(
        10,
        "average the replicas every K minibatches; auto: AdaComm's K = K0 sqrt(lr0 F / (lr F0)) "
        "in [1, --avg-every-max], recomputed from the training loss F at every log line",
        group="parallel",
        parse=period_or_auto,
    )
    avg_every_max: int = opt(
        16, "auto: the longest period, and the minibatches per round", group="parallel", low=1
    )
    avg_every_init: int = opt(
        1, "auto: the period K0 of the first log window", group="parallel", low=1
    )
    avg_warmup: str = opt(
        "0",
        "first average every minibatch (K = 1, plain averaging) for this many frames (500000) "
        "or epochs (2e), then as configured: post-local SGD",
        group="parallel",
        parse=warmup_parser("--avg-warmup"),
    )
    group_size: int | None = opt(
        None,
        "two-level averaging: groups of G consecutive workers average every "
        "--avg-every-inner minibatches, all workers every --avg-every",
        group="parallel",
        low=1,
    )
    avg_every_inner: int | None = opt(
        None, "two-level averaging: the groups' period K1", group="parallel", low=1
    )
    averaging: str = opt(
        "model",
        "averaging algorithm; overlap: plain averaging whose allreduce runs during the next "
        "round and is applied one round late, keeping the local progress (blocking at epoch ends); "
        "butterfly: each worker averages with one partner, id XOR 2^(sync mod log2 N), "
        "an allreduce at epoch ends (N a power of 2)",
        ALGORITHMS,
        "parallel",
    )
    avg_dtype: str = opt("fp32", "allreduce dtype: fp32, bf16, fp16", tuple(AVG_DTYPES), "parallel")
    block_momentum: float | None = opt(
        None, "bmuf: block momentum (default 1 - 1/N)", group="parallel"
    )
    block_lr: float = opt(1.0, "bmuf: block learning rate", group="parallel")
    outer_lr: float = opt(
        0.7, "diloco: outer Nesterov SGD learning rate", group="parallel", low=0, open_low=True
    )
    outer_momentum: float = opt(
        0.9, "diloco: outer Nesterov momentum", group="parallel", low=0, high=1, open_high=True
    )
    optimizer_state: str = opt(
        "local",
        "the local optimisers' moments (SGD momentum, Adam's) at each sync: kept, averaged "
        "like the models, or reset (NG-SGD's Fisher estimates stay local)",
        POLICIES,
        "parallel",
    )
    # run (beside RunOptions)
    cv_every: int = opt(
        0,
        "also validate every M averaging rounds within an epoch, for finer learning curves "
        "(0: after each epoch only)",
        group="run",
        low=0,
    )
    noise_scale: bool = opt(
        False,
        "also estimate the gradient noise scale at every validation (metrics.jsonl "
        "noise_scale: frames per update the task can use; with NG-SGD also noise_scale_ng, "
        "in its metric; see modelavg noise-scale)",
        group="run",
    )
    max_rollbacks: int = opt(3, "NaN/Inf rollbacks allowed before giving up", group="run", low=0)
    rollback_lr_factor: float = opt(
        0.5, "lr multiplier applied at each rollback", group="run", low=0, high=1, open_low=True
    )

    @property
    def round_steps(self) -> int:
        """Local minibatches per averaging round: K, or --avg-every-max with ``auto``."""
        return self.avg_every_max if self.avg_every == "auto" else self.avg_every


@dataclass
class PretrainConfig(RunOptions, ParallelOptions, DataOptions):
    max_utt_frames: int = opt(
        6000, "skip longer utterances, as nnet1 does (0 = keep all)", group="data", low=0
    )
    # model
    hidden_layers: int = opt(4, "RBMs in the stack (the recipe: 6)", group="model", low=1)
    hidden_dim: int = opt(1024, "hidden units per RBM (the recipe: 2048)", group="model", low=1)
    # RBM training
    rbm_iter: int = opt(
        1,
        "epochs per Bernoulli RBM; the Gaussian first RBM runs twice as many",
        group="rbm",
        low=1,
    )
    minibatch: int = opt(100, "frames per CD-1 minibatch", group="rbm", low=1)
    lr_scaling: str = opt(
        "none",
        "multiply the recipe lr (0.01, 0.4) by the number of workers (linear breaks the RBMs "
        "from N = 2 on: docs/RESULTS.md)",
        ("linear", "none"),
        "rbm",
    )
    with_bug: bool = opt(
        True, "Kaldi's --with-bug=true: momentum 0.9 from the first minibatch", group="rbm"
    )


def config_fields(cls: type = TrainConfig) -> list:
    """The fields of ``cls`` that are options (all of them have defaults)."""
    return [f for f in fields(cls) if f.default is not MISSING]


def read_options(path: str | os.PathLike | None, fields_: list) -> dict[str, Any]:
    """The options in a YAML config file (underscore names), refusing unknown ones."""
    if path is None:
        return {}
    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"{path}: cannot read config ({exc.__class__.__name__})") from None
    if not isinstance(loaded, dict):
        raise UsageError(f"{path}: a config file must be a mapping of option: value")
    known = {f.name for f in fields_}
    for key in loaded:
        if key not in known:
            raise UsageError(f"{path}: unknown option {key!r}")
    return loaded


def load_config(
    path: str | os.PathLike | None, overrides: dict[str, Any], cls: type = TrainConfig
) -> Any:
    """Defaults, then the YAML file, then explicit overrides (the command line); validated."""
    return validate(cls(**{**read_options(path, config_fields(cls)), **overrides}))


def validate(cfg: Any) -> Any:
    """Refuse a value outside its field's limits or choices, naming the option."""
    for f in config_fields(type(cfg)):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if f.metadata.get("parse") is not None:
            value = f.metadata["parse"](value)
            setattr(cfg, f.name, value)
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise UsageError(f"{flag} {value}: choose from {', '.join(choices)}")
        low, high, open_low, open_high = f.metadata["limits"]
        if value is None or (low is None and high is None):
            continue
        below = low is not None and (value <= low if open_low else value < low)
        above = high is not None and (value >= high if open_high else value > high)
        if below or above:
            raise UsageError(f"{flag} must be {describe_limits(*f.metadata['limits'])}")
    return cfg


def describe_limits(low: float | None, high: float | None, open_low: bool, open_high: bool) -> str:
    """'>= 1', '> 0', 'in (0, 1]': the accepted range as an error message says it."""
    if high is None:
        return f"{'>' if open_low else '>='} {low:g}"
    if low is None:
        return f"{'<' if open_high else '<='} {high:g}"
    return f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
