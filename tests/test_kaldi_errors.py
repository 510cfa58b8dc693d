"""Malformed Kaldi data directories: each is one UsageError line naming the file and utterance."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import kaldiio
import numpy as np
import pytest
from conftest import SMALL

from modelavg.cli import main
from modelavg.data.kaldi import read_corpus
from modelavg.errors import UsageError

UTTS = [f"u{i:02d}" for i in range(12)]
FRAMES, DIM = 80, 6


def _tables() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    feats = {u: rng.normal(size=(FRAMES, DIM)).astype(np.float32) for u in UTTS}
    return feats, {u: rng.integers(0, 3, FRAMES).astype(np.int32) for u in UTTS}


def _write(d: Path, feats: dict, targets: dict) -> Path:
    """Tables in the given order, without write_data_dir's sorting or dtype casts."""
    d.mkdir(parents=True, exist_ok=True)
    for name, table in (("feats", feats), ("targets", targets)):
        with kaldiio.WriteHelper(f"ark,scp:{d}/{name}.ark,{d}/{name}.scp") as w:
            for utt, value in table.items():
                w(utt, value)
    return d


def tables(change: Callable[[dict, dict], None]) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        feats, targets = _tables()
        change(feats, targets)
        return _write(tmp / "d", feats, targets)

    return make


def edit(name: str, change: Callable[[Path], bytes]) -> Callable[[Path], Path]:
    """A good directory with file ``name`` replaced by ``change(its path)``'s bytes."""

    def make(tmp: Path) -> Path:
        d = _write(tmp / "d", *_tables())
        (d / name).write_bytes(change(d))
        return d

    return make


def _offset(d: Path, utt: str) -> int:
    line = next(x for x in (d / "feats.scp").read_text().splitlines() if x.startswith(utt + " "))
    return int(line.rsplit(":", 1)[1])


def truncated_in(utt: str) -> Callable[[Path], bytes]:
    return lambda d: (d / "feats.ark").read_bytes()[: _offset(d, utt) + 40]


def _overwrite(data: bytes, at: int, new: bytes) -> bytes:
    return data[:at] + new + data[at + len(new) :]


