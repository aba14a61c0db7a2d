"""ONNX passes (normfx.passes.onnx): every rule on graphs that keep their BatchNormalization nodes,
numbers compared in onnxruntime (optimizations off, so ORT does not fold anything itself)."""

from __future__ import annotations

import io
import itertools
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper
from onnx_graphs import FLOAT, Builder, bn_stats

import normfx
from normfx.engine import explain, rewrite, rewrite_with_report
from normfx.errors import ModelError, RewriteError
from normfx.passes.onnx.io import load_model_proto, onnx_batchnorm_names

TOL = 1e-5
BN = "BatchNormalization"


# ----------------------------------------------------------------------------------------------
# helpers


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def rel(reference: np.ndarray, candidate: np.ndarray) -> float:
    reference, candidate = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    return float(np.abs(reference - candidate).max() / max(np.abs(reference).max(), 1e-30))


def count(model: onnx.ModelProto, op: str = BN) -> int:
    return sum(node.op_type == op for node in model.graph.node)


def entries(report) -> list[tuple[str, str, str]]:
    return [(e.name, e.status, e.reason) for e in report.entries]


def prove_rewrite(model: onnx.ModelProto, feeds: dict[str, np.ndarray], policy, **options):
    """Rewrite, then prove what every ONNX pass owes: caller's model untouched, checker + strict shape
    inference pass, ORT outputs equal (rel ≤ 1e-5), graph inputs/outputs and model fields kept, explain
    reports the same entries and changes nothing. Returns (new model, report, reference outputs, worst error)."""
    before = model.SerializeToString()
    out, report = rewrite_with_report(model, policy, **options)
    assert model.SerializeToString() == before, "the caller's ModelProto changed"
    assert isinstance(out, onnx.ModelProto) and out is not model
    onnx.checker.check_model(out, full_check=True)
    onnx.shape_inference.infer_shapes(out, strict_mode=True, check_type=True)
    reference, worst = ort_run(model, feeds), 0.0
    for r, c in zip(reference, ort_run(out, feeds)):
        assert r.shape == c.shape
        worst = max(worst, rel(r, c))
    assert worst <= TOL, f"relative error {worst:.3g}"
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    assert [i.name for i in out.graph.input] == [i.name for i in model.graph.input]
    assert out.ir_version == model.ir_version
    assert list(out.opset_import) == list(model.opset_import)
    assert list(out.metadata_props) == list(model.metadata_props)
    for field in ("producer_name", "producer_version", "doc_string", "model_version", "domain"):
        assert getattr(out, field) == getattr(model, field), field
    assert entries(explain(model, policy, **options)) == entries(report)
    assert model.SerializeToString() == before
    return out, report, reference, worst


def check(model: onnx.ModelProto, feeds: dict[str, np.ndarray], *, policy="fuse", bn_left: int = 0, **options):
    """:func:`prove_rewrite`, and ``bn_left`` BatchNormalization nodes remain. Returns (new model, report, worst
    relative error)."""
    out, report, _, worst = prove_rewrite(model, feeds, policy, **options)
    assert count(out) == bn_left, [(n.op_type, n.name) for n in out.graph.node]
    return out, report, worst


def only(report, status: str | None = None):
    assert len(report.entries) == 1, report
    entry = report.entries[0]
    if status:
        assert entry.status == status, entry
    return entry


def unchanged(model: onnx.ModelProto, policy="fuse", **options):
    """A rewrite that must leave the graph as it was (all BN skipped); returns the report."""
    before = model.SerializeToString()
    out, report = rewrite_with_report(model, policy, **options)
    assert model.SerializeToString() == before
    assert out.SerializeToString() == before
    assert all(e.status == "skipped" and e.reason for e in report.entries), report
    assert entries(explain(model, policy, **options)) == entries(report)
    return report


# ----------------------------------------------------------------------------------------------
# Conv / ConvTranspose → BN


@pytest.mark.parametrize(
    "dims,groups,bias,attrs",
    [
        (1, 1, True, {"pads": [1, 1]}),
        (1, 3, False, {"strides": [2]}),
        (2, 1, True, {"pads": [1, 1, 1, 1]}),
        (2, 2, False, {"strides": [2, 1], "dilations": [1, 2]}),
        (2, 6, True, {"pads": [1, 0, 2, 1]}),  # depthwise, asymmetric pads
        (3, 1, False, {"pads": [1] * 6}),
        (3, 3, True, {}),
    ],
)
def test_conv_bn(dims, groups, bias, attrs):
    b = Builder(dims * 10 + groups)
    x = b.input("x", ["N", 6] + [7] * dims)
    c = b.conv(x, 6, 6, 3, dims=dims, groups=groups, bias=bias, name="conv", **attrs)
    b.output(b.bn(c, 6, name="bn", eps=1e-3))
    out, report, _ = check(b.model(), b.feeds())
    entry = only(report, "applied")
    assert entry.details["fold"] == "conv_bn" and entry.details["into"] == "conv"
    assert count(out, "Conv") == 1


