"""The ``modelavg`` command: parse options, call one function per sub-command.

Bad input ends in one line on stderr (``modelavg: error: ...``) and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from modelavg.config import TrainConfig, config_fields, load_config
from modelavg.errors import ModelavgError, UsageError


class Parser(argparse.ArgumentParser):
    """argparse, but errors are one line and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog.split()[-1]}: {message}")


def _type(annotation: str) -> type:
    for name, kind in (("bool", bool), ("int", int), ("float", float)):
        if annotation.split(" | ")[0] == name:
            return kind
    return str


def add_config_options(parser: argparse.ArgumentParser, fields_: list) -> None:
    """One option per config dataclass field; defaults stay in the dataclass (SUPPRESS here)."""
    parser.add_argument("--config", help="YAML file of options (the command line overrides it)")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields_:
        group = groups.setdefault(
            f.metadata["group"], parser.add_argument_group(f.metadata["group"])
        )
        flag = "--" + f.name.replace("_", "-")
        kind = _type(str(f.type))
        help_ = f"{f.metadata['help']} (default: {f.default})"
        if kind is bool:
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_
            )
        else:
            group.add_argument(
                flag,
                type=kind,
                default=argparse.SUPPRESS,
                help=help_,
                choices=f.metadata.get("choices"),
                metavar=f.name.upper(),
            )


def given(args: argparse.Namespace, fields_: list) -> dict:
    """The options given on the command line (the rest keep their config/default values)."""
    names = {f.name for f in fields_}
    return {k: v for k, v in vars(args).items() if k in names}


def train_config(args: argparse.Namespace) -> TrainConfig:
    overrides = given(args, config_fields())
    config = args.config
    if overrides.get("resume") and config is None and "out" in overrides:
        saved = Path(overrides["out"]) / "config.yaml"  # resume with the run's own options
        config = saved if saved.exists() else None
    return load_config(config, overrides)


def check_out_dir(cfg: TrainConfig) -> None:
    """Refuse a missing, unwritable or already used --out before any work starts."""
    if cfg.out is None:
        raise UsageError("--out is required")
    out = Path(cfg.out)
    has_run = (out / "checkpoints" / "LATEST").exists()
    if cfg.resume and not has_run:
        raise UsageError(f"--resume: no checkpoint in {out / 'checkpoints'}")
    if not cfg.resume and has_run:
        raise UsageError(f"--out {out} already holds a run: pass --resume or choose another")
    parent = out if out.exists() else next(p for p in out.absolute().parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"--out {out}: not a writable directory")


def restarted_with_checkpoint(cfg: TrainConfig) -> bool:
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    return restarts > 0 and cfg.out is not None and (Path(cfg.out) / "checkpoints/LATEST").exists()


def cmd_train(args: argparse.Namespace, argv: list[str]) -> int:
    from modelavg import launch

    cfg = train_config(args)
    if restarted_with_checkpoint(cfg):
        cfg.resume = True  # torchrun --max-restarts restarted us: continue from the checkpoint
    check_out_dir(cfg)
    penv = launch.detect()
    if penv is None and not cfg.in_process and (cfg.workers or 1) > 1:
        return launch.spawn_local(argv, cfg.workers)
    run_training(cfg, penv)
    return 0


def run_training(cfg: TrainConfig, penv) -> dict:
    from modelavg import launch
    from modelavg.train import train

    with launch.joined(cfg, penv) as comm:
        result = train(cfg, comm)
    if comm.is_main:
        print(
            f"final: cv loss {result['cross_entropy']:.4f}, cv frame accuracy "
            f"{100 * result['frame_accuracy']:.2f}% on {result['frames']} frames; "
            f"model {Path(cfg.out) / 'final.pt'}",
            flush=True,
        )
    return result


def cmd_pretrain(args: argparse.Namespace, argv: list[str]) -> int:
    from modelavg import launch
    from modelavg.pretrain import (
        check_out_dir,
        load_pretrain_config,
        pretrain_config_fields,
        run_pretraining,
    )

    cfg = load_pretrain_config(args.config, given(args, pretrain_config_fields()))
    check_out_dir(cfg)
    penv = launch.detect()
    if penv is None and not cfg.in_process and (cfg.workers or 1) > 1:
        return launch.spawn_local(argv, cfg.workers)
    run_pretraining(cfg, penv)
    return 0


def cmd_eval(args: argparse.Namespace, argv: list[str]) -> int:
    from modelavg.evaluate import evaluate_data_dir, format_result
    from modelavg.nets.dnn import load_model

    data = Path(args.data)
    class_map = args.class_map
    if class_map is None and (data.parent / "classes.txt").exists():
        class_map = data.parent
    train_dir = args.train_data
    if train_dir is None and class_map is not None and (data.parent / "train").is_dir():
        train_dir = data.parent / "train"
    result = evaluate_data_dir(
        load_model(args.model), data, args.feats, args.targets, class_map, train_dir
    )
    print(json.dumps(result) if args.json else format_result(str(data), result))
    return 0


