"""Features named by an scp are checked once and not kept: a process reads again only the
utterances of its own shards, and gets the very frames a corpus held in memory gives."""

from __future__ import annotations

import kaldiio
import numpy as np
import pytest
import torch
from conftest import make_data_dir

from modelavg.data.frames import FrameTable
from modelavg.data.kaldi import Corpus, ScpFeats, read_corpus
from modelavg.data.sharded import shard_corpus
from modelavg.errors import UsageError


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """Every feature matrix kaldiio reads from an scp entry."""
    seen: list[str] = []
    load = kaldiio.load_mat

    def counting(entry, *args, **kwargs):
        if "feats.ark" in entry:
            seen.append(entry)
        return load(entry, *args, **kwargs)

    monkeypatch.setattr(kaldiio, "load_mat", counting)
    return seen


def test_a_process_reads_only_its_own_shard_again(tmp_path, loads):
    corpus = read_corpus(make_data_dir(tmp_path / "d", utts=40))
    assert isinstance(corpus.feats, ScpFeats) and len(loads) == 40  # the checking pass
    loads.clear()
    shards = shard_corpus(corpus, num_workers=4, worker_ids=[2], avg_every=1, minibatch=16)
    (table,) = shards.tables
    assert len(loads) == len(table.lengths) < 40 / 3  # one worker's utterances, read once
    assert len(table) == shards.shard_frames[2] and len(shards.shard_frames) == 4


def test_the_frames_are_those_of_the_corpus_in_memory(tmp_path):
    lazy = read_corpus(make_data_dir(tmp_path / "d", utts=12))
    feats = {u: kaldiio.load_mat(lazy.feats.entries[u]) for u in lazy.utts}
    memory = Corpus(feats, lazy.targets, "memory")
    assert memory.lengths == lazy.lengths and memory.dim == lazy.dim == 6
    utts = lazy.utts[3:9]
    a, b = FrameTable.from_corpus(lazy, utts), FrameTable.from_corpus(memory, utts)
    assert a.feats.dtype == torch.float32
    for name in ("feats", "targets", "start", "end"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    half = lazy.subset(utts)
    assert isinstance(half.feats, ScpFeats) and half.utts == utts and len(half.feats) == 6


def test_length_mismatches_are_trimmed_when_read_again(tmp_path):
    """Targets two frames short: the features read again are cut to the targets' length."""
    d = make_data_dir(tmp_path / "d", utts=4, lengths=[50, 60, 70, 80])
    targets = {u: v[:-2] for u, v in kaldiio.load_scp(str(d / "targets.scp")).items()}
    with kaldiio.WriteHelper(f"ark,scp:{d}/t2.ark,{d}/targets.scp") as writer:
        for utt, vec in targets.items():
            writer(utt, vec)
    corpus = read_corpus(d)
    assert [len(corpus.feats[u]) for u in corpus.utts] == [48, 58, 68, 78]
    assert list(corpus.lengths.values()) == [48, 58, 68, 78]


def test_features_from_an_ark_stay_in_memory(tmp_path):
    d = make_data_dir(tmp_path / "d", utts=5)
    corpus = read_corpus(d, feats=f"ark:{d}/feats.ark")
    assert isinstance(corpus.feats, dict) and corpus.num_frames() == sum(corpus.lengths.values())


def test_an_ark_that_changed_since_the_check_is_one_line(tmp_path):
    d = make_data_dir(tmp_path / "d", utts=5)
    corpus = read_corpus(d)
    (d / "feats.ark").write_bytes(b"")
    with pytest.raises(UsageError, match=r"feats.scp: cannot read utterance utt0000 again"):
        corpus.feats["utt0000"]
    assert np.isfinite(corpus.num_frames())
