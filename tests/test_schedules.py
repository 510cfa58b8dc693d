import math
from types import SimpleNamespace

import pytest

from modelavg.errors import UsageError
from modelavg.optim.schedules import (
    Constant,
    Exponential,
    Newbob,
    exponential_lr,
    worker_lr_factor,
)


def test_exponential_matches_paper_sequence():
    lrs = [exponential_lr(e, 0.32, 0.01, 15) for e in range(1, 16)]
    assert lrs[0] == pytest.approx(0.32)
    assert lrs[1] == pytest.approx(0.2303, abs=1e-4)
    assert lrs[-1] == pytest.approx(0.0032)
    assert lrs[1] / lrs[0] == pytest.approx(0.01 ** (1 / 14))


def test_exponential_state_accepts_every_epoch_and_stops_at_end():
    s = Exponential(lr0=1.0, epochs=3, final_ratio=0.25)
    seen = []
    while True:
        seen.append(s.lr)
        s, accepted, stop = s.after_epoch(cv_loss=math.nan)
        assert accepted
        if stop:
            break
    assert seen == pytest.approx([1.0, 0.5, 0.25])


def test_newbob_rejects_worse_epoch_and_halves_then_stops():
    s = Newbob(lr=1.0, epochs=20, best_loss=2.0)
    s, acc, stop = s.after_epoch(1.5)  # 25% better: accept, keep lr
    assert (acc, stop, s.lr, s.halving) == (True, False, 1.0, False)
    s, acc, stop = s.after_epoch(1.6)  # worse: reject, start halving
    assert (acc, stop, s.lr, s.halving, s.best_loss) == (False, False, 0.5, True, 1.5)
    s, acc, stop = s.after_epoch(1.4)  # 6.7% better: accept, keep halving
    assert (acc, stop, s.lr) == (True, False, 0.25)
    s, acc, stop = s.after_epoch(1.3999)  # below end threshold while halving: stop
    assert acc and stop


def test_newbob_starts_halving_below_threshold_only():
    s = Newbob(lr=1.0, epochs=20, best_loss=1.0, start_halving=0.01)
    s, _, _ = s.after_epoch(0.995)  # 0.5% improvement
    assert s.halving and s.lr == 0.5


def test_constant_and_max_epochs():
    s = Constant(lr=0.1, epochs=2)
    s, _, stop = s.after_epoch(1.0)
    assert not stop and s.lr == 0.1
    _, _, stop = s.after_epoch(1.0)
    assert stop
    s = Newbob(lr=1.0, epochs=1, best_loss=10.0)
    assert s.after_epoch(1.0)[2]


def test_lr_ramp_raises_the_linear_factor_from_1_to_n_by_hand():
    linear, none = SimpleNamespace(lr_scaling="linear"), SimpleNamespace(lr_scaling="none")
    # N = 4 over R = 8 rounds: 1 + 3 r / 8
    assert [worker_lr_factor(linear, 4, r, 8) for r in (0, 4, 6, 8, 20)] == [1, 2.5, 3.25, 4, 4]
    assert worker_lr_factor(linear, 4, 0, 0) == 4  # no ramp: the paper's linear scaling
    assert worker_lr_factor(none, 4, 3, 0) == 1
    with pytest.raises(UsageError, match="--lr-warmup .* needs --lr-scaling linear"):
        worker_lr_factor(none, 4, 3, 8)
