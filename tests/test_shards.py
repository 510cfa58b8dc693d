import numpy as np
import pytest

from modelavg.data.shards import epoch_order, minibatches, partition, rounds_per_epoch
from modelavg.errors import UsageError


def test_partition_is_frame_balanced_and_complete():
    rng = np.random.default_rng(0)
    lengths = {f"u{i}": int(rng.integers(10, 1000)) for i in range(200)}
    shards = partition(lengths, 7)
    flat = sorted(u for s in shards for u in s)
    assert flat == sorted(lengths)
    frames = [sum(lengths[u] for u in s) for s in shards]
    # greedy longest-first: shards differ by at most the longest utterance
    assert max(frames) - min(frames) <= max(lengths.values())
    assert max(frames) - min(frames) < 0.02 * sum(frames) / 7


def test_partition_longest_first_to_lightest():
    assert partition({"a": 300, "b": 200, "c": 120}, 2) == [["a"], ["b", "c"]]


def test_partition_refuses_more_workers_than_utterances():
    with pytest.raises(UsageError, match="more workers than utterances"):
        partition({"a": 1}, 2)
    assert partition({"a": 1}, 2, allow_empty=True) == [["a"], []]


def test_rounds_per_epoch_uses_smallest_shard():
    assert rounds_per_epoch([1000, 350, 5000], avg_every=10, minibatch=16) == 2


def test_epoch_order_is_a_seeded_permutation_that_changes_each_epoch():
    lengths = np.array([30, 50, 20])
    a = epoch_order(lengths, seed=1, epoch=1, worker=0, buffer_frames=32)
    assert sorted(a) == list(range(100))
    assert np.array_equal(a, epoch_order(lengths, seed=1, epoch=1, worker=0, buffer_frames=32))
    assert not np.array_equal(a, epoch_order(lengths, seed=1, epoch=2, worker=0, buffer_frames=32))
    assert not np.array_equal(a, epoch_order(lengths, seed=1, epoch=1, worker=1, buffer_frames=32))


def test_buffer_limits_how_far_frames_move():
    lengths = np.array([1000])
    order = epoch_order(lengths, seed=0, epoch=1, worker=0, buffer_frames=100)
    # each window of 100 positions holds exactly the frames of one window of the input
    for lo in range(0, 1000, 100):
        assert sorted(order[lo : lo + 100]) == list(range(lo, lo + 100))


def test_minibatches_drop_partial_and_skip():
    order = np.arange(50)
    batches = list(minibatches(order, 16))
    assert [len(b) for b in batches] == [16, 16, 16]
    assert list(minibatches(order, 16, skip=2))[0].tolist() == list(range(32, 48))
