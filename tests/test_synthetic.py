"""The festival synthetic corpus: aligned targets, consistent class maps, deterministic output."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from modelavg.corpora import synthetic
from modelavg.corpora.asterisk import ASTERISK_TRANSCRIPT
from modelavg.data.kaldi import read_corpus, read_labels
from modelavg.errors import UsageError
from modelavg.phones import load_class_map

NUM_UTTS = 12
needs_festival = pytest.mark.skipif(
    shutil.which("festival") is None or not ASTERISK_TRANSCRIPT.exists(),
    reason=f"Debian packages missing: {synthetic.APT_INSTALL}",
)


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix != ".scp"  # scp files hold absolute paths
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synthetic")
    counts = synthetic.prepare_synthetic(out, num_utts=NUM_UTTS, jobs=2, progress=False)
    return out, counts


def test_frame_labels_take_the_segment_at_each_frame_centre_and_split_it_into_states() -> None:
    segments = [(0.10, "pau"), (0.16, "a"), (0.30, "pau")]
    phones, states = synthetic.frame_labels(segments, 31)
    # centres 12.5 ms + 10 ms i: frames 0-8 end before 0.10 s, 9-14 before 0.16 s
    assert phones[:9] == ["pau"] * 9 and phones[9:15] == ["a"] * 6 and phones[15:] == ["pau"] * 16
    assert states[9:15].tolist() == [0, 0, 1, 1, 2, 2]
    assert states[:9].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert states[-1] == 2  # frame 30 (centre 0.3125 s) is past the end: the last segment


def test_frame_contexts_name_the_neighbouring_segments() -> None:
    segments = [(0.10, "pau"), (0.16, "a"), (0.30, "pau")]
    contexts = synthetic.frame_contexts(segments, 31)
    assert (
        contexts[0] == ("#", "a") and contexts[9] == ("pau", "pau") and contexts[30] == ("a", "#")
    )


def test_tie_states_keeps_the_most_frequent_triphone_states_and_backs_off() -> None:
    frequent, rare, other = ("pau", "a", "b", 1), ("x", "a", "b", 1), ("a", "b", "pau", 0)
    train = [frequent] * 5 + [other] * 3 + [rare]
    classes = synthetic.tie_states(train, [("a", 1), ("b", 0)], 4)
    assert classes == [("a", 1), ("b", 0), ("a", "b", "pau", 0), ("pau", "a", "b", 1)]
    kept = {c for c in classes if len(c) == 4}
    assert synthetic.tied(frequent, kept) == frequent and synthetic.tied(rare, kept) == ("a", 1)
    assert synthetic.class_name(frequent) == "pau-a+b_1" and synthetic.class_name(("a", 1)) == "a_1"
    with pytest.raises(UsageError, match="--context-classes 1: fewer than the 2 phone states"):
        synthetic.tie_states(train, [("a", 1), ("b", 0)], 1)


@needs_festival
def test_context_dependent_targets_refine_the_phone_states(corpus, tmp_path: Path) -> None:
    out, counts = corpus
    cd = synthetic.prepare_synthetic(
        tmp_path, num_utts=NUM_UTTS, jobs=2, progress=False, context_classes=counts["classes"] + 40
    )
    assert cd["classes"] == counts["classes"] + 40 and cd["phone_states"] == counts["classes"]
    class_to_phone, _ = load_class_map(tmp_path)
    names = (tmp_path / "classes.txt").read_text().split("\n")
    assert sum("+" in line for line in names) == 40
    for split in ("train", "cv", "test"):
        ci, tri = read_corpus(out / split), read_corpus(tmp_path / split)
        phones = read_labels(tmp_path / split, default_name="phones.scp")
        assert np.array_equal(ci.feats[ci.utts[0]], tri.feats[ci.utts[0]])  # same audio
        for utt, y in tri.targets.items():
            assert (class_to_phone[y].numpy() == phones[utt]).all()
            kept = y >= counts["classes"]
            assert (y[~kept] == ci.targets[utt][~kept]).all()  # backed off: the phone state
    train = read_corpus(tmp_path / "train").targets.values()
    assert sum(int((y >= counts["classes"]).sum()) for y in train) > 0


def test_draws_depend_on_seed_and_index_only() -> None:
    vocab = ["alpha", "beta", "gamma", "delta"]
    assert synthetic.draw_utterance(5, vocab, 0) == synthetic.draw_utterance(5, vocab, 0)
    assert synthetic.draw_utterance(5, vocab, 0) != synthetic.draw_utterance(5, vocab, 1)
    assert synthetic.draw_utterance(5, vocab, 0) != synthetic.draw_utterance(6, vocab, 0)


@needs_festival
def test_corpus_is_readable_and_class_map_matches_the_phone_table(corpus) -> None:
    out, counts = corpus
    assert sum(s["utterances"] for s in counts["splits"].values()) == NUM_UTTS
    class_to_phone, phone_names = load_class_map(out)
    assert len(class_to_phone) == counts["classes"] and len(phone_names) == counts["phones"]
    assert "pau" in phone_names
    for split in ("train", "cv", "test"):
        data = read_corpus(out / split)
        phones = read_labels(out / split, default_name="phones.scp")
        assert data.dim == synthetic.NUM_MEL_BINS
        assert data.num_frames() == counts["splits"][split]["frames"] > 0
        for utt, y in data.targets.items():
            assert len(y) == len(data.feats[utt]) == len(phones[utt])
            assert (class_to_phone[y].numpy() == phones[utt]).all()
            assert np.isfinite(data.feats[utt]).all()


VOWELS = {
    "aa",
    "ae",
    "ah",
    "ao",
    "aw",
    "ax",
    "ay",
    "eh",
    "er",
    "ey",
    "ih",
    "iy",
    "ow",
    "oy",
    "uh",
    "uw",
}


@needs_festival
def test_silence_frames_are_quieter_than_vowel_frames(corpus) -> None:
    """Labels line up with the audio: in every utterance, frames labelled 'pau' (noise only, at
    least 10 dB SNR) carry less energy than vowel frames; labels a few frames off, or in the
    wrong time unit, would mix the two."""
    out, _ = corpus
    class_to_phone, names = load_class_map(out)
    phone_of = np.array(names)[class_to_phone.numpy()]
    data = read_corpus(out / "train")
    for utt, feats in data.feats.items():
        energy = np.log(np.exp(feats).sum(1))
        phones = phone_of[data.targets[utt]]
        silent, vowel = phones == "pau", np.isin(phones, list(VOWELS))
        assert silent[0] and vowel.any(), utt
        assert energy[vowel].mean() - energy[silent].mean() > 1.0, utt  # > 4.3 dB


@needs_festival
def test_speaking_rate_and_pitch_draws_reach_the_audio() -> None:
    base = synthetic.draw_utterance(0, ["please", "enter", "the", "extension"], 0)
    base = replace(base, snr_db=60.0, tilt=0.0, gain_db=0.0)
    slow, fast, high = synthetic.synthesise(
        [
            replace(base, utt="slow", duration_stretch=1.3),
            replace(base, utt="fast", duration_stretch=0.8),
            replace(base, utt="high", duration_stretch=1.3, f0_mean=180.0),
        ]
    )
    assert len(slow.feats) > 1.3 * len(fast.feats)
    assert len(high.feats) == len(slow.feats) and not np.allclose(high.feats, slow.feats, atol=0.5)


@needs_festival
def test_output_does_not_depend_on_the_number_of_jobs(corpus, tmp_path: Path) -> None:
    out, _ = corpus
    synthetic.prepare_synthetic(tmp_path, num_utts=NUM_UTTS, jobs=1, progress=False)
    assert _digests(tmp_path) == _digests(out)


def test_bad_options_and_missing_festival_are_one_line_errors(monkeypatch, tmp_path) -> None:
    with pytest.raises(UsageError, match="--utts"):
        synthetic.prepare_synthetic(tmp_path, num_utts=2)
    monkeypatch.setattr(synthetic.shutil, "which", lambda _: None)
    with pytest.raises(UsageError, match="festival: command not found; run: apt-get"):
        synthetic.prepare_synthetic(tmp_path, num_utts=10)
    assert not any(tmp_path.iterdir())


def test_cli_reports_bad_count_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "modelavg", "prepare-synthetic", "--utts", "1", "--out", tmp_path],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "modelavg: error: --utts must be >= 3 (one per split), got 1"
    ]
