"""The DBN: a stack of RBMs trained layer by layer, its file (``dbn.pt``), and how it becomes a DNN.

Kaldi nnet1's recipe (`steps/nnet/pretrain_dbn.sh`): a Gaussian RBM on the normalised spliced
frames, then Bernoulli RBMs, each trained on the hidden probabilities of the stack below. For
fine-tuning the stack's sigmoid layers become the DNN's hidden layers and a new softmax layer goes
on top (`steps/nnet/train.sh --dbn`), as for the paper's DNNs (its table "Comparing RBM pretraining
with random initialization"). ``--init`` may also name a model file, whose hidden layers are
taken over in the same way; the output layer is always new, so the number of classes may differ.

Example::

    plan = pretraining_plan(440, hidden_dim=2048, depth=6)   # the recipe's stack
    save_dbn("exp/pretrain/dbn.pt", rbms, {"mean": mean, "std": std, "context": 5, ...})
    model = hidden_layers_from("exp/pretrain/dbn.pt", spec)  # a DNN to fine-tune
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelavg.errors import UsageError
from modelavg.io import atomic_save
from modelavg.nets.dnn import DNN, FORMAT, DNNSpec
from modelavg.nets.rbm import LR_BERNOULLI, LR_GAUSSIAN, RBM, VisibleType

DBN_FORMAT = "modelavg-dbn-1"
FIRST_LAYER_EPOCH_FACTOR = 2  # the Gaussian RBM runs 2 x rbm_iter epochs


@dataclass(frozen=True)
class LayerPlan:
    index: int  # 0-based
    visible_dim: int
    hidden_dim: int
    visible_type: VisibleType
    lr: float
    epochs: int


def pretraining_plan(
    input_dim: int, hidden_dim: int = 2048, depth: int = 6, rbm_iter: int = 1
) -> list[LayerPlan]:
    """The recipe's stack: a Gaussian RBM (lr 0.01, 2 x rbm_iter epochs), then Bernoulli RBMs
    (lr 0.4, rbm_iter epochs); the recipe trains every layer on minibatches of 100 frames."""
    plans = []
    for i in range(depth):
        first = i == 0
        plans.append(
            LayerPlan(
                index=i,
                visible_dim=input_dim if first else hidden_dim,
                hidden_dim=hidden_dim,
                visible_type="gaussian" if first else "bernoulli",
                lr=LR_GAUSSIAN if first else LR_BERNOULLI,
                epochs=rbm_iter * (FIRST_LAYER_EPOCH_FACTOR if first else 1),
            )
        )
    return plans


class DBN(nn.Module):
    """A stack of RBMs; layer i's hidden probabilities are layer i+1's visible data."""

    def __init__(self, rbms: Iterable[RBM] = ()) -> None:
        super().__init__()
        self.rbms = nn.ModuleList()
        for rbm in rbms:
            self.append(rbm)

    def append(self, rbm: RBM) -> None:
        if len(self.rbms) and rbm.visible_dim != self.output_dim:
            raise ValueError(
                f"RBM visible dim {rbm.visible_dim} != previous hidden dim {self.output_dim}"
            )
        self.rbms.append(rbm)

    def __len__(self) -> int:
        return len(self.rbms)

    def __iter__(self) -> Iterator[RBM]:
        return iter(self.rbms)

    def __getitem__(self, i: int) -> RBM:
        return self.rbms[i]

    @property
    def output_dim(self) -> int:
        return self.rbms[-1].hidden_dim

    @torch.no_grad()
    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Sigmoid hidden probabilities through the whole stack: the input of the next RBM in the
        recipe (no sampling between layers)."""
        for rbm in self.rbms:
            x = rbm.hidden_probs(x)
        return x


def save_dbn(
    path: str | os.PathLike,
    rbms: Iterable[RBM],
    feature_transform_state: dict[str, Any] | None = None,
) -> None:
    """Write the stack (plain tensors, dims, types) atomically.

    ``feature_transform_state`` (e.g. the global mean/std the RBMs were trained on) must be plain
    data - tensors, numbers, strings and containers - so it loads with ``weights_only=True``.
    """
    layers = [
        {
            "visible_dim": rbm.visible_dim,
            "hidden_dim": rbm.hidden_dim,
            "visible_type": rbm.visible_type,
            "state": {k: t.detach().cpu().clone() for k, t in rbm.state_dict().items()},
        }
        for rbm in rbms
    ]
    payload = {"format": DBN_FORMAT, "layers": layers, "feature_transform": feature_transform_state}
    atomic_save(payload, path)


