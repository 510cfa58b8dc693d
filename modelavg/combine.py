"""``modelavg combine``: one model from a run's last checkpoints, as Kaldi ends training.

The last M checkpoints' global models theta_1..theta_M (``RUN/checkpoints``, oldest first) become

    theta = sum_m w_m theta_m,   sum_m w_m = 1,

with w_m = 1/M (checkpoint averaging, icefall's ``--avg``), or with ``--fit-cv`` the weights that
minimise the cross-entropy on half of the run's CV frames, w = softmax(a) (positive, summing to
one: nnet3-combine's --enforce-positive-weights --enforce-sum-to-one), found by L-BFGS from the
uniform weights; the uniform average is kept if the fit does not beat it there. The other
half of the CV set reports last model, average and fit, so the choice is checked on frames it
was not made on. The model file is written atomically (default ``RUN/combined.pt``).

Example::

    modelavg combine exp/run --last 5 --fit-cv
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

from modelavg import checkpoint as ckpt
from modelavg.config import TrainConfig, load_config
from modelavg.data.frames import FrameTable
from modelavg.data.training import read_corpora
from modelavg.errors import UsageError
from modelavg.evaluate import frame_stats, summary
from modelavg.io import atomic_write_bytes
from modelavg.nets.dnn import DNN, load_model, save_model


def checkpoint_models(root: Path, last: int) -> list[tuple[str, dict]]:
    """(name, global model) of the newest ``last`` complete checkpoints, oldest first."""
    names = sorted(p.name for p in root.iterdir() if (p / "shared.pt").exists())
    if not names:
        raise UsageError(f"{root}: no checkpoints to combine")
    return [(n, ckpt.load(root / n / "shared.pt", torch.device("cpu"))["model"]) for n in names][
        -last:
    ]


def combine(states: list[dict], weights: torch.Tensor) -> dict:
    """sum_m w_m theta_m for every floating-point entry (the others from the last model)."""
    out = {}
    for key, last in states[-1].items():
        if last.is_floating_point():
            out[key] = sum(w * s[key] for w, s in zip(weights, states, strict=True))
        else:
            out[key] = last
    return out


def cv_halves(run: Path) -> tuple[FrameTable, FrameTable]:
    """The run's CV utterances, alternately into a fitting half and a reporting half."""
    cfg = load_config(run / "config.yaml", {"resume": False}, TrainConfig)
    _, cv = read_corpora(cfg)
    return (FrameTable.from_corpus(cv, cv.utts[0::2]), FrameTable.from_corpus(cv, cv.utts[1::2]))


def fit_weights(model: DNN, states: list[dict], table: FrameTable, frames: int) -> torch.Tensor:
    """nnet3-combine: L-BFGS on w = softmax(a) from a = 0, CV cross-entropy of up to ``frames``
    frames of ``table``."""
    m = len(states)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(table), generator=g)[:frames]
    x, y = table.minibatch(idx, model.spec.context)
    keys = [k for k, v in states[-1].items() if v.is_floating_point()]
    stacked = {k: torch.stack([s[k] for s in states]) for k in keys}
    a = torch.zeros(m, dtype=torch.float64, requires_grad=True)

    def weights() -> torch.Tensor:
        return torch.softmax(a, 0)

    def objective() -> torch.Tensor:
        w = weights().to(stacked[keys[0]].dtype)
        params = {k: torch.tensordot(w, v, dims=1) for k, v in stacked.items()}
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    opt = torch.optim.LBFGS([a], lr=1.0, max_iter=30, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    with torch.no_grad():
        uniform = objective().item()
    opt.step(closure)
    with torch.no_grad():
        fitted = objective().item()
    return weights().detach() if fitted < uniform else torch.full((m,), 1.0 / m)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a training run's --out directory (with checkpoints)")
    p.add_argument("--last", type=int, default=20, help="combine the last M checkpoints (20)")
    p.add_argument("--fit-cv", action="store_true", help="fit the weights on half the CV set")
    p.add_argument(
        "--cv-frames", type=int, default=50000, help="--fit-cv: frames the fit uses (50000)"
    )
    p.add_argument("--out", help="model file to write (default: RUN/combined.pt)")


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run)
    if args.last < 1 or args.cv_frames < 1:
        raise UsageError("--last and --cv-frames must be >= 1")
    template = run_dir / "final.pt"
    if not template.exists():
        raise UsageError(f"{template}: missing; combine needs a finished run")
    model = load_model(template)
    blob = torch.load(template, weights_only=False)
    extra = {"class_counts": blob["class_counts"]} if "class_counts" in blob else {}
    named = checkpoint_models(run_dir / "checkpoints", args.last)
    states = [s for _, s in named]
    fit_half, report_half = cv_halves(run_dir)
    m = len(states)
    weights = fit_weights(model, states, fit_half, args.cv_frames) if args.fit_cv else None
    candidates = {"last": torch.eye(m)[-1], "average": torch.full((m,), 1.0 / m)}
    if weights is not None:
        candidates["fit"] = weights
    report = {"checkpoints": [n for n, _ in named]}
    for name, w in candidates.items():
        model.load_state_dict(combine(states, w))
        stats = frame_stats(model, report_half, model.spec.context)
        report[name] = {"weights": w.tolist(), **summary(stats)}
    chosen = "fit" if weights is not None else "average"
    model.load_state_dict(combine(states, candidates[chosen]))
    out = Path(args.out) if args.out else run_dir / "combined.pt"
    report["chosen"] = chosen
    save_model(out, model, {**extra, "combine": report})
    atomic_write_bytes(json.dumps(report, indent=2).encode(), out.with_suffix(".json"))
    for name in candidates:
        r = report[name]
        weights_ = ", ".join(f"{v:.3f}" for v in r["weights"])
        print(
            f"{name}: held-out cv loss {r['cross_entropy']:.4f}, frame accuracy "
            f"{100 * r['frame_accuracy']:.2f}% (weights {weights_})"
        )
    print(f"wrote {out} ({chosen} of {m} checkpoints)")
    return 0
