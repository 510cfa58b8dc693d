"""GPU readiness of the training loop, checked on the CPU (issue 23): no tensor made without a
device, no host read per minibatch, and the step, averaging and validation run on a device that
is not the CPU (meta) with a collective that refuses anything else."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from fakes import FakePeer

from modelavg.audit import DeviceAudit
from modelavg.averaging import ALGORITHMS, algorithm_options, make_averager
from modelavg.averaging.base import share_flat_storage_
from modelavg.comm.inprocess import InProcessCommunicator
from modelavg.config import TrainConfig
from modelavg.engine import Engine
from modelavg.evaluate import frame_stats
from modelavg.optim import build_optimizer
from modelavg.preempt import Control
from modelavg.train import start, train, train_epoch

pytestmark = pytest.mark.usefixtures("one_thread")

# host-side construction, moved to the device once: the model's layers and buffers, and the
# normalisation statistics of the features (which live on the host until then)
HOST_SIDE = ("modelavg/nets/dnn.py", "modelavg/data/frames.py")


def config(data_dir, out, **options) -> TrainConfig:
    small = dict(hidden_layers=2, hidden_dim=32, context=1, minibatch=16, avg_every=2)
    small |= dict(epochs=1, progress=False, tensorboard=False, workers=2, in_process=True)
    return TrainConfig(data=str(data_dir), out=str(out), **(small | options))


@pytest.mark.parametrize(
    "options",
    [
        {"averaging": "bmuf"},
        {"optimizer": "ngsgd"},
        {"averaging": "diloco", "epochs": 2, "resume": True},
    ],
    ids=["sgd-bmuf", "ngsgd", "diloco-resume"],
)
def test_no_tensor_is_made_without_a_device_outside_host_side_construction(
    data_dir, tmp_path, options
):
    if options.get("resume"):  # the first epoch without the audit, then resume into the second
        train(config(data_dir, tmp_path, **(options | {"epochs": 1, "resume": False})), comm2())
    with DeviceAudit() as audit:
        train(config(data_dir, tmp_path, **options), comm2())
    implicit = {site for site in audit.implicit_device if not site.startswith(HOST_SIDE)}
    assert not implicit, f"tensors made without device= at {sorted(implicit)}"


def comm2() -> InProcessCommunicator:
    return InProcessCommunicator(2)


def started(cfg: TrainConfig):
    comm = comm2()
    return start(cfg, comm, Control(comm))


def test_sgd_reads_the_host_at_most_once_per_round_and_never_per_minibatch(data_dir, tmp_path):
    run = started(config(data_dir, tmp_path, log_every=10_000))
    idx = torch.arange(16)
    with DeviceAudit() as audit:
        for _ in range(4):
            run.workers[0].step(idx)
    assert audit.summary() == {"implicit_device": {}, "transfers": {}, "host_reads": {}}
    with DeviceAudit() as audit:
        train_epoch(run)
    reads = audit.host_reads
    per_minibatch = [s for s in reads if s.startswith(("modelavg/engine", "modelavg/workers"))]
    assert not per_minibatch
    log_line = 4  # the epoch's last round writes a log line: 3 training statistics, the spread
    assert sum(reads.values()) <= run.rounds + log_line, reads
    # the frame order goes to the device once per worker per epoch, not once per minibatch; the
    # log line's counters are copied for their reduction
    assert sum(audit.transfers.values()) <= len(run.workers) + log_line, audit.transfers


@pytest.mark.parametrize("averaging", ALGORITHMS)
def test_step_averaging_and_validation_run_on_the_device(data_dir, tmp_path, averaging):
    """Everything on meta, so a CPU tensor anywhere raises; the fake peer checks every
    collective's device (a CPU tensor handed to NCCL)."""
    cfg = config(data_dir, tmp_path, averaging=averaging)
    run = started(cfg)
    meta = torch.device("meta")
    comm = FakePeer(meta, local_workers=2)
    workers = []
    for w in run.workers:
        module = copy.deepcopy(w.module).to(meta)
        share_flat_storage_(module)
        table, cv = w.table.to(meta), w.cv.to(meta)
        optimizer = build_optimizer(module, cfg, comm.num_workers)
        workers.append(replace(w, module=module, optimizer=optimizer, table=table, cv=cv))
        workers[-1].stats = w.stats.to(meta)
    averager = make_averager(averaging, comm, **algorithm_options(cfg))
    engine = Engine(comm, averager, cfg.avg_every, cfg.minibatch, cfg.seed, cfg.buffer_frames)
    engine.broadcast(workers[0].module)
    averager.start([w.module for w in workers])
    engine.run_epoch(workers, epoch_key=1, rounds=3)
    assert engine.reduce_stats(workers).device == meta
    validation = comm.sum_stats([frame_stats(w.module, w.cv, cfg.context) for w in workers])
    assert validation.device == meta and comm.reduced >= 3 + 2


def test_with_several_processes_the_guard_and_the_preemption_poll_share_one_read():
    control = Control(FakePeer(torch.device("cpu")))
    for verdict in (0.0, 1.0):
        with DeviceAudit() as audit:
            stop, due, diverged = control.poll(torch.tensor(verdict, dtype=torch.float64))
        assert (stop, due, diverged) == (False, False, bool(verdict))
        assert sum(audit.host_reads.values()) == 1
