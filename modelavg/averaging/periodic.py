"""Plain model averaging (the paper): every replica becomes the arithmetic mean of all replicas.

theta <- (1/N) * sum_n theta_n, computed as one allreduce(SUM) of one flat buffer and a scale.

Example::

    averager = ModelAverager(comm)
    averager.sync(models)
"""

from __future__ import annotations

import torch

from modelavg.averaging.base import Averager


class ModelAverager(Averager):
    def _sync(self, flats: list[torch.Tensor]) -> None:
        self.comm.allreduce_mean_(flats)
