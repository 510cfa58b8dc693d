"""Resume on another number of workers: a lost node, a torchrun ``--nnodes MIN:MAX`` restart on
the survivors, or a requeued job that got fewer (or more) slots.

Model averaging suits this: at every checkpoint all replicas hold one global model, so any
number of workers can start from it. What changes with N, and what happens to it:

- data: re-sharded for the new N (``load_training_data`` already did), new frame orders;
- position: the epoch continues; a mid-epoch checkpoint maps to the round of the new, differently
  long epoch at which as many frames have been trained (each new shard then resumes from the
  same fraction of its own order, so the rest of that one epoch is a random subset);
- lr: ``--lr-scaling linear`` scales by the new N (``Run.lr`` reads it);
- local optimisers (SGD momentum, Adam moments, NG-SGD's Fisher estimates and RNG states) are
  per worker, with no worker to inherit them: they restart;
- the averaging algorithm maps its own state (``Averager.load_resized_state``): plain averaging
  has none; BMUF's W and Delta and DiLoCo's W and outer momentum are global and carry over;
- kept as they are: the lr schedule (Newbob's state), the accepted model, rollbacks, AdaComm's K;
- metrics.jsonl continues, with a ``resize`` line; config.yaml records the new N, so a later
  plain ``--resume`` uses it.

Pretraining (``modelavg pretrain --resume``) resizes the same way, layer by layer:

- finished layers: carried over as they are (``dbn.pt`` is written from them and the new layers);
  the input's global mean/std are recomputed over the same frames (all shards, float64 sums), so
  they see the input they were trained on;
- at a layer boundary nothing is per worker: the next layer starts as on any N (its RBM, its
  visible bias from the mean activation over all shards);
- inside a layer (at an epoch's end or mid-epoch): the current RBM carries over, the position maps
  as above (``resized_round``); every worker gets a fresh ``CD1Trainer``, even one whose worker
  id existed before, since its shard changed: zero momentum buffers, the guard's lr decay undone,
  the recipe lr (times the new N with ``--lr-scaling linear``), and a sampling RNG seeded from
  (seed, layer, worker, epoch, round), so no stream is replayed. The momentum/lr ramp is not
  per-worker state but a schedule on the layer's global frame count: it continues from the
  frames done at the mapped position. The averager maps its state as in training;
- pretrain.jsonl continues, with a ``resize`` line that names the layer; config.yaml records the
  new N.

Example::

    shared, states = checkpoint.restore(root, comm, resize=True)
    run.round = resize(shared, cfg, engine, models, rounds, log)   # the round to start from
"""

from __future__ import annotations

from torch import nn

from modelavg.config import PretrainConfig, TrainConfig
from modelavg.engine import Engine
from modelavg.io import write_config
from modelavg.runlog import RunLog


def resized_round(round_: int, workers_before: int, engine: Engine) -> int:
    """The round of the new epoch at which as many frames are done as at ``round_`` before (a
    round is K minibatches on every worker, for any N)."""
    frames = round_ * engine.avg_every * engine.minibatch * workers_before
    return round(frames / engine.frames_per_round)


def resize(
    shared: dict,
    cfg: TrainConfig,
    engine: Engine,
    models: list[nn.Module],
    rounds: int,
    log: RunLog,
) -> int:
    """The round to start the checkpoint's epoch from. A checkpoint ``shared`` of another N
    continues with ``engine.comm``'s workers, whose replicas hold its model: the averager maps
    its state and the change is logged."""
    before = shared["workers"]
    if before == engine.comm.num_workers:
        return shared["round"]
    averager = engine.averager.load_resized_state(shared["averager"], models, before)
    round_ = min(rounds, resized_round(shared["round"], before, engine))
    log_resize(shared, cfg, engine, rounds, round_, averager, log)
    return round_


def resize_layer(
    shared: dict,
    cfg: PretrainConfig,
    engine: Engine,
    rbms: list[nn.Module],
    rounds: int,
    round_: int,
    log: RunLog,
    layer: int,
) -> None:
    """A pretraining continues ``shared``, a checkpoint of another N, at ``round_`` of its epoch
    with ``rbms``, the replicas of ``layer`` (1-based). Inside the layer they take its RBM and the
    averager maps its state; at a layer boundary (no RBM) nothing carries over. Logged."""
    averager = "none"
    if shared["rbm"] is not None:
        for rbm in rbms:
            rbm.load_state_dict(shared["rbm"])
        averager = engine.averager.load_resized_state(shared["averager"], rbms, shared["workers"])
    log_resize(shared, cfg, engine, rounds, round_, averager, log, layer)


def log_resize(
    shared: dict,
    cfg: TrainConfig | PretrainConfig,
    engine: Engine,
    rounds: int,
    round_: int,
    averager: str,
    log: RunLog,
    layer: int | None = None,
) -> None:
    """The ``resize`` line (with ``layer``: a pretraining's, its frames into that layer), the new
    N in config.yaml and one console line; the run continues at ``round_`` of the checkpoint's
    epoch, the averager's state ``averager`` ("kept", "restarted", "none")."""
    comm = engine.comm
    before, after, epoch = shared["workers"], comm.num_workers, shared["epoch"]
    frames = ((epoch - 1) * rounds + round_) * engine.frames_per_round
    record = {"kind": "resize", **({} if layer is None else {"layer": layer}), "epoch": epoch}
    record |= {"round": round_, "round_before": shared["round"], "workers_before": before}
    record |= {"workers": after, "rounds_per_epoch": rounds}
    log.write({**record, "averager": averager, "frames": frames})
    if comm.is_main:
        write_config(cfg, cfg.out)
        where = f"epoch {epoch}" if layer is None else f"layer {layer} epoch {epoch}"
        local = "local optimiser" if layer is None else "CD-1"
        print(
            f"resumed on {after} workers from a checkpoint of {before}: {where}, round "
            f"{round_} of {rounds} (was {shared['round']}); data re-sharded, {local} state "
            f"restarted, averager state {averager}",
            flush=True,
        )