def remove(name: str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        d = _write(tmp / "d", *_tables())
        (d / name).unlink()
        return d

    return make


def scp_lines(change: Callable[[list[str]], list[str]]) -> Callable[[Path], bytes]:
    return lambda d: "".join(
        x + "\n" for x in change((d / "feats.scp").read_text().splitlines())
    ).encode()


def set_item(table: int, utt: str, value: np.ndarray) -> Callable[[dict, dict], None]:
    return lambda f, t: (f, t)[table].__setitem__(utt, value)


def with_nan(f: dict, t: dict) -> None:
    f["u03"][5, 2] = np.nan


def with_inf(f: dict, t: dict) -> None:
    f["u04"][0, 0] = -np.inf


def negative(f: dict, t: dict) -> None:
    t["u05"][3] = -1


def no_targets(f: dict, t: dict) -> None:
    del t["u02"]


def orphan_targets(f: dict, t: dict) -> None:
    t["zz"] = np.zeros(10, np.int32)


FEATS, TARGETS, ARK = "feats.scp", "targets.scp", "feats.ark"
# case -> (make the directory, read_corpus keywords, file named, utterance named, skippable)
CASES: dict[str, tuple[Callable[[Path], Path], dict, str, str | None, bool]] = {
    "missing feats.scp": (remove(FEATS), {}, FEATS, None, False),
    "missing targets.scp": (remove(TARGETS), {}, TARGETS, None, False),
    "empty feats.scp": (edit(FEATS, lambda d: b""), {}, FEATS, None, False),
    "truncated ark": (edit(ARK, truncated_in("u07")), {}, ARK, "u07", False),
    "truncated ark read directly": (
        edit(ARK, truncated_in("u07")),
        {"feats": ARK},
        ARK,
        "u07",
        False,
    ),
    "missing ark": (remove(ARK), {}, ARK, "u00", False),
    "scp offset past the end": (
        edit(FEATS, scp_lines(lambda x: [*x[:3], x[3].rsplit(":", 1)[0] + ":99999999", *x[4:]])),
        {},
        FEATS,
        "u03",
        False,
    ),
    "scp offset inside a record": (
        edit(FEATS, scp_lines(lambda x: [*x[:3], x[3] + "7", *x[4:]])),
        {},
        FEATS,
        "u03",
        False,
    ),
    "garbage in a record header": (
        edit(ARK, lambda d: _overwrite((d / ARK).read_bytes(), _offset(d, "u05"), b"\xff" * 8)),
        {},
        ARK,
        "u05",
        False,
    ),
    "binary feats.scp": (edit(FEATS, lambda d: (d / ARK).read_bytes()), {}, FEATS, "line 1", False),
    "garbled scp line": (
        edit(FEATS, scp_lines(lambda x: [*x[:4], "u04", *x[5:]])),
        {},
        FEATS,
        "line 5",
        False,
    ),
    "targets shorter than feats": (
        tables(set_item(1, "u06", np.zeros(50, np.int32))),
        {},
        TARGETS,
        "u06",
        True,
    ),
    "targets longer than feats": (
        tables(set_item(1, "u06", np.zeros(90, np.int32))),
        {},
        TARGETS,
        "u06",
        True,
    ),
    "float targets": (
        tables(set_item(1, "u01", np.zeros(FRAMES, np.float32))),
        {},
        TARGETS,
        "u01",
        False,
    ),
    "matrix targets": (
        tables(set_item(1, "u01", np.zeros((FRAMES, 2), np.float32))),
        {},
        TARGETS,
        "u01",
        False,
    ),
    "negative target": (tables(negative), {}, TARGETS, "u05", True),
    "features without targets": (tables(no_targets), {}, TARGETS, "u02", True),
    "targets without features": (tables(orphan_targets), {}, TARGETS, "zz", True),
    "duplicate utterance in feats.scp": (
        edit(FEATS, scp_lines(lambda x: [*x, x[2]])),
        {},
        FEATS,
        "u02",
        False,
    ),
    "duplicate utterance in targets.scp": (
        edit(TARGETS, lambda d: (d / TARGETS).read_bytes() * 2),
        {},
        TARGETS,
        "u00",
        False,
    ),
    "nan in features": (tables(with_nan), {}, FEATS, "u03", True),
    "inf in features": (tables(with_inf), {}, FEATS, "u04", True),
    "feature dimension differs": (
        tables(set_item(0, "u07", np.zeros((FRAMES, DIM - 1), np.float32))),
        {},
        FEATS,
        "u07",
        False,
    ),
    "zero-frame utterance": (
        tables(set_item(0, "u08", np.zeros((0, DIM), np.float32))),
        {},
        FEATS,
        "u08",
        True,
    ),
    "vector features": (
        tables(set_item(0, "u09", np.zeros(FRAMES, np.float32))),
        {},
        FEATS,
        "u09",
        False,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_data_is_one_line_naming_file_and_utterance(tmp_path: Path, case: str) -> None:
    make, kwargs, file, utt, _ = CASES[case]
    with pytest.raises(UsageError) as err:
        read_corpus(make(tmp_path), **kwargs)
    message = str(err.value)
    assert "\n" not in message, message
    assert file in message, message
    if utt is not None:
        assert f" {utt}" in message, message


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][4]])
def test_skip_bad_utts_drops_and_counts_the_utterance(tmp_path: Path, case: str) -> None:
    make, kwargs, _, utt, _ = CASES[case]
    corpus = read_corpus(make(tmp_path), skip_bad_utts=True, **kwargs)
    assert utt not in corpus.feats and set(corpus.feats) == set(corpus.targets)
    assert len(corpus.utts) == (12 if utt == "zz" else 11)
    assert corpus.source.endswith("(1 bad utterances skipped)")


@pytest.mark.parametrize("case", [c for c in CASES if not CASES[c][4]])
def test_skip_bad_utts_still_refuses_a_broken_table(tmp_path: Path, case: str) -> None:
    make, kwargs, _, _, _ = CASES[case]
    with pytest.raises(UsageError):
        read_corpus(make(tmp_path), skip_bad_utts=True, **kwargs)


def test_cli_exits_2_with_one_stderr_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = edit(ARK, truncated_in("u07"))(tmp_path)
    out = tmp_path / "out"
    code = main(["train", "--data", str(data), "--out", str(out), "--in-process", *SMALL])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("modelavg: error: "), err
    assert "feats.ark" in err and "u07" in err, err
    assert not out.exists()
