"""Fashion-MNIST as Kaldi data directories, so the speech trainer can run on a real, full-size set.

The Debian package ``dataset-fashion-mnist`` ships the four idx.gz files (70k 28x28 grey images,
10 classes). Each "utterance" written here is ``utt_size`` images stacked as frames (frames x 784,
float32 pixel/255) with one class id per frame. Frames are independent images, so training must use
splicing context 0 (no neighbouring frames); the README.md written next to the data says so.

Example::

    prepare_fashion("data/fashion")  # -> data/fashion/{train,cv,test}/{feats,targets}.{ark,scp}
"""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import numpy as np

from modelavg.data.kaldi import write_data_dir
from modelavg.errors import UsageError
from modelavg.io import atomic_write_bytes

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "apt-get install -y dataset-fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# idx type code -> numpy dtype; multi-byte values are big-endian (the idx format's convention).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

LICENCE = """\
Fashion-MNIST: Copyright 2017, Zalando SE (https://github.com/zalandoresearch/fashion-mnist).
Debian packaging (dataset-fashion-mnist): Copyright 2019-2020 Mo Zhou. Licence: Expat (MIT).

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
associated documentation files (the "Software"), to deal in the Software without restriction,
including without limitation the rights to use, copy, modify, merge, publish, distribute,
sublicense, and/or sell copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT
NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM,
DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT
OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse one gzipped idx file (2 zero bytes, type code, rank, big-endian uint32 dims, data)."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise UsageError(f"{path}: cannot read ({exc})") from None
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_DTYPES:
        raise UsageError(f"{path}: not an idx file")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    if len(data) != header + math.prod(dims) * dtype.itemsize:
        raise UsageError(f"{path}: {len(data) - header} data bytes do not match dims {dims}")
    return np.frombuffer(data, dtype, offset=header).reshape(dims)


def load_split(name: str, source_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, ...]:
    """Return (images uint8 [n, 28, 28], labels int [n]) of the 'train' or 'test' split."""
    src = Path(FASHION_DIR if source_dir is None else source_dir)
    paths = [src / f for f in FILES[name]]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UsageError(f"{missing[0]}: Fashion-MNIST not found; install it with: {INSTALL_HINT}")
    images, labels = (read_idx(p) for p in paths)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UsageError(f"{src}: {name} images {images.shape} do not match labels {labels.shape}")
    return images, labels


def _utterances(
    split: str, images: np.ndarray, labels: np.ndarray, idx: np.ndarray, utt_size: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Group the images ``idx`` (in that order) into utterances of ``utt_size`` frames each."""
    n_utts = -(-len(idx) // utt_size)
    width = max(5, len(str(n_utts - 1)))  # zero-padded, so sorted ids keep the image order
    feats: dict[str, np.ndarray] = {}
    targets: dict[str, np.ndarray] = {}
    for i in range(n_utts):
        chunk = idx[i * utt_size : (i + 1) * utt_size]
        utt = f"{split}-{i:0{width}d}"
        feats[utt] = images[chunk].reshape(len(chunk), -1).astype(np.float32) / np.float32(255)
        targets[utt] = labels[chunk].astype(np.int32)
    return feats, targets


def _readme(counts: dict[str, int], utt_size: int, cv_fraction: float, seed: int, src: Path) -> str:
    rows = "\n".join(
        f"| {s} | {counts[s + '_images']} | {counts[s + '_utts']} |"
        for s in ("train", "cv", "test")
    )
    classes = ", ".join(f"{i} {c}" for i, c in enumerate(CLASSES))
    return f"""# Fashion-MNIST as Kaldi data directories

Written by `modelavg.corpora.fashion.prepare_fashion` from the Debian package
`dataset-fashion-mnist`
(idx.gz files in {src}).

- Each utterance is {utt_size} images stacked as frames: 784 float32 values (pixel / 255) per frame,
  one class id per frame in `targets.scp`.
- **Frames are independent images: train with splicing context 0** (no neighbouring frames).
- `cv` is a seeded (seed {seed}) random hold-out, cv_fraction={cv_fraction:.6g}, of the images of
  the training file; `train` is the rest; `test` is the official test file (t10k). Within each set
  the images keep their file order.
- Classes: {classes}.

| set | images | utterances |
|---|---|---|
{rows}

## Licence (from /usr/share/doc/dataset-fashion-mnist/copyright)

{LICENCE}"""


def prepare_fashion(
    out_dir: str | os.PathLike = "data/fashion",
    utt_size: int = 100,
    cv_fraction: float = 1 / 12,
    seed: int = 0,
    max_images: int | None = None,
    source_dir: str | os.PathLike | None = None,
) -> dict[str, int]:
    """Write ``train/``, ``cv/`` and ``test/`` data directories plus README.md; return the counts.

    ``max_images`` keeps only the first images of each file (fast tests). The output is
    deterministic: a re-run with the same arguments rewrites byte-identical files.
    """
    if utt_size < 1:
        raise UsageError(f"utt_size must be >= 1, got {utt_size}")
    if not 0 < cv_fraction < 1:
        raise UsageError(f"cv_fraction must be in (0, 1), got {cv_fraction}")
    if max_images is not None and max_images < 1:
        raise UsageError(f"max_images must be >= 1, got {max_images}")
    out = Path(out_dir)
    src = Path(FASHION_DIR if source_dir is None else source_dir)
    train_x, train_y = load_split("train", src)
    test_x, test_y = load_split("test", src)
    if max_images is not None:
        train_x, train_y = train_x[:max_images], train_y[:max_images]
        test_x, test_y = test_x[:max_images], test_y[:max_images]

    perm = np.random.default_rng(seed).permutation(len(train_x))
    n_cv = round(len(train_x) * cv_fraction)
    splits = {
        "train": (train_x, train_y, np.sort(perm[n_cv:])),
        "cv": (train_x, train_y, np.sort(perm[:n_cv])),
        "test": (test_x, test_y, np.arange(len(test_x))),
    }
    counts: dict[str, int] = {}
    for name, (images, labels, idx) in splits.items():
        if len(idx) == 0:
            raise UsageError(f"{name}: no images (max_images={max_images}, cv={cv_fraction})")
        feats, targets = _utterances(name, images, labels, idx, utt_size)
        write_data_dir(out / name, feats, targets)
        counts[f"{name}_images"], counts[f"{name}_utts"] = len(idx), len(feats)
    readme = _readme(counts, utt_size, cv_fraction, seed, src)
    atomic_write_bytes(readme.encode("utf-8"), out / "README.md")
    summary = ", ".join(
        f"{s} {counts[s + '_images']} images / {counts[s + '_utts']} utts" for s in splits
    )
    print(f"fashion-mnist -> {out}: {summary}")
    return counts
