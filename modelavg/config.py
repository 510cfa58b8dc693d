"""Training configuration: one dataclass, plain values, saved with every run.

Every field is a ``modelavg train`` option (``avg_every`` -> ``--avg-every``); a YAML file given
with ``--config`` sets fields by their underscore names and the command line overrides it.

Example::

    cfg = TrainConfig(data="data/demo/train", out="exp/x", workers=2)
    cfg = load_config("my.yaml", overrides={"lr": 0.1})
"""

from __future__ import annotations

import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from modelavg.errors import UsageError


def opt(default: Any, help: str, choices: tuple | None = None, group: str = "training") -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, "group": group})


@dataclass
class ParallelOptions:
    """How a job's workers are started and talk: shared by ``train`` and ``pretrain``."""

    workers: int | None = opt(
        None, "workers (default: from torchrun/mpirun/srun, else 1)", group="parallel"
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
        300.0, "seconds a collective may wait for a missing worker", group="parallel"
    )


@dataclass
class TrainConfig(ParallelOptions):
    # data
    data: str | None = opt(None, "training data directory (feats.scp, targets.scp)", group="data")
    cv: str | None = opt(
        None,
        "validation data directory; default: the last 10%% of --data's utterances",
        group="data",
    )
    feats: str | None = opt(None, "override feats.scp: a path or rspecifier", group="data")
    targets: str | None = opt(
        None,
        "override targets.scp: a path or rspecifier, e.g. 'ark:gunzip -c ali.1.gz|'",
        group="data",
    )
    cv_feats: str | None = opt(None, "override the CV set's feats.scp", group="data")
    cv_targets: str | None = opt(None, "override the CV set's targets.scp", group="data")
    cv_fraction: float = opt(0.1, "share of --data held out when --cv is not given", group="data")
    num_classes: int | None = opt(None, "output classes (default: from the data)", group="data")
    context: int = opt(
        5, "splice +-C frames around each frame (0 for non-sequential data)", group="data"
    )
    buffer_frames: int = opt(32768, "frame-shuffling buffer size per worker", group="data")
    skip_bad_utts: bool = opt(
        False, "drop (and count) unusable utterances instead of failing", group="data"
    )
    # model
    hidden_layers: int = opt(4, "hidden layers", group="model")
    hidden_dim: int = opt(1024, "units per hidden layer", group="model")
    activation: str = opt("sigmoid", "hidden activation", ("sigmoid", "tanh", "relu"), "model")
    init: str | None = opt(
        None, "initialise hidden layers from a DBN (dbn.pt) or a model file", group="model"
    )
    # optimisation
    optimizer: str = opt("sgd", "local optimiser", ("sgd", "ngsgd"))
    lr: float = opt(0.5, "learning rate of one worker (see --lr-scaling)")
    lr_scaling: str = opt(
        "linear", "multiply --lr by the number of workers (paper section 2.4)", ("linear", "none")
    )
    momentum: float = opt(0.0, "SGD momentum")
    minibatch: int = opt(256, "frames per minibatch")
    epochs: int = opt(10, "epochs (the maximum, for newbob)")
    schedule: str = opt(
        "exponential", "learning-rate schedule", ("exponential", "newbob", "constant")
    )
    final_lr_ratio: float = opt(0.01, "exponential: last epoch's lr / first epoch's lr")
    newbob_start: float = opt(0.01, "newbob: start halving below this relative CV improvement")
    newbob_end: float = opt(0.001, "newbob: stop below this relative CV improvement")
    halving_factor: float = opt(0.5, "newbob: lr multiplier once halving")
    # natural gradient
    ng_rank_in: int = opt(20, "NG-SGD rank of the input-side Fisher factor", group="ngsgd")
    ng_rank_out: int = opt(80, "NG-SGD rank of the output-side Fisher factor", group="ngsgd")
    ng_update_period: int = opt(
        4, "NG-SGD: update the Fisher estimate every N minibatches", group="ngsgd"
    )
    ng_samples_history: float = opt(
        2000.0, "NG-SGD: frames of history in the estimate", group="ngsgd"
    )
    ng_alpha: float = opt(4.0, "NG-SGD: identity smoothing of the Fisher estimate", group="ngsgd")
    max_change: float = opt(
        0.075, "NG-SGD: max parameter change per frame (0 = off)", group="ngsgd"
    )
    max_change_scaling: str = opt(
        "none",
        "NG-SGD: multiply --max-change by the number of workers, as --lr-scaling linear does "
        "the lr (the paper's code: its max-change ignored the global lr, so the cap grew with "
        "lr x N)",
        ("none", "linear"),
        "ngsgd",
    )
    ng_variant: str = opt(
        "nnet2",
        "NG-SGD arithmetic: Kaldi nnet2's online preconditioner (2014, the paper's) or nnet3's",
        ("nnet2", "nnet3"),
        "ngsgd",
    )
    ng_reset: str = opt(
        "epoch",
        "NG-SGD: reset the Fisher estimates every epoch (paper) or never",
        ("epoch", "never"),
        "ngsgd",
    )
    # parallelism (workers, backend, device, threads, timeout: ParallelOptions)
    avg_every: int = opt(10, "average the replicas every K minibatches", group="parallel")
    averaging: str = opt("model", "averaging algorithm", ("model", "bmuf"), "parallel")
    block_momentum: float | None = opt(
        None, "bmuf: block momentum (default 1 - 1/N)", group="parallel"
    )
    block_lr: float = opt(1.0, "bmuf: block learning rate", group="parallel")
    # run
    out: str | None = opt(None, "output directory", group="run")
    seed: int = opt(777, "random seed (initialisation and frame order)", group="run")
    resume: bool = opt(False, "continue from the last checkpoint in --out", group="run")
    log_every: int = opt(50, "write a metrics line every M averaging rounds", group="run")
    cv_every: int = opt(
        0,
        "also validate every M averaging rounds within an epoch, for finer learning curves "
        "(0: after each epoch only)",
        group="run",
    )
    noise_scale: bool = opt(
        False,
        "also estimate the gradient noise scale at every validation (metrics.jsonl "
        "noise_scale: frames per update the task can use; with NG-SGD also noise_scale_ng, "
        "in its metric; see modelavg noise-scale)",
        group="run",
    )
    checkpoint_every: int = opt(
        0, "also checkpoint every M averaging rounds (0 = epochs only)", group="run"
    )
    progress: bool = opt(True, "show a progress bar", group="run")
    max_rollbacks: int = opt(3, "NaN/Inf rollbacks allowed before giving up", group="run")
    rollback_lr_factor: float = opt(0.5, "lr multiplier applied at each rollback", group="run")

    def resolved(self) -> dict[str, Any]:
        return asdict(self)


