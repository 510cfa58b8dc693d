"""Real fault injection: killed workers, kills during checkpoint writes, malformed data, NaNs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import kaldiio
import numpy as np
import pytest
import torch
from conftest import SMALL, make_data_dir

from modelavg import checkpoint as ckpt
from modelavg.cli import main

# -- a corpus of malformed data directories --------------------------------------------------


def good(tmp: Path) -> Path:
    return make_data_dir(tmp / "d", utts=12, seed=3)


def write(tmp: Path, feats: dict, targets: dict | None) -> Path:
    d = tmp / "d"
    d.mkdir(parents=True, exist_ok=True)
    with kaldiio.WriteHelper(f"ark,scp:{d}/feats.ark,{d}/feats.scp") as w:
        for u, m in feats.items():
            w(u, m)
    if targets is not None:
        with kaldiio.WriteHelper(f"ark,scp:{d}/targets.ark,{d}/targets.scp") as w:
            for u, t in targets.items():
                w(u, t)
    return d


def base(n: int = 12, frames: int = 80, dim: int = 6) -> tuple[dict, dict]:
    rng = np.random.default_rng(0)
    feats = {f"u{i:02d}": rng.normal(size=(frames, dim)).astype(np.float32) for i in range(n)}
    return feats, {u: rng.integers(0, 3, frames).astype(np.int32) for u in feats}


def with_feats(change):
    def make(tmp: Path) -> Path:
        feats, targets = base()
        change(feats, targets)
        return write(tmp, feats, targets)

    return make


def edit_file(name: str, change):
    def make(tmp: Path) -> Path:
        d = good(tmp)
        path = d / name
        path.write_bytes(change(path.read_bytes()))
        return d

    return make


def nan(f, t):
    f["u03"][5, 2] = np.nan


def inf(f, t):
    f["u04"][0, 0] = np.inf


def negative(f, t):
    t["u05"][3] = -1


def mismatch(f, t):
    t["u06"] = t["u06"][:50]


def dims(f, t):
    f["u07"] = np.zeros((80, 5), np.float32)


def extra_targets(f, t):
    t["zz_orphan"] = np.zeros(10, np.int32)


def missing_targets(f, t):
    del t["u02"]


def float_targets(f, t):
    t["u01"] = np.zeros((80, 2), np.float32)


def vector_feats(f, t):
    f["u01"] = np.zeros(80, np.float32)


def empty_utt(f, t):
    f["u08"] = np.zeros((0, 6), np.float32)


def remove(name):
    def make(tmp: Path) -> Path:
        d = good(tmp)
        (d / name).unlink()
        return d

    return make


def truncate_ark(tmp: Path) -> Path:
    d = good(tmp)
    ark = d / "feats.ark"
    ark.write_bytes(ark.read_bytes()[: ark.stat().st_size // 2])
    return d


def as_file(tmp: Path) -> Path:
    (tmp / "d").write_text("not a directory")
    return tmp / "d"


BAD = {
    "nan in features": (with_feats(nan), [], "u03: features contain NaN or Inf"),
    "inf in features": (with_feats(inf), [], "u04: features contain NaN or Inf"),
    "negative target": (with_feats(negative), [], "u05: negative class id"),
    "length mismatch": (with_feats(mismatch), [], "u06: 50 targets for 80 feature frames"),
    "inconsistent dims": (with_feats(dims), [], "u07: feature dimension 5, expected 6"),
    "targets without features": (with_feats(extra_targets), [], "zz_orphan: targets but no"),
    "features without targets": (with_feats(missing_targets), [], "u02 has features but no"),
    "float targets": (with_feats(float_targets), [], "u01: expected an int32 vector"),
    "1-d features": (with_feats(vector_feats), [], "u01: expected a non-empty frames x dims"),
    "empty utterance": (with_feats(empty_utt), [], "u08: expected a non-empty frames x dims"),
    "class id too large": (good, ["--num-classes", "2"], "not below --num-classes 2"),
    "more workers than utts": (good, ["--workers", "50", "--in-process"], "more workers than"),
    "missing feats.scp": (remove("feats.scp"), [], "feats.scp: no such file"),
    "missing targets.scp": (remove("targets.scp"), [], "targets.scp: no such file"),
    "missing ark": (remove("feats.ark"), [], "feats.scp: cannot read"),
    "truncated ark": (truncate_ark, [], "feats.scp: cannot read"),
    "garbage ark": (
        edit_file("feats.ark", lambda b: b[:20] + b"\xff" * 200 + b[220:]),
        [],
        "cannot read",
    ),
    "bad scp offset": (
        edit_file("feats.scp", lambda b: b.replace(b".ark:", b".ark:99999999", 1)),
        [],
        "feats.scp: cannot read",
    ),
    "malformed scp line": (
        edit_file("feats.scp", lambda b: b"justonefield\n" + b),
        [],
        "feats.scp: cannot read",
    ),
    "empty feats.scp": (edit_file("feats.scp", lambda b: b""), [], "feats.scp: no utterances"),
    "duplicate utterance": (
        edit_file("feats.scp", lambda b: b + b.splitlines(True)[0]),
        [],
        "duplicate utterance id",
    ),
    "data dir is a file": (as_file, [], "not a data directory"),
    "bad cv dim": (good, ["--cv", "CVDIR"], "feature dimension 5, training data has 6"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_data_is_refused_in_one_line_with_nothing_written(tmp_path, capsys, case):
    make, extra, message = BAD[case]
    data = make(tmp_path)
    if "CVDIR" in extra:
        feats, targets = base(dim=5)
        cv = write(tmp_path / "cv", feats, targets)
        extra = [cv if x == "CVDIR" else x for x in extra]
    out = tmp_path / "out"
    code = main(["train", "--data", str(data), "--out", str(out), *SMALL, *map(str, extra)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("modelavg: error:"), err
    assert message in err, err
    assert not out.exists(), "nothing may be written to --out"


def test_skip_bad_utts_drops_and_counts(tmp_path, capsys):
    feats, targets = base()
    nan(feats, targets)
    missing_targets(feats, targets)
    data = write(tmp_path, feats, targets)
    out = tmp_path / "out"
    assert (
        main(
            [
                "train",
                "--data",
                str(data),
                "--out",
                str(out),
                *SMALL,
                "--skip-bad-utts",
                "--epochs",
                "1",
            ]
        )
        == 0
    )
    assert (out / "final.pt").exists()
    from modelavg.data.kaldi import read_corpus

    corpus = read_corpus(data, skip_bad_utts=True)
    assert len(corpus.utts) == 10 and "2 bad utterances skipped" in corpus.source


# -- misuse ------------------------------------------------------------------------------------


def test_unwritable_out(data_dir, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        code = main(["train", "--data", str(data_dir), "--out", str(locked / "x"), *SMALL])
        assert code == 2 and "not a writable directory" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("where", ["file", "file/below"])
def test_out_that_is_or_is_under_a_file(data_dir, tmp_path, capsys, where):
    (tmp_path / "file").write_text("x")
    assert main(["train", "--data", str(data_dir), "--out", str(tmp_path / where), *SMALL]) == 2
    assert "not a writable directory" in capsys.readouterr().err


# -- divergence --------------------------------------------------------------------------------

DIVERGE = ["--activation", "relu", "--schedule", "constant", "--in-process", "--workers", "2"]


def test_divergence_rolls_back_then_gives_up(data_dir, tmp_path, capsys):
    out = tmp_path / "nan"
    code = main(
        [
            "train",
            "--data",
            str(data_dir),
            "--out",
            str(out),
            *SMALL,
            *DIVERGE,
            "--lr",
            "1e7",
            "--max-rollbacks",
            "2",
        ]
    )
    captured = capsys.readouterr()
    assert code == 2
    assert "diverged" in captured.err and "--max-rollbacks 2" in captured.err
    assert captured.out.count("rolled back") == 2
    assert not (out / "final.pt").exists()


def test_divergence_recovers_with_a_lower_lr(data_dir, tmp_path):
    out = tmp_path / "recover"
    assert (
        main(
            [
                "train",
                "--data",
                str(data_dir),
                "--out",
                str(out),
                *SMALL,
                *DIVERGE,
                "--lr",
                "1e7",
                "--max-rollbacks",
                "10",
                "--rollback-lr-factor",
                "0.001",
            ]
        )
        == 0
    )
    lines = (out / "metrics.jsonl").read_text()
    assert '"kind": "rollback"' in lines
    state = torch.load(out / "final.pt", weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values())


# -- killed workers ----------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text()[:80]


def train_argv(data_dir: Path, out: Path, **train) -> list[str]:
    """``modelavg train`` for many epochs (the tests kill it long before it ends)."""
    opts = [f"--{k.replace('_', '-')}={v}" for k, v in train.items()]
    command = [sys.executable, "-m", "modelavg", "train"]
    paths = ["--data", str(data_dir), "--out", str(out)]
    return command + paths + [*SMALL, "--epochs", "200", "--timeout", "30", *opts]


def start_training(data_dir: Path, out: Path, env: dict | None = None, **train) -> subprocess.Popen:
    """Start ``train_argv`` and return once its first checkpoint is written."""
    proc = subprocess.Popen(
        train_argv(data_dir, out, **train),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / "LATEST").exists():  # training is under way
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    return proc


def test_survivor_of_a_killed_peer_exits_with_peer_lost_not_a_signal(data_dir, tmp_path):
    """Ranks started by hand (as torchrun or mpirun would): when rank 1 is SIGKILLed, rank 0
    prints one line and exits with PEER_LOST (3), not SIGABRT from a broken process group's
    teardown, which would make a launcher blame it instead of rank 1."""
    from modelavg.launch import PEER_LOST, free_port, local_rank_env

    port = free_port()
    envs = [{**os.environ, **local_rank_env(rank, 2, port)} for rank in (0, 1)]
    out = tmp_path / "by_hand"
    rank1 = subprocess.Popen(
        train_argv(data_dir, out),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=envs[1],
    )
    rank0 = start_training(data_dir, out, env=envs[0])
    rank1.kill()
    rank1.wait()
    _, err = rank0.communicate(timeout=60)
    assert rank0.returncode == PEER_LOST, err
    errors = [line for line in err.splitlines() if line.startswith("modelavg: error:")]
    assert len(errors) == 1 and "worker rank 0: a collective failed" in errors[0], err


def test_killed_worker_stops_the_job_quickly_and_names_the_rank(data_dir, tmp_path):
    parent = start_training(data_dir, tmp_path / "killed", workers=2)
    workers = children(parent.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    killed = time.monotonic()
    _, err = parent.communicate(timeout=60)
    took = time.monotonic() - killed
    assert parent.returncode != 0
    assert "worker rank 1 failed (signal 9)" in err
    assert took < 30, f"survivors took {took:.1f} s to stop"
    assert not any(alive(w) for w in workers)
    print(f"job stopped {took:.2f} s after the kill")


def test_kill_during_checkpoint_writes_leaves_a_loadable_checkpoint(tmp_path):
    """A writer that checkpoints big states in a loop is SIGKILLed at random moments."""
    root = tmp_path / "ck"
    script = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from modelavg import checkpoint as c\n"
        "root = Path(sys.argv[1]); i = 0\n"
        "while True:\n"
        "    i += 1; name = c.checkpoint_name(i, 0)\n"
        "    c.save_files(root, name, {'i': i, 'w': torch.full((2_000_000,), float(i))},"
        " {0: {'i': i}})\n"
        "    c.commit(root, name, keep=2)\n"
    )
    rng = np.random.default_rng(0)
    for _ in range(4):
        before = ckpt.latest(root)
        proc = subprocess.Popen([sys.executable, "-c", script, str(root)])
        deadline = time.monotonic() + 120  # importing torch can take seconds on a loaded machine
        while ckpt.latest(root) == before and time.monotonic() < deadline:
            time.sleep(0.05)  # the writer is in its loop once it has committed a checkpoint
        time.sleep(rng.uniform(0, 1.5))
        proc.kill()
        proc.wait()
        latest = ckpt.latest(root)
        assert latest is not None
        shared = ckpt.load(latest / "shared.pt", torch.device("cpu"))
        worker = ckpt.load(ckpt.worker_file(latest, 0), torch.device("cpu"))
        assert shared["w"][0] == shared["i"] == worker["i"]
        assert torch.all(shared["w"] == shared["i"])
