"""A one-node Slurm cluster for tests: its own munged (socket, key), slurmctld and slurmd with
their own ports, state and spool directories under one temporary directory; nothing in /etc or
/run is touched. Needs root and Debian's slurm-wlm and munge.

Example::

    with one_node_cluster(tmp_path) as env:      # raises Unavailable(reason) where it cannot
        subprocess.run(["srun", "-n", "2", "hostname"], env=env)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from modelavg.launch import free_port

BINARIES = ("munged", "slurmctld", "slurmd", "srun", "sbatch", "squeue", "scancel", "scontrol")


class Unavailable(Exception):
    """Why no cluster could start here (a test skips with this reason)."""


def which(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if path is None:
        raise Unavailable(f"{name} not found: apt-get install -y slurm-wlm munge")
    return path


def start_daemon(cmd: list[str], d: Path, name: str) -> int:
    """Run a forking daemon; its pid once it has written ``d/name.pid``."""
    pid_file, log = d / f"{name}.pid", d / f"{name}.log"
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    deadline = time.monotonic() + 15
    while not (pid_file.exists() and pid_file.read_text().strip()):
        if r.returncode or time.monotonic() > deadline:
            text = log.read_text()[-1000:] if log.exists() else ""
            raise Unavailable(f"{name} did not start (exit {r.returncode}): {r.stderr} {text}")
        time.sleep(0.05)
    return int(pid_file.read_text())


def stop(pid: int, grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL: slurmd ignores SIGTERM while a job step still reports."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)


def step_daemons() -> set[int]:
    out = subprocess.run(["pgrep", "-x", "slurmstepd"], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def slurm_conf(d: Path, host: str) -> str:
    keys = {
        "ClusterName": "modelavg",
        "SlurmctldHost": f"{host}(127.0.0.1)",
        "SlurmctldPort": free_port(),
        "SlurmdPort": free_port(),
        "AuthType": "auth/munge",
        "AuthInfo": f"socket={d}/munge.sock",
        "SlurmUser": "root",
        "SlurmdUser": "root",
        "StateSaveLocation": d / "state",
        "SlurmdSpoolDir": d / "spool",
        "SlurmctldPidFile": d / "slurmctld.pid",
        "SlurmdPidFile": d / "slurmd.pid",
        "SlurmctldLogFile": d / "slurmctld.log",
        "SlurmdLogFile": d / "slurmd.log",
        "ProctrackType": "proctrack/linuxproc",  # no cgroups needed (containers)
        "TaskPlugin": "task/none",
        "JobAcctGatherType": "jobacct_gather/none",
        "SchedulerType": "sched/builtin",
        "SelectType": "select/cons_tres",
        "SelectTypeParameters": "CR_CPU",
        "MpiDefault": "none",
        "ReturnToService": 2,
    }
    lines = [f"{k}={v}" for k, v in keys.items()]
    lines.append(f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} State=UNKNOWN")
    lines.append(
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP "
        "OverSubscribe=FORCE:4"
    )
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def one_node_cluster(d: Path, env: dict[str, str]) -> Iterator[dict[str, str]]:
    """Start the cluster in directory ``d``; yields ``env`` with SLURM_CONF. On exit: cancel
    what still runs, wait for its steps, stop the daemons (and any step daemon they left)."""
    for name in BINARIES:
        which(name)
    if os.geteuid() != 0:
        raise Unavailable("starting slurmctld and slurmd needs root")
    host = socket.gethostname()
    try:  # srun's workers meet at the first host of the node list
        socket.gethostbyname(host)
    except OSError:
        raise Unavailable(f"this machine's name {host} does not resolve (/etc/hosts)") from None
    d.chmod(0o700)
    for sub in ("state", "spool"):
        (d / sub).mkdir()
    key = d / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    (d / "slurm.conf").write_text(slurm_conf(d, host))
    cluster_env = {**env, "SLURM_CONF": str(d / "slurm.conf")}
    steps_before = step_daemons()
    pids = []
    try:
        munged = [which("munged"), "--force", f"--socket={d}/munge.sock", f"--key-file={key}"]
        munged += [f"--log-file={d}/munged.log", f"--pid-file={d}/munged.pid"]
        pids.append(start_daemon([*munged, f"--seed-file={d}/seed"], d, "munged"))
        for daemon in ("slurmctld", "slurmd"):
            pids.append(start_daemon([which(daemon), "-f", str(d / "slurm.conf")], d, daemon))
        wait_until_idle(cluster_env, d)
        yield cluster_env
    finally:
        if len(pids) == 3:
            cancel_all(cluster_env)
        for pid in reversed(pids):
            stop(pid)
        for pid in step_daemons() - steps_before:  # steps our slurmd started
            stop(pid, grace_s=0)


def squeue(env: dict[str, str], *args: str) -> str:
    cmd = [which("squeue"), "-h", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env).stdout.strip()


def wait_until_idle(env: dict[str, str], d: Path, timeout: float = 30) -> None:
    """Until the node reports idle."""
    deadline = time.monotonic() + timeout
    sinfo = [which("scontrol"), "show", "node"]
    while "State=IDLE" not in subprocess.run(sinfo, capture_output=True, text=True, env=env).stdout:
        if time.monotonic() > deadline:
            raise Unavailable(f"the node did not come up: {(d / 'slurmd.log').read_text()[-1000:]}")
        time.sleep(0.2)


def cancel_all(env: dict[str, str], timeout: float = 30) -> None:
    """Cancel every job and wait until none is left (completing steps report back)."""
    jobs = squeue(env, "-o", "%i").split()
    if jobs:
        subprocess.run([which("scancel"), *jobs], env=env, capture_output=True)
    deadline = time.monotonic() + timeout
    while squeue(env, "-o", "%i") and time.monotonic() < deadline:
        time.sleep(0.2)
