"""Gradient noise scale: the estimator against exact per-frame gradients, the ceiling formulas,
and the ``noise-scale`` command."""

import copy
import json

import numpy as np
import pytest
import torch
from conftest import SMALL, make_data_dir

from modelavg.analysis.noise import (
    efficiency_ceiling,
    estimate_noise_scale,
    estimate_noise_scales,
    euclidean,
    gradients,
    natural_gradient_metric,
    noise_scale_needed,
    trajectory_efficiency_ceiling,
    workers_at_half_efficiency,
)
from modelavg.audit import DeviceAudit
from modelavg.cli import main
from modelavg.data.frames import FrameTable
from modelavg.data.kaldi import read_corpus
from modelavg.nets.dnn import DNN, DNNSpec, save_model
from modelavg.optim import NGSGD


@pytest.fixture(scope="module")
def noisy_problem(tmp_path_factory):
    """A small untrained DNN on ~4000 frames of overlapping Gaussian classes."""
    data = make_data_dir(tmp_path_factory.mktemp("noise") / "train", utts=40, classes=4, dim=3)
    corpus = read_corpus(data)
    table = FrameTable.from_corpus(corpus, corpus.utts)
    torch.manual_seed(0)
    model = DNN(DNNSpec(input_dim=3, context=0, hidden_layers=1, hidden_dim=8, num_classes=4))
    return data, table, model


def exact_noise_scale(model, table, metric=euclidean) -> tuple[float, float]:
    """|G|^2 and tr(Sigma) from every frame's own gradient (the population, no sampling)."""
    grads = torch.stack(
        [
            metric(gradients(model, *table.minibatch(torch.tensor([t]), 0)))
            for t in range(len(table))
        ]
    )
    mean = grads.mean(0)
    return float(mean @ mean), float(((grads - mean) ** 2).sum(1).mean())


def test_estimate_matches_the_exact_noise_scale(noisy_problem):
    _, table, model = noisy_problem
    assert len(table) > 3000  # sampling without replacement: big batches are < 2% of the data
    grad_sq, trace_cov = exact_noise_scale(model, table)
    est = estimate_noise_scale(model, table, 0, small_batch=8, batches=8, repeats=150, seed=1)
    assert est.frames == 8 * 8 * 150
    assert est.trace_cov == pytest.approx(trace_cov, rel=0.1)
    assert est.grad_sq == pytest.approx(grad_sq, rel=0.2)
    assert est.noise_scale == pytest.approx(trace_cov / grad_sq, rel=0.2)
    assert 0 < est.stderr < 0.2 * est.noise_scale


def trained_ngsgd(model, table, steps: int = 12) -> tuple[DNN, NGSGD]:
    """A copy of ``model`` after ``steps`` NG-SGD steps, and its optimiser."""
    model = copy.deepcopy(model)
    opt = NGSGD(model, lr=0.05, rank_in=2, rank_out=2)
    assert not opt.estimates_ready
    for i in range(steps):
        x, y = table.minibatch(torch.arange(64 * i, 64 * (i + 1)), 0)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert opt.estimates_ready
    return model, opt


def test_natural_gradient_metric_matches_dense_preconditioners(noisy_problem):
    _, table, model = noisy_problem
    with pytest.raises(ValueError, match="not initialised"):
        natural_gradient_metric(model, NGSGD(copy.deepcopy(model), lr=0.1).preconditioners())
    trained, opt = trained_ngsgd(model, table)
    plain = DNN(trained.spec)
    plain.load_state_dict(trained.state_dict())
    grads = dict(
        zip(
            [n for n, _ in plain.named_parameters()],
            gradients(plain, *table.minibatch(torch.arange(100), 0)),
            strict=True,
        )
    )

    def dense_sqrt(pre):
        vals, vecs = torch.linalg.eigh(pre.beta * torch.linalg.inv(pre.smoothed_fisher()))
        return vecs @ torch.diag(vals.sqrt()) @ vecs.T

    expected = []
    for name, (pre_in, pre_out) in opt.preconditioners().items():
        full = torch.cat([grads[f"{name}.weight"], grads[f"{name}.bias"][:, None]], 1).double()
        scale = (pre_in.expected_gamma() * pre_out.expected_gamma()) ** 0.5
        expected.append(scale * (dense_sqrt(pre_out) @ full @ dense_sqrt(pre_in)).reshape(-1))
    metric = natural_gradient_metric(plain, opt.preconditioners())
    with DeviceAudit() as audit:  # the estimates went to the device when the metric was made
        for _ in range(3):
            torch.testing.assert_close(metric(tuple(grads.values())), torch.cat(expected))
    assert not [site for site in audit.transfers if "optim/fisher.py" in site], audit.transfers