def load_dbn(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[DBN, dict[str, Any] | None]:
    """Read a file written by :func:`save_dbn`: (DBN, feature_transform_state)."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such DBN file") from None
    except Exception as exc:  # unpickling errors come in many types
        raise UsageError(f"{path}: not a readable DBN file ({exc.__class__.__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != DBN_FORMAT:
        raise UsageError(f"{path}: not a {DBN_FORMAT} file")
    dbn = DBN()
    for layer in payload["layers"]:
        rbm = RBM(layer["visible_dim"], layer["hidden_dim"], layer["visible_type"])
        rbm.load_state_dict(layer["state"])
        dbn.append(rbm.to(map_location))
    return dbn, payload["feature_transform"]


def dbn_to_linear_layers(dbn: Iterable[RBM]) -> list[nn.Linear]:
    """nn.Linear(V, H) per RBM with (weight, hidden_bias) copied: sigmoid(layer(x)) equals
    rbm.hidden_probs(x), so a sigmoid DNN built from these starts as the DBN's up-pass."""
    layers = []
    for rbm in dbn:
        linear = nn.Linear(rbm.visible_dim, rbm.hidden_dim)
        with torch.no_grad():
            linear.weight.copy_(rbm.weight)
            linear.bias.copy_(rbm.hidden_bias)
        layers.append(linear.to(rbm.weight.device))
    return layers


def kaldi_weight_std(in_dim: int, out_dim: int) -> float:
    """nnet1 proto init: sigma = 0.1 * 35 * sqrt(2 / (d_in + d_out)); 2048 -> 8806 gives 0.0475."""
    return 0.1 * 35.0 * math.sqrt(2.0 / (in_dim + out_dim))


def kaldi_softmax_init(
    in_dim: int, out_dim: int, generator: torch.Generator | None = None
) -> nn.Linear:
    """The new output layer put on top of the DBN: W ~ N(0, kaldi_weight_std^2), bias 0."""
    linear = nn.Linear(in_dim, out_dim)
    with torch.no_grad():
        std = kaldi_weight_std(in_dim, out_dim)
        linear.weight.copy_(torch.randn(out_dim, in_dim, generator=generator) * std)
        linear.bias.zero_()
    return linear


def hidden_layers_from(path: str | os.PathLike, spec: DNNSpec) -> DNN:
    """A DNN of ``spec`` whose hidden layers come from a DBN or model file (``--init``)."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise UsageError(f"--init {path}: no such file") from None
    except Exception as exc:
        raise UsageError(f"--init {path}: unreadable ({type(exc).__name__})") from None
    from_dbn = not (isinstance(blob, dict) and blob.get("format") == FORMAT)
    if from_dbn:
        dbn, features = load_dbn(path)
        check_dbn_features(path, features, spec)
        hidden = dbn_to_linear_layers(dbn)
    else:
        given = DNN(DNNSpec(**blob["spec"]))
        given.load_state_dict(blob["state_dict"])
        hidden = given.linears()[:-1]
    want = [
        (spec.spliced_dim if i == 0 else spec.hidden_dim, spec.hidden_dim)
        for i in range(spec.hidden_layers)
    ]
    have = [(lin.in_features, lin.out_features) for lin in hidden]
    if have != want:
        raise UsageError(
            f"--init {path}: hidden layers {have} do not fit this data and model {want} "
            f"(input {spec.input_dim} x {2 * spec.context + 1} spliced frames, --hidden-layers "
            f"{spec.hidden_layers}, --hidden-dim {spec.hidden_dim})"
        )
    model = DNN(spec, hidden=hidden)
    if from_dbn:
        model.linears()[-1].load_state_dict(
            kaldi_softmax_init(spec.hidden_dim, spec.num_classes).state_dict()
        )
    return model


def check_dbn_features(path: str | os.PathLike, features: dict | None, spec: DNNSpec) -> None:
    """A DBN only fits frames of the dimension and splicing it was pretrained on."""
    if features and (features.get("context"), features.get("input_dim")) != (
        spec.context,
        spec.input_dim,
    ):
        raise UsageError(
            f"--init {path}: pretrained on {features.get('input_dim')}-dim frames spliced "
            f"+-{features.get('context')}, this run has {spec.input_dim}-dim frames and "
            f"--context {spec.context}"
        )


def dbn_feature_stats(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(mean, std) of the spliced input a dbn.pt was pretrained with, else None.

    Fine-tuning reuses them (as Kaldi reuses the pretraining feature transform) so the network
    sees exactly the input its RBMs were trained on.
    """
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    ft = blob.get("feature_transform") if isinstance(blob, dict) else None
    return (ft["mean"], ft["std"]) if ft and "mean" in ft else None
