"""Pre-activation fold on the ONNX route (normfx/passes/onnx/preact.py + offsets.py), and the deployed graph of
``normfx.export`` (fx route, export, ONNX route): numbers in onnxruntime against a float64 run of the original."""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from test_preact_fx import ACTIVATIONS, _OnInput, _randomized_block
from torch import nn

import normfx
from normfx import models
from normfx.export import export_onnx
from normfx.inspect import batchnorm_calls

#: BatchNormalization nodes left, the same on both routes (the reasons are asserted below)
KEPT = {"preact_resnet": 0, "densenet": 10, "dualpath": 5}
#: ops a BN could leave behind as elementwise work
BN_DERIVED = {"BatchNormalization", "Mul", "Div", "Sub"}


def _ort(proto: onnx.ModelProto, x: torch.Tensor) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _reference(model: nn.Module, x: torch.Tensor) -> tuple[np.ndarray, float]:
    with torch.no_grad():
        y64 = copy.deepcopy(model).double()(x.double()).numpy()
        y32 = model(x).numpy()
    return y64, _rel(y64, y32)


def _rel(reference: np.ndarray, candidate: np.ndarray) -> float:
    reference = np.asarray(reference, np.float64)
    return float(np.abs(reference - np.asarray(candidate, np.float64)).max() / np.abs(reference).max())


def _constant_adds(proto: onnx.ModelProto) -> list[str]:
    constants = {i.name for i in proto.graph.initializer} | {o for n in proto.graph.node if n.op_type == "Constant"
                                                             for o in n.output}
    return [n.name for n in proto.graph.node if n.op_type == "Add" and any(i in constants for i in n.input)]


@pytest.mark.parametrize("name", sorted(KEPT))
def test_both_routes_agree_and_leave_only_reasoned_bns(name):
    model = models.create(name, seed=3)
    x = models.example_input(name, batch=2, seed=3)
    y64, floor = _reference(model, x)
    bound = max(1e-5, 2 * floor)
    plain = export_onnx(model, (x,))
    assert Counter(n.op_type for n in plain.graph.node)["BatchNormalization"] > KEPT[name]
    onnx_route, report = normfx.rewrite_with_report(plain, "fuse")
    deployed = normfx.export(model, x, None, policy="fuse")
    for proto in (onnx_route, deployed.model):
        ops = Counter(n.op_type for n in proto.graph.node)
        assert ops["BatchNormalization"] == KEPT[name]
        assert not {"Div", "Sub", "Max", "Min"} & set(ops) and not _constant_adds(proto)
        # the per-channel clamps of ReLUs with negative BN scales (see below): a Mul by ±1 before their Relu
        assert all(set(np.unique(c)) <= {-1.0, 1.0} for c in _mul_constants(proto))
        assert _rel(y64, _ort(proto, x)) <= bound
    folded = [e for e in report.applied if e.details.get("direction") == "pre-activation"]
    assert folded and all("shift carried by Conv" in e.reason for e in folded)
    kept = [e for e in report.skipped if "pre-activation BN kept" in e.reason]
    assert len(kept) == KEPT[name] == len(report.skipped)
    assert all("comes from Relu" in e.reason or "needs (a different one)" in e.reason for e in kept)


def _mul_constants(proto) -> list[np.ndarray]:
    """The constant operand of every Mul node (initializers)."""
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    return [next(inits[i] for i in n.input if i in inits) for n in proto.graph.node if n.op_type == "Mul"]


def test_preact_resnet_deploys_without_any_batchnorm():
    """Every BN goes; what remains per ReLU whose BN had negative scales on channels the residual stream carries
    with the other sign is a per-channel clamp, written s·relu(s·z) (a Mul by ±1, the Relu, the outer sign in the
    consumers; ONNX Clip takes scalar bounds only): 6 of the 17 ReLUs here, the minimum (the stem's MaxPool fixes
    stage 1's sign, each later stage's two readers disagree)."""
    model = models.create("preact_resnet", seed=3)
    x = models.example_input("preact_resnet", batch=2, seed=3)
    result = normfx.export(model, x, None, policy="fuse")
    ops = Counter(n.op_type for n in result.model.graph.node)
    assert result.batchnorm_left == 0
    assert ops["Relu"] == 17 and 0 < ops["Mul"] <= 6 and not {"Max", "Min"} & set(ops)
    assert all(set(np.unique(c)) <= {-1.0, 1.0} for c in _mul_constants(result.model))
    assert ops["Add"] == 8  # the residual additions only


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_each_activation_folds_on_the_onnx_route(act):
    model = _randomized_block(ACTIVATIONS[act]())
    x = torch.randn(2, 3, 9, 9)
    y64, floor = _reference(model, x)
    out, report = normfx.rewrite_with_report(export_onnx(model, (x,)), "fuse")
    entry = next(e for e in report.entries if "bn" in e.name)
    assert entry.status == "applied" and entry.reason.startswith("pre-activation: scale into")
    assert batchnorm_calls(out) == 0
    assert _rel(y64, _ort(out, x)) <= max(1e-5, 2 * floor)


def test_bn_on_the_graph_input_is_kept_with_the_reason():
    model = models.randomize_batchnorm(_OnInput(), 3).eval()
    x = torch.randn(2, 3, 8, 8)
    out, report = normfx.rewrite_with_report(export_onnx(model, (x,)), "fuse")
    entry = next(e for e in report.entries if "bn" in e.name)
    assert entry.status == "skipped"
    assert "pre-activation BN kept: its input channel 0 comes from the graph input 'input'" in entry.reason
    with torch.no_grad():
        assert _rel(model(x).numpy(), _ort(out, x)) <= 1e-5
