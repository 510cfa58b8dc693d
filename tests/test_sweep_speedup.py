"""Speedup to accuracy on hand-made curves, the noise-scale ceilings, the noise plot, and the
time models against the paper's calibration."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from modelavg.analysis import timemodel as tm
from modelavg.analysis.calibration import calibration_report
from modelavg.sweep import plots
from modelavg.sweep.results import learning_curve, noise_curve
from modelavg.sweep.speedup import (
    add_noise_ceilings,
    frames_to_reach,
    priced,
    speedup_table,
    speedup_to_accuracy,
    time_only,
)
from modelavg.sweep.time_models import (
    TIME_MODEL_PRESETS,
    TimeModelSpec,
    seconds_function,
    syncs_at,
    time_model_specs,
)


def test_frames_to_reach_interpolates():
    frames, acc = [0, 100, 200], [0.1, 0.5, 0.7]
    assert frames_to_reach(frames, acc, 0.6) == pytest.approx(150.0)
    assert frames_to_reach(frames, acc, 0.5) == pytest.approx(100.0)
    assert frames_to_reach(frames, acc, 0.05) == 0.0
    assert frames_to_reach(frames, acc, 0.71) is None


def test_speedup_to_accuracy_by_hand():
    curves = {
        1: [([0, 100, 200], [0.2, 0.6, 0.8])],  # reference 0.8 -> target 0.795 at 197.5 frames
        2: [
            ([0, 50, 100, 150, 200], [0.2, 0.6, 0.7, 0.79, 0.81]),  # a longer budget: 175
            ([0, 50, 100, 150], [0.2, 0.7, 0.79, 0.8]),  # 100 + 0.005/0.01 * 50 = 125
        ],
        4: [([0, 25, 50], [0.2, 0.7, 0.79])],  # never reaches 0.795
    }
    rows = speedup_to_accuracy(curves, 0.8, lambda n, f, i: 2 * f + (10 if n > 1 else 0))
    by_n = {r["workers"]: r for r in rows}
    assert by_n[2]["run"] == 1 and by_n[1]["run"] == 0 and by_n[4]["run"] is None
    assert by_n[1]["target"] == pytest.approx(0.795)
    assert by_n[1]["frames_to_target"] == pytest.approx(197.5)
    assert by_n[2]["frames_to_target"] == pytest.approx(125.0)
    assert by_n[1]["speedup"] == pytest.approx(1.0)
    assert by_n[2]["time_s"] == pytest.approx(260.0)
    assert by_n[2]["speedup"] == pytest.approx(395.0 / 260.0)
    assert by_n[2]["efficiency"] == pytest.approx(395.0 / 260.0 / 2)
    assert by_n[2]["sample_efficiency"] == pytest.approx(197.5 / (2 * 125.0))
    assert by_n[4]["frames_to_target"] is None
    assert by_n[4]["speedup"] is None and by_n[4]["efficiency"] is None


def test_noise_ceiling_follows_the_reference_run_up_to_its_target():
    metrics = [
        {"kind": "start"},
        {"kind": "epoch", "epoch": 0, "cv_frame_accuracy": 0.2, "noise_scale": 100.0},
        {"kind": "cv", "frames_per_worker": 100, "cv_frame_accuracy": 0.6, "noise_scale": 400.0}
        | {"noise_scale_ng": 900.0},  # NG-SGD's metric: not before the first step
        {"kind": "epoch", "epoch": 1, "cv_frame_accuracy": 0.8, "noise_scale": 900.0}
        | {"noise_scale_ng": 1e12},
    ]
    assert noise_curve(metrics, 200) == ([0.0, 100.0, 200.0], [100.0, 400.0, 900.0])
    ng = noise_curve(metrics, 200, "noise_scale_ng")
    assert ng == ([0.0, 100.0, 200.0], [900.0, 900.0, 1e12])  # starts at frame 0
    curves = {1: [learning_curve(metrics, 200)], 2: [([0, 150], [0.2, 0.8])]}
    rows = speedup_to_accuracy(curves, 0.8, lambda n, f, i: f)  # N = 1 reaches 0.795 at 197.5
    ref = {"noise_curve": noise_curve(metrics, 200), "noise_curve_ng": ng, "minibatch": 100}
    add_noise_ceilings(rows, [ref])
    by_n = {r["workers"]: r for r in rows}
    assert by_n[1]["ceiling"] == pytest.approx(1.0)
    # stretches [0, 100) and [100, 197.5) at the larger end point's B: 400 and 900
    cost = 100 / ((1 + 0.25) / (1 + 0.5)) + 97.5 / ((1 + 1 / 9) / (1 + 2 / 9))
    assert by_n[2]["ceiling"] == pytest.approx(197.5 / cost)
    # NG metric: B = 900 up to frame 100, then ~no noise-limited loss (ceiling ~1)
    assert by_n[2]["ceiling_ng"] == pytest.approx(197.5 / (100 / (10 / 11) + 97.5), rel=1e-6)
    cell = {"minibatch": 100, "avg_every": 1, "parameters": 1000, "step_s": 0.01}
    used = seconds_function(
        TIME_MODEL_PRESETS["paper"], [cell | {"frames_per_worker_epoch": 200}], None
    )[1]
    table = speedup_table("t", rows, used)
    assert "| ceiling (noise scale) | ceiling (NG metric) |" in table
    assert f"| {by_n[2]['ceiling']:.1%} | {by_n[2]['ceiling_ng']:.1%} |" in table
    plain = speedup_to_accuracy(curves, 0.8, lambda n, f, i: f)
    add_noise_ceilings(plain, [{"noise_curve": ([], []), "minibatch": 100}])
    assert all("ceiling" not in r for r in plain)  # no noise scale logged: no column
    assert "ceiling" not in speedup_table("t", plain, used)


def test_noise_plot_draws_each_logged_curve(tmp_path, monkeypatch):
    """Both metrics of a run that logged them; frame 0 and an infinite B (no measurable
    gradient) left out of the log-log plot; a run without a curve adds nothing."""
    rows = [
        {
            "cell": "workers=1",
            "noise_curve": ([0.0, 100.0, 200.0, 300.0], [50.0, 400.0, 900.0, math.inf]),
            "noise_curve_ng": ([0.0, 100.0, 200.0], [900.0, 900.0, 2000.0]),
        },
        {"cell": "workers=2", "noise_curve": ([], []), "noise_curve_ng": ([], [])},
    ]
    save, lines = plots.save_figure, []

    def keep(fig, path):
        lines.extend((ln.get_label(), list(ln.get_xdata())) for ln in fig.axes[0].get_lines())
        return save(fig, path)

    monkeypatch.setattr(plots, "save_figure", keep)
    assert plots.plot_noise(rows, tmp_path / "noise_scale.png").stat().st_size > 0
    assert lines == [
        ("workers=1 (noise scale)", [100.0, 200.0]),
        ("workers=1 (NG metric)", [100.0, 200.0]),
    ]


def test_paper_time_model_reproduces_calibrated_speedup():
    """If N workers need exactly 1/N of the frames, speedup-to-accuracy is the time model's."""
    frames = tm.PAPER_FRAMES_PER_EPOCH
    group = [
        {
            "minibatch": 1024,
            "avg_every": 10,
            "parameters": tm.PAPER_MODEL_PARAMS,
            "step_s": 0.01,
            "frames_per_worker_epoch": frames,
        }
    ]
    spec = TimeModelSpec("paper", "paper", "paper", "paper", "paper")
    seconds, _ = seconds_function(spec, group, Path("g.yaml"))
    curves = {n: [([0.0, frames / n], [0.0, 1.0])] for n in tm.PAPER_GPUS}
    rows = speedup_to_accuracy(curves, 1.0, lambda n, f, i: seconds(n, f), drop=0.0)
    cal = calibration_report()
    for row, ref in zip(rows, cal.rows, strict=True):
        assert row["speedup"] == pytest.approx(ref["speedup_pred"], rel=1e-9)
    assert rows[4]["efficiency"] == pytest.approx(9.32 / 16, abs=0.03)  # the paper's 58% at 16
    for row in rows:  # 1/N of the frames each: all of the efficiency is the time model's
        assert row["sample_efficiency"] == pytest.approx(1.0)
        assert time_only(row) == pytest.approx(row["efficiency"])


