"""``modelavg demo``: the README's main command, end to end on real speech.

Prepares the Asterisk/pocketsphinx senone corpus if absent, trains a DNN acoustic model with
2 gloo worker processes averaging every 10 minibatches, evaluates on ``test/`` (same speaker) and
``test_other/`` (another speaker), and writes ``report.md`` with PNG plots beside it.

Example::

    run_demo(data_dir="data/demo", out="exp/demo", workers=2)
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import yaml

from modelavg.config import TrainConfig, validate
from modelavg.errors import UsageError

# The demo's recipe: chosen so the whole run fits in about 10 minutes on 2 CPU cores.
DEMO_OPTIONS = {
    "hidden_layers": 3,
    "hidden_dim": 512,
    "activation": "sigmoid",
    "optimizer": "ngsgd",
    "lr": 1.0,
    "schedule": "exponential",
    "final_lr_ratio": 0.1,
    "epochs": 8,
    "minibatch": 256,
    "avg_every": 10,
    "context": 5,
}


def clear_previous(out: Path) -> None:
    """Remove an earlier demo run in ``out`` (only a directory that holds a modelavg run)."""
    if not out.exists():
        return
    if not (out / "config.yaml").exists():
        raise UsageError(f"--out {out}: exists and is not a modelavg run; choose another")
    print(f"replacing the earlier demo run in {out}")
    shutil.rmtree(out)


def train_demo(cfg: TrainConfig) -> None:
    """Train with real worker processes (or in-process when asked), like ``modelavg train``."""
    from modelavg import launch
    from modelavg.cli import run_training

    if cfg.in_process or (cfg.workers or 1) == 1:
        run_training(cfg, None)
        return
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        yaml.safe_dump(asdict(cfg), fh)
    try:
        code = launch.spawn_local(["train", "--config", fh.name], cfg.workers)
    finally:
        Path(fh.name).unlink(missing_ok=True)
    if code != 0:
        raise UsageError(f"demo training failed (exit code {code})")


def run_demo(
    data_dir: str = "data/demo",
    out: str = "exp/demo",
    workers: int = 2,
    in_process: bool = False,
    overrides: dict | None = None,
) -> Path:
    """Prepare, train, evaluate, report. Returns the report path."""
    from modelavg.evaluate import evaluate_data_dir, format_result
    from modelavg.nets.dnn import load_model

    t0 = time.time()
    data, run_dir = Path(data_dir), Path(out)
    if not (data / "train" / "feats.scp").exists():
        from modelavg.corpora.asterisk import prepare_demo

        prepare_demo(data)
    prepared = time.time()
    clear_previous(run_dir)
    # every senone of the class map is an output, also those seen only in test_other
    classes = len((data / "classes.txt").read_text().splitlines())
    options = {**DEMO_OPTIONS, "num_classes": classes, **(overrides or {})}
    cfg = validate(
        TrainConfig(
            data=str(data / "train"),
            cv=str(data / "cv"),
            out=str(run_dir),
            workers=workers,
            in_process=in_process,
            **options,
        )
    )
    train_demo(cfg)
    trained = time.time()

    model = load_model(run_dir / "final.pt")
    results = {}
    for split in ("test", "test_other"):
        results[split] = evaluate_data_dir(
            model, data / split, class_map=data, train_dir=data / "train"
        )
        print(format_result(split, results[split]))
    report = write_report(
        run_dir,
        cfg,
        results,
        {"prepare_s": prepared - t0, "train_s": trained - prepared, "total_s": time.time() - t0},
    )
    print(
        f"\nreport: {report}\nplots:  {', '.join(str(p) for p in sorted(run_dir.glob('*.png')))}"
        f"\nmodel:  {run_dir / 'final.pt'}\nlog:    {run_dir / 'metrics.jsonl'}"
    )
    return report


def write_report(run_dir: Path, cfg: TrainConfig, results: dict, times: dict) -> Path:
    """report.md: what ran, how long, accuracies beside their baselines, the plots."""
    from modelavg.io import atomic_write_bytes
    from modelavg.report import epoch_table, load_metrics, plot_run

    plot_run(run_dir, title=f"{cfg.workers} workers, K={cfg.avg_every}")
    metrics = load_metrics(run_dir)
    start = next(m for m in metrics if m["kind"] == "start")

    def pct(r: dict, key: str) -> str:
        return f"{100 * r[key]:.2f}%" if key in r else "n/a"

    rows = [
        "| split | frames | senone acc | chance | majority | phone acc | phone majority | PER |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for split, r in results.items():
        rows.append(
            f"| {split} | {r['frames']} | {pct(r, 'frame_accuracy')} | "
            f"{pct(r, 'chance_accuracy')} | {pct(r, 'majority_accuracy')} | "
            f"{pct(r, 'phone_frame_accuracy')} | {pct(r, 'phone_majority_accuracy')} | "
            f"{pct(r, 'phone_error_rate')} |"
        )
    text = f"""# modelavg demo report

Real speech (Asterisk English prompts, one speaker; `test_other`: LibriVox, another speaker),
senone targets from a pocketsphinx GMM-HMM forced alignment. DNN {start["parameters"]:,}
parameters: {cfg.hidden_layers}x{cfg.hidden_dim} {cfg.activation}, input +-{cfg.context} frames,
{start["num_classes"]} senone classes; optimiser {cfg.optimizer}, lr {cfg.lr} per worker
({cfg.lr_scaling} scaling), {cfg.schedule} schedule, minibatch {cfg.minibatch}.
{start["workers"]} workers ({start["processes"]} processes), averaging every {cfg.avg_every}
minibatches, {start["rounds_per_epoch"]} averaging rounds per epoch.

Time: data preparation {times["prepare_s"]:.0f} s, training {times["train_s"]:.0f} s,
total {times["total_s"]:.0f} s.

## Test results

{chr(10).join(rows)}

Chance = 1/classes; majority = always guessing the most frequent training label. PER: Viterbi
decoding of phone posteriors (summed senone posteriors over priors) with a frame-level phone
bigram from the training alignments, against the aligned reference phones.

## Training

{epoch_table(metrics)}

![CV accuracy and loss](cv.png) ![learning rate](lr.png) ![averaging share](averaging.png)
"""
    path = run_dir / "report.md"
    atomic_write_bytes(text.encode(), path)
    return path
