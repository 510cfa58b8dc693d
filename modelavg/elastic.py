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

Example::

    shared, states = checkpoint.restore(root, comm, resize=True)
    run.round = resize(shared, cfg, engine, models, rounds, log)   # the round to start from
"""

from __future__ import annotations

from torch import nn

from modelavg.config import TrainConfig
from modelavg.engine import Engine
from modelavg.io import write_config
from modelavg.runlog import RunLog


def resized_round(round_: int, workers_before: int, cfg: TrainConfig, engine: Engine) -> int:
    """The round of the new epoch at which as many frames are done as at ``round_`` before."""
    frames = round_ * cfg.round_steps * cfg.minibatch * workers_before
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
    comm = engine.comm
    before, after = shared["workers"], comm.num_workers
    if before == after:
        return shared["round"]
    averager = engine.averager.load_resized_state(shared["averager"], models, before)
    round_ = min(rounds, resized_round(shared["round"], before, cfg, engine))
    epoch = shared["epoch"]
    frames = ((epoch - 1) * rounds + round_) * engine.frames_per_round
    record = {"kind": "resize", "epoch": epoch, "round": round_, "round_before": shared["round"]}
    record |= {"workers_before": before, "workers": after, "rounds_per_epoch": rounds}
    log.write({**record, "averager": averager, "frames": frames})
    if comm.is_main:
        write_config(cfg, cfg.out)
        print(
            f"resumed on {after} workers from a checkpoint of {before}: epoch {epoch}, round "
            f"{round_} of {rounds} (was {shared['round']}); data re-sharded, local optimiser "
            f"state restarted, averager state {averager}",
            flush=True,
        )
    return round_