def test_paper_hardware_drops_staging_and_overheads_only():
    """paper-hardware = the paper's step, bytes and fitted ring; no staging, no N > 1 overheads."""
    group = [
        {
            "minibatch": 1024,
            "avg_every": 10,
            "parameters": 1000,
            "step_s": 0.01,
            "frames_per_worker_epoch": 1e6,
        }
    ]
    specs = time_model_specs(["paper", "paper-hardware"], Path("g.yaml"))
    assert [m.name for m in specs] == ["paper", "paper-hardware"]
    paper, _ = seconds_function(specs[0], group, Path("g.yaml"))
    hardware, used = seconds_function(specs[1], group, Path("g.yaml"))
    cal = calibration_report()
    link = cal.link_fit.link
    assert used["link"].host_bandwidth_Bps is None and used["overhead"] == 0.0
    assert (
        used["link"].latency_s == link.latency_s
        and used["link"].bandwidth_Bps == link.bandwidth_Bps
    )
    frames = 1e6
    rounds = frames / (1024 * 10)
    ring = tm.allreduce_seconds(tm.PAPER_MODEL_BYTES, 16, link.latency_s, link.bandwidth_Bps)
    expected = frames / 1024 * cal.compute.step_seconds + rounds * ring
    assert hardware(16, frames) == pytest.approx(expected, rel=1e-12)
    assert hardware(16, frames) < paper(16, frames)
    assert hardware(1, frames) == pytest.approx(paper(1, frames), rel=1e-12)


