"""The real-speech demo corpus: a small prepare_demo run, checked file by file."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest

import modelavg.corpora.asterisk as demo
from modelavg.corpora.text import normalize_text
from modelavg.data.kaldi import read_corpus
from modelavg.errors import UsageError

SPLITS = ("train", "cv", "test", "test_other")
MAX_UTTS = 12


def _run(out_dir: Path, num_workers: int) -> dict:
    return demo.prepare_demo(
        out_dir, max_utts=MAX_UTTS, seed=3, progress=False, num_workers=num_workers
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    return out, _run(out, num_workers=2)


def _class_table(out: Path) -> tuple[np.ndarray, list[str]]:
    phones = [line.split() for line in (out / "phones.txt").read_text().splitlines()]
    phone_id = {name: int(i) for i, name in phones}
    classes = [line.split() for line in (out / "classes.txt").read_text().splitlines()]
    assert [int(c[0]) for c in classes] == list(range(len(classes)))
    senones = [int(c[1]) for c in classes]
    assert senones == sorted(set(senones))
    return np.array([phone_id[c[2]] for c in classes]), [p[1] for p in phones]


@pytest.mark.slow
def test_layout_and_contents(corpus):
    out, counts = corpus
    class_to_phone, phone_names = _class_table(out)
    assert counts["classes"] == len(class_to_phone)
    assert counts["phones"] == len(phone_names)
    for name in ("README.md", "failed.txt", "classes.txt", "phones.txt"):
        assert (out / name).is_file()
    assert "CC-BY-SA-3.0" in (out / "README.md").read_text()

    for split in SPLITS:
        d = out / split
        data = read_corpus(d)
        phones = read_corpus(d, targets="phones.scp")
        assert data.dim == 40
        assert all(m.dtype == np.float32 for m in data.feats.values())
        for utt, targets in data.targets.items():
            assert len(targets) == len(data.feats[utt])  # no trimming was needed
            assert targets.min() >= 0 and targets.max() < len(class_to_phone)
            np.testing.assert_array_equal(class_to_phone[targets], phones.targets[utt])
        c = counts["splits"][split]
        assert c["utterances"] == len(data.utts)
        assert c["frames"] == data.num_frames()
        assert c["senones"] == len(np.unique(np.concatenate(list(data.targets.values()))))
        assert c["phones"] == len(np.unique(np.concatenate(list(phones.targets.values()))))
        text_utts = [line.split()[0] for line in (d / "text").read_text().splitlines()]
        spk = dict(line.split() for line in (d / "utt2spk").read_text().splitlines())
        assert text_utts == sorted(data.utts) == sorted(spk)
        assert set(spk.values()) == {"librivox" if split == "test_other" else "allison"}


@pytest.mark.slow
def test_split_is_disjoint_and_complete(corpus):
    out, counts = corpus
    utts = {s: set(read_corpus(out / s).utts) for s in SPLITS}
    assert not (utts["train"] & utts["cv"] or utts["train"] & utts["test"])
    assert not utts["cv"] & utts["test"]
    assert all(utts[s] for s in SPLITS)
    asterisk = utts["train"] | utts["cv"] | utts["test"]
    assert len(asterisk) == counts["aligned"] == sum(len(utts[s]) for s in SPLITS[:3])
    failed = (out / "failed.txt").read_text().splitlines()
    assert len(asterisk) + len(failed) == counts["prompts"] == MAX_UTTS
    assert sum(counts["failed"].values()) == len(failed)
    assert not {line.split()[0] for line in failed} & asterisk


@pytest.mark.slow
def test_rerun_is_byte_identical(corpus, tmp_path):
    out, counts = corpus
    again = _run(tmp_path, num_workers=1)  # also shows alignments do not depend on the workers
    assert again["splits"] == counts["splits"]

    def digest(root: Path) -> dict[str, str]:
        """Checksums of every file but the scp indexes (they hold absolute paths)."""
        files = [p for p in root.rglob("*") if p.is_file() and p.suffix != ".scp"]
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}

    first = digest(out)
    assert len(first) == 4 + 4 * 6  # top-level files; per split 3 arks, text, utt2spk, spk2utt
    assert digest(tmp_path) == first


def test_missing_debian_package_names_apt_get(monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "ASTERISK_WAV_DIR", tmp_path / "no-such-dir")
    with pytest.raises(UsageError, match="apt-get install -y asterisk-core-sounds-en-wav"):
        demo.prepare_demo(tmp_path / "out", max_utts=2, progress=False)


def test_missing_python_package_names_pip(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "kaldi_native_fbank", None)  # makes the import fail
    with pytest.raises(UsageError, match="pip install pocketsphinx kaldi-native-fbank"):
        demo.prepare_demo(tmp_path / "out", max_utts=2, progress=False)


def test_bad_max_utts(tmp_path):
    with pytest.raises(UsageError, match="max_utts"):
        demo.prepare_demo(tmp_path / "out", max_utts=0, progress=False)


@pytest.mark.parametrize(
    ("raw", "spoken"),
    [
        ("Please enter your password followed by the pound key.", None),
        (
            "press * to toggle pause, press # to enter",
            "press star to toggle pause press pound to enter",
        ),
        ("Call-Forward on No Answer.", "call forward on no answer"),
        ("[ascending tones]", ""),
        ("(10 seconds of silence)", ""),
        ("<beep ascending>", ""),
        ("dollar [$]", "dollar"),
        ("A.M.", "a m"),
        ("dial 2 now, or 14", "dial two now or fourteen"),
        ("a 28.8 kilobit modem", "a twenty eight point eight kilobit modem"),
        ("I'm sorry, \"don't call\"", "i'm sorry don't call"),
        ("Un-indentified or witheld", "unidentified or withheld"),
    ],
)
def test_normalize_text(raw, spoken):
    expected = spoken if spoken is not None else raw.lower().rstrip(".")
    assert normalize_text(raw) == expected
