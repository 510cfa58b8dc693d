"""From data directories to what the workers train on: shards, CV shards, normalisation, model.

Every process reads the data lists and computes the same partition (``data.sharded``); each keeps
only its own workers' shards. The normalisation statistics and the class counts (the priors a
decoder divides by) are summed across all workers' shards.

Example::

    data = load_training_data(cfg, comm)
    data.train[0]          # FrameTable of this process's first worker
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modelavg.comm.base import Communicator
from modelavg.config import TrainConfig
from modelavg.data.frames import FrameTable
from modelavg.data.kaldi import Corpus, read_corpus
from modelavg.data.sharded import global_mean_std, shard_corpus
from modelavg.data.shards import partition
from modelavg.errors import UsageError
from modelavg.nets.dnn import DNN, DNNSpec


@dataclass
class TrainingData:
    train: list[FrameTable]  # one per local worker
    cv: list[FrameTable]
    shard_frames: list[int]  # every worker's, in global worker order
    rounds: int  # averaging rounds per epoch
    cv_frames: int
    num_classes: int
    initial_model: DNN
    class_counts: torch.Tensor  # float64 (num_classes,): the training targets of all workers


def split_cv(corpus: Corpus, fraction: float) -> tuple[Corpus, Corpus]:
    """Hold out the last ``fraction`` of utterances (Kaldi's subset_data_dir_tr_cv.sh default)."""
    utts = corpus.utts
    n_cv = max(1, round(len(utts) * fraction))
    if n_cv >= len(utts):
        raise UsageError(f"{corpus.source}: too few utterances ({len(utts)}) to hold out a CV set")

    return corpus.subset(utts[:-n_cv]), corpus.subset(utts[-n_cv:])


def count_classes(cfg: TrainConfig, corpora: list[Corpus]) -> int:
    largest = max(int(t.max()) for c in corpora for t in c.targets.values())
    if cfg.num_classes is None:
        return largest + 1
    for c in corpora:
        for utt, t in c.targets.items():
            if int(t.max()) >= cfg.num_classes:
                raise UsageError(
                    f"{c.source}: utterance {utt} has class id {int(t.max())}, "
                    f"not below --num-classes {cfg.num_classes}"
                )
    return cfg.num_classes


def load_training_data(cfg: TrainConfig, comm: Communicator) -> TrainingData:
    """Read, split and shard the data (a bad file is reported once), then the statistics."""
    with comm.one_voice():  # no collectives inside: every process fails alike or not at all
        corpus, cv = read_corpora(cfg)
        num_classes = count_classes(cfg, [corpus, cv])
        shards = shard_corpus(
            corpus, comm.num_workers, comm.worker_ids, cfg.round_steps, cfg.minibatch
        )
        cv_shards = partition(cv.lengths, comm.num_workers, True)
        cv_tables = [FrameTable.from_corpus(cv, cv_shards[w]) for w in comm.worker_ids]
        model = initial_model(cfg, corpus.dim, num_classes)
    model.normalize.set_stats(*normalisation(cfg, comm, shards.tables))
    counts = [torch.bincount(t.targets, minlength=num_classes).double() for t in shards.tables]
    return TrainingData(
        train=[t.to(comm.device) for t in shards.tables],
        cv=[t.to(comm.device) for t in cv_tables],
        shard_frames=shards.shard_frames,
        rounds=shards.rounds,
        cv_frames=cv.num_frames(),
        num_classes=num_classes,
        initial_model=model,
        class_counts=comm.sum_stats([c.to(comm.device) for c in counts]).cpu(),
    )


def read_corpora(cfg: TrainConfig) -> tuple[Corpus, Corpus]:
    """The training corpus and the CV corpus (``--cv``, or held out from ``--data``)."""
    if cfg.data is None and cfg.feats is None:
        raise UsageError("--data is required")
    corpus = read_corpus(cfg.data or ".", cfg.feats, cfg.targets, skip_bad_utts=cfg.skip_bad_utts)
    if cfg.cv is None and cfg.cv_feats is None:
        return split_cv(corpus, cfg.cv_fraction)
    cv = read_corpus(cfg.cv or ".", cfg.cv_feats, cfg.cv_targets, skip_bad_utts=cfg.skip_bad_utts)
    if cv.dim != corpus.dim:
        raise UsageError(f"{cv.source}: feature dimension {cv.dim}, training data has {corpus.dim}")
    return corpus, cv


def initial_model(cfg: TrainConfig, input_dim: int, num_classes: int) -> DNN:
    """A randomly initialised DNN, or one whose hidden layers come from ``--init``."""
    spec = DNNSpec(
        input_dim=input_dim,
        context=cfg.context,
        hidden_layers=cfg.hidden_layers,
        hidden_dim=cfg.hidden_dim,
        num_classes=num_classes,
        activation=cfg.activation,
    )
    torch.manual_seed(cfg.seed)
    if cfg.init is None:
        return DNN(spec)
    from modelavg.nets.dbn import hidden_layers_from

    return hidden_layers_from(cfg.init, spec)


def normalisation(
    cfg: TrainConfig, comm: Communicator, train: list[FrameTable]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean/std of the spliced input: a DBN's own (``--init dbn.pt``), else the training data's."""
    if cfg.init is not None:
        from modelavg.nets.dbn import dbn_feature_stats

        stats = dbn_feature_stats(cfg.init)
        if stats is not None:
            return stats
    mean, std, _ = global_mean_std(comm, train)
    return mean.repeat(2 * cfg.context + 1), std.repeat(2 * cfg.context + 1)