@pytest.mark.parametrize(
    "dims,groups,attrs",
    [
        (2, 1, {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
        (2, 2, {"strides": [2, 2], "pads": [1, 0, 1, 0], "output_padding": [1, 1]}),
        (2, 4, {}),
        (1, 2, {"strides": [3]}),
        (3, 2, {"pads": [1] * 6}),
    ],
)
def test_conv_transpose_bn(dims, groups, attrs):
    b = Builder(100 + dims * 10 + groups)
    x = b.input("x", ["N", 4] + [5] * dims)
    c = b.conv(x, 4, 8, 3, dims=dims, groups=groups, transpose=True, name="convt", **attrs)
    b.output(b.bn(c, 8, name="bn"))
    _, report, _ = check(b.model(), b.feeds())
    assert only(report, "applied").details["fold"] == "conv_bn"


def test_conv_bn_relu_chain_in_a_network():
    b = Builder(7)
    x = b.input("x", [2, 3, 9, 9])
    h = b.node("Relu", [b.bn(b.conv(x, 3, 8, 3, pads=[1] * 4), 8, name="bn1")])
    h = b.bn(b.conv(h, 8, 8, 3, groups=4, strides=[2, 2]), 8, name="bn2")
    h = b.node("Relu", [b.bn(b.conv(h, 8, 4, 1, transpose=True, groups=2, bias=False), 4, name="bn3")])
    b.output(h)
    out, report, _ = check(b.model(), b.feeds())
    assert [e.status for e in report.entries] == ["applied"] * 3
    assert count(out, "Relu") == 2


# ----------------------------------------------------------------------------------------------
# Gemm / MatMul (+Add) → BN


@pytest.mark.parametrize(
    "trans_a,trans_b,alpha,beta,c_shape",
    list(itertools.product([0, 1], [0, 1], [1.0, 0.7], [1.0, -1.3], ["vector"]))
    + [(0, 1, 1.0, 1.0, None), (1, 0, 0.5, 2.0, "row"), (0, 0, 1.0, 0.5, "scalar")],
)
def test_gemm_bn(trans_a, trans_b, alpha, beta, c_shape):
    b = Builder(hash((trans_a, trans_b, alpha, beta, c_shape)) % 1000)
    k, n = 6, 5
    x = b.input("x", [k, 4] if trans_a else [4, k])
    w = b.weight("W", [n, k] if trans_b else [k, n])
    ins = [x, w]
    if c_shape is not None:
        value = {"vector": (n,), "row": (1, n), "scalar": ()}[c_shape]
        ins.append(b.init("C", b.rng.normal(0, 0.5, value).astype(np.float32)))
    g = b.node("Gemm", ins, name="gemm", alpha=alpha, beta=beta, transA=trans_a, transB=trans_b)
    b.output(b.bn(g, n, name="bn"))
    out, report, _ = check(b.model(), b.feeds())
    entry = only(report, "applied")
    assert entry.details["fold"] == "gemm_bn"
    gemm = next(node for node in out.graph.node if node.op_type == "Gemm")
    attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
    assert attrs.get("transA", 0) == trans_a and attrs.get("transB", 0) == trans_b


def test_gemm_bn_row_varying_c_is_skipped():
    b = Builder(3)
    x = b.input("x", [4, 6])
    g = b.node("Gemm", [x, b.weight("W", [6, 5]), b.init("C", np.ones((4, 5), np.float32))], name="gemm")
    b.output(b.bn(g, 5, name="bn"))
    entry = only(unchanged(b.model()))
    assert "C" in entry.reason and "(4, 5)" in entry.reason and "kept" in entry.reason


@pytest.mark.parametrize("add", [None, "after", "before"])
def test_matmul_bn(add):
    b = Builder(11)
    x = b.input("x", ["N", 6])
    y = b.node("MatMul", [x, b.weight("W", [6, 5])], name="mm")
    if add:
        bias = b.init("bias", b.rng.normal(0, 0.5, (1, 5)).astype(np.float32))
        y = b.node("Add", [y, bias] if add == "after" else [bias, y], name="add")
    b.output(b.bn(y, 5, name="bn"))
    out, report, _ = check(b.model(), b.feeds())
    entry = only(report, "applied")
    assert entry.details["fold"] == "matmul_bn"
    assert count(out, "Add") == 1 and count(out, "MatMul") == 1


def test_matmul_3d_through_transpose_to_bn1d():
    # (N, T, K) @ (K, C) -> (N, T, C) -> Transpose -> (N, C, T) -> BN1d -> Transpose back
    b = Builder(12)
    x = b.input("x", ["N", 7, 6])
    y = b.node("MatMul", [x, b.weight("W", [6, 5])], name="mm")
    y = b.node("Add", [y, b.init("bias", np.full(5, 0.2, np.float32))])
    y = b.node("Transpose", [y], perm=[0, 2, 1])
    y = b.node("Transpose", [b.bn(y, 5, name="bn")], perm=[0, 2, 1])
    b.output(y)
    _, report, _ = check(b.model(), b.feeds())
    assert only(report, "applied").details["pattern"] == "MatMul→Add→Transpose→BatchNormalization"


def test_matmul_with_constant_first_operand_is_skipped():
    b = Builder(17)
    x = b.input("x", [6, "N"])
    b.output(b.bn(b.node("MatMul", [b.weight("W", [5, 6]), x], name="mm"), 5, name="bn"))
    entry = only(unchanged(b.model()))
    assert "first operand" in entry.reason


def test_conv_add_bn_folds_through_the_add():
    b = Builder(18)
    x = b.input("x", ["N", 3, 6, 6])
    c = b.conv(x, 3, 4, 3, name="conv")
    y = b.node("Add", [c, b.init("bias", np.ones((4, 1, 1), np.float32))], name="add")
    b.output(b.node("Relu", [b.bn(y, 4, name="bn")], name="relu"))
    out, report, _ = check(b.model(), b.feeds())  # the Add merges into the BN (bn_affine), which folds into the conv
    assert [(e.name, e.status) for e in report.entries] == [("bn", "applied"), ("add", "applied")]
    assert count(out, "Add") == 0 and count(out, "Conv") == 1


def test_matmul_3d_without_transpose_is_skipped():
    # BN1d over (N, T, C) with T == C: the BN channels are T, not the MatMul's features
    b = Builder(13)
    x = b.input("x", ["N", 5, 6])
    y = b.node("MatMul", [x, b.weight("W", [6, 5])], name="mm")
    b.output(b.bn(y, 5, name="bn"))
    entry = only(unchanged(b.model()))
    assert "axis 1" in entry.reason and "axis 2" in entry.reason


@pytest.mark.parametrize("shape_kind", ["reshape_const", "unsqueeze", "reshape_zero"])
def test_gemm_reshape_bn2d(shape_kind):
    b = Builder(14)
    x = b.input("x", ["N", 6])
    g = b.node("Gemm", [x, b.weight("W", [5, 6]), b.init("C", np.zeros(5, np.float32) + 0.1)], name="gemm", transB=1)
    if shape_kind == "unsqueeze":
        g = b.node("Unsqueeze", [g, b.init("axes", np.array([2, 3], np.int64))])
    else:
        target = [0, 5, 1, 1] if shape_kind == "reshape_zero" else [-1, 5, 1, 1]
        g = b.node("Reshape", [g, b.init("shape", np.array(target, np.int64))])
    b.output(b.bn(g, 5, name="bn"))
    out, report, _ = check(b.model(), b.feeds())
    entry = only(report, "applied")
    assert entry.details["fold"] == "gemm_bn" and count(out, "Reshape") + count(out, "Unsqueeze") == 1


def test_conv_flatten_bn1d_on_1x1_map():
    b = Builder(15)
    x = b.input("x", ["N", 3, 4, 4])
    c = b.conv(x, 3, 6, 4, name="conv")  # -> (N, 6, 1, 1)
    b.output(b.bn(b.node("Flatten", [c], axis=1), 6, name="bn"))
    _, report, _ = check(b.model(), b.feeds())
    assert only(report, "applied").details["pattern"] == "Conv→Flatten→BatchNormalization"


def test_conv_flatten_bn1d_on_2x2_map_is_skipped():
    b = Builder(16)
    x = b.input("x", ["N", 3, 5, 5])
    c = b.conv(x, 3, 2, 4, name="conv")  # -> (N, 2, 2, 2), flattened to 8 features
    b.output(b.bn(b.node("Flatten", [c], axis=1), 8, name="bn"))
    entry = only(unchanged(b.model()))
    assert "channels" in entry.reason


# ----------------------------------------------------------------------------------------------
# BN → Conv / ConvTranspose / Gemm / MatMul (forward)


@pytest.mark.parametrize(
    "attrs,static,expect_add",
    [
        ({"strides": [2, 2], "dilations": [2, 1]}, False, False),  # unpadded: plain bias, any shape
        ({"pads": [1, 1, 1, 1]}, True, True),  # padded: exact per-position constant
        ({"pads": [0, 2, 1, 0], "strides": [2, 2], "group": 2}, True, True),
        ({"auto_pad": "SAME_UPPER", "strides": [2, 2]}, True, True),
        ({"auto_pad": "VALID"}, False, False),
    ],
)
def test_bn_conv(attrs, static, expect_add):
    b = Builder(21)
    x = b.input("x", ["N", 4, 9, 8] if static else ["N", 4, "H", "W"])
    y = b.bn(x, 4, name="bn")
    groups = attrs.pop("group", 1)
    b.output(b.conv(y, 4, 6, 3, groups=groups, name="conv", **attrs))
    model = b.model()
    feeds = b.feeds() if static else {"x": b.rng.normal(0.3, 1.2, (2, 4, 11, 10)).astype(np.float32)}
    out, report, _ = check(model, feeds, border_correction=True)
    entry = only(report, "applied")
    assert entry.details["fold"] == "bn_conv" and entry.details["direction"] == "forward"
    assert count(out, "Add") == int(expect_add)
    if expect_add:
        assert "position-dependent" in entry.details["shift"]
        declined = only(unchanged(model))  # the default keeps the BN rather than add a constant map
        assert "set border_correction=true" in declined.reason


def test_bn_padded_conv_dynamic_spatial_is_skipped():
    b = Builder(22)
    x = b.input("x", ["N", 4, "H", "W"])
    b.output(b.conv(b.bn(x, 4, name="bn"), 4, 6, 3, name="conv", pads=[1, 1, 1, 1]))
    entry = only(unchanged(b.model()))
    assert "zero-padded" in entry.reason and "not static" in entry.reason and "kept" in entry.reason


@pytest.mark.parametrize("transpose,attrs", [
    (False, {"pads": [1, 1, 1, 1]}),
    (False, {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    (True, {"strides": [2, 2], "pads": [1, 0, 1, 1]}),
    (True, {"output_shape": [11, 12], "strides": [2, 2]}),
])
def test_bn_with_zero_shift_folds_into_a_padded_layer_of_any_input_shape(transpose, attrs):
    # β = mean · γ / sqrt(var + eps) exactly (here both 0): the BN is a pure per-channel scale, so nothing
    # reaches the borders and the fold is exact with any padding, input shape and ConvTranspose attributes.
    # γ and var stay randomized (negative scales included); the layer has no bias, and gets none.
    b = Builder(29)
    x = b.input("x", ["N", 4, "H", "W"])
    stats = bn_stats(b.rng, 4)
    params = [b.init(f"bn.{k}", v) for k, v in (("scale", stats["scale"]), ("B", np.zeros(4, np.float32)),
                                                ("mean", np.zeros(4, np.float32)), ("var", stats["var"]))]
    y = b.node("BatchNormalization", [x, *params], name="bn")
    b.output(b.conv(y, 4, 6, 3, transpose=transpose, bias=False, name="conv", **attrs))
    model = b.model()
    feeds = {"x": b.rng.normal(0.3, 1.2, (2, 4, 5, 6)).astype(np.float32)}
    out, report, _ = check(model, feeds)
    entry = only(report, "applied")
    assert entry.details["fold"] == "bn_conv" and entry.details["pattern"] == f"BatchNormalization→{b.nodes[-1].op_type}"
    assert "shift" not in entry.details and [n.op_type for n in out.graph.node] == [b.nodes[-1].op_type]
    assert len(out.graph.node[0].input) == 2  # no bias added
    with_shift = onnx.ModelProto()
    with_shift.CopyFrom(model)
    next(t for t in with_shift.graph.initializer if t.name == "bn.B").CopyFrom(
        numpy_helper.from_array(np.full(4, 0.5, np.float32), "bn.B"))
    entry = only(unchanged(with_shift))  # the same layer with a shift: position-dependent, not computable
    assert "BN shift" in entry.reason or "output_shape/auto_pad" in entry.reason


def test_bn_conv_transpose_static():
    b = Builder(23)
    x = b.input("x", ["N", 4, 5, 6])
    y = b.bn(x, 4, name="bn")
    b.output(b.conv(y, 4, 6, 3, transpose=True, groups=2, name="ct", strides=[2, 2], pads=[1, 0, 1, 1]))
    _, report, _ = check(b.model(), b.feeds(), border_correction=True)
    assert only(report, "applied").details["fold"] == "bn_conv"


@pytest.mark.parametrize(
    "trans_b,alpha,beta,with_c", [(0, 1.0, 1.0, True), (1, 0.6, -1.5, True), (1, 2.0, 1.0, False), (0, 1.0, 0.3, True)]
)
def test_bn_gemm(trans_b, alpha, beta, with_c):
    b = Builder(24)
    x = b.input("x", ["N", 6])
    ins = [b.bn(x, 6, name="bn"), b.weight("W", [5, 6] if trans_b else [6, 5])]
    if with_c:
        ins.append(b.init("C", b.rng.normal(0, 0.5, (5,)).astype(np.float32)))
    b.output(b.node("Gemm", ins, name="gemm", transB=trans_b, alpha=alpha, beta=beta))
    _, report, _ = check(b.model(), b.feeds())
    assert only(report, "applied").details["fold"] == "bn_gemm"


def test_bn_gemm_trans_a_is_skipped():
    b = Builder(25)
    x = b.input("x", [6, 4])
    b.output(b.node("Gemm", [b.bn(x, 4, name="bn"), b.weight("W", [6, 5])], name="gemm", transA=1))
    entry = only(unchanged(b.model()))
    assert "transA=1" in entry.reason


def test_bn_flatten_gemm_and_bn_transpose_matmul():
    b = Builder(26)
    x = b.input("x", ["N", 6, 1, 1])
    h = b.node("Flatten", [b.bn(x, 6, name="bn_a")], axis=1)
    h = b.node("Gemm", [h, b.weight("W1", [6, 5])], name="gemm")  # (N, 5)
    h = b.node("Reshape", [h, b.init("s", np.array([0, 5, 1], np.int64))])  # (N, 5, 1)
    h = b.node("Transpose", [b.bn(h, 5, name="bn_b")], perm=[0, 2, 1])  # (N, 1, 5)
    b.output(b.node("MatMul", [h, b.weight("W2", [5, 3])], name="mm"))
    out, report, _ = check(b.model(), b.feeds(), forward=True)
    assert [e.status for e in report.entries] == ["applied", "applied"]
    assert report.entries[1].details["fold"] in ("gemm_bn", "bn_matmul")


def test_bn_into_two_convs_and_forward_off():
    b = Builder(27)
    x = b.input("x", ["N", 4, 6, 6])
    y = b.bn(x, 4, name="bn")
    a = b.conv(y, 4, 3, 1, name="conv_a")
    c = b.conv(y, 4, 3, 3, name="conv_b", strides=[3, 3])
    b.output(b.node("Add", [b.node("MaxPool", [a], kernel_shape=[3, 3], strides=[3, 3]), c]))
    model, feeds = b.model(), b.feeds()
    out, report, _ = check(model, feeds)
    entry = only(report, "applied")
    assert entry.details["into"] == ["conv_a", "conv_b"]
    entry = only(unchanged(model, forward=False))
    assert "forward=false" in entry.reason


def test_bn_bn_conv_folds_both_in_rounds():
    b = Builder(28)
    x = b.input("x", ["N", 4, 5, 5])
    b.output(b.conv(b.bn(b.bn(x, 4, name="bn1"), 4, name="bn2"), 4, 2, 1, name="conv"))
    out, report, _ = check(b.model(), b.feeds())
    assert [e.status for e in report.entries] == ["applied", "applied"] and count(out, "Conv") == 1


# ----------------------------------------------------------------------------------------------
# negative cases: every skip has a reason


def test_conv_with_two_consumers_is_skipped():
    b = Builder(31)
    x = b.input("x", ["N", 3, 6, 6])
    c = b.conv(x, 3, 4, 3, name="conv", pads=[1, 1, 1, 1])
    y = b.node("Relu", [b.bn(c, 4, name="bn")])
    b.output(b.node("Add", [y, c]))
    entry = only(unchanged(b.model()))
    assert "'conv'" in entry.reason or "Conv" in entry.reason
    assert "also feeds" in entry.reason and "kept" in entry.reason


def test_conv_output_also_graph_output_is_skipped():
    b = Builder(32)
    x = b.input("x", ["N", 3, 6, 6])
    c = b.conv(x, 3, 4, 3, name="conv")
    b.output(c)
    b.output(b.node("Relu", [b.bn(c, 4, name="bn")]))
    entry = only(unchanged(b.model()))
    assert "graph output" in entry.reason


def test_bn_output_is_graph_output_keeps_its_name():
    b = Builder(33)
    x = b.input("x", ["N", 3, 6, 6])
    b.output(b.bn(b.conv(x, 3, 4, 3, name="conv"), 4, name="bn", out="features"), ["N", 4, 4, 4])
    out, report, _ = check(b.model(), b.feeds())
    only(report, "applied")
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    assert list(conv.output) == ["features"] and out.graph.output[0].name == "features"


def test_shared_initializer_is_never_edited_in_place():
    b = Builder(34)
    x = b.input("x", ["N", 3, 6, 6])
    w = b.weight("shared.w", [4, 3, 3, 3])
    c1 = b.node("Conv", [x, w], name="conv1")
    c2 = b.node("Conv", [x, w], name="conv2")
    b.output(b.bn(c1, 4, name="bn"))
    b.output(b.node("Relu", [c2]))
    model = b.model()
    original = numpy_helper.to_array(model.graph.initializer[0]).copy()
    out, report, _ = check(model, b.feeds())
    only(report, "applied")
    inits = {t.name: t for t in out.graph.initializer}
    assert np.array_equal(numpy_helper.to_array(inits["shared.w"]), original)
    conv1 = next(n for n in out.graph.node if n.name == "conv1")
    conv2 = next(n for n in out.graph.node if n.name == "conv2")
    assert conv2.input[1] == "shared.w" and conv1.input[1] != "shared.w" and conv1.input[1] in inits
    entry = only(unchanged(model, duplicate_shared=False))
    assert "duplicate_shared=false" in entry.reason and "shared.w" in entry.reason


@pytest.mark.parametrize("opset,mode", [(15, "attr"), (14, "attr"), (9, "outputs"), (15, "outputs_read")])
def test_training_mode_bn_is_skipped(opset, mode):
    b = Builder(35, opset=opset, ir_version=4 if opset == 9 else 8)
    x = b.input("x", ["N", 3, 6, 6])
    c = b.conv(x, 3, 4, 3, name="conv")
    attrs = {"training_mode": 1} if mode == "attr" else {}
    outs = b.node(BN, [c] + [b.init(f"p{i}", np.full(4, 0.5 + i, np.float32)) for i in range(4)],
                  n_out=1 if mode == "attr" else 3, name="bn", **attrs)
    for tensor in (outs if mode == "outputs_read" else outs[:1] if isinstance(outs, list) else [outs]):
        b.output(tensor)
    entry = only(unchanged(b.model()))
    assert ("are read by the graph" if mode == "outputs_read" else "training mode") in entry.reason


def test_opset15_bn_with_unused_optional_outputs_folds():
    # opset >= 14: training_mode=0 decides; declared-but-unused running-stat outputs do not block
    b = Builder(36)
    x = b.input("x", ["N", 3, 6, 6])
    c = b.conv(x, 3, 4, 3, name="conv")
    stats = [b.init(f"p{i}", v) for i, v in enumerate(bn_stats(b.rng, 4).values())]
    outs = b.node(BN, [c] + stats, n_out=3, name="bn", training_mode=0)
    b.output(b.node("Relu", [outs[0]]), ["N", 4, 4, 4])  # ONNX inference gives up on this BN form
    model = b.model()
    reference = onnx.ModelProto.FromString(model.SerializeToString())
    del reference.graph.node[1].output[1:]  # the same BN without the optional outputs, for ORT
    out, report = rewrite_with_report(model, "fuse")
    onnx.checker.check_model(out, full_check=True)
    assert only(report, "applied") and count(out) == 0
    feeds = b.feeds()
    assert rel(ort_run(reference, feeds)[0], ort_run(out, feeds)[0]) <= TOL


@pytest.mark.parametrize("which", ["graph_input", "overridable_initializer", "computed"])
def test_non_constant_bn_parameters_are_skipped(which):
    b = Builder(36)
    x = b.input("x", ["N", 3, 6, 6])
    c = b.conv(x, 3, 4, 3, name="conv")
    params = [b.init(f"p{i}", np.full(4, 0.5 + i, np.float32)) for i in range(4)]
    if which == "graph_input":
        params[2] = b.input("running_mean", [4])
    elif which == "overridable_initializer":
        b.inputs.append(helper.make_tensor_value_info("p3", FLOAT, [4]))
    else:
        params[2] = b.node("ReduceMean", [c], name="make_mean", axes=[0, 2, 3], keepdims=0)
    b.output(b.node(BN, [c] + params, name="bn"))
    entry = only(unchanged(b.model()))
    expected = {
        "graph_input": "graph input",
        "overridable_initializer": "override",
        "computed": "computed at run time by ReduceMean 'make_mean'",
    }
    assert expected[which] in entry.reason


def test_bn_with_invalid_statistics_is_skipped():
    b = Builder(45)
    x = b.input("x", ["N", 3, 6, 6])
    c = b.conv(x, 3, 4, 3, name="conv")
    stats = bn_stats(b.rng, 4)
    stats["var"][2] = -1.0  # var + eps <= 0: the BN is undefined
    b.output(b.node(BN, [c] + [b.init(f"p.{k}", v) for k, v in stats.items()], name="bn"))
    entry = only(unchanged(b.model()))
    assert "channel 2" in entry.reason and "running_var" in entry.reason


def test_conv_weight_from_graph_input_is_skipped():
    b = Builder(37)
    x = b.input("x", ["N", 3, 6, 6])
    w = b.input("w", [4, 3, 3, 3])
    b.output(b.bn(b.node("Conv", [x, w], name="conv"), 4, name="bn"))
    entry = only(unchanged(b.model()))
    assert "'w'" in entry.reason and "graph input" in entry.reason


def test_standalone_bn_is_kept_with_reason():
    b = Builder(38)
    x = b.input("x", ["N", 3, 6, 6])
    b.output(b.node("Relu", [b.bn(b.node("Relu", [x], name="r1"), 3, name="bn")], name="r2"))
    entry = only(unchanged(b.model()))
    assert "no adjacent Conv/ConvTranspose/Gemm/MatMul" in entry.reason
    assert "Relu 'r1'" in entry.reason and "cheapest standalone form in ORT" in entry.reason


def test_strict_turns_a_skip_into_an_error():
    b = Builder(39)
    x = b.input("x", ["N", 3, 6, 6])
    b.output(b.node("Relu", [b.bn(x, 3, name="bn")]))
    with pytest.raises(RewriteError, match="bn"):
        rewrite(b.model(), "fuse", strict=True)


def test_bn_in_if_subgraph_is_reported_skipped():
    b = Builder(40)
    b.input("x", ["N", 3, 4, 4])
    cond = b.input("cond", [])
    sub = Builder(41)
    inner_bn = sub.bn("x", 3, name="inner_bn")
    then_g = helper.make_graph(sub.nodes, "then", [], [helper.make_tensor_value_info(inner_bn, FLOAT, None)], sub.inits)
    else_out = [helper.make_tensor_value_info("e_out", FLOAT, None)]
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["e_out"])], "else", [], else_out)
    # the then-branch also reads an initializer of the main graph that nothing else uses
    b.init("outer_scale", np.full((1, 3, 1, 1), 1.5, np.float32))
    sub.nodes.append(helper.make_node("Mul", [inner_bn, "outer_scale"], ["scaled"], name="scale"))
    then_g = helper.make_graph(sub.nodes, "then", [], [helper.make_tensor_value_info("scaled", FLOAT, None)], sub.inits)
    branch = b.node("If", [cond], name="if", then_branch=then_g, else_branch=else_g)
    b.output(b.bn(b.conv(branch, 3, 2, 1, name="conv"), 2, name="outer_bn"))
    model = b.model()
    model.graph.input[1].CopyFrom(helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []))
    assert onnx_batchnorm_names(model) == ["inner_bn", "outer_bn"]
    feeds = {"x": b.rng.normal(size=(2, 3, 4, 4)).astype(np.float32), "cond": np.array(True)}
    out, report, _ = check(model, feeds, bn_left=0)
    status = {e.name: e for e in report.entries}
    assert status["outer_bn"].status == "applied"
    assert status["inner_bn"].status == "skipped" and "subgraph of If node 'if'" in status["inner_bn"].reason
    if_node = next(n for n in out.graph.node if n.op_type == "If")
    assert if_node == model.graph.node[0]  # the If (and its body) is copied verbatim
    assert "outer_scale" in {t.name for t in out.graph.initializer}  # still defined for the body
    false_feeds = dict(feeds, cond=np.array(False))
    assert rel(ort_run(model, false_feeds)[0], ort_run(out, false_feeds)[0]) <= TOL


