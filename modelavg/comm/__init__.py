"""How replicas talk: one small interface (``Communicator``), three implementations."""

from modelavg.comm.base import Communicator
from modelavg.comm.inprocess import InProcessCommunicator

__all__ = ["Communicator", "InProcessCommunicator"]
