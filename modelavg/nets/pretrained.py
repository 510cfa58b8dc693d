"""Initialising a DNN's hidden layers from a pretrained DBN (``dbn.pt``) or another model file.

The hidden layers are taken over; the output layer is new (a different number of classes is
fine), initialised as Kaldi does for the layer it adds on top of a DBN.

Example::

    model = hidden_layers_from("exp/pretrain/dbn.pt", spec)
"""

from __future__ import annotations

import os

import torch

from modelavg.errors import UsageError
from modelavg.nets.dnn import DNN, FORMAT, DNNSpec


def hidden_layers_from(path: str | os.PathLike, spec: DNNSpec) -> DNN:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise UsageError(f"--init {path}: no such file") from None
    except Exception as exc:
        raise UsageError(f"--init {path}: unreadable ({type(exc).__name__})") from None
    if isinstance(blob, dict) and blob.get("format") == FORMAT:
        given = DNN(DNNSpec(**blob["spec"]))
        given.load_state_dict(blob["state_dict"])
        hidden = given.linears()[:-1]
        from_dbn = False
    else:
        from modelavg.nets.rbm import dbn_to_linear_layers, load_dbn

        dbn, features = load_dbn(path)
        check_dbn_features(path, features, spec)
        hidden = dbn_to_linear_layers(dbn)
        from_dbn = True
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
    if from_dbn:  # as nnet1 does: a new N(0, kaldi_weight_std^2) softmax layer on top of the DBN
        from modelavg.nets.rbm import kaldi_softmax_init

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
