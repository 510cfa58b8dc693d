"""modelavg export: the ONNX graph gives training's log-posteriors from raw features, run by
onnxruntime alone; bad input is one UsageError and nothing written."""

from __future__ import annotations

import argparse
import contextlib
import io

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from modelavg import export
from modelavg.cli import Parser
from modelavg.data.frames import FrameTable
from modelavg.errors import UsageError
from modelavg.nets.dnn import DNN, DNNSpec, save_model

SPEC = DNNSpec(input_dim=5, context=3, hidden_layers=2, hidden_dim=16, num_classes=7)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = Parser(prog="modelavg export")
    export.add_arguments(parser)
    return parser.parse_args(argv)


def random_model() -> DNN:
    """Random weights and a normalisation far from identity, so dropping it would show."""
    torch.manual_seed(0)
    model = DNN(SPEC)
    dim = SPEC.spliced_dim
    model.normalize.set_stats(torch.randn(dim) * 3, torch.rand(dim) * 4 + 0.5)
    return model.eval()


def as_trained(model: DNN, feats: torch.Tensor) -> torch.Tensor:
    """Log-posteriors the way training and evaluation compute them: FrameTable.splice + model."""
    frames = len(feats)
    table = FrameTable(
        feats=feats,
        targets=None,
        start=torch.zeros(frames, dtype=torch.int64),
        end=torch.full((frames,), frames, dtype=torch.int64),
        lengths=np.array([frames]),
    )
    with torch.no_grad():
        x = table.splice(torch.arange(frames), SPEC.context)
        return torch.log_softmax(model(x), dim=-1)


def test_training_splice_repeats_edge_frames():
    feats = torch.arange(4.0)[:, None]
    table = FrameTable(feats, None, torch.zeros(4, dtype=torch.int64), torch.full((4,), 4), None)
    assert table.splice(torch.tensor([0, 3]), 2).tolist() == [[0, 0, 0, 1, 2], [1, 2, 3, 3, 3]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[DNN, str, str]:
    """The model, its exported file and what the command printed."""
    tmp = tmp_path_factory.mktemp("export")
    model = random_model()
    save_model(tmp / "final.pt", model)
    out = tmp / "model.onnx"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert export.run(parse(["--model", str(tmp / "final.pt"), "--out", str(out)])) == 0
    return model, str(out), printed.getvalue()


def test_onnxruntime_matches_training(exported):
    model, path, printed = exported
    assert "frames x 5" in printed and "max abs diff" in printed
    onnx.checker.check_model(path)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, outp.name) == ("feats", "log_posteriors")
    assert not isinstance(inp.shape[0], int) and inp.shape[1] == SPEC.input_dim  # frames dynamic
    rng = np.random.default_rng(1)
    worst = 0.0
    for frames in [1, 2, SPEC.context, SPEC.context + 1, 2 * SPEC.context + 1, 57, 300]:
        feats = rng.normal(size=(frames, SPEC.input_dim)).astype(np.float32) * 3 + 1
        (got,) = session.run(None, {"feats": feats})
        want = as_trained(model, torch.from_numpy(feats)).numpy()
        assert got.shape == (frames, SPEC.num_classes)
        worst = max(worst, float(np.abs(got - want).max()))
    print(f"onnxruntime vs torch (FrameTable.splice + DNN): max abs diff {worst:.2e}")
    assert worst <= 1e-4


def test_onnx_carries_the_spec(exported):
    meta = {p.key: p.value for p in onnx.load(exported[1]).metadata_props}
    assert meta == {"feature_dim": "5", "context": "3", "num_classes": "7"}


def test_missing_model(tmp_path):
    with pytest.raises(UsageError, match="no such model file"):
        export.run(parse(["--model", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "m")]))
    assert list(tmp_path.iterdir()) == []


def test_unwritable_out(tmp_path):
    save_model(tmp_path / "final.pt", random_model())
    (tmp_path / "file").write_text("")
    for out in [tmp_path / "file" / "model.onnx", tmp_path]:
        with pytest.raises(UsageError, match="^--out .*(not a writable directory|is a directory)$"):
            export.run(parse(["--model", str(tmp_path / "final.pt"), "--out", str(out)]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "final.pt"]


def test_unknown_format(tmp_path):
    with pytest.raises(UsageError, match="--format: invalid choice: 'tflite'"):
        parse(["--model", "m.pt", "--format", "tflite", "--out", str(tmp_path / "m")])
