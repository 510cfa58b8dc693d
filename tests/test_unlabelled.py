"""Unlabelled speech (other languages' prompts) as a features-only data dir for pretraining."""

import pytest

from modelavg.corpora.unlabelled import SOUNDS, VOICES, prepare_unlabelled
from modelavg.data.kaldi import read_corpus
from modelavg.errors import UsageError


def test_features_only_corpus_feeds_pretraining(tmp_path):
    if not (SOUNDS / VOICES["es"]).is_dir():
        pytest.skip("apt-get install -y asterisk-core-sounds-es-wav")
    counts = prepare_unlabelled(tmp_path / "u", langs=("es",), max_utts=5, progress=False)
    corpus = read_corpus(tmp_path / "u", need_targets=False)
    assert len(corpus.utts) == counts["utterances"] == 5
    assert corpus.dim == 40 and corpus.targets is None
    assert all(u.startswith("es-") for u in corpus.utts)


def test_unknown_language_is_refused(tmp_path):
    with pytest.raises(UsageError, match="--langs xx"):
        prepare_unlabelled(tmp_path / "u", langs=("xx",))
