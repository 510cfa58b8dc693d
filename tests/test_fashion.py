"""Fashion-MNIST -> Kaldi data directories: readable by the trainer, grouped, deterministic."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest

from modelavg.corpora import fashion
from modelavg.data.kaldi import read_corpus
from modelavg.errors import UsageError

N_IMAGES = 250  # per file: train 200 + cv 50 (cv_fraction 0.2), test 250 -> 100, 100, 50 frames
needs_data = pytest.mark.skipif(
    not (fashion.FASHION_DIR / fashion.FILES["train"][0]).is_file(),
    reason="Debian package missing: apt-get install -y dataset-fashion-mnist",
)


def _raw(name: str, offset: int) -> np.ndarray:
    """Independent reader: skip the idx header (16 bytes for images, 8 for labels)."""
    with gzip.open(fashion.FASHION_DIR / name, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    out = tmp_path_factory.mktemp("fashion")
    counts = fashion.prepare_fashion(out, utt_size=100, cv_fraction=0.2, max_images=N_IMAGES)
    return out, counts


@needs_data
def test_counts_and_readable(prepared: tuple[Path, dict[str, int]]) -> None:
    out, counts = prepared
    assert counts == {
        "train_images": 200,
        "train_utts": 2,
        "cv_images": 50,
        "cv_utts": 1,
        "test_images": 250,
        "test_utts": 3,
    }
    for split in ("train", "cv", "test"):
        corpus = read_corpus(out / split)
        assert corpus.dim == 784
        assert corpus.num_frames() == counts[f"{split}_images"]
        assert corpus.utts == [f"{split}-{i:05d}" for i in range(counts[f"{split}_utts"])]
        for utt, feats in corpus.feats.items():
            assert feats.dtype == np.float32
            assert feats.min() >= 0.0 and feats.max() <= 1.0
            labels = corpus.targets[utt]
            assert len(labels) == len(feats)
            assert labels.min() >= 0 and labels.max() <= 9
    assert [len(m) for m in read_corpus(out / "test").feats.values()] == [100, 100, 50]


@needs_data
def test_frames_are_the_images_in_file_order(prepared: tuple[Path, dict[str, int]]) -> None:
    out, _ = prepared
    images = _raw("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 784)[:N_IMAGES]
    labels = _raw("t10k-labels-idx1-ubyte.gz", 8)[:N_IMAGES]
    test = read_corpus(out / "test")
    feats = np.concatenate(list(test.feats.values()))
    np.testing.assert_array_equal(feats, images.astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(np.concatenate(list(test.targets.values())), labels)
    # train and cv partition the first N_IMAGES training images (same multiset of rows)
    train_images = _raw("train-images-idx3-ubyte.gz", 16).reshape(-1, 784)[:N_IMAGES]
    parts = [read_corpus(out / s) for s in ("train", "cv")]
    got = sorted(
        np.round(m * 255).astype(np.uint8).tobytes()
        for c in parts
        for u in c.utts
        for m in c.feats[u]
    )
    assert got == sorted(row.tobytes() for row in train_images)


@needs_data
def test_rerun_is_byte_identical(prepared: tuple[Path, dict[str, int]]) -> None:
    out, _ = prepared
    before = _digests(out)
    fashion.prepare_fashion(out, utt_size=100, cv_fraction=0.2, max_images=N_IMAGES)
    assert _digests(out) == before
    readme = (out / "README.md").read_text()
    assert "splicing context 0" in readme and "Expat" in readme


@needs_data
def test_cv_depends_on_seed(tmp_path: Path) -> None:
    a = fashion.prepare_fashion(tmp_path / "a", utt_size=50, cv_fraction=0.2, max_images=100)
    fashion.prepare_fashion(tmp_path / "b", utt_size=50, cv_fraction=0.2, max_images=100, seed=1)
    assert a["cv_images"] == 20
    cv_a, cv_b = (read_corpus(tmp_path / d / "cv").feats["cv-00000"] for d in "ab")
    assert not np.array_equal(cv_a, cv_b)


def test_missing_package_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fashion, "FASHION_DIR", tmp_path / "absent")
    with pytest.raises(UsageError, match="apt-get install -y dataset-fashion-mnist"):
        fashion.prepare_fashion(tmp_path / "out", max_images=10)
    assert not (tmp_path / "out").exists()


def test_read_idx_parses_and_rejects(tmp_path: Path) -> None:
    good = tmp_path / "x.gz"
    payload = np.arange(6, dtype=">i2").tobytes()
    good.write_bytes(gzip.compress(b"\0\0\x0b\x02" + b"\0\0\0\x02\0\0\0\x03" + payload))
    np.testing.assert_array_equal(fashion.read_idx(good), np.arange(6).reshape(2, 3))
    short = tmp_path / "short.gz"
    short.write_bytes(gzip.compress(b"\0\0\x08\x01\0\0\0\x05abc"))
    with pytest.raises(UsageError, match="do not match"):
        fashion.read_idx(short)
    junk = tmp_path / "junk.gz"
    junk.write_bytes(b"not gzip")
    with pytest.raises(UsageError, match="cannot read"):
        fashion.read_idx(junk)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"utt_size": 0}, "utt_size"),
        ({"cv_fraction": 1.0}, "cv_fraction"),
        ({"cv_fraction": 0}, "cv_fraction"),
        ({"max_images": 0}, "max"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        fashion.prepare_fashion(tmp_path, **kwargs)