def test_bn_output_read_inside_a_subgraph_is_not_folded_forward():
    b = Builder(43)
    x = b.input("x", ["N", 3, 4, 4])
    cond = b.input("cond", [])
    y = b.bn(x, 3, name="bn")
    inner_w = numpy_helper.from_array(b.rng.normal(size=(2, 3, 1, 1)).astype(np.float32), "inner_w")
    inner_w2 = numpy_helper.from_array(numpy_helper.to_array(inner_w) * 2, "inner_w2")

    def body(name: str, weight: onnx.TensorProto) -> onnx.GraphProto:
        conv = helper.make_node("Conv", [y, weight.name], [f"{name}_out"], name=f"{name}_conv")
        outputs = [helper.make_tensor_value_info(f"{name}_out", FLOAT, None)]
        return helper.make_graph([conv], name, [], outputs, [weight])

    then_g, else_g = body("then", inner_w), body("else", inner_w2)
    b.output(b.node("If", [cond], name="if", then_branch=then_g, else_branch=else_g))
    model = b.model()
    model.graph.input[1].CopyFrom(helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []))
    entry = only(unchanged(model))
    assert "inside a subgraph" in entry.reason


def test_bn_in_local_function_is_reported_skipped():
    b = Builder(42)
    x = b.input("x", ["N", 3, 4, 4])
    stats = [b.init(f"f{i}", np.full(3, 0.5 + i, np.float32)) for i in range(4)]
    bn_node = helper.make_node(BN, ["fx", "s", "bb", "m", "v"], ["fy"], name="fn_bn")
    function = helper.make_function("local", "NormBlock", ["fx", "s", "bb", "m", "v"], ["fy"], [bn_node],
                                    [helper.make_opsetid("", 15)])
    h = b.node("NormBlock", [x] + stats, name="call", domain="local")
    b.output(b.bn(b.conv(h, 3, 2, 1, name="conv"), 2, name="outer_bn"))
    outputs = [helper.make_tensor_value_info(b.nodes[-1].output[0], FLOAT, None)]
    graph = helper.make_graph(b.nodes, "g", b.inputs, outputs, b.inits)
    opsets = [helper.make_opsetid("", 15), helper.make_opsetid("local", 1)]
    model = helper.make_model(graph, opset_imports=opsets, functions=[function])
    model.ir_version = 8
    model = onnx.shape_inference.infer_shapes(model)
    del model.graph.value_info[:]
    out, report = rewrite_with_report(model, "fuse")
    onnx.checker.check_model(out, full_check=True)
    status = {e.name: e for e in report.entries}
    assert status["outer_bn"].status == "applied"
    assert status["fn_bn"].status == "skipped" and "local function" in status["fn_bn"].reason
    assert list(out.functions) == list(model.functions)
    feeds = b.feeds()
    assert rel(ort_run(model, feeds)[0], ort_run(out, feeds)[0]) <= TOL


