"""The ``modelavg`` command: one table of sub-commands, each an ``add_arguments``/``run`` pair.

Only the chosen command's module is imported. An expected failure ends in one line on stderr
(``modelavg: error: ...``) and the exit code of its error class; a bug keeps its traceback.

Example::

    main(["train", "--data", "data/demo/train", "--out", "exp/x", "--workers", "2"])
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from pathlib import Path

from modelavg.config import PretrainConfig, TrainConfig, config_fields, load_config
from modelavg.errors import ModelavgError, UsageError

# name: (module with add_arguments(parser) and run(args) -> exit code, one-line help)
COMMANDS = {
    "train": ("modelavg.cli", "train a DNN with periodic model averaging"),
    "pretrain": ("modelavg.cli", "RBM (DBN) pretraining with periodic model averaging"),
    "eval": ("modelavg.evaluate", "frame accuracy and cross-entropy of a model on a data dir"),
    "noise-scale": (
        "modelavg.analysis.noise_command",
        "gradient noise scale of a model on a data dir: how many workers x minibatch the task "
        "can use (McCandlish et al. 2018)",
    ),
    "demo": (
        "modelavg.demo",
        "prepare the real speech demo, train with 2 workers, evaluate, write a report (the "
        "README's main command)",
    ),
    "prepare-demo": (
        "modelavg.cli",
        "build the real speech demo corpus (Asterisk prompts forced-aligned to senones with "
        "pocketsphinx)",
    ),
    "prepare-fashion": ("modelavg.cli", "Fashion-MNIST (Debian package) as Kaldi data dirs"),
    "prepare-synthetic": (
        "modelavg.cli",
        "synthetic speech (festival) with exact phone-state targets, any size, for scale studies",
    ),
    "prepare-unlabelled": (
        "modelavg.cli",
        "features only (no labels) from the Asterisk prompts in other languages, for modelavg "
        "pretrain",
    ),
    "make-graph": (
        "modelavg.decoding.graph",
        "decoding graph (HCLG) over the corpus's senones: cmudict lexicon, an n-gram LM "
        "(pocketsphinx's en-us, an ARPA file or one estimated from text); cached",
    ),
    "decode": (
        "modelavg.decoding.decode",
        "word error rate of a model (or of the targets, --oracle) through a make-graph graph",
    ),
    "forward": (
        "modelavg.decoding.forward",
        "log-likelihoods (log posterior - log prior) as a Kaldi archive, for Kaldi's decoders",
    ),
    "export": (
        "modelavg.export",
        "the model with its splicing and normalisation as one ONNX graph (checked with "
        "onnxruntime)",
    ),
    "report": (
        "modelavg.report",
        "report.md with tables and plots of one or more runs (train or pretrain), overlaid",
    ),
    "sweep": ("modelavg.sweep", "run a grid of training runs: results table, plots, speedup"),
    "combine": (
        "modelavg.combine",
        "one model from a run's last checkpoints: their average, or weights fitted on CV "
        "(Kaldi's nnet3-combine)",
    ),
}


class Parser(argparse.ArgumentParser):
    """argparse, but errors are one line and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog.split()[-1]}: {message}")


# -- options generated from the config dataclasses -----------------------------------------------


def _type(annotation: str) -> type:
    for name, kind in (("bool", bool), ("int", int), ("float", float)):
        if annotation.split(" | ")[0] == name:
            return kind
    return str


