"""``modelavg demo``: the README's main command, end to end on real speech.

Prepares the Asterisk/pocketsphinx senone corpus if absent, trains a DNN acoustic model with
2 gloo worker processes averaging every 10 minibatches, evaluates on ``test/`` (same speaker),
``cv/`` and ``test_other/`` (another speaker), decodes them to words through the en-us bigram
graph (``modelavg make-graph``, built once into ``<data-dir>/lang_enus`` in a second process
while the model trains; the acoustic scale is chosen on cv), and writes ``report.md`` with PNG
plots beside it.

Example::

    modelavg demo --workers 2 --out exp/demo
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from modelavg import launch, report
from modelavg.config import TrainConfig, validate
from modelavg.decoding.decode import decode_data_dir, tune_acwt
from modelavg.decoding.graph import load_graph
from modelavg.decoding.wer import WER_KEYS, format_wer
from modelavg.errors import ModelavgError, UsageError
from modelavg.evaluate import evaluate_data_dir, format_result
from modelavg.io import read_jsonl
from modelavg.nets.dnn import load_model
from modelavg.train import train

# The demo's recipe: chosen so the whole run, graph and decoding included, fits in 10 minutes
# on 2 CPU cores. ReLU units: 6-7 points lower test WER than sigmoid ones at the same cost
# (docs/RESULTS.md, "Word error rate").
DEMO_OPTIONS = {
    "hidden_layers": 3,
    "hidden_dim": 512,
    "activation": "relu",
    "optimizer": "ngsgd",
    "lr": 1.0,
    "schedule": "exponential",
    "final_lr_ratio": 0.1,
    "epochs": 8,
    "minibatch": 256,
    "avg_every": 10,
    "context": 5,
}
SPLITS = ("test", "cv", "test_other")
GRAPH_NAME = "lang_enus"  # the en-us bigram graph, beside the corpus's splits


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
    p.add_argument(
        "--graph",
        help="decoding graph dir from modelavg make-graph (default: the en-us bigram graph in "
        "DATA_DIR/lang_enus, built if absent)",
    )
    p.add_argument("--no-wer", action="store_true", help="skip the graph and the word decode")


def run(args: argparse.Namespace) -> int:
    """Prepare, train (through the one launch path), evaluate, decode, report.

    Spawned workers re-run this command and only train; the process that spawned them (or, under
    torchrun/mpirun/srun, rank 0) builds the graph, evaluates, decodes and writes the report.
    """
    t0 = time.time()
    data, run_dir = Path(args.data_dir), Path(args.out)
    penv = launch.detect()
    reports = penv is None or (penv.launcher != "spawn" and penv.rank == 0)
    decodes = reports and not args.no_wer
    if decodes and args.graph:
        load_graph(args.graph, need_fst=False)  # a bad --graph fails before anything runs
    if not (data / "train" / "feats.scp").exists():
        if penv is not None:
            raise UsageError(f"--data-dir {data}: not prepared; run modelavg prepare-demo first")
        from modelavg.corpora.asterisk import prepare_demo

        prepare_demo(data)
    prepared = time.time()
    if penv is None:
        clear_previous(run_dir)
    cfg = demo_config(data, run_dir, args.workers, args.in_process, args.epochs)
    graph_dir = Path(args.graph) if args.graph else data / GRAPH_NAME
    builder = start_graph_build(data, graph_dir) if decodes and not args.graph else None
    try:
        code = launch.run_job(cfg, args.argv, train)
    except BaseException:
        stop(builder)
        raise
    if code or not reports:
        stop(builder)
        return code
    trained = time.time()
    model = load_model(run_dir / "final.pt")
    results = {}
    for split in SPLITS:
        results[split] = evaluate_data_dir(
            model, data / split, class_map=data, train_dir=data / "train"
        )
        print(format_result(split, results[split]))
    times = {"prepare_s": prepared - t0, "train_s": trained - prepared}
    graph = None
    if decodes:
        evaluated = time.time()
        if builder is not None:
            finish_graph_build(builder, graph_dir)
        times["graph_wait_s"] = time.time() - evaluated
        graph = decode_splits(run_dir / "final.pt", data, graph_dir, run_dir, results)
    times["total_s"] = time.time() - t0
    report = write_report(run_dir, cfg, results, times, graph)
    print(
        f"\nreport: {report}\nplots:  {', '.join(str(p) for p in sorted(run_dir.glob('*.png')))}"
        f"\nmodel:  {run_dir / 'final.pt'}\nlog:    {run_dir / 'metrics.jsonl'}"
    )
    return 0


def start_graph_build(data: Path, graph_dir: Path) -> subprocess.Popen:
    """``modelavg make-graph`` of the en-us bigram graph in a second process, so it builds while
    the model trains (a few seconds when the graph is up to date); its output goes to
    ``<graph_dir>.log``."""
    log = graph_dir.parent / f"{graph_dir.name}.log"
    print(f"building the decoding graph {graph_dir} while training (log: {log})")
    cmd = [sys.executable, "-m", "modelavg", "make-graph", "--data", str(data), "--lm", "en-us"]
    with open(log, "w") as out:
        return subprocess.Popen(
            [*cmd, "--out", str(graph_dir)], stdout=out, stderr=subprocess.STDOUT
        )


def stop(builder: subprocess.Popen | None) -> None:
    """Interrupt a graph build: make-graph removes its half-built directory on the way out."""
    if builder is not None and builder.poll() is None:
        builder.send_signal(signal.SIGINT)


def finish_graph_build(builder: subprocess.Popen, graph_dir: Path) -> None:
    """Wait for the graph; its failure is one line naming the log."""
    log = graph_dir.parent / f"{graph_dir.name}.log"
    if builder.poll() is None:
        print(f"waiting for the decoding graph {graph_dir} (log: {log})")
    if builder.wait():
        lines = log.read_text(errors="replace").strip().splitlines() or ["no output"]
        raise ModelavgError(f"make-graph {graph_dir} failed: {lines[-1][-300:]} (see {log})")


def decode_splits(model: Path, data: Path, graph_dir: Path, run_dir: Path, results: dict) -> dict:
    """Word error rates added to ``results``: the acoustic scale with the lowest cv WER
    (``tune_acwt``), then test and test_other at that scale; hypotheses in
    ``run_dir/decode_<split>``. Returns the graph's record and the cv WER of each scale."""
    graph = load_graph(graph_dir)
    jobs = min(os.cpu_count() or 1, 8)
    acwt, tuned = tune_acwt(model, data / "cv", graph, run_dir / "decode_cv", jobs=jobs)
    decoded = {"cv": tuned[acwt]}
    for split in ("test", "test_other"):
        decoded[split] = decode_data_dir(
            model, data / split, graph, acwt=acwt, jobs=jobs, out_dir=run_dir / f"decode_{split}"
        )
    for split in SPLITS:
        results[split].update({k: decoded[split][k] for k in WER_KEYS}, acwt=acwt)
        print(format_wer(f"{split} words (acwt {acwt:g})", decoded[split]))
    return {**graph.meta, "dir": str(graph_dir), "cv_wer": {a: r["wer"] for a, r in tuned.items()}}


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