# ----------------------------------------------------------------------------------------------
# opsets, names, fidelity


@pytest.mark.parametrize(
    "opset,ir_version,attrs", [(9, 4, {}), (7, 3, {"spatial": 1}), (14, 7, {"training_mode": 0}), (15, 8, {})]
)
def test_opsets(opset, ir_version, attrs):
    b = Builder(50 + opset, opset=opset, ir_version=ir_version)
    x = b.input("x", [2, 3, 6, 6])
    c = b.conv(x, 3, 4, 3, name="conv")
    b.output(b.node("Relu", [b.bn(c, 4, name="bn", **attrs)]))
    model = b.model()
    out, report, _ = check(model, b.feeds()) if ir_version >= 4 else _check_old_ir(model, b.feeds())
    only(report, "applied")


def _check_old_ir(model, feeds):
    out, report = rewrite_with_report(model, "fuse")
    onnx.checker.check_model(out, full_check=True)
    inits = {t.name for t in out.graph.initializer}
    assert inits <= {i.name for i in out.graph.input}  # IR 3: initializers are inputs
    assert {"x"} | inits == {i.name for i in out.graph.input}  # the BN's dropped ones are gone
    assert count(out) == 0 and out.ir_version == 3
    ref, got = ort_run(model, feeds), ort_run(out, feeds)
    assert rel(ref[0], got[0]) <= TOL
    return out, report, rel(ref[0], got[0])


