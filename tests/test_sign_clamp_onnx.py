"""The ONNX rule that rewrites a per-channel ReLU clamp (Max + Min, as a pre-activation fold's ``torch.clamp``
exports) into a Mul by ±1 + Relu with the sign folded into the readers."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normfx
from normfx.export import export_onnx


class _Clamped(nn.Module):
    def __init__(self, lower, upper, padding: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("lower", torch.tensor(lower, dtype=torch.float32).reshape(-1, 1, 1))
        self.register_buffer("upper", torch.tensor(upper, dtype=torch.float32).reshape(-1, 1, 1))
        self.head = nn.Conv2d(4, 5, 3, padding=padding)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        z = torch.clamp(self.stem(x), min=self.lower, max=self.upper)
        return self.head(z).sum((2, 3))[:, :2] + self.fc(torch.flatten(F.adaptive_avg_pool2d(z, 1), 1))


def _run(proto, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def test_a_sign_clamp_becomes_mul_and_relu_exactly():
    inf = float("inf")
    model = _Clamped([0, -inf, 0, -inf], [inf, 0, inf, 0]).eval()
    x = torch.randn(2, 3, 8, 8)
    plain = export_onnx(model, (x,))
    assert {"Max", "Min"} <= {n.op_type for n in plain.graph.node}
    out, report = normfx.rewrite_with_report(plain, "fuse")
    ops = Counter(n.op_type for n in out.graph.node)
    assert not {"Max", "Min"} & set(ops) and ops["Mul"] == 1 and ops["Relu"] == 1
    entry = next(e for e in report.applied if e.details.get("fold") == "sign_clamp")
    assert "2 channel(s)" in entry.reason and len(entry.details["into"]) == 2
    expected = model(x).detach().numpy()
    assert np.max(np.abs(_run(out, x) - expected)) <= 1e-5 * np.max(np.abs(expected))


@pytest.mark.parametrize("lower, upper", [
    ([0, 0, 0, 0], [6, 6, 6, 6]),                   # ReLU6: a real upper bound
    ([0, -1, 0, 0], [float("inf"), 0, float("inf"), float("inf")]),  # a bound other than 0 / ±inf
])
def test_other_clamps_are_left_alone(lower, upper):
    model = _Clamped(lower, upper).eval()
    x = torch.randn(2, 3, 8, 8)
    out, report = normfx.rewrite_with_report(export_onnx(model, (x,)), "fuse")
    assert {"Max", "Min"} <= {n.op_type for n in out.graph.node}
    assert not [e for e in report.entries if e.details.get("fold") == "sign_clamp"]
