"""torch.distributed process groups: gloo on CPU, NCCL on GPU (one GPU per process).

Rendezvous is ``env://`` (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), which torchrun sets and
``modelavg.launch`` sets for mpirun, srun and local spawning.

Example::

    comm = TorchDistCommunicator(rank=0, world_size=2, backend="gloo")
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from modelavg.comm.base import Communicator
from modelavg.errors import WorkerLost

# A RuntimeError outside torch.distributed's own classes that still means a peer is gone (gloo
# reports a closed socket or a timeout this way); any other error (out of memory, a CUDA error, a
# tensor on the wrong device) is this worker's own and keeps its message.
_PEER_GONE = re.compile(r"timed? ?out|timeout|connection|closed|reset by peer|broken pipe", re.I)


def rendezvous_store(rank: int, world_size: int, timeout: timedelta) -> dist.Store:
    """The TCP store at MASTER_ADDR:MASTER_PORT, under a prefix unique to this (re)start.

    After torchrun restarts a job, the store still holds the failed attempt's gloo addresses; a
    per-attempt prefix keeps the new processes from dialling the dead ones.
    """
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    is_server = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "False") != "True"
    store = dist.TCPStore(addr, port, world_size, is_master=is_server, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"modelavg/attempt-{attempt}", store)


class TorchDistCommunicator(Communicator):
    def __init__(
        self,
        rank: int,
        world_size: int,
        backend: str = "gloo",
        device: torch.device | str = "cpu",
        timeout_s: float = 300.0,
    ) -> None:
        self.process_rank = rank
        self.num_processes = world_size
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self.failed = False  # a collective failed: leave without tearing the group down
        if not dist.is_initialized():
            timeout = timedelta(seconds=timeout_s)
            with self._collective():
                dist.init_process_group(
                    backend,
                    store=rendezvous_store(rank, world_size, timeout),
                    rank=rank,
                    world_size=world_size,
                    timeout=timeout,
                    # NCCL then connects now (a bad GPU mapping fails at join, not mid-epoch)
                    device_id=self.device if backend == "nccl" else None,
                )
        self.backend = dist.get_backend()

    @contextmanager
    def _collective(self) -> Iterator[None]:
        """A collective that fails (a peer's connection closed, or no answer within --timeout)
        becomes one ``WorkerLost`` line; errors outside collectives keep their traceback."""
        try:
            yield
        except RuntimeError as exc:
            text = str(exc).strip()
            if not isinstance(exc, dist.DistError) and not _PEER_GONE.search(text):
                raise
            self.failed = True
            first = text.splitlines()[0][:200] if text else type(exc).__name__
            raise WorkerLost(
                f"worker rank {self.process_rank}: a collective failed, another worker died or "
                f"hung past --timeout {self.timeout_s:g}s ({first})"
            ) from None

    def check_device(self, tensor: torch.Tensor) -> None:
        """NCCL reduces CUDA tensors only; under it a CPU tensor would fail inside the collective
        and look like a lost peer, so name the bug instead."""
        if tensor.device != self.device:
            raise ValueError(
                f"a {self.backend} collective got a tensor on {tensor.device}, "
                f"this worker's device is {self.device}"
            )

    def _allreduce_sum_(self, tensor: torch.Tensor) -> None:
        self._allreduce_sum_async_(tensor)()  # one path for both: started, then waited for

    def _allreduce_sum_async_(
        self, tensor: torch.Tensor, group: dist.ProcessGroup | None = None
    ) -> Callable[[], None]:
        """``all_reduce(async_op=True)``: gloo sums on its own threads, NCCL on its stream (a
        wait makes the current stream wait, the host goes on); a lost peer surfaces at the wait."""
        self.check_device(tensor)
        with self._collective():
            work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group, async_op=True)

        def wait() -> None:
            with self._collective():
                work.wait()

        return wait

    def _exchange_(self, send: torch.Tensor, recv: torch.Tensor, peer: int) -> None:
        """One send and one receive, started together (neither side waits for the other's
        receive to be posted first)."""
        self.check_device(send)
        ops = [dist.P2POp(dist.isend, send, peer), dist.P2POp(dist.irecv, recv, peer)]
        with self._collective():
            for work in dist.batch_isend_irecv(ops):
                work.wait()

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> None:
        self.check_device(tensor)
        with self._collective():
            dist.broadcast(tensor, src=src)

    def barrier(self) -> None:
        with self._collective():
            dist.barrier()

    def close(self) -> None:
        """Leave the group; after a failed collective skip the teardown, which can block on a
        broken NCCL communicator (the process exits right after, see ``launch.end_process``)."""
        if dist.is_initialized() and not self.failed:
            dist.destroy_process_group()

    def split(self, processes: int) -> Communicator:
        groups = [
            dist.new_group(list(range(first, first + processes)))
            for first in range(0, self.num_processes, processes)
        ]
        return Subgroup(self, groups[self.process_rank // processes], processes)


class Subgroup(Communicator):
    """A block of ``processes`` consecutive ranks of ``parent``'s process group."""

    def __init__(self, parent: TorchDistCommunicator, group: dist.ProcessGroup, processes: int):
        self.parent, self.group = parent, group
        self.process_rank = parent.process_rank % processes
        self.num_processes, self.local_workers = processes, parent.local_workers
        self.device = parent.device

    def _allreduce_sum_(self, tensor: torch.Tensor) -> None:
        self._allreduce_sum_async_(tensor)()

    def _allreduce_sum_async_(self, tensor: torch.Tensor) -> Callable[[], None]:
        return self.parent._allreduce_sum_async_(tensor, self.group)
