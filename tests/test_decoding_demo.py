"""Decoding on a small real demo corpus: the mdef lookup against the aligner, the oracle decode,
model decodes, Kaldi log-likelihood output, and the one-line errors of bad input."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from modelavg.data.kaldi import read_labels
from modelavg.decoding import decode as decode_mod
from modelavg.decoding import forward as forward_mod
from modelavg.decoding.decode import decode_data_dir, tune_acwt
from modelavg.decoding.decoder import log_prior
from modelavg.decoding.graph import load_graph, make_graph, read_classes
from modelavg.decoding.lexicon import SIL, aligner_dictionary
from modelavg.decoding.mdef import (
    WPOS_BEGIN,
    WPOS_END,
    WPOS_INTERNAL,
    WPOS_SINGLE,
    Mdef,
    default_model_dir,
)
from modelavg.errors import UsageError
from modelavg.nets.dnn import DNN, DNNSpec, save_model

pytestmark = pytest.mark.slow
MAX_UTTS = 40


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from modelavg.corpora.asterisk import prepare_demo

    out = tmp_path_factory.mktemp("demo")
    prepare_demo(out, max_utts=MAX_UTTS, seed=1, progress=False, num_workers=2)
    return out


@pytest.fixture(scope="module")
def graph_dir(corpus, tmp_path_factory) -> Path:
    """A graph whose LM is estimated from the test and cv sentences (a trigram: a bigram cannot
    tell "press two to" from "press to to")."""
    text = tmp_path_factory.mktemp("lm") / "sentences.txt"
    lines = [line.split(maxsplit=1)[1] for s in ("test", "cv") for line in _lines(corpus / s)]
    text.write_text("\n".join(lines) + "\n")
    out = tmp_path_factory.mktemp("graphs") / "lang_test"
    make_graph(corpus, out, lm_text=str(text), order=3, progress=False)
    return out


def _lines(split: Path) -> list[str]:
    return (split / "text").read_text().splitlines()


def _model(path: Path, num_classes: int, counts: np.ndarray | None, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = DNN(DNNSpec(input_dim=40, context=1, hidden_layers=1, hidden_dim=16,
                        num_classes=num_classes))  # fmt: skip
    extra = None if counts is None else {"class_counts": torch.tensor(counts, dtype=torch.float64)}
    save_model(path, model, extra)
    return path


def _train_counts(corpus: Path) -> np.ndarray:
    n = len((corpus / "classes.txt").read_text().splitlines())
    flat = np.concatenate(list(read_labels(corpus / "train").values()))
    return np.bincount(flat, minlength=n).astype(np.float64)


# ----------------------------------------------------------------------------------------------
# The mdef lookup reproduces every senone triple the aligner chose


def _phone_instances(senones: np.ndarray, states: np.ndarray) -> list[tuple[int, tuple]]:
    """(CI phone, senone triple) of each phone instance: a new one starts when the phone
    changes or its HMM state does not advance (left-to-right, no skips)."""
    runs = [s for s, _ in itertools.groupby(senones.tolist())]
    out: list[tuple[int, list[int]]] = []
    for s in runs:
        phone, state = states[s]
        if state == 0 or not out or out[-1][0] != phone or len(out[-1][1]) != state:
            out.append((int(phone), []))
        out[-1][1].append(s)
    return [(p, tuple(seq)) for p, seq in out]


def _word_positions(phones: list[str], words: list[str], prons) -> list[int] | None:
    """Word positions of the non-silence phones, from the pronunciations that spell them."""

    def match(i: int, j: int) -> list[int] | None:
        if j == len(words):
            return [] if i == len(phones) else None
        for pron in prons[words[j]]:
            if tuple(phones[i : i + len(pron)]) == pron:
                if len(pron) == 1:
                    here = [WPOS_SINGLE]
                else:
                    here = [WPOS_BEGIN] + [WPOS_INTERNAL] * (len(pron) - 2) + [WPOS_END]
                rest = match(i + len(pron), j + 1)
                if rest is not None:
                    return here + rest
        return None

    return match(0, 0)


def test_mdef_lookup_matches_the_aligner_on_every_phone_instance(corpus):
    mdef = Mdef.read(default_model_dir() / "mdef")
    states = mdef.senone_states()
    prons = aligner_dictionary()
    senone_of = read_classes(corpus / "classes.txt", mdef.num_senones)
    texts = {line.split()[0]: line.split()[1:] for line in _lines(corpus / "train")}
    checked = 0
    for utt, targets in read_labels(corpus / "train").items():
        instances = _phone_instances(senone_of[targets], states)
        names = [mdef.ciphones[p] for p, _ in instances]
        speech = [i for i, n in enumerate(names) if n != SIL]
        positions = _word_positions([names[i] for i in speech], texts[utt], prons)
        assert positions is not None, f"{utt}: phones do not spell the transcript"
        wpos = dict(zip(speech, positions, strict=True))
        for i, (phone, triple) in enumerate(instances):
            left = instances[i - 1][0] if i else mdef.sil
            right = instances[i + 1][0] if i + 1 < len(instances) else mdef.sil
            pid = mdef.phone_id_nearest(phone, left, right, wpos.get(i, WPOS_SINGLE))
            assert tuple(mdef.senones(pid)) == triple, f"{utt}: phone instance {i} ({names[i]})"
            checked += 1
    assert checked > 500


# ----------------------------------------------------------------------------------------------
# Decoding


def test_oracle_decode_through_a_graph_with_the_test_sentences_is_exact(corpus, graph_dir):
    result = decode_data_dir(None, corpus / "test", graph_dir, progress=False)
    assert result["wer"] == 0.0 and result["words"] > 0
    assert result["ins"] == result["del"] == result["sub"] == 0
    hyp = (graph_dir / "oracle_test" / "hyp.txt").read_text().splitlines()
    assert sorted(hyp) == sorted(_lines(corpus / "test"))


def test_model_decode_writes_hypotheses_and_is_the_same_over_two_jobs(corpus, graph_dir, tmp_path):
    n = len(read_classes(corpus / "classes.txt", 10**9))
    model = _model(tmp_path / "final.pt", n, _train_counts(corpus))
    one = decode_data_dir(model, corpus / "cv", graph_dir, out_dir=tmp_path / "a", progress=False)
    two = decode_data_dir(
        model, corpus / "cv", graph_dir, jobs=2, out_dir=tmp_path / "b", progress=False
    )
    assert (tmp_path / "a" / "hyp.txt").read_text() == (tmp_path / "b" / "hyp.txt").read_text()
    assert {"wer", "ins", "del", "sub", "words", "rtf"} <= set(one)
    assert one["wer"] == two["wer"] and one["rtf"] > 0
    default = decode_data_dir(model, corpus / "cv", graph_dir, progress=False)
    assert Path(default["out"]) == tmp_path / f"decode_{graph_dir.name}_cv"


def test_tune_acwt_picks_the_lowest_cv_wer(corpus, graph_dir, tmp_path):
    n = len(read_classes(corpus / "classes.txt", 10**9))
    model = _model(tmp_path / "final.pt", n, _train_counts(corpus))
    graph = load_graph(graph_dir)
    best, results = tune_acwt(model, corpus / "cv", graph, tmp_path / "tune", grid=(0.05, 0.2))
    assert set(results) == {0.05, 0.2}
    assert results[best]["wer"] == min(r["wer"] for r in results.values())
    assert (tmp_path / "tune" / "acwt_0.05" / "hyp.txt").is_file()


def test_old_model_files_take_priors_from_a_train_dir(corpus, graph_dir, tmp_path):
    """Also a model trained without --num-classes: outputs only up to the largest train class."""
    flat = np.concatenate(list(read_labels(corpus / "train").values()))
    model = _model(tmp_path / "old.pt", int(flat.max()) + 1, None)
    with pytest.raises(UsageError, match="--priors-from"):
        decode_data_dir(model, corpus / "test", graph_dir, progress=False)
    assert not (tmp_path / f"decode_{graph_dir.name}_test").exists()
    result = decode_data_dir(
        model, corpus / "test", graph_dir, priors_from=corpus / "train", progress=False
    )
    assert result["words"] > 0


def test_model_and_graph_senone_mismatch_is_refused(corpus, graph_dir, tmp_path):
    n = len(read_classes(corpus / "classes.txt", 10**9)) + 5
    model = _model(tmp_path / "big.pt", n, np.ones(n))
    with pytest.raises(UsageError, match="not the same senone set"):
        decode_data_dir(model, corpus / "test", graph_dir, progress=False)
    assert list(tmp_path.iterdir()) == [model]


def test_empty_data_dir_and_missing_graph(corpus, graph_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "feats.scp").write_text("")
    n = len(read_classes(corpus / "classes.txt", 10**9))
    model = _model(tmp_path / "m.pt", n, np.ones(n))
    with pytest.raises(UsageError, match="no utterances"):
        decode_data_dir(model, tmp_path / "empty", graph_dir, out_dir=tmp_path / "o")
    with pytest.raises(UsageError, match="not a graph directory"):
        decode_data_dir(model, corpus / "test", tmp_path / "nograph", out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_decode_command_line(corpus, graph_dir, capsys, tmp_path):
    parser = argparse.ArgumentParser()
    decode_mod.add_arguments(parser)
    args = parser.parse_args(
        ["--data", str(corpus / "test"), "--graph", str(graph_dir), "--oracle", "--json",
         "--out", str(tmp_path / "o")]
    )  # fmt: skip
    assert decode_mod.run(args) == 0
    assert '"wer": 0.0' in capsys.readouterr().out
    with pytest.raises(UsageError, match="--model is required"):
        decode_mod.run(parser.parse_args(["--data", "d", "--graph", "g"]))


# ----------------------------------------------------------------------------------------------
# Kaldi hand-off


def test_forward_writes_kaldi_loglikes_that_a_second_reader_reads_back(corpus, tmp_path):
    import kaldi_native_io

    n = len(read_classes(corpus / "classes.txt", 10**9))
    counts = _train_counts(corpus)
    model = _model(tmp_path / "final.pt", n, counts)
    ark, scp = tmp_path / "out" / "loglikes.ark", tmp_path / "out" / "loglikes.scp"
    parser = argparse.ArgumentParser()
    forward_mod.add_arguments(parser)
    args = parser.parse_args(
        ["--model", str(model), "--data", str(corpus / "test"), "--out", f"ark,scp:{ark},{scp}"]
    )
    assert forward_mod.run(args) == 0
    expected = forward_mod.loglikes(model, corpus / "test")
    prior = log_prior(counts)
    with kaldi_native_io.SequentialFloatMatrixReader(f"scp:{scp}") as reader:
        got = {utt: np.array(mat) for utt, mat in reader}  # copies: views die on next()
    assert sorted(got) == sorted(expected)
    for utt, mat in got.items():
        np.testing.assert_allclose(mat, expected[utt], rtol=1e-6)
        posteriors = np.exp(mat + prior)  # log posterior = log-likelihood + log prior
        np.testing.assert_allclose(posteriors.sum(axis=1), 1.0, rtol=1e-4)
    with kaldi_native_io.SequentialFloatMatrixReader(f"ark:{ark}") as reader:
        assert sum(1 for _ in reader) == len(expected)


def test_forward_refuses_a_pipe_and_writes_nothing(corpus, tmp_path):
    with pytest.raises(UsageError, match="--out"):
        forward_mod.write_loglikes(tmp_path / "m.pt", corpus / "test", "ark:| gzip -c > x.gz")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# WER in eval and in a sweep (the demo's report: tests/test_demo_command.py)


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def test_eval_graph_adds_the_decode_wer(corpus, graph_dir, tmp_path, capsys):
    from modelavg.cli import main

    n = len(read_classes(corpus / "classes.txt", 10**9))
    model = _model(tmp_path / "final.pt", n, _train_counts(corpus))
    argv = ["eval", "--model", str(model), "--data", str(corpus / "test"), "--graph",
            str(graph_dir), "--acwt", "0.2"]  # fmt: skip
    assert main([*argv, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    decoded = decode_data_dir(model, corpus / "test", graph_dir, acwt=0.2, progress=False)
    for key in ("wer", "ins", "del", "sub", "words"):
        assert got[key] == decoded[key], key
    assert got["words"] > 0 and got["acwt"] == 0.2 and "frame_accuracy" in got
    assert got["wer"] == pytest.approx((got["ins"] + got["del"] + got["sub"]) / got["words"])
    assert Path(got["hypotheses"]).is_file()
    assert main(argv) == 0
    assert "words (acwt 0.2): WER" in capsys.readouterr().out


def test_sweep_decodes_each_cell_once(corpus, graph_dir, tmp_path, monkeypatch):
    import yaml

    from modelavg.sweep import wer as sweep_wer
    from modelavg.sweep.grid import load_grid
    from modelavg.sweep.runner import run_sweep

    grid = {"data": str(corpus / "train"), "cv": str(corpus / "cv"), "hidden_layers": 1,
            "hidden_dim": 32, "epochs": 1, "minibatch": 64, "avg_every": 2, "in_process": True,
            "num_classes": len(read_classes(corpus / "classes.txt", 10**9)),
            "graph": str(graph_dir), "decode": str(corpus / "test"),
            "grid": {"workers": [1]}}  # fmt: skip
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    rows = run_sweep(path, tmp_path / "sweep", log=lambda _: None)
    assert [r["status"] for r in rows] == ["done"]
    for r in rows:
        assert r["wer"] == pytest.approx(
            (r["wer_ins"] + r["wer_del"] + r["wer_sub"]) / r["wer_words"]
        )
        assert r["acwt"] in decode_mod.ACWT_GRID and r["cv_wer"] >= 0
    table = (tmp_path / "sweep" / "results.md").read_text()
    assert "test WER (ins/del/sub)" in table and f"{100 * rows[0]['wer']:.2f}% (" in table
    assert "wer_ins" in (tmp_path / "sweep" / "results.csv").read_text().splitlines()[0]

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(decode_mod, "decode_data_dir", no_decode)  # a later sweep reads it back
    decoder = sweep_wer.CellDecoder(load_grid(path).wer, jobs=1)
    again = decoder.cell_wer(tmp_path / "sweep" / "workers=1", str(corpus / "cv"))
    assert again == {k: rows[0][k] for k in sweep_wer.COLUMNS}
    assert decoder._graph is None  # a cached cell does not read HCLG


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"graph": "g"}, "'graph' and 'decode' go together"),
        ({"graph": "g", "decode": "d", "acwt": "x"}, "acwt must be a number"),
        ({"graph": "g", "decode": "d", "acwt": 0}, "acwt must be positive"),
    ],
)
def test_sweep_grid_decode_keys_are_checked(tmp_path, keys, message):
    import yaml

    from modelavg.sweep.grid import load_grid

    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"data": "d", **keys, "grid": {"workers": [1]}}))
    with pytest.raises(UsageError, match=message):
        load_grid(path)


def test_sweep_with_a_missing_graph_fails_before_training(corpus, tmp_path):
    import yaml

    from modelavg.sweep.runner import run_sweep

    grid = {"data": str(corpus / "train"), "graph": str(tmp_path / "nograph"),
            "decode": str(corpus / "test"), "grid": {"workers": [1]}}  # fmt: skip
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    with pytest.raises(UsageError, match="not a graph directory"):
        run_sweep(tmp_path / "grid.yaml", tmp_path / "sweep")
    assert not (tmp_path / "sweep").exists()


# ----------------------------------------------------------------------------------------------
# Bad input on the command line: one line on stderr, exit 2, nothing written


def _bad_input_cases(corpus: Path, graph_dir: Path, tmp: Path) -> dict[str, list[str]]:
    n = len(read_classes(corpus / "classes.txt", 10**9))
    good = str(_model(tmp / "in" / "m.pt", n, np.ones(n)))
    big = str(_model(tmp / "in" / "big.pt", n + 5, np.ones(n + 5)))
    empty = tmp / "in" / "empty"
    empty.mkdir()
    (empty / "feats.scp").write_text("")
    arpa = tmp / "in" / "lm.arpa"
    arpa.write_text("\\data\\\nngram 1=2\n\n\\1-grams:\n-1.0 qqzx\n-1.0 zzqv\n\n\\end\\\n")
    out, test, g = str(tmp / "out"), str(corpus / "test"), str(graph_dir)
    nog = str(tmp / "in" / "nograph")
    return {
        "make-graph, no word of the ARPA in the lexicon": [
            "make-graph", "--data", str(corpus), "--lm", str(arpa), "--out", out],
        "make-graph, no class map": ["make-graph", "--data", str(empty), "--out", out],
        "decode, missing graph": ["decode", "--model", good, "--data", test, "--graph", nog,
                                  "--out", out],
        "decode, senone mismatch": ["decode", "--model", big, "--data", test, "--graph", g,
                                    "--out", out],
        "decode, empty data dir": ["decode", "--model", good, "--data", str(empty), "--graph", g,
                                   "--out", out],
        "forward, empty data dir": ["forward", "--model", good, "--data", str(empty), "--out",
                                    f"ark,scp:{out}/x.ark,{out}/x.scp"],
        "forward, missing model": ["forward", "--model", nog, "--data", test, "--out",
                                   f"ark:{out}/x.ark"],
        "eval, missing graph": ["eval", "--model", good, "--data", test, "--graph", nog],
        "eval, senone mismatch": ["eval", "--model", big, "--data", test, "--graph", g],
        "eval, empty data dir": ["eval", "--model", good, "--data", str(empty), "--graph", g],
    }  # fmt: skip


def test_bad_input_is_one_line_and_exit_2(corpus, graph_dir, tmp_path, capsys):
    from modelavg.cli import main

    (tmp_path / "in").mkdir()
    cases = _bad_input_cases(corpus, graph_dir, tmp_path)
    before = _files(tmp_path) | _files(corpus) | _files(graph_dir)
    for name, argv in cases.items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err.strip().splitlines()  # a progress bar may come first
        assert err[-1].startswith("modelavg: error: "), (name, err)
        assert sum("error" in line for line in err) == 1 and "Traceback" not in str(err), name
        assert not (tmp_path / "out").exists(), name
    assert _files(tmp_path) | _files(corpus) | _files(graph_dir) == before
