"""Language models: Kneser-Ney estimation sums to one, ARPA filtering survives a torn dump,
the en-us bigram dump, WER counting."""

from __future__ import annotations

import pytest

from modelavg.decoding.lm import (
    dump_enus_arpa,
    filter_arpa,
    kneser_ney_arpa,
    most_probable,
    unigram_log10,
)
from modelavg.decoding.wer import format_wer, score
from modelavg.errors import UsageError

SENTENCES = [s.split() for s in ("the cat sat on the mat", "the dog sat on the log", "a cat")]


def read_arpa(text: str) -> tuple[dict, dict]:
    """(log10 probs, log10 back-off weights) keyed by n-gram tuples."""
    probs, bows, order = {}, {}, 0
    for line in text.splitlines():
        if line.startswith("\\") and line.endswith("-grams:"):
            order = int(line[1])
        elif order and line.strip() and not line.startswith("\\"):
            fields = line.split("\t")
            gram = tuple(fields[1].split())
            probs[gram] = float(fields[0])
            if len(fields) > 2:
                bows[gram] = float(fields[2])
    return probs, bows


def log10_prob(probs: dict, bows: dict, gram: tuple) -> float:
    if gram in probs:
        return probs[gram]
    return bows.get(gram[:-1], 0.0) + log10_prob(probs, bows, gram[1:])


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_kneser_ney_distributions_sum_to_one(order):
    probs, bows = read_arpa(kneser_ney_arpa(SENTENCES, order))
    vocab = [g[0] for g in probs if len(g) == 1 and g[0] != "<s>"]
    histories = [(), ("<s>",), ("the",), ("sat",), ("zebra",), ("<s>", "the"), ("on", "the")]
    for h in histories[: 1 if order == 1 else None]:
        h = h[-(order - 1) :] if order > 1 else ()
        total = sum(10 ** log10_prob(probs, bows, (*h, w)) for w in vocab if w != "zebra")
        assert total == pytest.approx(1.0, abs=1e-5), h


def test_seen_continuations_beat_unseen_ones():
    probs, bows = read_arpa(kneser_ney_arpa(SENTENCES, 3))
    assert log10_prob(probs, bows, ("on", "the", "mat")) > log10_prob(
        probs, bows, ("on", "the", "cat")
    )


def test_filter_keeps_complete_lines_and_recounts(tmp_path):
    torn = tmp_path / "torn.arpa"
    torn.write_text(
        "\\data\\\nngram 1=4\nngram 2=9\nngram 3=9\n\n\\1-grams:\n"
        "-99\t<s>\t-0.5\n-1.0\t</s>\n-0.5\thello\t-0.2\n-0.7\tworld\t-0.1\n\n"
        "\\2-grams:\n-0.3\t<s> hello\t0.0\n-0.2\thello world\t0.0\n-0.4\tworld </s>\t0.0\n"
        "-0.1\thello </"
    )
    out = tmp_path / "bigram.arpa"
    counts = filter_arpa(torn, out, max_order=2, keep=None)
    assert counts == {1: 4, 2: 3}
    text = out.read_text()
    assert "ngram 2=3" in text and "\\3-grams" not in text and text.endswith("\\end\\\n")
    assert "-0.2\thello world\n" in text  # no back-off weights at the top order
    assert filter_arpa(torn, out, max_order=2, keep={"<s>", "</s>", "hello"}) == {1: 3, 2: 1}
    assert most_probable(unigram_log10(out), 1) == {"<s>", "</s>", "hello"}


def test_not_an_arpa_file(tmp_path):
    (tmp_path / "x.arpa").write_text("hello\n")
    with pytest.raises(UsageError, match="no 1-grams"):
        unigram_log10(tmp_path / "x.arpa")


@pytest.mark.slow
def test_enus_dump_holds_every_unigram_and_nearly_every_bigram(tmp_path):
    dump_enus_arpa(tmp_path / "dump.arpa")
    counts = filter_arpa(tmp_path / "dump.arpa", tmp_path / "bigram.arpa", 2, keep=None)
    assert counts[1] == 72547 and counts[2] > 2_000_000


def test_wer_counts_each_kind_of_error():
    r = score({"u1": ["a", "b", "c", "d"], "u2": ["e", "f"]}, {"u1": ["a", "x", "c", "d", "e"]})
    assert (r["ins"], r["del"], r["sub"], r["words"], r["sentence_errors"]) == (1, 2, 1, 6, 2)
    assert r["wer"] == pytest.approx(4 / 6)
    assert format_wer("test", r).startswith("test: WER 66.67% [4 / 6, 1 ins, 2 del, 1 sub]")