def test_unnamed_and_duplicate_bn_names_are_stable():
    b = Builder(60)
    x = b.input("x", ["N", 3, 6, 6])
    h = b.bn(b.conv(x, 3, 4, 3, name="conv1"), 4, name="")
    h = b.bn(b.conv(h, 4, 4, 1, name="conv2"), 4, name="dup")
    h = b.node("Relu", [b.bn(b.conv(h, 4, 4, 1, name="conv3"), 4, name="dup")])
    b.output(h)
    model = b.model()
    names = onnx_batchnorm_names(model)
    assert names == ["BatchNormalization_0", "BatchNormalization_1", "BatchNormalization_2"]
    before = model.SerializeToString()
    out, report = rewrite_with_report(model, "fuse")
    assert model.SerializeToString() == before and count(out) == 0
    assert [e.name for e in report.entries] == names and all(e.status == "applied" for e in report.entries)
    assert entries(explain(model, "fuse")) == entries(report)
    # onnxruntime refuses duplicate node names: the reference runs on a renamed copy
    reference = onnx.ModelProto.FromString(before)
    for i, node in enumerate(reference.graph.node):
        node.name = f"n{i}"
    feeds = b.feeds()
    assert rel(ort_run(reference, feeds)[0], ort_run(out, feeds)[0]) <= TOL
    kept = rewrite_with_report(model, "keep")[1]
    assert [e.name for e in kept.entries] == names


