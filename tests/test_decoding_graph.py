"""Decoding graphs from small LMs: exact decodes of one-hot senone sequences, caching, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from modelavg.decoding import graph as graph_mod
from modelavg.decoding.decoder import Scorer, best_path, log_prior, oracle_log_likelihoods
from modelavg.decoding.graph import load_graph, make_graph
from modelavg.decoding.lexicon import aligner_dictionary, split_phone, with_positions
from modelavg.decoding.lm import kneser_ney_arpa
from modelavg.decoding.mdef import WPOS_SINGLE, Mdef, default_model_dir
from modelavg.errors import UsageError

SENTENCES = [
    "please enter your password",
    "call forward unconditional",
    "the conference has ended",
    "press the pound key",
    "a b c",
]


@pytest.fixture(scope="module")
def mdef() -> Mdef:
    return Mdef.read(default_model_dir() / "mdef")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, mdef) -> Path:
    """A corpus dir whose classes are all senones (class id = senone id)."""
    root = tmp_path_factory.mktemp("toy")
    states = mdef.senone_states()
    lines = [f"{s} {s} {mdef.ciphones[p]}" for s, (p, _) in enumerate(states)]
    (root / "classes.txt").write_text("\n".join(lines) + "\n")
    (root / "sentences.txt").write_text("\n".join(SENTENCES) + "\n")
    return root


@pytest.fixture(scope="module")
def toy_graph(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("graphs") / "lang_toy"
    make_graph(corpus, out, lm_text=str(corpus / "sentences.txt"), order=2, progress=False)
    return out


def aligned_senones(words: list[str], mdef: Mdef) -> np.ndarray:
    """The senone sequence the aligner would produce: first pronunciations, no pauses, SIL
    context at the utterance edges, two frames per HMM state."""
    prons = aligner_dictionary()
    phones = [p for w in words for p in with_positions(prons[w][0])]
    ci = [mdef.ci(split_phone(p)[0]) for p in phones]
    out = []
    for i, p in enumerate(phones):
        left = ci[i - 1] if i else mdef.sil
        right = ci[i + 1] if i + 1 < len(ci) else mdef.sil
        wpos = split_phone(p)[1]
        pid = mdef.phone_id_nearest(ci[i], left, right, WPOS_SINGLE if wpos is None else wpos)
        out += [s for s in mdef.senones(pid) for _ in range(2)]
    return np.asarray(out)


def test_one_hot_sequences_decode_exactly(toy_graph, mdef):
    graph = load_graph(toy_graph)
    assert graph.meta["words"] == len({w for s in SENTENCES for w in s.split()})
    for sentence in SENTENCES:
        targets = aligned_senones(sentence.split(), mdef)
        scores = oracle_log_likelihoods(targets, graph)
        words = [graph.words[i] for i in best_path(graph.fst, scores, beam=13.0, max_active=7000)]
        assert words == sentence.split()


def test_second_call_is_cached(toy_graph, corpus):
    before = (toy_graph / "HCLG.fst").stat().st_mtime_ns
    info = make_graph(
        corpus, toy_graph, lm_text=str(corpus / "sentences.txt"), order=2, progress=False
    )
    assert info["cached"] and (toy_graph / "HCLG.fst").stat().st_mtime_ns == before
    meta = json.loads((toy_graph / "graph.json").read_text())
    assert meta["inputs_hash"] == info["inputs_hash"]
    assert {"HCLG.fst", "words.txt", "classes.txt", "senones.txt", "lexicon.txt"} <= {
        p.name for p in toy_graph.iterdir()
    }


def test_arpa_file_and_changed_options_rebuild(corpus, tmp_path):
    arpa = tmp_path / "lm.arpa"
    arpa.write_text(kneser_ney_arpa([s.split() for s in SENTENCES], order=3))
    out = tmp_path / "lang"
    first = make_graph(corpus, out, lm=str(arpa), progress=False)
    second = make_graph(corpus, out, lm=str(arpa), vocab=5, progress=False)
    assert "cached" not in second and second["inputs_hash"] != first["inputs_hash"]
    assert second["words"] == 5
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_arpa_without_known_words_is_refused(corpus, tmp_path):
    arpa = tmp_path / "lm.arpa"
    arpa.write_text(kneser_ney_arpa([["qqzx", "zzqv"]], order=2))
    with pytest.raises(UsageError, match="no word of the language model has a pronunciation"):
        make_graph(corpus, tmp_path / "lang", lm=str(arpa), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm.arpa"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lm": "/no/such.arpa"}, "no such file"),
        ({"vocab": 0}, "--vocab"),
        ({"sil_prob": 1.0}, "--sil-prob"),
        ({"lm": "x.arpa", "lm_text": "x.txt"}, "give one"),
    ],
)
def test_bad_options(corpus, tmp_path, kwargs, message):
    with pytest.raises(UsageError, match=message):
        make_graph(corpus, tmp_path / "lang", progress=False, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_out_that_is_not_a_graph_is_left_alone(corpus, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("x")
    with pytest.raises(UsageError, match="not a graph directory"):
        make_graph(corpus, tmp_path / "data", lm_text=str(corpus / "sentences.txt"), order=2)
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["keep.txt"]


def test_corpus_without_class_map(tmp_path):
    with pytest.raises(UsageError, match="classes.txt"):
        make_graph(tmp_path, tmp_path / "lang", progress=False)


def test_missing_graph(tmp_path):
    with pytest.raises(UsageError, match="not a graph directory"):
        load_graph(tmp_path / "nope")


def test_command_line(corpus, toy_graph, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    graph_mod.add_arguments(parser)
    args = parser.parse_args(
        ["--data", str(corpus), "--lm-text", str(corpus / "sentences.txt"), "--order", "2",
         "--out", str(toy_graph)]
    )  # fmt: skip
    assert graph_mod.run(args) == 0
    assert "up to date" in capsys.readouterr().out


def test_scorer_backs_off_to_the_pooled_phone_state(toy_graph):
    """Direct senones: log posterior - log prior; untrained ones: the pooled state's ratio."""
    graph = load_graph(toy_graph, need_fst=False)
    n = 300  # the network's outputs: the first 300 classes
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 5, size=n).astype(float)
    log_post = np.log(rng.dirichlet(np.ones(n), size=4))
    scores = Scorer(graph, counts)(log_post)
    assert scores.shape == (4, len(graph.senone_states))
    prior = log_prior(counts)
    trained = np.flatnonzero(counts > 0)
    np.testing.assert_allclose(scores[:, trained], (log_post - prior)[:, trained], rtol=1e-5)
    state_of = [tuple(graph.senone_states[c]) for c in range(n)]  # class id = senone id here
    untrained = next(
        c for c in np.flatnonzero(counts == 0) if any(state_of[t] == state_of[c] for t in trained)
    )
    pool = [t for t in trained if state_of[t] == state_of[untrained]]
    expected = np.log(np.exp(log_post[:, pool]).sum(1)) - np.log(np.exp(prior[pool]).sum())
    np.testing.assert_allclose(scores[:, untrained], expected, rtol=1e-5)
    assert np.isfinite(scores).all()
