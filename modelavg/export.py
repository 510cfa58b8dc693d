"""``modelavg export``: a trained model as one ONNX graph that needs nothing from modelavg.

The graph takes one utterance's features and returns its log-posteriors, doing everything
training did in between: splicing +-context frames with the edge frames repeated (as
``FrameTable.splice``), the normalisation the model file carries, the MLP and a log-softmax. So a
user feeds raw features (the same kind the model was trained on) to onnxruntime or any ONNX
runtime and gets frame log-posteriors for a decoder.

Example::

    modelavg export --model exp/dnn/final.pt --format onnx --out model.onnx

    import onnxruntime  # elsewhere, without modelavg
    logp = onnxruntime.InferenceSession("model.onnx").run(None, {"feats": feats})[0]
    # feats: (frames, feature dim) float32, any frames >= 1; logp: (frames, classes)
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from modelavg.errors import UsageError
from modelavg.nets.dnn import DNN

FORMATS = ("onnx",)
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
INPUT, OUTPUT = "feats", "log_posteriors"


class UtteranceModel(nn.Module):
    """(frames, dim) features of one utterance -> (frames, classes) log-posteriors."""

    def __init__(self, dnn: DNN) -> None:
        super().__init__()
        self.dnn = dnn
        self.context = dnn.spec.context

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        frames = feats.shape[0]
        offsets = torch.arange(-self.context, self.context + 1, device=feats.device)
        pos = torch.arange(frames, device=feats.device)[:, None] + offsets[None, :]
        spliced = feats[pos.clamp(0, frames - 1)].reshape(frames, -1)
        return torch.log_softmax(self.dnn(spliced), dim=-1)


def to_onnx(model: DNN) -> bytes:
    """The serialised ONNX model of ``UtteranceModel(model)``, the number of frames dynamic."""
    from modelavg import __version__

    wrapped = UtteranceModel(model.cpu()).eval()
    example = torch.zeros(2 * model.spec.context + 2, model.spec.input_dim)
    # The exporter warns about its own internals and optional torchvision ops: not the user's news.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapped,
            (example,),
            dynamo=True,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_shapes=({0: torch.export.Dim.DYNAMIC},),
            verbose=False,
        )
    proto = program.model_proto
    proto.producer_name, proto.producer_version = "modelavg", __version__
    spec = model.spec
    for key, value in {
        "feature_dim": spec.input_dim,
        "context": spec.context,
        "num_classes": spec.num_classes,
    }.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    return proto.SerializeToString()


def max_abs_diff(onnx_model: bytes, model: DNN, lengths: list[int], seed: int = 0) -> float:
    """Largest |onnxruntime - torch| log-posterior over random utterances of ``lengths`` frames."""
    import onnxruntime

    session = onnxruntime.InferenceSession(onnx_model, providers=["CPUExecutionProvider"])
    reference = UtteranceModel(model.cpu()).eval()
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for frames in lengths:
        feats = torch.randn(frames, model.spec.input_dim, generator=gen)
        (got,) = session.run(None, {INPUT: feats.numpy()})
        with torch.no_grad():
            want = reference(feats).numpy()
        worst = max(worst, float(np.abs(got - want).max()))
    return worst


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model file (final.pt or a checkpoint)")
    parser.add_argument("--format", default="onnx", choices=FORMATS, help="(default: onnx)")
    parser.add_argument("--out", required=True, help="output file, e.g. model.onnx")


def _check_out(out: Path) -> None:
    """Refuse an --out that cannot be written before the (slow) export."""
    if out.is_dir():
        raise UsageError(f"--out {out}: is a directory")
    parent = next(p for p in out.absolute().parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"--out {out}: {parent} is not a writable directory")


def run(args: argparse.Namespace) -> int:
    from modelavg.io import atomic_write_bytes
    from modelavg.nets.dnn import load_model

    missing = [m for m in ONNX_PACKAGES if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(
            f"--format onnx needs {', '.join(missing)}; run: pip install 'modelavg[export]'"
        )
    out = Path(args.out)
    model = load_model(args.model)
    _check_out(out)
    data = to_onnx(model)
    try:
        atomic_write_bytes(data, out)
    except OSError as exc:
        raise UsageError(f"--out {out}: {exc.strerror or exc}") from None
    spec = model.spec
    diff = max_abs_diff(data, model, [1, spec.context + 1, 2 * spec.context + 1, 100])
    print(
        f"wrote {out}: {INPUT} (frames x {spec.input_dim}) -> {OUTPUT} (frames x "
        f"{spec.num_classes}), splicing +-{spec.context} and normalisation included; "
        f"onnxruntime vs torch max abs diff {diff:.2e}"
    )
    return 0
