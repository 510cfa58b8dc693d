"""GPU readiness on a CPU machine: device selection, backend choice, collectives and MPI staging
with ``torch.cuda`` stubbed (issue 23). Each test fails on the code before its fix."""

from __future__ import annotations

import types
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from fakes import FakePeer

from modelavg import checkpoint as ckpt
from modelavg import launch
from modelavg.comm import mpi as mpi_mod
from modelavg.comm.torchdist import TorchDistCommunicator
from modelavg.errors import UsageError, WorkerLost
from modelavg.launch import ProcessEnv, choose_backend, pick_device
from modelavg.nets.rbm import RBM, CD1Trainer


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine has ``n`` GPUs; returns the devices set_device was given."""
    chosen: list[torch.device] = []

    def have(n: int) -> list[torch.device]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
        return chosen

    return have


def penv(local: int, size: int, rank: int = 0) -> ProcessEnv:
    return ProcessEnv(rank, size, rank % local, local, "torchrun")


def test_cuda_without_an_index_is_this_processes_gpu(gpus):
    gpus(4)
    assert pick_device("cuda", 3) == torch.device("cuda", 3)
    assert pick_device("cuda", 5) == torch.device("cuda", 1)
    assert pick_device("auto", 2) == torch.device("cuda", 2)
    assert pick_device("cuda:1", 3) == torch.device("cuda", 1)
    with pytest.raises(UsageError, match="has 4 GPU"):
        pick_device("cuda:4", 0)


def test_no_gpu_auto_is_cpu_and_cuda_is_a_usage_error(gpus):
    gpus(0)
    assert pick_device("auto", 1) == torch.device("cpu")
    with pytest.raises(UsageError, match="no CUDA device"):
        pick_device("cuda", 0)


def test_ranks_sharing_a_gpu_fall_back_to_gloo_or_refuse_nccl(gpus, capsys):
    gpus(1)
    cuda0 = torch.device("cuda", 0)
    assert choose_backend("auto", cuda0, penv(2, 2)) == "gloo"
    assert "share 1 GPU(s): using gloo" in capsys.readouterr().err
    with pytest.raises(UsageError, match="NCCL needs one GPU per process"):
        choose_backend("nccl", cuda0, penv(2, 2))
    assert choose_backend("gloo", cuda0, penv(2, 2)) == "gloo"  # gloo reduces CUDA tensors
    assert choose_backend("auto", cuda0, penv(1, 4)) == "nccl"  # one per node, four nodes
    gpus(2)
    assert choose_backend("auto", torch.device("cuda", 1), penv(2, 2, rank=1)) == "nccl"
    with pytest.raises(UsageError):  # --device cuda:0 pins both local ranks to one GPU
        choose_backend("nccl", cuda0, penv(2, 2), explicit_index=True)
    with pytest.raises(UsageError, match="needs --device cuda"):
        choose_backend("nccl", torch.device("cpu"), penv(1, 2))


def test_connect_sets_the_device_and_nccl_connects_eagerly(gpus, monkeypatch):
    chosen = gpus(2)
    calls: dict = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.update(kw))
    monkeypatch.setattr(dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr("modelavg.comm.torchdist.rendezvous_store", lambda *a: None)
    monkeypatch.setattr(launch, "ensure_rendezvous", lambda penv: None)
    monkeypatch.setattr(launch, "_joined_process_group", False)  # restored after connect sets it
    cfg = types.SimpleNamespace(in_process=False, workers=None, device="cuda", backend="auto")
    cfg.timeout = 30.0
    comm = launch.connect(cfg, penv(2, 2, rank=1))
    assert chosen == [torch.device("cuda", 1)] and comm.device == torch.device("cuda", 1)
    assert calls["device_id"] == torch.device("cuda", 1)


def test_rng_state_from_a_gpu_checkpoint_is_restored_through_the_cpu():
    state = mock.Mock()  # what map_location="cuda" gives: a tensor that must come back first
    state.cpu.return_value = torch.get_rng_state()
    ckpt.set_rng_state(state)
    state.cpu.assert_called_once()


def torchdist(device: str = "cpu") -> TorchDistCommunicator:
    """A communicator that never joined a process group (its error handling alone)."""
    comm = object.__new__(TorchDistCommunicator)
    comm.process_rank, comm.num_processes, comm.timeout_s = 0, 2, 5.0
    comm.device, comm.backend, comm.failed = torch.device(device), "nccl", False
    return comm


def test_only_a_lost_peer_becomes_worker_lost():
    comm = torchdist()
    for own in (torch.OutOfMemoryError("CUDA out of memory"), RuntimeError("CUDA error: bad")):
        with pytest.raises(type(own)), comm._collective():
            raise own
    assert not comm.failed
    for lost in (RuntimeError("Connection closed by peer"), dist.DistBackendError("NCCL")):
        with pytest.raises(WorkerLost), comm._collective():
            raise lost
    assert comm.failed  # close() then skips destroy_process_group (it can block under NCCL)


def test_a_collective_refuses_a_tensor_off_the_communicators_device():
    comm = torchdist("meta")
    with pytest.raises(ValueError, match="tensor on cpu"):
        comm._allreduce_sum_(torch.zeros(3))
    with pytest.raises(ValueError, match="tensor on cpu"):
        comm.broadcast_(torch.zeros(3))


def test_sum_stats_moves_cpu_counters_to_the_device():
    comm = FakePeer(torch.device("meta"))
    total = comm.sum_stats([torch.tensor([1.0, 2.0], dtype=torch.float64)])
    assert total.device.type == "meta" and comm.reduced == 1


class FakeMPI:
    """mpi4py's MPI module as far as MPICommunicator uses it; every call goes into ``log``."""

    IN_PLACE, SUM = object(), object()

    def __init__(self, log: list[str], cuda_aware: bool) -> None:
        self.COMM_WORLD = self
        self.log, self.cuda_aware = log, cuda_aware

    def Query_cuda_support(self) -> bool:  # noqa: N802 - mpi4py's name
        return self.cuda_aware

    def Get_rank(self) -> int:  # noqa: N802
        return 0

    def Get_size(self) -> int:  # noqa: N802
        return 2

    def Bcast(self, buf, root: int) -> None:  # noqa: N802, ANN001
        self.log.append("Bcast")

    def Allreduce(self, in_place, buf, op) -> None:  # noqa: N802, ANN001
        self.log.append("Allreduce")


