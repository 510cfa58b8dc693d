"""`modelavg demo` end to end on a small subset of the real corpus."""

import json
import re

import pytest

from modelavg.cli import main

pytest.importorskip("pocketsphinx")


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    from modelavg.corpora.asterisk import prepare_demo

    out = tmp_path_factory.mktemp("demo") / "data"
    prepare_demo(out, max_utts=40, progress=False)
    return out


def test_demo_trains_evaluates_decodes_and_reports(small_corpus, tmp_path, capsys):
    from modelavg.decoding.graph import make_graph

    out, graph, sentences = tmp_path / "exp", tmp_path / "lang", tmp_path / "sentences.txt"
    texts = [(small_corpus / s / "text").read_text().splitlines() for s in ("test", "cv")]
    sentences.write_text("".join(line.split(maxsplit=1)[1] + "\n" for t in texts for line in t))
    make_graph(small_corpus, graph, lm_text=str(sentences), order=2, progress=False)
    assert (
        main(
            [
                "demo",
                "--data-dir",
                str(small_corpus),
                "--out",
                str(out),
                "--epochs",
                "1",
                "--in-process",
                "--graph",
                str(graph),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "report:" in printed and "phone error rate" in printed
    assert re.search(r"^test words \(acwt [0-9.]+\): WER [0-9.]+%", printed, re.M)
    report = (out / "report.md").read_text()
    for split in ("test", "cv", "test_other"):  # each row ends in its WER (ins/del/sub of words)
        row = next(x for x in report.splitlines() if x.startswith(f"| {split} |"))
        assert re.search(r"\| [0-9.]+% \(\d+/\d+/\d+ of [1-9]\d*\) \|$", row), row
        assert list((out / f"decode_{split}").rglob("hyp.txt"))  # cv: one per acwt tried
    assert "the lowest cv WER of 0.07: " in report
    assert not list(small_corpus.glob("lang_enus*"))  # --graph given: no en-us graph built
    assert "nan" not in report
    for png in ["learning.png", "lr.png", "averaging.png", "spread.png"]:
        assert (out / png).stat().st_size > 1000
    # eval on the demo layout finds the class map and training alignments by itself
    assert (
        main(
            [
                "eval",
                "--model",
                str(out / "final.pt"),
                "--data",
                str(small_corpus / "test"),
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    for key in [
        "frame_accuracy",
        "chance_accuracy",
        "majority_accuracy",
        "phone_error_rate",
        "phone_frame_accuracy",
        "phone_majority_accuracy",
    ]:
        assert 0.0 <= result[key] <= 1.5, key
    assert result["chance_accuracy"] < result["majority_accuracy"]


def test_demo_replaces_only_its_own_runs(tmp_path):
    from modelavg.demo import clear_previous
    from modelavg.errors import UsageError

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("x")
    clear_previous(mine)
    assert not mine.exists()
    (tmp_path / "other").mkdir()
    with pytest.raises(UsageError, match="not a modelavg run"):
        clear_previous(tmp_path / "other")
