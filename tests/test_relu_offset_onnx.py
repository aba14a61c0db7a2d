"""ONNX ``fuse``: a per-channel Add after a Relu (what the affine rules keep before a zero-padded conv) moves into
what produces the Relu's input, the Relu becoming ``Max(·, c)``: ``relu(a) + c = max(a + c, c)``."""

import collections
import copy

import numpy as np
import pytest
import torch
from helpers import randomize_proxy_norm
from torch import nn

import normfx
from normfx import models
from normfx.export import export_onnx
from normfx.runtime import make_session


class _ReluOffset(nn.Module):
    """conv → ReLU → + c (per channel) → zero-padded conv; ``shared`` also reads the conv output elsewhere."""

    def __init__(self, shared: bool = False) -> None:
        super().__init__()
        self.shared = shared
        self.stem = nn.Conv2d(3, 6, 3)
        self.head = nn.Conv2d(6, 4, 3, padding=1)
        self.register_buffer("offset", torch.linspace(-0.7, 0.9, 6).reshape(1, 6, 1, 1))

    def forward(self, x):
        a = self.stem(x)
        y = self.head(torch.relu(a) + self.offset)
        return y + a[:, :4].mean() if self.shared else y


def _run(proto, x: torch.Tensor) -> np.ndarray:
    session = make_session(proto)
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _ops(proto) -> collections.Counter:
    return collections.Counter(n.op_type for n in proto.graph.node)


def test_the_offset_moves_into_the_conv_bias_and_the_relu_becomes_a_max():
    torch.manual_seed(0)
    model = _ReluOffset().eval()
    x = torch.randn(2, 3, 10, 10)
    proto = export_onnx(model, (x,))
    fused, report = normfx.rewrite_with_report(proto, "fuse")
    assert _ops(proto)["Add"] == 1 and _ops(fused)["Add"] == 0
    assert _ops(fused)["Max"] == 1 and _ops(fused)["Relu"] == 0
    entry = next(e for e in report.entries if e.details.get("fold") == "relu_offset")
    assert entry.status == "applied" and "relu(a) + c = max(a + c, c)" in entry.reason
    with torch.no_grad():
        expected = copy.deepcopy(model).double()(x.double()).numpy()
    got = _run(fused, x)
    assert np.abs(got - expected).max() / np.abs(expected).max() <= 1e-6


def test_a_relu_input_read_elsewhere_keeps_its_add():
    torch.manual_seed(1)
    model = _ReluOffset(shared=True).eval()
    x = torch.randn(2, 3, 10, 10)
    proto = export_onnx(model, (x,))
    fused, report = normfx.rewrite_with_report(proto, "fuse")
    assert not [e for e in report.entries if e.details.get("fold") == "relu_offset"]
    assert _ops(fused)["Max"] == 0 and _ops(fused)["Relu"] == 1
    np.testing.assert_allclose(_run(fused, x), _run(proto, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, absorbed", [("resnet18", 8)])
def test_onnx_only_fuse_of_a_proxy_norm_model_leaves_no_add_after_its_relus(name, absorbed):
    model = models.create(name, seed=2)
    x = models.example_input(name, batch=2, seed=2)
    converted = randomize_proxy_norm(normfx.rewrite(model, "proxynorm", example_inputs=x), seed=3)
    proto = export_onnx(converted, (x,))
    fused, report = normfx.rewrite_with_report(proto, "fuse")
    entries = [e for e in report.entries if e.details.get("fold") == "relu_offset"]
    assert len(entries) == absorbed == _ops(fused)["Max"]
    constants = {i.name for i in fused.graph.initializer}
    for node in fused.graph.node:  # no Relu output feeds an Add by a constant any more (residual Adds stay)
        if node.op_type == "Relu":
            readers = [n for n in fused.graph.node if node.output[0] in n.input]
            assert not [r for r in readers if r.op_type == "Add" and set(r.input) & constants]
    kept_then_absorbed = [e for e in report.entries if "then absorbed by the Relu before it" in e.reason]
    assert len(kept_then_absorbed) == absorbed
    with torch.no_grad():
        expected = copy.deepcopy(converted).double()(x.double()).numpy()
        floor = np.abs(converted(x).numpy() - expected).max() / np.abs(expected).max()
    error = np.abs(_run(fused, x) - expected).max() / np.abs(expected).max()
    assert error <= max(1e-5, 2 * floor), (error, floor)