def test_each_run_is_priced_by_its_own_averagings():
    """A warm-up's K = 1 syncs, group syncs and overlap change the modelled time; a run from
    before the counts were logged is priced at one averaging a round."""
    ref = {"minibatch": 1024, "avg_every": 10, "round_steps": 10, "parameters": 1000}
    ref |= {"step_s": 0.01, "frames_per_worker_epoch": 1e6}
    seconds, used = seconds_function(TIME_MODEL_PRESETS["paper-hardware"], [ref], Path("g.yaml"))
    old = {**ref, "sync_curve": ([], [], [])}
    warm = {**ref, "sync_curve": ([0.0, 5e5, 1e6], [0.0, 500.0, 549.0], [0.0, 0.0, 0.0])}
    two = {**ref, "group_size": 4, "sync_curve": ([0.0, 1e6], [0.0, 98.0], [0.0, 882.0])}
    over = {**ref, "averaging": "overlap", "sync_curve": ([0.0, 1e6], [0.0, 98.0], [0.0, 0.0])}
    assert syncs_at(old, 1e6) == tm.Syncs(1e6 / 10240)
    assert syncs_at(warm, 7.5e5) == tm.Syncs(524.5)
    assert syncs_at(two, 5e5) == tm.Syncs(49.0, 441.0, 4)
    fly = {**ref, "averaging": "butterfly", "sync_curve": ([0.0, 1e6], [0.0, 98.0], [0.0, 0.0])}
    t = priced(seconds, {16: [old, warm, two, over, fly]})
    link, step = used["link"], used["step_s"]
    ar16, ar4 = (link.allreduce_seconds(used["model_bytes"], n) for n in (16, 4))
    compute = 1e6 / 1024 * step
    assert t(16, 1e6, 0) == pytest.approx(compute + 1e6 / 10240 * ar16, rel=1e-12)
    assert t(16, 1e6, 1) == pytest.approx(compute + 549 * ar16, rel=1e-12)
    assert t(16, 1e6, 2) == pytest.approx(compute + 98 * ar16 + 882 * ar4, rel=1e-12)
    assert t(16, 1e6, 3) == pytest.approx(compute + 98 * max(0, ar16 - 10 * step), rel=1e-12)
    assert t(16, 1e6, 3) < t(16, 1e6, 0) < t(16, 1e6, 1)
    exchange = link.exchange_seconds(used["model_bytes"])
    assert t(16, 1e6, 4) == pytest.approx(compute + 98 * exchange, rel=1e-12)
