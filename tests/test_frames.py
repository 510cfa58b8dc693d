import numpy as np
import torch

from modelavg.data.frames import FrameTable, mean_std, moment_sums
from modelavg.data.kaldi import Corpus


def corpus():
    feats = {
        "a": np.arange(4, dtype=np.float32)[:, None] * [1, 10],
        "b": 100 + np.arange(3, dtype=np.float32)[:, None] * [1, 10],
    }
    targets = {"a": np.arange(4), "b": np.arange(3)}
    return Corpus(feats, targets, "mem")


def test_splice_repeats_edge_frames_within_each_utterance():
    table = FrameTable.from_corpus(corpus(), ["a", "b"])
    x = table.splice(torch.tensor([0, 3, 4]), context=1).numpy()
    # frame 0 of a: left neighbour is itself; frame 3 (last of a): right neighbour is itself
    assert x[0].tolist() == [0, 0, 0, 0, 1, 10]
    assert x[1].tolist() == [2, 20, 3, 30, 3, 30]
    # frame 4 is b's first frame: never reaches back into a
    assert x[2].tolist() == [100, 100, 100, 100, 101, 110]


def test_moments_sum_across_tables_to_global_stats():
    c = corpus()
    whole = moment_sums(FrameTable.from_corpus(c, ["a", "b"]))
    parts = moment_sums(FrameTable.from_corpus(c, ["a"])) + moment_sums(
        FrameTable.from_corpus(c, ["b"])
    )
    assert torch.equal(whole, parts)
    mean, std = mean_std(whole)
    allx = np.concatenate([c.feats["a"], c.feats["b"]])
    np.testing.assert_allclose(mean, allx.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std, allx.std(0), rtol=1e-5)