def cmd_noise_scale(args: argparse.Namespace, argv: list[str]) -> int:
    import torch

    from modelavg.analysis import noise
    from modelavg.evaluate import read_labelled_table
    from modelavg.nets.dnn import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for path in args.model:
        model = load_model(path)
        _, table = read_labelled_table(model, args.data, args.feats, args.targets)
        context = model.spec.context
        metrics = {"euclidean": noise.euclidean}
        if args.ngsgd:
            metrics["ngsgd"] = noise.warmed_natural_gradient_metric(
                model, table, context, args.minibatch, args.ng_warmup, args.seed
            )
        ests = noise.estimate_noise_scales(
            model, table, context, metrics, args.small_batch, args.batches, args.repeats, args.seed
        )
        for metric, est in ests.items():
            results.append(noise.report(path, est, args.minibatch, args.workers, metric))
            if not args.json:
                print(noise.format_report(results[-1]), flush=True)
    if args.json:
        print(json.dumps(results))
    return 0


def cmd_demo(args: argparse.Namespace, argv: list[str]) -> int:
    from modelavg.demo import run_demo

    overrides = {"epochs": args.epochs} if args.epochs else {}
    run_demo(args.data_dir, args.out, args.workers, args.in_process, overrides)
    return 0


def cmd_sweep(args: argparse.Namespace, argv: list[str]) -> int:
    from modelavg.sweep import main as sweep_main

    return sweep_main(args)


def cmd_prepare_demo(args: argparse.Namespace, argv: list[str]) -> int:
    from modelavg.corpora.asterisk import prepare_demo

    prepare_demo(args.out, max_utts=args.max_utts, seed=args.seed)
    return 0


def cmd_prepare_synthetic(args: argparse.Namespace, argv: list[str]) -> int:
    from modelavg.corpora.synthetic import prepare_synthetic

    prepare_synthetic(
        args.out,
        num_utts=args.utts,
        seed=args.seed,
        jobs=args.jobs,
        context_classes=args.context_classes,
    )
    return 0


def cmd_prepare_unlabelled(args: argparse.Namespace, argv: list[str]) -> int:
    from modelavg.corpora.unlabelled import prepare_unlabelled

    prepare_unlabelled(args.out, tuple(args.langs), max_utts=args.max_utts)
    return 0


def cmd_prepare_fashion(args: argparse.Namespace, argv: list[str]) -> int:
    from modelavg.corpora.fashion import prepare_fashion

    prepare_fashion(args.out, utt_size=args.utt_size, seed=args.seed, max_images=args.max_images)
    return 0