def write_report(
    run_dir: Path, cfg: TrainConfig, results: dict, times: dict, graph: dict | None
) -> Path:
    """report.md: what ran, how long, accuracies beside their baselines, word error rates, then
    ``modelavg report``'s tables and plots of the run."""
    start = next(r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "start")

    def pct(r: dict, key: str) -> str:
        return f"{100 * r[key]:.2f}%" if key in r else ""

    def wer(r: dict) -> str:
        return f"{pct(r, 'wer')} ({r['ins']}/{r['del']}/{r['sub']} of {r['words']})" if r else ""

    rows = [
        "| split | frames | senone acc | chance | majority | phone acc | phone majority | PER "
        "| WER (ins/del/sub of words) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for split, r in results.items():
        rows.append(
            f"| {split} | {r['frames']} | {pct(r, 'frame_accuracy')} | "
            f"{pct(r, 'chance_accuracy')} | {pct(r, 'majority_accuracy')} | "
            f"{pct(r, 'phone_frame_accuracy')} | {pct(r, 'phone_majority_accuracy')} | "
            f"{pct(r, 'phone_error_rate')} | {wer(r if 'wer' in r else {})} |"
        )
    words = "WER: not measured (`--no-wer`)."
    if graph is not None:
        scales = ", ".join(f"{a:g}: {100 * w:.2f}%" for a, w in graph["cv_wer"].items())
        words = (
            f"WER: word decode (`modelavg decode`) through `{graph['dir']}` ({graph['words']:,} "
            f"words, HCLG {graph['hclg_states']:,} states), acoustic scale "
            f"{results['cv']['acwt']:g}: the lowest cv WER of {scales}."
        )
    after = times["total_s"] - times["prepare_s"] - times["train_s"]
    wait = (
        f", {times['graph_wait_s']:.0f} s of it waiting for the graph"
        if "graph_wait_s" in times
        else ""
    )
    preamble = f"""# modelavg demo report

Real speech (Asterisk English prompts, one speaker; `test_other`: LibriVox, another speaker),
senone targets from a pocketsphinx GMM-HMM forced alignment. DNN {start["parameters"]:,}
parameters: {cfg.hidden_layers}x{cfg.hidden_dim} {cfg.activation}, input +-{cfg.context} frames,
{start["num_classes"]} senone classes; optimiser {cfg.optimizer}, lr {cfg.lr} per worker
({cfg.lr_scaling} scaling), {cfg.schedule} schedule, minibatch {cfg.minibatch}.
{start["workers"]} workers ({start["processes"]} processes), averaging every {cfg.avg_every}
minibatches, {start["rounds_per_epoch"]} averaging rounds per epoch.

Time: data preparation {times["prepare_s"]:.0f} s, training {times["train_s"]:.0f} s, evaluation
and word decoding {after:.0f} s{wait}; total {times["total_s"]:.0f} s.

## Test results

{chr(10).join(rows)}

Chance = 1/classes; majority = always guessing the most frequent training label. PER: Viterbi
decoding of phone posteriors (summed senone posteriors over priors) with a frame-level phone
bigram from the training alignments, against the aligned reference phones. {words}"""
    return report.write_report([run_dir], preamble=preamble)