def add_config_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One option per config field, in its group; defaults stay in the dataclass (SUPPRESS)."""
    parser.add_argument("--config", help="YAML file of options (the command line overrides it)")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in config_fields(cls):
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
                type=f.metadata.get("parse") or kind,
                default=argparse.SUPPRESS,
                help=help_,
                choices=f.metadata.get("choices"),
                metavar=f.name.upper(),
            )


def command_config(args: argparse.Namespace, cls: type) -> TrainConfig | PretrainConfig:
    """Defaults, then --config (or, for --resume, the run's own config.yaml), then the options
    given on the command line."""
    names = {f.name for f in config_fields(cls)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    config = args.config
    if overrides.get("resume") and config is None and "out" in overrides:
        saved = Path(overrides["out"]) / "config.yaml"
        config = saved if saved.exists() else None
    return load_config(config, overrides, cls)


# -- commands whose code lives elsewhere but need no module of their own ------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of train, pretrain and the prepare-* commands (by ``p.prog``)."""
    command = p.prog.split()[-1]
    if command in ("train", "pretrain"):
        add_config_options(p, TrainConfig if command == "train" else PretrainConfig)
    elif command == "prepare-demo":
        p.add_argument("--out", default="data/demo", help="output directory (default: data/demo)")
        p.add_argument("--max-utts", type=int, help="process only this many prompts (for tests)")
        p.add_argument("--seed", type=int, default=0, help="seed of the train/cv/test split")
    elif command == "prepare-fashion":
        p.add_argument("--out", default="data/fashion", help="output directory")
        p.add_argument("--utt-size", type=int, default=100, help="images per utterance")
        p.add_argument("--max-images", type=int, help="cap the number of images (for tests)")
        p.add_argument("--seed", type=int, default=0, help="seed of the cv hold-out")
    elif command == "prepare-synthetic":
        p.add_argument("--out", default="data/synthetic", help="output directory")
        p.add_argument(
            "--utts",
            type=int,
            default=12000,
            help="sentences (~365 frames each; default 12000: 3.5M training frames, ~2 min)",
        )
        p.add_argument(
            "--seed", type=int, default=0, help="seed of the text, voice, channel, split"
        )
        p.add_argument("--jobs", type=int, default=2, help="festival processes in parallel")
        p.add_argument(
            "--context-classes",
            type=int,
            default=0,
            help="targets: this many classes of tied triphone states, the most frequent ones "
            "besides every phone state (like the paper's senones); default 0: phone states only",
        )
    elif command == "prepare-unlabelled":
        p.add_argument("--out", default="data/unlabelled", help="output data directory")
        p.add_argument("--langs", nargs="+", default=["es", "fr", "it", "ru"], help="languages")
        p.add_argument("--max-utts", type=int, help="cap the number of prompts (for tests)")


def run(args: argparse.Namespace) -> int:
    from modelavg import launch

    if args.command == "train":
        from modelavg.train import train

        return launch.run_job(command_config(args, TrainConfig), args.argv, train)
    if args.command == "pretrain":
        from modelavg.pretrain import pretrain

        return launch.run_job(command_config(args, PretrainConfig), args.argv, pretrain)
    if args.command == "prepare-demo":
        from modelavg.corpora.asterisk import prepare_demo

        prepare_demo(args.out, max_utts=args.max_utts, seed=args.seed)
    elif args.command == "prepare-fashion":
        from modelavg.corpora.fashion import prepare_fashion

        prepare_fashion(
            args.out, utt_size=args.utt_size, seed=args.seed, max_images=args.max_images
        )
    elif args.command == "prepare-synthetic":
        from modelavg.corpora.synthetic import prepare_synthetic

        prepare_synthetic(
            args.out,
            num_utts=args.utts,
            seed=args.seed,
            jobs=args.jobs,
            context_classes=args.context_classes,
        )
    elif args.command == "prepare-unlabelled":
        from modelavg.corpora.unlabelled import prepare_unlabelled

        prepare_unlabelled(args.out, tuple(args.langs), max_utts=args.max_utts)
    return 0


# -- the parser and the entry point ---------------------------------------------------------------


def build_parser(only: str | None = None) -> Parser:
    """Every command with its help; the options of ``only`` (all when None, for the docs)."""
    from modelavg import __version__

    parser = Parser(prog="modelavg", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"modelavg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if only is None or only == name:
            importlib.import_module(module).add_arguments(p)
    return parser


def help_markdown() -> str:
    """docs/CLI.md: every command's --help (kept in sync by a test)."""
    os.environ["COLUMNS"] = "100"
    parser = build_parser()
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
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        args = build_parser(only=command if command in COMMANDS else None).parse_args(argv)
        args.argv = argv
        code = importlib.import_module(COMMANDS[args.command][0]).run(args)
    except ModelavgError as exc:
        if str(exc):  # empty: another process reported it
            print(f"modelavg: error: {' '.join(str(exc).split())}", file=sys.stderr)  # one line
        code = exc.exit_code
    except KeyboardInterrupt:
        print("modelavg: interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:  # the reader left (``modelavg sweep --dry-run | head``): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit's flush
        code = 141  # 128 + SIGPIPE, as a shell reports it
    except Exception:  # a bug: its traceback, exit 1 (and the launcher names this rank)
        traceback.print_exc()
        code = 1
    from modelavg.launch import end_process  # a worker of a process group exits here

    return end_process(code)


if __name__ == "__main__":
    sys.exit(main())
