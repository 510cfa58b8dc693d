"""``modelavg noise-scale``: the gradient noise scale of saved models on a data directory, and
what it predicts for N averaged workers (McCandlish et al. 2018; docs/RESULTS.md).

Example::

    modelavg noise-scale --model exp/demo/final.pt --data data/demo/cv --minibatch 256 --ngsgd
"""

from __future__ import annotations

import argparse
import json

import torch

from modelavg.analysis import noise
from modelavg.evaluate import read_labelled_table
from modelavg.nets.dnn import load_model

HELP = (
    "gradient noise scale of a model on a data dir: how many workers x minibatch the task can "
    "use (McCandlish et al. 2018)"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
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


def run(args: argparse.Namespace) -> int:
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