def test_model_fields_doc_strings_and_value_info_are_kept():
    b = Builder(61)
    x = b.input("x", ["N", 3, 6, 6])
    c = b.conv(x, 3, 4, 3, name="conv")
    y = b.bn(c, 4, name="bn")
    r = b.node("Relu", [y], name="relu")
    gain = b.init("gain", np.full((1, 4, 1, 1), 0.5, np.float32))
    b.inputs.append(helper.make_tensor_value_info(gain, FLOAT, [1, 4, 1, 1]))  # overridable default (IR >= 4)
    b.output(b.node("Mul", [b.node("Sigmoid", [r], name="sig"), gain], name="mul"))
    b.value_info += [helper.make_tensor_value_info(name, FLOAT, ["N", 4, 4, 4]) for name in (c, r)]
    model = b.model(
        producer_name="tests", producer_version="9.9", doc_string="model doc", model_version=7, domain="ai.tests"
    )
    onnx.helper.set_model_props(model, {"author": "normfx", "stage": "test"})
    model.graph.doc_string = "graph doc"
    next(n for n in model.graph.node if n.name == "sig").doc_string = "sigmoid doc"
    out, report, _ = check(model, b.feeds())
    only(report, "applied")
    assert (out.model_version, out.domain, out.graph.doc_string, out.graph.name) == (7, "ai.tests", "graph doc", "g")
    assert next(n for n in out.graph.node if n.name == "sig").doc_string == "sigmoid doc"
    vi = {v.name: v for v in out.graph.value_info}
    assert c not in vi, "stale value_info of the removed conv output kept"
    assert vi[r] == model.graph.value_info[1]
    assert [i.name for i in out.graph.input] == ["x", "gain"]