def test_noise_scale_in_the_natural_gradient_metric(noisy_problem):
    """Both metrics from the same draws: the Euclidean one is estimate_noise_scale's, the NG one
    matches its exact per-frame value."""
    _, table, model = noisy_problem
    trained, opt = trained_ngsgd(model, table)
    plain = DNN(trained.spec)
    plain.load_state_dict(trained.state_dict())
    metric = natural_gradient_metric(plain, opt.preconditioners())
    draws = {"small_batch": 8, "batches": 8, "repeats": 150, "seed": 1}
    both = estimate_noise_scales(plain, table, 0, {"sgd": euclidean, "ng": metric}, **draws)
    assert both["sgd"] == estimate_noise_scale(plain, table, 0, **draws)
    grad_sq, trace_cov = exact_noise_scale(plain, table, metric)
    assert both["ng"].noise_scale == pytest.approx(trace_cov / grad_sq, rel=0.2)
    assert both["ng"].noise_scale != pytest.approx(both["sgd"].noise_scale, rel=1e-3)


def test_identical_frames_have_no_noise():
    n = 512
    table = FrameTable(
        feats=torch.ones(n, 2),
        targets=torch.zeros(n, dtype=torch.int64),
        start=torch.zeros(n, dtype=torch.int64),
        end=torch.full((n,), n),
        lengths=np.array([n]),
    )
    torch.manual_seed(0)
    model = DNN(DNNSpec(input_dim=2, context=0, hidden_layers=1, hidden_dim=4, num_classes=3))
    est = estimate_noise_scale(model, table, 0, small_batch=4, batches=4, repeats=3)
    assert abs(est.noise_scale) < 1e-6 and est.grad_sq > 0


def test_ceiling_formulas():
    assert efficiency_ceiling(2048, 1024, 1) == 1.0
    assert efficiency_ceiling(2048, 1024, 16) == pytest.approx(1.5 / 9)
    assert efficiency_ceiling(1e12, 1024, 32) == pytest.approx(1.0)  # pure noise: free scaling
    ceilings = [efficiency_ceiling(5000, 256, n) for n in (1, 2, 4, 8, 16)]
    assert ceilings == sorted(ceilings, reverse=True)
    for e, n in ((0.583, 16), (0.522, 32), (0.9, 2)):
        assert efficiency_ceiling(noise_scale_needed(e, 1024, n), 1024, n) == pytest.approx(e)
    n_half = workers_at_half_efficiency(8192, 1024)
    assert efficiency_ceiling(8192, 1024, n_half) == pytest.approx(0.5)


