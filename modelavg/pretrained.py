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
from modelavg.model import DNN, FORMAT, DNNSpec


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
    else:
        from modelavg.rbm import dbn_to_linear_layers, load_dbn

        hidden = dbn_to_linear_layers(load_dbn(path))
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
    return model