def test_keep_policy_and_glob_overrides():
    b = Builder(62)
    x = b.input("x", ["N", 3, 6, 6])
    h = b.bn(b.conv(x, 3, 4, 3, name="conv1"), 4, name="stem.bn")
    b.output(b.bn(b.conv(h, 4, 4, 1, name="conv2"), 4, name="head.bn"))
    model = b.model()
    report = unchanged_keep(model)
    assert [(e.name, e.status) for e in report.entries] == [("stem.bn", "kept"), ("head.bn", "kept")]
    out, report, _ = check(model, b.feeds(), policy={"head.*": "fuse", "*": "keep"}, bn_left=1)
    assert {e.name: e.status for e in report.entries} == {"stem.bn": "kept", "head.bn": "applied"}


def unchanged_keep(model):
    before = model.SerializeToString()
    out, report = rewrite_with_report(model, "keep")
    assert out.SerializeToString() == before
    return report


# ----------------------------------------------------------------------------------------------
# torch exports (the exporters fold Conv→BN themselves unless constant folding is off)


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn_in = torch.nn.BatchNorm2d(3)
        self.conv = torch.nn.Conv2d(3, 8, 3, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.up = torch.nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1, groups=2)
        self.bn2 = torch.nn.BatchNorm2d(6)
        self.pre = torch.nn.BatchNorm2d(6)  # pre-activation: BN -> ReLU -> conv, stays
        self.conv2 = torch.nn.Conv2d(6, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 5)
        self.bn3 = torch.nn.BatchNorm1d(5)

    def forward(self, x):
        h = self.bn1(self.conv(self.bn_in(x)))
        h = torch.relu(self.bn2(self.up(torch.relu(h))))
        h = self.conv2(torch.relu(self.pre(h)))
        return self.bn3(self.fc(h.mean((2, 3))))


def _randomize_bn(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.8 + 0.4)
            m.running_var.copy_(torch.rand(c, generator=g) * 2.5 + 0.3)
            with torch.no_grad():
                sign = torch.where(torch.rand(c, generator=g) < 0.3, -1.0, 1.0)
                m.weight.copy_((torch.rand(c, generator=g) + 0.4) * sign)
                m.bias.copy_(torch.randn(c, generator=g) * 0.7 + 0.5)