def test_cuda_aware_mpi_waits_for_the_stream_before_it_reads_device_memory(monkeypatch):
    log: list[str] = []
    monkeypatch.setattr(mpi_mod, "_mpi", lambda: FakeMPI(log, cuda_aware=True))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append("sync"))
    monkeypatch.delenv("MODELAVG_MPI_CUDA_AWARE", raising=False)
    comm = mpi_mod.MPICommunicator("meta")
    assert comm.cuda_aware
    comm.broadcast_(torch.empty(4, device="meta"))
    comm._allreduce_sum_(torch.empty(4, device="meta"))
    assert log == ["sync", "Bcast", "sync", "Allreduce"]
    monkeypatch.setenv("MODELAVG_MPI_CUDA_AWARE", "0")
    assert not mpi_mod.MPICommunicator("meta").cuda_aware


def test_host_staging_reuses_one_buffer_per_shape(monkeypatch):
    monkeypatch.setattr(mpi_mod, "_mpi", lambda: FakeMPI([], cuda_aware=False))
    comm = mpi_mod.MPICommunicator("meta")
    big, small = torch.empty(1000, device="meta"), torch.empty(3, device="meta")
    assert comm._host(big) is comm._host(big) and comm._host(small).shape == (3,)
    assert comm._host(big).device.type == "cpu"


def test_rbm_generator_state_from_a_gpu_checkpoint_is_restored_through_the_cpu():
    trainer = CD1Trainer(RBM(6, 4, "gaussian"), seed=1)
    saved = trainer.state_dict()
    state = mock.Mock()
    state.cpu.return_value = saved["rng_state"]
    CD1Trainer(RBM(6, 4, "gaussian"), seed=2).load_state_dict({**saved, "rng_state": state})
    state.cpu.assert_called_once()