def config_fields() -> list:
    return [f for f in fields(TrainConfig) if f.default is not MISSING]


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


def check(cfg: Any, checks: list[tuple[bool, str]], fields_: list) -> Any:
    """Raise the first failed check's message, then refuse values outside a field's choices."""
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    for f in fields_:
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices and value not in choices:
            flag = "--" + f.name.replace("_", "-")
            raise UsageError(f"{flag} {value}: choose from {', '.join(choices)}")
    return cfg


def load_config(path: str | os.PathLike | None, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults, then the YAML file, then explicit overrides (the command line)."""
    return validate(TrainConfig(**{**read_options(path, config_fields()), **overrides}))


def validate(cfg: TrainConfig) -> TrainConfig:
    """Refuse impossible values with a message naming the option."""
    checks = [
        (cfg.avg_every >= 1, "--avg-every must be >= 1"),
        (cfg.workers is None or cfg.workers >= 1, "--workers must be >= 1"),
        (cfg.minibatch >= 1, "--minibatch must be >= 1"),
        (cfg.epochs >= 1, "--epochs must be >= 1"),
        (cfg.context >= 0, "--context must be >= 0"),
        (cfg.hidden_layers >= 0, "--hidden-layers must be >= 0"),
        (cfg.hidden_dim >= 1, "--hidden-dim must be >= 1"),
        (cfg.lr > 0, "--lr must be > 0"),
        (0 <= cfg.momentum < 1, "--momentum must be in [0, 1)"),
        (0 < cfg.cv_fraction < 1, "--cv-fraction must be in (0, 1)"),
        (cfg.buffer_frames >= 1, "--buffer-frames must be >= 1"),
        (cfg.log_every >= 1, "--log-every must be >= 1"),
        (cfg.checkpoint_every >= 0, "--checkpoint-every must be >= 0"),
        (cfg.cv_every >= 0, "--cv-every must be >= 0"),
        (cfg.timeout > 0, "--timeout must be > 0"),
        (cfg.max_rollbacks >= 0, "--max-rollbacks must be >= 0"),
        (0 < cfg.rollback_lr_factor <= 1, "--rollback-lr-factor must be in (0, 1]"),
    ]
    return check(cfg, checks, config_fields())