@pytest.mark.parametrize("opset", [13, 17])
def test_torch_export_matches_torch(opset):
    torch.manual_seed(0)
    net = _Net().eval()
    _randomize_bn(net, opset)
    x = torch.randn(2, 3, 10, 10)
    buffer = io.BytesIO()
    torch.onnx.export(net, (x,), buffer, dynamo=False, do_constant_folding=False, opset_version=opset,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    model = onnx.load_from_string(buffer.getvalue())
    assert count(model) == 5  # bn_in, bn1, bn2, pre, bn3: the exporter folded none of them
    feeds = {"x": x.numpy()}
    out, report, _ = check(model, feeds, bn_left=1)
    status = {e.name.split("/")[1]: e for e in report.entries}
    assert status["pre"].status == "skipped" and "Relu" in status["pre"].reason
    assert status["bn_in"].details["fold"] == "bn_conv"  # unpadded conv: forward fold, static or not
    with torch.no_grad():
        expected = net(x).numpy()
    assert rel(expected, ort_run(out, feeds)[0]) <= TOL
    with torch.no_grad():  # dynamic batch still works
        assert rel(net(x[:1]).numpy(), ort_run(out, {"x": x.numpy()[:1]})[0]) <= TOL
    used = {name for node in out.graph.node for name in node.input}
    assert all(n.output[0] in used for n in out.graph.node if n.op_type == "Identity"), "dead Identity left behind"


class _Seq(torch.nn.Module):
    """Conv1d + BN1d, then Linear over the channels of a (B, C, L) tensor with BN1d on each side."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(4, 8, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm1d(8)
        self.lin = torch.nn.Linear(8, 6)
        self.bn2 = torch.nn.BatchNorm1d(6)
        self.pre = torch.nn.BatchNorm1d(6)
        self.lin2 = torch.nn.Linear(6, 3)

    def forward(self, x):
        h = self.bn(self.conv(x))
        h = self.bn2(self.lin(h.transpose(1, 2)).transpose(1, 2))  # MatMul(x, Transpose(W)) + Add -> BN1d
        return self.lin2(self.pre(h).transpose(1, 2))  # BN1d -> Transpose -> MatMul: forward fold


class _Eff(torch.nn.Module):
    """Bias-less convs, depthwise + SiLU + squeeze-excite, ConvTranspose, Linear + BN1d."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.SiLU())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False), nn.BatchNorm2d(8), nn.SiLU())
        self.se1, self.se2 = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
        self.proj = nn.Sequential(nn.Conv2d(8, 12, 1, bias=False), nn.BatchNorm2d(12))
        self.up = nn.Sequential(nn.ConvTranspose2d(12, 4, 2, 2, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.fc, self.bn = nn.Linear(4, 5), nn.BatchNorm1d(5)

    def forward(self, x):
        h = self.dw(self.stem(x))
        h = h * torch.sigmoid(self.se2(torch.relu(self.se1(h.mean((2, 3), keepdim=True)))))
        h = self.up(self.proj(h))
        return self.bn(self.fc(h.mean((2, 3))))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_torch_exports_fold_completely(exporter):
    """Exports that keep their BNs (no constant folding / no optimizer) carry weights through small
    constant subgraphs — Transpose(W), Expand(CastLike(0, x), Shape(W)) — which the passes read."""
    torch.manual_seed(1)
    cases = [(_Seq(), torch.randn(2, 4, 7))] + ([(_Eff(), torch.randn(2, 3, 16, 16))] if exporter == "dynamo" else [])
    for net, x in cases:
        net.eval()
        _randomize_bn(net, 5)
        if exporter == "dynamo":
            model = torch.onnx.export(net, (x,), dynamo=True, optimize=False, verbose=False).model_proto
        else:
            buffer = io.BytesIO()
            torch.onnx.export(net, (x,), buffer, dynamo=False, do_constant_folding=False, opset_version=17)
            model = onnx.load_from_string(buffer.getvalue())
        assert count(model) >= 3
        feeds = {model.graph.input[0].name: x.numpy()}
        out, report, _ = check(model, feeds)
        assert all(e.status == "applied" for e in report.entries), report
        with torch.no_grad():
            assert rel(net(x).numpy(), ort_run(out, feeds)[0]) <= TOL
        left = {n.op_type for n in out.graph.node}
        assert not left & {"Expand", "CastLike", "Shape"}, "dead constant subgraphs left behind"


def test_constant_subgraph_parameters():
    b = Builder(44)
    x = b.input("x", ["N", 5, 6])
    wt = b.node("Transpose", [b.weight("W", [4, 6])], perm=[1, 0])  # Linear weight (out, in) -> (in, out)
    zero = b.node("CastLike", [b.node("Constant", [], value=numpy_helper.from_array(np.array(0.0), "z")), x])
    cw = b.weight("cw", [4, 4, 1])
    bias = b.node("Expand", [zero, b.node("Shape", [cw], start=0, end=1)])
    y = b.node("Transpose", [b.node("MatMul", [x, wt], name="mm")], perm=[0, 2, 1])  # (N, 4, 5)
    stats = {k: b.init(f"s.{k}", v) for k, v in bn_stats(b.rng, 4).items()}
    mean = b.node("Identity", [stats["mean"]])
    y = b.node(BN, [y, stats["scale"], stats["B"], mean, stats["var"]], name="bn_mm")
    y = b.node("Conv", [y, cw, bias], name="conv")
    b.output(b.bn(y, 4, name="bn_conv"))
    model = b.model()
    out, report, _ = check(model, b.feeds())
    assert [e.status for e in report.entries] == ["applied", "applied"]
    assert [n.op_type for n in out.graph.node] == ["MatMul", "Add", "Transpose", "Conv"]


def test_type_and_shape_readers_do_not_block_folds():
    # dynamo-style: a bias-less conv's bias is Expand(CastLike(0, its input), Shape(W)[:1]), so the
    # BN output has a CastLike reader; a Shape reader of the conv output sits before the other BN.
    b = Builder(46)
    x = b.input("x", ["N", 3, 6, 6])
    c = b.conv(x, 3, 4, 3, name="conv1", bias=False)
    size = b.node("Shape", [c], name="shape_of_conv")
    y = b.node("Relu", [b.bn(c, 4, name="bn1")])
    y2 = b.bn(y, 4, name="bn2")  # folds forward into conv2
    zero = b.node("CastLike", [b.init("zero", np.array(0.0, np.float32)), y2], name="castlike")
    w = b.weight("w2", [2, 4, 1, 1])
    bias = b.node("Expand", [zero, b.node("Shape", [w], start=0, end=1)])
    b.output(b.node("Conv", [y2, w, bias], name="conv2"))
    b.outputs.append(helper.make_tensor_value_info(size, onnx.TensorProto.INT64, [4]))
    out, report, _ = check(b.model(), b.feeds())
    assert [(e.name, e.status) for e in report.entries] == [("bn1", "applied"), ("bn2", "applied")]
    shape_node = next(n for n in out.graph.node if n.name == "shape_of_conv")
    conv1 = next(n for n in out.graph.node if n.name == "conv1")
    assert shape_node.input[0] == conv1.output[0]
    assert report.entries[1].details["fold"] == "bn_conv"
    left = {n.name for n in out.graph.node} | {n.op_type for n in out.graph.node}
    assert not {"castlike", "Expand"} & left  # the old bias subgraph is gone


# ----------------------------------------------------------------------------------------------
# files


def _simple_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    b = Builder(70)
    x = b.input("x", ["N", 3, 6, 6])
    b.output(b.node("Relu", [b.bn(b.conv(x, 3, 16, 3, name="conv"), 16, name="bn")]))
    return b.model(), b.feeds()


def test_rewrite_from_a_path_with_external_data(tmp_path):
    model, feeds = _simple_model()
    reference = ort_run(model, feeds)[0]
    plain = tmp_path / "plain.onnx"
    onnx.save(model, str(plain))
    out = normfx.rewrite(str(plain), "fuse")
    assert count(out) == 0 and rel(reference, ort_run(out, feeds)[0]) <= TOL
    folder = tmp_path / "ext"
    folder.mkdir()
    external = folder / "model.onnx"
    copy = onnx.ModelProto.FromString(model.SerializeToString())  # onnx.save edits the proto it saves
    onnx.save(copy, str(external), save_as_external_data=True, location="weights.bin", size_threshold=0)
    before = external.read_bytes(), (folder / "weights.bin").read_bytes()
    out = rewrite(external, "fuse")  # PathLike
    assert (external.read_bytes(), (folder / "weights.bin").read_bytes()) == before
    onnx.checker.check_model(out, full_check=True)
    assert rel(reference, ort_run(out, feeds)[0]) <= TOL
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in out.graph.initializer)


def test_model_proto_with_unloaded_external_data_is_skipped_with_reason(tmp_path):
    model, _ = _simple_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="w.bin", size_threshold=0)
    proto = onnx.load(str(path), load_external_data=False)
    report = explain(proto, "fuse")
    entry = only(report, "skipped")
    assert "cannot be read" in entry.reason


@pytest.mark.parametrize("kind", ["missing", "folder", "text", "truncated", "external_missing"])
def test_bad_files_raise_model_error(tmp_path, kind):
    model, _ = _simple_model()
    path = tmp_path / "bad.onnx"
    if kind == "folder":
        path.mkdir()
    elif kind == "text":
        path.write_text("this is not an ONNX model\n")
    elif kind == "truncated":
        data = model.SerializeToString()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "external_missing":
        onnx.save(model, str(path), save_as_external_data=True, location="w.bin", size_threshold=0)
        os.remove(tmp_path / "w.bin")
    with pytest.raises(ModelError) as info:
        rewrite(str(path), "fuse")
    message = str(info.value)
    assert "bad.onnx" in message and "\n" not in message
    with pytest.raises(ModelError):
        load_model_proto(path)


def test_load_model_proto_returns_a_copy():
    model, _ = _simple_model()
    copy = load_model_proto(model)
    assert copy is not model and copy == model
    copy.graph.node[0].name = "changed"
    assert model.graph.node[0].name == "conv"
    with pytest.raises(ModelError):
        load_model_proto(onnx.ModelProto())