def test_command_prints_json_and_refuses_a_misfit(tmp_path, capsys):
    data = make_data_dir(tmp_path / "train", utts=20, dim=6, classes=4)
    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    save_model(good, DNN(DNNSpec(6, 1, 1, 16, 4)))
    save_model(bad, DNN(DNNSpec(5, 1, 1, 16, 4)))
    common = ["--data", str(data), "--small-batch", "16", "--batches", "4", "--repeats", "3"]
    assert main(["noise-scale", "--model", str(good), str(good), *common, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out) == 2 and out[0] == out[1]  # same model, same seed: the same draws
    assert out[0]["metric"] == "euclidean"
    ceiling = list(out[0]["efficiency_ceiling"].values())
    assert out[0]["noise_scale"] > 0 and ceiling[0] == 1.0 and ceiling == sorted(ceiling)[::-1]
    assert main(["noise-scale", "--model", str(good), *common]) == 0
    assert "gradient noise scale" in capsys.readouterr().out
    assert main(["noise-scale", "--model", str(bad), *common]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "feature dimension 6, the model expects 5" in err
    assert main(["noise-scale", "--model", str(good), *common[:2], "--batches", "999"]) == 2
    assert "fewer than one big batch" in capsys.readouterr().err
    # NG-SGD's metric as well: estimates warmed on the data, the same draws for both metrics
    assert main(["noise-scale", "--model", str(good), *common, "--ngsgd", "--json"]) == 0
    both = json.loads(capsys.readouterr().out)
    assert [r["metric"] for r in both] == ["euclidean", "ngsgd"] and both[0] == out[0]
    assert both[1]["noise_scale"] > 0 and both[1]["noise_scale"] != both[0]["noise_scale"]
    assert main(["noise-scale", "--model", str(good), *common, "--ngsgd"]) == 0
    assert "gradient noise scale in NG-SGD's metric" in capsys.readouterr().out
    assert main(["noise-scale", "--model", str(good), *common, "--ngsgd", "--ng-warmup", "0"]) == 2
    assert capsys.readouterr().err.strip().endswith("--ng-warmup must be >= 1, got 0")


def test_train_logs_the_noise_scale_without_changing_training(tmp_path, capsys):
    data = make_data_dir(tmp_path / "train", utts=60)
    runs = {}
    for name, extra in (
        ("plain", ["--cv-every", "4"]),
        ("noise", ["--cv-every", "4", "--noise-scale"]),
    ):
        out = tmp_path / name
        args = ["--data", str(data), "--out", str(out), "--in-process", "--workers", "1"]
        assert main(["train", *SMALL, *args, "--optimizer", "ngsgd", *extra]) == 0
        runs[name] = out
    records = [json.loads(line) for line in (runs["noise"] / "metrics.jsonl").open()]
    noisy = [r for r in records if r["kind"] in ("epoch", "cv")]
    assert len(noisy) >= 4 and all(r["noise_scale"] > 0 for r in noisy)  # epoch 0 included
    assert noisy[0]["epoch"] == 0
    # in NG-SGD's metric from the first validation after a step on
    assert "noise_scale_ng" not in noisy[0] and all(r["noise_scale_ng"] > 0 for r in noisy[1:])
    plain, noise = (torch.load(runs[k] / "final.pt")["state_dict"] for k in ("plain", "noise"))
    assert all(torch.equal(plain[k], noise[k]) for k in plain)
    small = tmp_path / "small"
    code = main(
        ["train", *SMALL, "--data", str(data), "--out", str(small), "--in-process"]
        + ["--workers", "4", "--noise-scale"]
    )
    assert code == 2 and "--noise-scale: a worker's shard holds" in capsys.readouterr().err
    assert not small.exists() or not any(small.iterdir())


def test_trajectory_ceiling_weights_each_stretch_by_its_frames():
    # constant B: the single-point ceiling
    assert trajectory_efficiency_ceiling([0, 10, 30], [4096] * 3, 1024, 8) == pytest.approx(
        efficiency_ceiling(4096, 1024, 8)
    )
    # 1 frame-unit between B = 512 and 1024 (counts at 1024: ceiling 2/(1+N)), then 3 up to
    # B = inf (ceiling 1); `until` cuts the second stretch to 1 unit
    n = 4
    got = trajectory_efficiency_ceiling([0, 1, 4], [512, 1024, float("inf")], 1024, n)
    assert got == pytest.approx(4 / ((1 + n) / 2 + 3))
    cut = trajectory_efficiency_ceiling([0, 1, 4], [512, 1024, float("inf")], 1024, n, until=2)
    assert cut == pytest.approx(2 / ((1 + n) / 2 + 1))