def build_parser() -> tuple[Parser, dict[str, Callable]]:
    parser = Parser(prog="modelavg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    handlers: dict[str, Callable] = {}

    p = sub.add_parser("train", help="train a DNN with periodic model averaging")
    add_config_options(p, config_fields())
    handlers["train"] = cmd_train

    from modelavg.pretrain import pretrain_config_fields

    p = sub.add_parser("pretrain", help="RBM (DBN) pretraining with periodic model averaging")
    add_config_options(p, pretrain_config_fields())
    handlers["pretrain"] = cmd_pretrain

    p = sub.add_parser("eval", help="frame accuracy and cross-entropy of a model on a data dir")
    p.add_argument("--model", required=True, help="model file (final.pt)")
    p.add_argument("--data", required=True, help="data directory with feats.scp, targets.scp")
    p.add_argument("--feats", help="override feats.scp (path or rspecifier)")
    p.add_argument("--targets", help="override targets.scp (path or rspecifier)")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object")
    p.add_argument(
        "--class-map",
        help="directory with classes.txt and phones.txt for phone "
        "accuracy and PER (default: the parent of --data, if it has them)",
    )
    p.add_argument(
        "--train-data",
        help="training data dir for the majority-class baseline and "
        "the phone bigram (default: the sibling train/ of --data with a class map)",
    )
    handlers["eval"] = cmd_eval

    p = sub.add_parser(
        "noise-scale",
        help="gradient noise scale of a model on a data dir: how many workers x minibatch the "
        "task can use (McCandlish et al. 2018)",
    )
    p.add_argument("--model", required=True, nargs="+", help="model file(s), e.g. final.pt")
    p.add_argument("--data", required=True, help="data directory with feats.scp, targets.scp")
    p.add_argument("--feats", help="override feats.scp (path or rspecifier)")
    p.add_argument("--targets", help="override targets.scp (path or rspecifier)")
    p.add_argument(
        "--minibatch", type=int, default=256, help="the training minibatch to predict for"
    )
    p.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[1, 2, 4, 8, 16, 32, 64],
        help="worker counts to predict for",
    )
    from modelavg.analysis import noise

    p.add_argument(
        "--small-batch", type=int, default=noise.SMALL_BATCH, help="frames per small gradient"
    )
    p.add_argument("--batches", type=int, default=noise.BATCHES, help="small gradients per big one")
    p.add_argument(
        "--repeats", type=int, default=noise.REPEATS, help="big gradients (for the error)"
    )
    p.add_argument(
        "--ngsgd",
        action="store_true",
        help="also in NG-SGD's metric (Fisher estimates warmed on the data, default ranks)",
    )
    p.add_argument(
        "--ng-warmup",
        type=int,
        default=noise.NG_WARMUP,
        help="minibatches of --minibatch frames that warm NG-SGD's estimates",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the frame draws")
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument(
        "--json", action="store_true", help="print one JSON list, one entry per model and metric"
    )
    handlers["noise-scale"] = cmd_noise_scale

    p = sub.add_parser(
        "demo",
        help="prepare the real speech demo, train with 2 workers, evaluate, write a report "
        "(the README's main command)",
    )
    p.add_argument("--data-dir", default="data/demo", help="demo corpus (built if absent)")
    p.add_argument("--out", default="exp/demo", help="run directory (default: exp/demo)")
    p.add_argument("--workers", type=int, default=2, help="workers (default: 2 processes)")
    p.add_argument("--in-process", action="store_true", help="logical workers in one process")
    p.add_argument("--epochs", type=int, help="override the demo's number of epochs")
    handlers["demo"] = cmd_demo

    p = sub.add_parser(
        "prepare-demo",
        help="build the real speech demo corpus (Asterisk prompts "
        "forced-aligned to senones with pocketsphinx)",
    )
    p.add_argument("--out", default="data/demo", help="output directory (default: data/demo)")
    p.add_argument("--max-utts", type=int, help="process only this many prompts (for tests)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/cv/test split")
    handlers["prepare-demo"] = cmd_prepare_demo

    p = sub.add_parser("prepare-fashion", help="Fashion-MNIST (Debian package) as Kaldi data dirs")
    p.add_argument("--out", default="data/fashion", help="output directory (default: data/fashion)")
    p.add_argument("--utt-size", type=int, default=100, help="images per utterance")
    p.add_argument("--max-images", type=int, help="cap the number of images (for tests)")
    p.add_argument("--seed", type=int, default=0, help="seed of the cv hold-out")
    handlers["prepare-fashion"] = cmd_prepare_fashion

    p = sub.add_parser(
        "prepare-synthetic",
        help="synthetic speech (festival) with exact phone-state targets, any size, for scale "
        "studies",
    )
    p.add_argument("--out", default="data/synthetic", help="output directory")
    p.add_argument(
        "--utts",
        type=int,
        default=12000,
        help="sentences (~365 frames each; default 12000: 3.5M training frames, ~2 min)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the text, voice, channel, split")
    p.add_argument("--jobs", type=int, default=2, help="festival processes in parallel")
    p.add_argument(
        "--context-classes",
        type=int,
        default=0,
        help="targets: this many classes of tied triphone states, the most frequent ones "
        "besides every phone state (like the paper's senones); default 0: phone states only",
    )
    handlers["prepare-synthetic"] = cmd_prepare_synthetic
    p = sub.add_parser(
        "prepare-unlabelled",
        help="features only (no labels) from the Asterisk prompts in other languages, "
        "for modelavg pretrain",
    )
    p.add_argument("--out", default="data/unlabelled", help="output data directory")
    p.add_argument("--langs", nargs="+", default=["es", "fr", "it", "ru"], help="languages")
    p.add_argument("--max-utts", type=int, help="cap the number of prompts (for tests)")
    handlers["prepare-unlabelled"] = cmd_prepare_unlabelled

    from modelavg import sweep

    p = sub.add_parser("sweep", help="run a grid of training runs: results table, plots, speedup")
    sweep.add_arguments(p)
    handlers["sweep"] = cmd_sweep
    return parser, handlers


def help_markdown() -> str:
    """docs/CLI.md: every command's --help (kept in sync by a test)."""
    os.environ["COLUMNS"] = "100"
    parser, handlers = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parts = [
        "# modelavg command reference",
        "",
        "Generated from the parser: `python -c 'from modelavg.cli import help_markdown as h; "
        'print(h(), end="")\' > docs/CLI.md`.',
        "",
    ]
    for name, p in sub.choices.items():
        parts += [f"## modelavg {name}", "", "```", p.format_help().rstrip(), "```", ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, handlers = build_parser()
    try:
        args = parser.parse_args(argv)
        code = handlers[args.command](args, argv)
    except ModelavgError as exc:
        print(f"modelavg: error: {' '.join(str(exc).split())}", file=sys.stderr)  # one line
        code = exc.exit_code
    except KeyboardInterrupt:
        print("modelavg: interrupted", file=sys.stderr)
        code = 130
    from modelavg.launch import end_process  # a worker of a process group exits here

    return end_process(code)


if __name__ == "__main__":
    sys.exit(main())
