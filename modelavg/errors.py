"""The errors users see: each prints as one line and ends the process with its class's exit code.

Example::

    raise UsageError("--lr must be > 0")          # modelavg: error: --lr must be > 0   (exit 2)
"""


class ModelavgError(Exception):
    """An expected failure: one line on stderr, no traceback, exit ``exit_code``."""

    exit_code = 1


class UsageError(ModelavgError):
    """Bad input or misuse. The message names the file, utterance or option at fault."""

    exit_code = 2


class WorkerLost(ModelavgError):
    """Another worker died or hung mid-collective; this one stops too."""

    exit_code = 3


class Infeasible(UsageError):
    """The options cannot run on this data (K x minibatch frames exceed a worker's shard).

    A sweep cell with this exit code is reported as infeasible, not as failed.
    """

    exit_code = 4


class Preempted(ModelavgError):
    """SIGTERM or SIGUSR1 (Slurm preemption, a scheduler's notice): every worker finished its
    round and a checkpoint was written; ``--resume`` continues. Exit 75 (sysexits' EX_TEMPFAIL:
    try again later), which an sbatch script can answer with ``scontrol requeue``."""

    exit_code = 75


class Reported(ModelavgError):
    """This process stops because another one hit an error and reported it: print nothing."""

    def __init__(self, exit_code: int) -> None:
        super().__init__("")
        self.exit_code = exit_code
