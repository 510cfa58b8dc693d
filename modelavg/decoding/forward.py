"""``modelavg forward``: a model's log-likelihoods in Kaldi's table format, for Kaldi's decoders.

Kaldi's hybrid decoders (``latgen-faster-mapped``, ``decode-faster-mapped``) read, per
utterance, a frames x pdfs matrix of log-likelihoods: log posterior minus log prior (Kaldi's
``nnet-forward --class-frame-counts``; priors as ``decoder.log_prior``). Here a pdf is a network
output (a line of ``classes.txt``); with a transition model whose pdf-ids are those classes the
matrix decodes as it is. Written with kaldiio as a binary ark and, with ``ark,scp:``, an scp of
absolute offsets. Both are written to temporary files and renamed into place.

Example::

    modelavg forward --model exp/demo/final.pt --data data/demo/test \\
        --out ark,scp:exp/demo/loglikes.ark,exp/demo/loglikes.scp
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import kaldiio
import numpy as np

from modelavg.errors import UsageError
from modelavg.io import atomic_write, atomic_write_bytes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model file (final.pt)")
    parser.add_argument("--data", required=True, help="data dir (feats.scp)")
    parser.add_argument("--out", required=True, help="wspecifier: ark,scp:X.ark,X.scp or ark:X.ark")
    parser.add_argument("--priors-from", help="train data dir to count priors from (old models)")


def run(args: argparse.Namespace) -> int:
    n = write_loglikes(args.model, args.data, args.out, args.priors_from)
    print(f"{n} utterances -> {args.out}")
    return 0


def parse_wspecifier(wspec: str) -> tuple[Path, Path | None]:
    """(ark path, scp path or None) of ``ark:A`` / ``ark,scp:A,S`` (files only, no pipes)."""
    kind, _, paths = wspec.partition(":")
    options = set(kind.split(","))
    names = paths.split(",")
    if any("|" in n or n.strip() == "-" for n in names):
        raise UsageError(f"--out {wspec}: pipes and stdout are not supported, give file names")
    if options == {"ark"} and len(names) == 1 and names[0]:
        return Path(names[0]), None
    if options == {"ark", "scp"} and len(names) == 2 and all(names):
        return Path(names[0]), Path(names[1])
    raise UsageError(f"--out {wspec}: expected ark:FILE.ark or ark,scp:FILE.ark,FILE.scp")


def loglikes(model_path, data_dir, priors_from=None) -> dict[str, np.ndarray]:
    """Per utterance, (frames, classes) float32 log posterior - log prior."""
    from modelavg.decoding.decode import class_counts, data_log_probs
    from modelavg.decoding.decoder import log_prior
    from modelavg.nets.dnn import load_model

    model = load_model(model_path)
    prior = log_prior(class_counts(model_path, model.spec.num_classes, priors_from))
    return {
        utt: (lp - prior).astype(np.float32) for utt, lp in data_log_probs(model, data_dir).items()
    }


def write_loglikes(
    model_path: str | os.PathLike,
    data_dir: str | os.PathLike,
    wspecifier: str,
    priors_from: str | os.PathLike | None = None,
) -> int:
    """Write the log-likelihoods of every utterance; returns how many."""
    ark, scp = parse_wspecifier(wspecifier)
    mats = loglikes(model_path, data_dir, priors_from)
    offsets: dict[str, int] = {}

    def write_ark(fh) -> None:
        for utt, mat in mats.items():
            offsets[utt] = fh.tell() + len(utt) + 1  # after "utt "
            kaldiio.save_ark(fh, {utt: mat})

    atomic_write(ark, write_ark)
    if scp is not None:
        where = ark.resolve()
        lines = "".join(f"{utt} {where}:{off}\n" for utt, off in offsets.items())
        atomic_write_bytes(lines.encode(), scp)
    return len(mats)
