"""The one launch path of every command: torchrun, mpirun/mpiexec (OpenMPI, MPICH), srun, or
local processes we spawn (``--workers N``), or N logical workers in this process.

Whoever launched us, the result is a rank, a world size and a local rank; the process group then
rendezvouses over env:// (MASTER_ADDR/MASTER_PORT), which works with the pip PyTorch wheel (its
``mpi`` backend needs a source build; ``--backend mpi`` uses mpi4py instead).

Example::

    def work(cfg, comm): train(cfg, comm)
    code = run_job(cfg, argv, work)     # detect -> spawn or join -> work -> exit code
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modelavg.comm.base import Communicator
from modelavg.comm.inprocess import InProcessCommunicator
from modelavg.errors import Infeasible, Preempted, UsageError, WorkerLost
from modelavg.io import check_out_dir
from modelavg.preempt import SIGNALS

PEER_LOST = WorkerLost.exit_code  # a worker that stopped because another one died
# the worker printed why (or, preempted, the main one did)
SELF_REPORTED = (UsageError.exit_code, Infeasible.exit_code, Preempted.exit_code)
GRACE_S = 5.0  # after one worker fails, how long the others may take to stop on their own


def run_job(cfg: Any, argv: list[str], work: Callable[[Any, Communicator], None]) -> int:
    """Check --out, then spawn ``--workers`` local processes running ``modelavg <argv>``, or join
    the launcher's job (or host in-process workers) and run ``work(cfg, comm)``.

    Under ``torchrun --max-restarts`` a restarted process resumes from the last checkpoint.
    Returns the exit code (0; or a spawned job's first failure).
    """
    checkpoints = Path(cfg.out) / "checkpoints" / "LATEST" if cfg.out else None
    has_run = checkpoints is not None and checkpoints.exists()
    if has_run and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        cfg.resume = True  # torchrun restarted us: continue from the checkpoint
    check_out_dir(cfg.out, has_run, cfg.resume)
    penv = detect()
    if penv is None and not cfg.in_process and (cfg.workers or 1) > 1:
        return spawn_local(argv, cfg.workers)
    with joined(cfg, penv) as comm:
        work(cfg, comm)
    return 0


@dataclass(frozen=True)
class ProcessEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str


def _ints(env: dict, *names: str) -> list[int] | None:
    if not all(n in env for n in names):
        return None
    return [int(env[n]) for n in names]


def detect(env: dict | None = None) -> ProcessEnv | None:
    """Rank, world size and local rank from the launcher's environment variables."""
    env = dict(os.environ if env is None else env)
    if v := _ints(env, "RANK", "WORLD_SIZE"):  # torchrun and our own spawn
        local = int(env.get("LOCAL_RANK", 0))
        local_size = int(env.get("LOCAL_WORLD_SIZE", v[1]))
        return ProcessEnv(v[0], v[1], local, local_size, env.get("MODELAVG_LAUNCHER", "torchrun"))
    if v := _ints(env, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"):
        local = int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0))
        local_size = int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", v[1]))
        return ProcessEnv(v[0], v[1], local, local_size, "mpirun")
    if v := _ints(env, "PMI_RANK", "PMI_SIZE"):  # MPICH / Intel MPI (Hydra)
        local = int(env.get("MPI_LOCALRANKID", 0))
        local_size = int(env.get("MPI_LOCALNRANKS", v[1]))
        return ProcessEnv(v[0], v[1], local, local_size, "mpiexec")
    # Inside an sbatch script SLURM_PROCID/SLURM_NTASKS exist too; only srun sets the step's.
    if v := _ints(env, "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
        local = int(env.get("SLURM_LOCALID", 0))
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE", str(v[1]))
        return ProcessEnv(v[0], v[1], local, int(re.match(r"\d+", per_node).group()), "srun")
    return None


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list: 'gpu[03-05,07],cpu1' -> 'gpu03'."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m:
        return nodelist
    prefix, ranges = m.groups()
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_rendezvous(penv: ProcessEnv) -> None:
    """Set MASTER_ADDR/MASTER_PORT for launchers that do not (mpirun, srun)."""
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        return
    if penv.launcher == "srun" and "SLURM_STEP_NODELIST" in os.environ:
        os.environ.setdefault("MASTER_ADDR", first_slurm_host(os.environ["SLURM_STEP_NODELIST"]))
        os.environ.setdefault(
            "MASTER_PORT", str(29500 + int(os.environ.get("SLURM_JOB_ID", 0)) % 20000)
        )
        return
    try:
        from mpi4py import MPI
    except ImportError:
        raise UsageError(
            f"launched by {penv.launcher} without MASTER_ADDR/MASTER_PORT: export them "
            "(e.g. -x MASTER_ADDR=host0 -x MASTER_PORT=29500) or pip install mpi4py"
        ) from None
    MPI.COMM_WORLD.Barrier()  # MPI opens its own sockets now, not after we pick a free port
    addr = (socket.gethostname(), free_port()) if penv.rank == 0 else None
    addr = MPI.COMM_WORLD.bcast(addr, root=0)
    os.environ.setdefault(
        "MASTER_ADDR", addr[0] if penv.world_size > penv.local_world_size else "127.0.0.1"
    )
    os.environ.setdefault("MASTER_PORT", str(addr[1]))


def pick_device(requested: str, local_rank: int) -> torch.device:
    """auto: one GPU per process (cuda:local_rank) when GPUs exist, else the CPU; ``cuda``
    without an index also means this process's GPU."""
    if requested == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    try:
        device = torch.device("cuda" if requested == "auto" else requested)
    except RuntimeError:
        raise UsageError(f"--device {requested}: choose auto, cpu, cuda or cuda:N") from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise UsageError(f"--device {requested}: no CUDA device available")
    count = torch.cuda.device_count()
    index = local_rank % count if device.index is None else device.index
    if index >= count:
        raise UsageError(f"--device {requested}: this machine has {count} GPU(s)")
    return torch.device("cuda", index)


def choose_backend(
    requested: str, device: torch.device, penv: ProcessEnv, explicit_index: bool = False
) -> str:
    """gloo or nccl. NCCL needs a GPU of its own per process (two ranks on one GPU fail at the
    first collective); ``auto`` then falls back to gloo, which reduces CUDA tensors too, so a
    one-GPU machine still runs several worker processes."""
    if requested not in ("auto", "nccl"):
        return requested
    if device.type != "cuda":
        if requested == "nccl":
            raise UsageError("--backend nccl needs --device cuda")
        return "gloo"
    gpus = torch.cuda.device_count()
    shared = penv.local_world_size > gpus or (explicit_index and penv.local_world_size > 1)
    if not shared:
        return "nccl"
    why = f"{penv.local_world_size} processes on this machine share {gpus} GPU(s)"
    if requested == "nccl":
        raise UsageError(
            f"--backend nccl: {why}, NCCL needs one GPU per process; use --backend gloo, fewer "
            "processes, or --in-process"
        )
    if penv.rank == 0:
        print(f"modelavg: {why}: using gloo, not NCCL", file=sys.stderr, flush=True)
    return "gloo"


def connect(cfg, penv: ProcessEnv | None) -> Communicator:
    """The communicator for this process: in-process workers or a real process group."""
    if cfg.in_process or penv is None:
        device = pick_device(cfg.device, 0)
        return InProcessCommunicator(cfg.workers or 1, device)
    if cfg.workers is not None and cfg.workers != penv.world_size:
        raise UsageError(
            f"--workers {cfg.workers} but {penv.launcher} started {penv.world_size} processes"
        )
    device = pick_device(cfg.device, penv.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.backend == "mpi":
        from modelavg.comm.mpi import MPICommunicator

        return MPICommunicator(device)
    backend = choose_backend(cfg.backend, device, penv, explicit_index=":" in cfg.device)
    ensure_rendezvous(penv)
    from modelavg.comm.torchdist import TorchDistCommunicator

    global _joined_process_group
    _joined_process_group = True
    return TorchDistCommunicator(penv.rank, penv.world_size, backend, device, cfg.timeout)


_joined_process_group = False  # set by connect(); read by end_process()


def end_process(code: int) -> int:
    """``code``, or, once this process has joined a torch.distributed group, exit with it now.

    Interpreter teardown after a gloo group (even a destroyed one) can abort in its C++ threads
    (SIGABRT, seen after successful runs and after a lost peer), and the launcher would report a
    failed worker. Everything a job writes is closed and atomically in place by then.
    """
    if not _joined_process_group:
        return code
    mpi = sys.modules.get("mpi4py.MPI")  # imported by ensure_rendezvous under mpirun
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()  # mpirun counts an exit without it as a failure; os._exit skips atexit
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@contextmanager
def joined(cfg: Any, penv: ProcessEnv | None) -> Iterator[Communicator]:
    """Set threads, join the job (or host N in-process workers), and leave it afterwards.

    A failed collective surfaces as ``WorkerLost`` (raised by the communicator); any other error
    of this worker passes through with its own message and traceback.
    """
    local = penv.local_world_size if penv and not cfg.in_process else 1
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // local))
    # Saturated sigmoids make denormal floats, and CPUs compute on those ~20x slower; flushing
    # them to zero changes only values below ~1e-38.
    torch.set_flush_denormal(True)
    if penv and penv.rank != 0:
        cfg.progress = False
    comm = connect(cfg, penv)
    try:
        yield comm
    finally:
        comm.close()


def local_rank_env(rank: int, workers: int, port: int) -> dict[str, str]:
    """The variables torchrun sets for ``rank`` of ``workers`` processes on this machine."""
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(workers),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(workers),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def spawn_local(argv: list[str], workers: int, poll_s: float = 0.2) -> int:
    """Run ``modelavg <argv>`` as ``workers`` local processes; if one fails, stop the rest.

    Returns the exit code: 0 when all succeed, else the first failure's code (or 128 + signal).
    A worker that reported its own error (a usage error, infeasible options) has printed why;
    otherwise the launcher names the rank that failed first (not one that stopped because its
    peer died). SIGTERM/SIGUSR1 are passed on to the workers (preemption: they checkpoint and
    all exit 75).
    """
    port = free_port()
    procs = []
    for rank in range(workers):
        env = {**os.environ, **local_rank_env(rank, workers, port), "MODELAVG_LAUNCHER": "spawn"}
        procs.append(subprocess.Popen([sys.executable, "-m", "modelavg", *argv], env=env))

    def forward(signum: int, frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in SIGNALS}
    try:
        deadline = None
        while True:
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if all(c == 0 for c in codes):
                return 0
            if failed and deadline is None:
                deadline = time.monotonic() + GRACE_S  # the others may stop on their own
            if failed and (None not in codes or time.monotonic() > deadline):
                rank, code = min(failed, key=lambda rc: (rc[1] == PEER_LOST, rc[0]))
                if code not in SELF_REPORTED:
                    why = f"signal {-code}" if code < 0 else f"exit code {code}"
                    print(
                        f"modelavg: error: worker rank {rank} failed ({why}); stopping the others",
                        file=sys.stderr,
                        flush=True,
                    )
                stop_all(procs)
                return 128 - code if code < 0 else code
            time.sleep(poll_s)
    except KeyboardInterrupt:
        stop_all(procs)
        return 130
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def stop_all(procs: list[subprocess.Popen], grace_s: float = 5.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
