"""DBN pretraining on the averaging engine: syncs, process-count invariance, learning, DNN init."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from modelavg import launch
from modelavg.averaging import ModelAverager
from modelavg.averaging.base import flatten
from modelavg.comm import InProcessCommunicator
from modelavg.config import PretrainConfig
from modelavg.data.kaldi import read_corpus
from modelavg.errors import UsageError
from modelavg.launch import free_port, local_rank_env
from modelavg.nets.dbn import DBN, load_dbn
from modelavg.nets.dnn import DNN, DNNSpec
from modelavg.pretrain import pretrain

LAYERS, HIDDEN, CONTEXT = 2, 16, 1
SMALL = dict(
    hidden_layers=LAYERS,
    hidden_dim=HIDDEN,
    context=CONTEXT,
    minibatch=16,
    avg_every=2,
    log_every=5,
    threads=1,
    progress=False,
)


class RecordingAverager(ModelAverager):
    """The real averaging engine, checking the replicas around every synchronisation."""

    def __init__(self, comm) -> None:
        super().__init__(comm)
        self.differed_before = []  # one bool per sync: did local training move the replicas apart?
        self.equal_after = []
        self.started = []  # replicas (copies) at the start of every layer

    def start(self, models) -> None:
        self.started.append([{k: v.clone() for k, v in m.state_dict().items()} for m in models])

    def sync(self, models) -> None:
        before = [flatten(m) for m in models]
        self.differed_before.append(any(not torch.equal(before[0], b) for b in before[1:]))
        super().sync(models)
        after = [flatten(m) for m in models]
        torch.testing.assert_close(after[0], torch.stack(before).mean(0), rtol=1e-6, atol=1e-7)
        self.equal_after.append(all(torch.equal(after[0], a) for a in after[1:]))


@pytest.fixture(scope="module")
def inprocess(data_dir, tmp_path_factory):
    """Two logical workers in this process, one thread (for the bitwise comparison)."""
    out = tmp_path_factory.mktemp("pretrain") / "inproc"
    cfg = PretrainConfig(data=str(data_dir), out=str(out), workers=2, in_process=True, **SMALL)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        averager = RecordingAverager(InProcessCommunicator(2))
        path = pretrain(cfg, InProcessCommunicator(2), averager)
    finally:
        torch.set_num_threads(threads)
    return path, averager, read_log(out)


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "pretrain.jsonl").read_text().splitlines()]


def spliced_normalised(data_dir: Path, state: dict) -> torch.Tensor:
    """Every frame of the data, spliced +-C (edges repeated) and normalised by the saved stats."""
    corpus = read_corpus(data_dir, need_targets=False)
    c = state["context"]
    rows = []
    for m in corpus.feats.values():
        t = torch.tensor(m)
        pos = (torch.arange(len(t))[:, None] + torch.arange(-c, c + 1)).clamp(0, len(t) - 1)
        rows.append(t[pos].reshape(len(t), -1))
    return (torch.cat(rows) - state["mean"]) / state["std"]


def assert_same_dbn(a: Path, b: Path) -> None:
    (dbn_a, state_a), (dbn_b, state_b) = load_dbn(a), load_dbn(b)
    assert len(dbn_a) == len(dbn_b) == LAYERS
    for ra, rb in zip(dbn_a, dbn_b, strict=True):
        for (name, pa), pb in zip(ra.state_dict().items(), rb.state_dict().values(), strict=True):
            assert torch.equal(pa, pb), f"{name} differs between {a} and {b}"
    assert torch.equal(state_a["mean"], state_b["mean"]) and torch.equal(
        state_a["std"], state_b["std"]
    )


def clean_env() -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "OMPI_", "PMI_"))
    }
    return {**env, "OMP_NUM_THREADS": "1"}


# --------------------------------------------------------------------------------------------------


def test_replicas_are_averaged_every_k_and_train_locally_in_between(inprocess):
    path, averager, log = inprocess
    start = log[0]
    rounds = start["rounds_per_epoch"]
    assert averager.syncs == rounds * sum(p["epochs"] for p in start["plan"]) == rounds * 3
    assert all(averager.equal_after), "replicas differ after an averaging"
    assert all(averager.differed_before), "replicas were equal before an averaging: no local steps"
    assert len(averager.started) == LAYERS


def test_replicas_start_each_layer_equal_with_logit_visible_bias(inprocess, data_dir):
    """Layer 2's b_v = logit(mean layer-1 activation over all workers' shards), on every worker."""
    path, averager, _ = inprocess
    dbn, state = load_dbn(path)
    for replicas in averager.started:
        assert all(torch.equal(replicas[0][k], r[k]) for r in replicas[1:] for k in r)
    layer1_mean = dbn[0].hidden_probs(spliced_normalised(data_dir, state)).mean(0)
    expected = torch.logit(layer1_mean.clamp(1e-4, 1 - 1e-4))
    torch.testing.assert_close(averager.started[1][0]["visible_bias"], expected, rtol=0, atol=1e-4)
    assert torch.equal(averager.started[0][0]["visible_bias"], torch.zeros(dbn[0].visible_dim))


def test_reconstruction_error_falls_within_each_layer(inprocess):
    _, _, log = inprocess
    for layer in range(1, LAYERS + 1):
        errors = [
            r["reconstruction_error"] for r in log if r["kind"] == "round" and r["layer"] == layer
        ]
        assert len(errors) >= 4
        assert np.mean(errors[-2:]) < 0.8 * np.mean(errors[:2]), (layer, errors)
    summaries = [r for r in log if r["kind"] == "layer"]
    assert [s["layer"] for s in summaries] == [1, 2]
    assert all(s["compute_s"] > 0 and s["averaging_s"] > 0 for s in summaries)


def test_log_reports_the_recipe_schedule(inprocess, tmp_path, data_dir):
    """lr used = recipe lr x (1 - 0.5) before the first ramp step, momentum 0.9 (with the bug);
    --lr-scaling linear multiplies it by N."""
    _, _, log = inprocess
    first = {r["layer"]: r for r in reversed(log) if r["kind"] == "round"}
    assert first[1]["lr"] == pytest.approx(0.01 * 0.5) and first[2]["lr"] == pytest.approx(0.2)
    assert first[1]["momentum"] == pytest.approx(0.9)
    assert {"guard_firings", "compute_s", "averaging_s"} <= set(first[1])
    cfg = PretrainConfig(
        data=str(data_dir), out=str(tmp_path), lr_scaling="linear", **{**SMALL, "hidden_layers": 1}
    )
    pretrain(cfg, InProcessCommunicator(2))
    linear = next(r for r in read_log(tmp_path) if r["kind"] == "round")
    assert linear["lr"] == pytest.approx(2 * 0.01 * 0.5)
    assert (tmp_path / "pretrain.png").stat().st_size > 0


def test_two_processes_give_the_same_dbn_as_two_inprocess_workers(inprocess, data_dir, tmp_path):
    out = tmp_path / "procs"
    cfg = PretrainConfig(
        data=str(data_dir), out=str(out), workers=2, device="cpu", backend="gloo", **SMALL
    )
    script = (
        "import json, sys, torch\n"
        "from modelavg import launch\n"
        "from modelavg.config import PretrainConfig\n"
        "from modelavg.pretrain import pretrain\n"
        "cfg = PretrainConfig(**json.loads(sys.argv[1]))\n"
        "code = launch.run_job(cfg, [], pretrain)\n"
        "launch.end_process(code)\n"
    )
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**clean_env(), **local_rank_env(rank, 2, port)}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", script, json.dumps(asdict(cfg))],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert_same_dbn(out / "dbn.pt", inprocess[0])
    errors = [r.get("reconstruction_error") for r in read_log(out)[1:]]
    assert errors == [r.get("reconstruction_error") for r in inprocess[2][1:]]


def test_cli_pretrain_with_spawned_workers(inprocess, data_dir, tmp_path):
    out = tmp_path / "cli"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items() if k != "progress"]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelavg",
            "pretrain",
            "--data",
            str(data_dir),
            "--out",
            str(out),
            "--workers",
            "2",
            "--no-progress",
            *flags,
        ],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=240,
    )
    assert r.returncode == 0, r.stderr
    assert_same_dbn(out / "dbn.pt", inprocess[0])


def test_dbn_file_carries_the_input_normalisation(inprocess, data_dir):
    _, state = load_dbn(inprocess[0])
    assert state["context"] == CONTEXT
    frames = np.concatenate(list(read_corpus(data_dir, need_targets=False).feats.values()))
    splice = 2 * CONTEXT + 1
    assert state["frames"] == len(frames) and state["input_dim"] * splice == state["mean"].numel()
    np.testing.assert_allclose(state["mean"], np.tile(frames.mean(0), splice), atol=1e-5)
    np.testing.assert_allclose(state["std"], np.tile(frames.std(0), splice), rtol=1e-4)


def test_dbn_initialises_the_dnn_via_hidden_layers_from(inprocess, data_dir):
    from modelavg.nets.dbn import hidden_layers_from

    dbn, state = load_dbn(inprocess[0])
    spec = DNNSpec(
        input_dim=state["input_dim"],
        context=CONTEXT,
        hidden_layers=LAYERS,
        hidden_dim=HIDDEN,
        num_classes=4,
    )
    model = hidden_layers_from(inprocess[0], spec)
    model.normalize.set_stats(state["mean"], state["std"])
    assert_dnn_is_the_dbn_up_pass(model, dbn, data_dir, state)


def test_dbn_layers_reproduce_the_up_pass_in_a_dnn(inprocess, data_dir):
    """What hidden_layers_from should build: DNN hidden activations = DBN.transform."""
    from modelavg.nets.dbn import dbn_to_linear_layers

    dbn, state = load_dbn(inprocess[0])
    spec = DNNSpec(
        input_dim=state["input_dim"],
        context=CONTEXT,
        hidden_layers=LAYERS,
        hidden_dim=HIDDEN,
        num_classes=4,
    )
    model = DNN(spec, hidden=dbn_to_linear_layers(dbn))
    model.normalize.set_stats(state["mean"], state["std"])
    assert_dnn_is_the_dbn_up_pass(model, dbn, data_dir, state)


def assert_dnn_is_the_dbn_up_pass(model: DNN, dbn: DBN, data_dir: Path, state: dict) -> None:
    x = spliced_normalised(data_dir, state)
    raw = x * state["std"] + state["mean"]
    with torch.no_grad():
        hidden = model.layers[: 2 * LAYERS](model.normalize(raw))
    torch.testing.assert_close(hidden, dbn.transform(x), rtol=1e-5, atol=1e-5)


def test_refuses_a_used_out_dir_and_shards_too_small(inprocess, data_dir, tmp_path):
    used = PretrainConfig(data=str(data_dir), out=str(inprocess[0].parent))
    with pytest.raises(UsageError, match="already holds"):
        launch.run_job(used, [], pretrain)
    with pytest.raises(UsageError, match="smallest shard"):
        pretrain(
            PretrainConfig(data=str(data_dir), out=str(tmp_path), **{**SMALL, "avg_every": 1000}),
            InProcessCommunicator(2),
        )


def test_utterances_over_max_utt_frames_are_skipped(data_dir, tmp_path):
    lengths = [len(m) for m in read_corpus(data_dir, need_targets=False).feats.values()]
    cfg = PretrainConfig(
        data=str(data_dir), out=str(tmp_path), max_utt_frames=100, **{**SMALL, "hidden_layers": 1}
    )
    pretrain(cfg, InProcessCommunicator(2))
    start = read_log(tmp_path)[0]
    assert start["skipped_long_utts"] == sum(n > 100 for n in lengths) > 0
    assert sum(start["shard_frames"]) == sum(n for n in lengths if n <= 100)
