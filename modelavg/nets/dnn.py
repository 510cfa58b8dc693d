"""The DNN acoustic model: global normalisation, then an MLP, then (log-)softmax.

The normalisation is a module inside the model, so the model file carries the transform it was
trained with and every later use applies the same one. The input is a spliced frame; the splice
context is part of the model's spec so evaluation splices the same way.

Example::

    spec = DNNSpec(input_dim=40, context=5, hidden_layers=6, hidden_dim=2048, num_classes=8806)
    model = DNN(spec)  # the paper's 440-6x2048-8806 sigmoid network
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

from modelavg.errors import UsageError
from modelavg.io import atomic_save

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}
FORMAT = "modelavg-dnn-1"


@dataclass(frozen=True)
class DNNSpec:
    input_dim: int  # per-frame feature dimension before splicing
    context: int  # splice +-context frames
    hidden_layers: int
    hidden_dim: int
    num_classes: int
    activation: str = "sigmoid"

    @property
    def spliced_dim(self) -> int:
        return self.input_dim * (2 * self.context + 1)


class Normalize(nn.Module):
    """x -> (x - mean) / std with fixed statistics (buffers: saved, never trained or averaged)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("inv_std", torch.ones(dim))

    def set_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean)
        self.inv_std.copy_(1.0 / std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.inv_std


class DNN(nn.Module):
    """Normalize -> [Linear -> activation] x hidden_layers -> Linear (logits)."""

    def __init__(self, spec: DNNSpec, hidden: list[nn.Linear] | None = None) -> None:
        super().__init__()
        if spec.activation not in ACTIVATIONS:
            raise UsageError(f"--activation {spec.activation}: choose from {sorted(ACTIVATIONS)}")
        self.spec = spec
        self.normalize = Normalize(spec.spliced_dim)
        layers: list[nn.Module] = []
        dims = [spec.spliced_dim] + [spec.hidden_dim] * spec.hidden_layers
        for i in range(spec.hidden_layers):
            layers += [nn.Linear(dims[i], dims[i + 1]), ACTIVATIONS[spec.activation]()]
        layers.append(nn.Linear(dims[-1], spec.num_classes))
        self.layers = nn.Sequential(*layers)
        if hidden is not None:  # e.g. from a pretrained DBN
            for mine, given in zip(self.linears()[:-1], hidden, strict=True):
                mine.load_state_dict(given.state_dict())

    def linears(self) -> list[nn.Linear]:
        return [m for m in self.layers if isinstance(m, nn.Linear)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.normalize(x))


def save_model(path: str | os.PathLike, model: DNN, extra: dict | None = None) -> None:
    """Write the model file (spec + weights + normalisation) atomically."""
    atomic_save(
        {
            "format": FORMAT,
            "spec": asdict(model.spec),
            "state_dict": model.state_dict(),
            **(extra or {}),
        },
        path,
    )


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> DNN:
    try:
        blob = torch.load(path, map_location=device, weights_only=False)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such model file") from None
    except Exception as exc:
        raise UsageError(f"{path}: not a readable model file ({type(exc).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise UsageError(f"{path}: not a modelavg model file")
    model = DNN(DNNSpec(**blob["spec"]))
    model.load_state_dict(blob["state_dict"])
    return model.to(device)


@torch.no_grad()
def utterance_log_probs(model: nn.Module, table, context: int) -> list[torch.Tensor]:
    """Per-utterance (T x C) log posteriors of a ``FrameTable``, in table order: one splice per
    utterance (for decoding and the phone error rate)."""
    device = next(model.parameters()).device
    model.eval()
    out, lo = [], 0
    for n in table.lengths:
        idx = torch.arange(lo, lo + int(n))
        out.append(torch.log_softmax(model(table.splice(idx, context).to(device)), 1).cpu())
        lo += int(n)
    return out
