"""``modelavg demo``: the README's main command, end to end on real speech.

Prepares the Asterisk/pocketsphinx senone corpus if absent, trains a DNN acoustic model with
2 gloo worker processes averaging every 10 minibatches, evaluates on ``test/`` (same speaker) and
``test_other/`` (another speaker), and writes ``report.md`` with PNG plots beside it.

Example::

    modelavg demo --workers 2 --out exp/demo
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from modelavg import launch, report
from modelavg.config import TrainConfig, validate
from modelavg.errors import UsageError
from modelavg.evaluate import evaluate_data_dir, format_result
from modelavg.io import read_jsonl
from modelavg.nets.dnn import load_model
from modelavg.train import train

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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default="data/demo", help="demo corpus (built if absent)")
    p.add_argument("--out", default="exp/demo", help="run directory (default: exp/demo)")
    p.add_argument("--workers", type=int, default=2, help="workers (default: 2 processes)")
    p.add_argument("--in-process", action="store_true", help="logical workers in one process")
    p.add_argument("--epochs", type=int, help="override the demo's number of epochs")


def run(args: argparse.Namespace) -> int:
    """Prepare, train (through the one launch path), evaluate, report.

    Spawned workers re-run this command and only train; the process that spawned them (or, under
    torchrun/mpirun/srun, rank 0) evaluates and writes the report.
    """
    t0 = time.time()
    data, run_dir = Path(args.data_dir), Path(args.out)
    penv = launch.detect()
    if not (data / "train" / "feats.scp").exists():
        if penv is not None:
            raise UsageError(f"--data-dir {data}: not prepared; run modelavg prepare-demo first")
        from modelavg.corpora.asterisk import prepare_demo

        prepare_demo(data)
    prepared = time.time()
    if penv is None:
        clear_previous(run_dir)
    cfg = demo_config(data, run_dir, args.workers, args.in_process, args.epochs)
    code = launch.run_job(cfg, args.argv, train)
    reports = penv is None or (penv.launcher != "spawn" and penv.rank == 0)
    if code or not reports:
        return code
    trained = time.time()
    model = load_model(run_dir / "final.pt")
    results = {}
    for split in ("test", "test_other"):
        results[split] = evaluate_data_dir(
            model, data / split, class_map=data, train_dir=data / "train"
        )
        print(format_result(split, results[split]))
    times = {"prepare_s": prepared - t0, "train_s": trained - prepared, "total_s": time.time() - t0}
    report = write_report(run_dir, cfg, results, times)
    print(
        f"\nreport: {report}\nplots:  {', '.join(str(p) for p in sorted(run_dir.glob('*.png')))}"
        f"\nmodel:  {run_dir / 'final.pt'}\nlog:    {run_dir / 'metrics.jsonl'}"
    )
    return 0


def demo_config(
    data: Path, out: Path, workers: int, in_process: bool, epochs: int | None
) -> TrainConfig:
    """The demo's recipe on the prepared corpus; every senone of the class map is an output,
    also those seen only in test_other."""
    classes = len((data / "classes.txt").read_text().splitlines())
    options = {**DEMO_OPTIONS, "num_classes": classes, **({"epochs": epochs} if epochs else {})}
    return validate(
        TrainConfig(
            data=str(data / "train"),
            cv=str(data / "cv"),
            out=str(out),
            workers=workers,
            in_process=in_process,
            **options,
        )
    )


def write_report(run_dir: Path, cfg: TrainConfig, results: dict, times: dict) -> Path:
    """report.md: what ran, how long, accuracies beside their baselines, then ``modelavg
    report``'s tables and plots of the run."""
    start = next(r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "start")

    def pct(r: dict, key: str) -> str:
        return f"{100 * r[key]:.2f}%" if key in r else ""

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
    preamble = f"""# modelavg demo report

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
bigram from the training alignments, against the aligned reference phones."""
    return report.write_report([run_dir], preamble=preamble)
