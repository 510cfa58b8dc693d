"""The one exception type users see: printed as a single line, exit code 2, no traceback."""


class UsageError(Exception):
    """Bad input or misuse. The message names the file, utterance or option at fault."""


class WorkerLost(Exception):
    """Another worker vanished mid-collective: one line, exit code ``launch.PEER_LOST``."""
