"""Policy ``unfuse`` on ONNX (normfx.passes.onnx.unfuse): a BatchNormalization put back after every
Conv/ConvTranspose/Gemm/MatMul(+Add) that no normalization follows — eval outputs unchanged (onnxruntime,
optimizations off), statistics measured on data, skips with their reasons, and the round trip
``fuse → export → unfuse → fuse`` on every zoo model."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from onnx_graphs import FLOAT, Builder
from test_onnx_passes import count, entries, ort_run, prove_rewrite, rel

import normfx
from normfx import models
from normfx.engine import explain, rewrite_with_report
from normfx.errors import InputDataError, ModelError, PolicyError, RewriteError
from normfx.export import export_onnx
from normfx.passes import unfuse_options
from normfx.passes.onnx import unfuse as onnx_unfuse
from normfx.passes.unfuse_options import CLASSIFIER_REASON, NO_DATA_NOTE
from normfx.stats.onnx_train_graph import with_batch_statistics

TOL = 1e-5
BN = "BatchNormalization"


# ----------------------------------------------------------------------------------------------
# helpers


def inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def bn_params(model: onnx.ModelProto, name: str) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The (scale, B, mean, var) initializers and the attributes of BN node ``name``."""
    node = next(n for n in model.graph.node if n.name == name)
    assert node.op_type == BN
    values = inits(model)
    params = dict(zip(("scale", "B", "mean", "var"), (values[i] for i in node.input[1:5])))
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return params, attrs


def check(model: onnx.ModelProto, feeds: dict[str, np.ndarray], *, policy="unfuse", added: int, **options):
    """Unfuse, then prove it: caller's model untouched, checker + strict shape inference pass, ORT eval
    outputs equal (rel ≤ 1e-5), ``added`` new BNs (one per applied entry), model fields kept, explain
    reports the same entries, and ``fuse`` folds every new BN back to the same outputs.
    Returns (new model, report)."""
    out, report, reference, _ = prove_rewrite(model, feeds, policy, **options)
    assert count(out) - count(model) == added == len(report.applied), report
    # existing initializers are never edited: every one the output keeps is bit-identical
    old = inits(model)
    for name, value in inits(out).items():
        if name in old:
            assert value.dtype == old[name].dtype and np.array_equal(value, old[name]), name
    back, fused = rewrite_with_report(out, "fuse")
    assert count(back) == count(model)
    for r, c in zip(reference, ort_run(back, feeds)):
        assert rel(r, c) <= TOL
    return out, report


def by_name(report) -> dict:
    return {e.name: e for e in report.entries}


def unchanged(model: onnx.ModelProto, policy="unfuse", **options):
    """An unfuse that skips every layer: ``rewrite`` refuses with one line (nothing to unfuse) and leaves the
    model as it was; ``explain`` reports every layer with its reason. Returns explain's report."""
    before = model.SerializeToString()
    with pytest.raises(ModelError, match="no layer to unfuse") as info:
        rewrite_with_report(model, policy, **options)
    assert "\n" not in str(info.value)
    assert model.SerializeToString() == before
    report = explain(model, policy, **options)
    mine = [e for e in report.entries if e.rule == "unfuse"]  # existing BNs are reported "kept" by the engine
    assert mine and all(e.status == "skipped" and e.reason for e in mine), report
    assert any("rewrite would refuse" in n for n in report.notes)
    return report


# ----------------------------------------------------------------------------------------------
# Conv / ConvTranspose


@pytest.mark.parametrize(
    "dims,groups,bias,transpose",
    [(1, 1, True, False), (2, 1, True, False), (2, 1, False, False), (2, 3, True, False), (2, 6, True, False),
     (3, 1, True, False), (2, 1, True, True), (2, 2, True, True), (1, 3, False, True)],
)
def test_conv_becomes_conv_without_bias_then_bn(dims, groups, bias, transpose):
    b = Builder(dims * 10 + groups + 100 * transpose)
    x = b.input("x", ["N", 6] + [5] * dims)
    c = b.conv(x, 6, 6, 3, dims=dims, groups=groups, bias=bias, transpose=transpose, name="conv")
    b.output(b.conv(b.node("Relu", [c]), 6, 2, 1, dims=dims, name="head"))
    model = b.model()
    out, report = check(model, b.feeds(), added=1, eps=1e-3, momentum=0.2)
    entry = by_name(report)["conv"]
    assert entry.status == "applied" and entry.details["statistics"] == "identity"
    assert by_name(report)["head"].status == "skipped"
    layer = next(n for n in out.graph.node if n.name == "conv")
    assert list(layer.input) == ["x", "conv.weight"]  # the bias input is gone, the weight tensor kept
    params, attrs = bn_params(out, entry.details["bn"])
    expected_b = inits(model)["conv.bias"] if bias else np.zeros(6, np.float32)
    assert np.array_equal(params["B"], expected_b) and np.array_equal(params["mean"], np.zeros(6, np.float32))
    assert np.allclose(params["scale"], 1.0) and np.allclose(params["var"], 1.0 - 1e-3)
    assert attrs["epsilon"] == pytest.approx(1e-3) and attrs["momentum"] == pytest.approx(0.8)
    assert all(p.dtype == np.float32 for p in params.values())
    assert "conv.bias" not in inits(out) or not bias


def test_conv_network_with_residual_and_unnamed_nodes():
    b = Builder(7)
    x = b.input("x", ["N", 3, 8, 8])
    h = b.node("Relu", [b.conv(x, 3, 4, 3, pads=[1] * 4, name="")])
    r = b.conv(h, 4, 4, 3, pads=[1] * 4, name="")
    h = b.node("Relu", [b.node("Add", [r, h])])
    pooled = b.node("Flatten", [b.node("GlobalAveragePool", [h])])
    b.output(b.node("Gemm", [pooled, b.weight("fc.w", [5, 4]), b.init("fc.b", np.ones(5, np.float32))],
                    name="fc", transB=1))
    model = b.model()
    for node in model.graph.node:  # unnamed layers get stable names
        if node.op_type == "Conv":
            node.name = ""
    out, report = check(model, b.feeds(), added=2)
    assert [(e.name, e.status) for e in report.entries] == [
        ("Conv_0", "applied"), ("Conv_1", "applied"), ("fc", "skipped")]
    assert [n.name for n in out.graph.node if n.op_type == BN] == ["Conv_0_bn", "Conv_1_bn"]
    assert "classifier" in by_name(report)["fc"].reason


def test_shared_weight_is_kept_and_each_call_gets_its_bn():
    b = Builder(8)
    x = b.input("x", ["N", 4, 6, 6])
    w, bias = b.weight("shared.w", [4, 4, 1, 1]), b.init("shared.b", np.full(4, 0.3, np.float32))
    h = b.node("Conv", [x, w, bias], name="first")
    h = b.node("Conv", [b.node("Relu", [h]), w, bias], name="second")
    b.output(b.conv(h, 4, 2, 1, name="head"))
    out, report = check(b.model(), b.feeds(), added=2)
    assert by_name(report)["first"].status == by_name(report)["second"].status == "applied"
    assert {"shared.w"} <= set(inits(out)) and "shared.b" not in inits(out)


# ----------------------------------------------------------------------------------------------
# Gemm / MatMul


@pytest.mark.parametrize(
    "trans_a,trans_b,alpha,beta,c_shape",
    [(0, 0, 1.0, 1.0, "vector"), (0, 1, 1.0, 1.0, "vector"), (0, 1, 0.7, -1.3, "vector"), (0, 0, 1.5, 0.5, "row"),
     (0, 1, 1.0, 1.0, None), (0, 0, 1.0, 2.0, "scalar"), (1, 1, 0.5, 2.0, "vector")],
)
def test_gemm(trans_a, trans_b, alpha, beta, c_shape):
    b = Builder(hash((trans_a, trans_b, alpha, beta, c_shape)) % 1000)
    k, n = 6, 5
    x = b.input("x", [k, 4] if trans_a else [4, k])
    ins = [x, b.weight("W", [n, k] if trans_b else [k, n])]
    c = None
    if c_shape is not None:
        c = b.rng.normal(0, 0.5, {"vector": (n,), "row": (1, n), "scalar": ()}[c_shape]).astype(np.float32)
        ins.append(b.init("C", c))
    g = b.node("Gemm", ins, name="gemm", alpha=alpha, beta=beta, transA=trans_a, transB=trans_b)
    b.output(b.node("Gemm", [b.node("Relu", [g]), b.weight("W2", [n, 3])], name="head"))
    model = b.model()
    out, report = check(model, b.feeds(4), added=1)
    entry = by_name(report)["gemm"]
    assert entry.status == "applied" and entry.details["alpha"] == pytest.approx(alpha)
    gemm = next(node for node in out.graph.node if node.name == "gemm")
    assert list(gemm.input) == [x, "W"]
    attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
    assert (attrs.get("transA", 0), attrs.get("transB", 0)) == (trans_a, trans_b)
    params, _ = bn_params(out, entry.details["bn"])
    expected = np.zeros(n) if c is None else np.broadcast_to(beta * c.astype(np.float64).reshape(-1), (n,))
    assert np.allclose(params["B"], expected, rtol=1e-6, atol=1e-7)


def test_gemm_row_varying_c_is_skipped():
    b = Builder(3)
    x = b.input("x", [4, 6])
    g = b.node("Gemm", [x, b.weight("W", [6, 5]), b.init("C", np.ones((4, 5), np.float32))], name="gemm")
    b.output(b.node("Gemm", [g, b.weight("W2", [5, 2])], name="head"))
    entry = by_name(unchanged(b.model()))["gemm"]
    assert "C" in entry.reason and "(4, 5)" in entry.reason and "varies along rows" in entry.reason


def test_gemm_opset9_keeps_a_zero_c():
    b = Builder(4, opset=9, ir_version=4)
    x = b.input("x", [3, 6])
    g = b.node("Gemm", [x, b.weight("W", [5, 6]), b.init("C", np.full(5, 0.4, np.float32))], name="gemm", transB=1)
    b.output(b.node("Gemm", [g, b.weight("W2", [5, 2]), b.init("C2", np.zeros(2, np.float32))], name="head"))
    out, report = check(b.model(), b.feeds(), added=1)
    gemm = next(node for node in out.graph.node if node.name == "gemm")
    assert len(gemm.input) == 3 and not inits(out)[gemm.input[2]].any()
    params, _ = bn_params(out, by_name(report)["gemm"].details["bn"])
    assert np.allclose(params["B"], 0.4)


@pytest.mark.parametrize("add", [None, "after", "before", "scalar"])
def test_matmul_and_its_bias_add(add):
    b = Builder(11)
    x = b.input("x", ["N", 6])
    y = b.node("MatMul", [x, b.weight("W", [6, 5])], name="mm")
    bias = None
    if add:
        bias = b.rng.normal(0, 0.5, () if add == "scalar" else (1, 5)).astype(np.float32)
        name = b.init("bias", bias)
        y = b.node("Add", [y, name] if add != "before" else [name, y], name="add")
    b.output(b.node("MatMul", [b.node("Tanh", [y]), b.weight("W2", [5, 3])], name="head"))
    model = b.model()
    out, report = check(model, b.feeds(), added=1)
    entry = by_name(report)["mm"]
    assert entry.status == "applied"
    assert count(out, "Add") == 0 and count(out, "MatMul") == 2
    assert entry.details["pattern"] == ("MatMul→Add" if add else "MatMul")
    params, _ = bn_params(out, entry.details["bn"])
    expected = np.zeros(5) if bias is None else np.broadcast_to(bias.reshape(-1), (5,))
    assert np.allclose(params["B"], expected)


def test_matmul_with_a_runtime_add_keeps_the_add():
    b = Builder(12)
    x = b.input("x", ["N", 6])
    y = b.node("Add", [b.node("MatMul", [x, b.weight("W", [6, 6])], name="mm"), x], name="residual")
    b.output(b.node("MatMul", [y, b.weight("W2", [6, 2])], name="head"))
    out, report = check(b.model(), b.feeds(), added=1)
    assert count(out, "Add") == 1 and by_name(report)["mm"].details["pattern"] == "MatMul"


def test_matmul_on_3d_input_is_skipped():
    b = Builder(13)
    x = b.input("x", ["N", 7, 6])
    y = b.node("Add", [b.node("MatMul", [x, b.weight("W", [6, 5])], name="mm"), b.init("bias", np.ones(5, np.float32))])
    b.output(b.node("MatMul", [b.node("Relu", [y]), b.weight("W2", [5, 2])], name="head"))
    entry = by_name(unchanged(b.model()))["mm"]
    assert "rank 3" in entry.reason and "axis 1" in entry.reason and "last axis" in entry.reason


def test_matmul_of_unknown_rank_and_non_constant_weights_are_skipped():
    b = Builder(14)
    b.inputs.append(helper.make_tensor_value_info("x", FLOAT, None))  # rank unknown
    b.shapes["x"] = [3, 6]
    x = "x"
    w = b.input("w", [6, 5])
    h = b.node("MatMul", [x, b.weight("W", [6, 6])], name="unknown_rank")
    h = b.node("MatMul", [h, w], name="runtime_weight")
    h = b.node("MatMul", [b.weight("W0", [4, 3]), h], name="constant_first")
    b.output(b.node("MatMul", [h, b.weight("W2", [5, 2])], name="head"))
    report = by_name(unchanged(b.model()))
    assert "unknown rank" in report["unknown_rank"].reason
    assert "graph input" in report["runtime_weight"].reason
    assert "first operand" in report["constant_first"].reason


def test_conv_weight_from_graph_input_is_skipped():
    b = Builder(15)
    x = b.input("x", ["N", 3, 5, 5])
    w = b.input("w", [4, 3, 3, 3])
    b.output(b.conv(b.node("Conv", [x, w], name="conv"), 4, 2, 1, name="head"))
    entry = by_name(unchanged(b.model()))["conv"]
    assert "weight 'w' is a graph input" in entry.reason


# ----------------------------------------------------------------------------------------------
# skips: already normalized, classifier, subgraphs


@pytest.mark.parametrize("norm", ["bn", "flatten_bn", "instance", "group", "layer"])
def test_layer_already_followed_by_a_normalization_is_skipped(norm):
    b = Builder(20, opset=18 if norm in ("group", "layer") else 15)
    flat = norm == "flatten_bn"
    x = b.input("x", ["N", 4, 1, 1] if flat else ["N", 3, 5, 5])
    c = b.conv(x, 4 if flat else 3, 4, 1, name="conv")
    scale, shift = b.init("s", np.full(4, 1.3, np.float32)), b.init("t", np.full(4, 0.2, np.float32))
    if norm in ("bn", "flatten_bn"):
        y, expected = b.bn(b.node("Flatten", [c]) if flat else c, 4, name="bn"), "BatchNormalization 'bn'"
    elif norm == "instance":
        y, expected = b.node("InstanceNormalization", [c, scale, shift], name="in"), "InstanceNormalization 'in'"
    elif norm == "group":
        y = b.node("GroupNormalization", [c, scale, shift], name="gn", num_groups=2)
        expected = "GroupNormalization 'gn'"
    else:
        ln_scale, ln_shift = b.init("ls", np.full(5, 1.1, np.float32)), b.init("lt", np.full(5, 0.1, np.float32))
        y = b.node("LayerNormalization", [c, ln_scale, ln_shift], name="ln", axis=-1)
        expected = "LayerNormalization 'ln'"
    y = b.node("Relu", [y])
    b.output(b.node("Gemm", [y, b.weight("W", [4, 2])], name="head") if flat else b.conv(y, 4, 2, 1, name="head"))
    report = by_name(unchanged(b.model()))
    assert report["conv"].reason == f"already followed by {expected}: nothing to unfuse"


def test_matmul_add_then_bn_is_already_followed():
    b = Builder(21)
    x = b.input("x", ["N", 6])
    y = b.node("Add", [b.node("MatMul", [x, b.weight("W", [6, 5])], name="mm"), b.init("bias", np.ones(5, np.float32))])
    b.output(b.node("MatMul", [b.bn(y, 5, name="bn"), b.weight("W2", [5, 2])], name="head"))
    report = by_name(unchanged(b.model()))
    assert report["mm"].reason == "already followed by BatchNormalization 'bn': nothing to unfuse"


def test_classifier_default_and_classifier_true():
    b = Builder(22)
    x = b.input("x", ["N", 3, 6, 6])
    h = b.node("Relu", [b.conv(x, 3, 4, 3, name="body")])
    seg = b.node("Sigmoid", [b.conv(h, 4, 2, 1, name="seg_head")])  # a second output head, conv
    logits = b.node("Gemm", [b.node("Flatten", [b.node("GlobalAveragePool", [h])]), b.weight("W", [4, 5])], name="fc")
    b.output(b.node("Softmax", [logits], axis=1))
    b.output(seg)
    model = b.model()
    feeds = b.feeds()
    _, report = check(model, feeds, added=1)
    status = by_name(report)
    assert status["body"].status == "applied"
    reason = CLASSIFIER_REASON
    assert status["fc"].reason == status["seg_head"].reason == reason
    _, report = check(model, feeds, policy="unfuse:classifier=true", added=3)
    assert all(e.status == "applied" for e in report.entries)


def test_layers_in_subgraphs_and_local_functions_are_reported_skipped():
    b = Builder(23)
    x = b.input("x", ["N", 3, 4, 4])
    cond = b.input("cond", [])
    w = numpy_helper.from_array(b.rng.normal(size=(3, 3, 1, 1)).astype(np.float32), "inner_w")

    def body(name: str) -> onnx.GraphProto:
        conv = helper.make_node("Conv", [x, "inner_w"], [f"{name}_out"], name=f"{name}_conv")
        return helper.make_graph([conv], name, [], [helper.make_tensor_value_info(f"{name}_out", FLOAT, None)])

    b.inits.append(w)
    branch = b.node("If", [cond], name="if", then_branch=body("then"), else_branch=body("else"))
    fn_conv = helper.make_node("Conv", ["fx", "fw"], ["fy"], name="fn_conv")
    function = helper.make_function("local", "Block", ["fx", "fw"], ["fy"], [fn_conv], [helper.make_opsetid("", 15)])
    h = b.node("Block", [branch, b.weight("fw", [3, 3, 1, 1])], name="call", domain="local")
    h = b.node("Relu", [b.conv(h, 3, 3, 1, name="conv")])
    b.output(b.conv(h, 3, 2, 1, name="head"))
    y = helper.make_tensor_value_info(b.nodes[-1].output[0], FLOAT, ["N", 2, 4, 4])
    graph = helper.make_graph(b.nodes, "g", b.inputs, [y], b.inits)
    opsets = [helper.make_opsetid("", 15), helper.make_opsetid("local", 1)]
    model = helper.make_model(graph, opset_imports=opsets, functions=[function])
    model.ir_version = 8
    model.graph.input[1].CopyFrom(helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []))
    out, report = rewrite_with_report(model, "unfuse")
    onnx.checker.check_model(out, full_check=True)
    status = by_name(report)
    assert status["conv"].status == "applied" and status["head"].status == "skipped"
    for name in ("then_conv", "else_conv"):
        assert status[name].status == "skipped" and "subgraph of If node 'if'" in status[name].reason
    assert status["fn_conv"].status == "skipped" and "local function 'local.Block'" in status["fn_conv"].reason
    assert list(out.functions) == list(model.functions)
    for flag in (True, False):
        feeds = {"x": b.rng.normal(size=(2, 3, 4, 4)).astype(np.float32), "cond": np.array(flag)}
        assert rel(ort_run(model, feeds)[0], ort_run(out, feeds)[0]) <= TOL


def test_a_residual_stream_returned_as_features_is_not_the_classifier():
    """Only single-data-input paths make the classifier: an Add / Mul / Concat of two computed tensors
    ends the path (a backbone returning its features), a shape-only input (Reshape(g, Shape(g))) does not."""
    b = Builder(24)
    x = b.input("x", ["N", 4, 6, 6])
    r = b.node("Relu", [b.conv(x, 4, 4, 3, pads=[1] * 4, name="stem")])
    features = b.node("Add", [b.conv(r, 4, 4, 1, name="block"), r])  # residual Add, a graph output
    gate = b.node("Sigmoid", [b.conv(b.node("GlobalAveragePool", [features]), 4, 4, 1, name="gate")])
    cat = b.node("Concat", [b.conv(r, 4, 2, 1, name="proj"), r], axis=1)
    pooled = b.node("Flatten", [b.node("GlobalAveragePool", [features])])
    logits = b.node("Gemm", [pooled, b.weight("fc.w", [5, 4]), b.init("fc.b", np.ones(5, np.float32))],
                    name="fc", transB=1)
    b.output(b.node("Reshape", [logits, b.node("Shape", [logits])]))  # a shape-only second input
    b.output(features)
    b.output(b.node("Mul", [features, gate]))  # squeeze-excitation gate: two computed inputs
    b.output(cat)
    model = b.model()
    _, report = check(model, b.feeds(), added=4)
    status = by_name(report)
    assert all(status[name].status == "applied" for name in ("stem", "block", "gate", "proj")), report
    assert status["fc"].status == "skipped" and status["fc"].reason == CLASSIFIER_REASON
    _, report = check(model, b.feeds(), policy="unfuse:classifier=true", added=5)


def test_zoo_backbone_without_head_unfuses_every_conv():
    """resnet18 with fc = Identity returns its features: no layer is the classifier."""
    model = models.create("resnet18", seed=5)
    model.fc = torch.nn.Identity()
    x = models.example_input("resnet18", batch=2, seed=5)
    exported = export_onnx(normfx.rewrite(model, "fuse", example_inputs=x).eval(), (x,))
    _, report = rewrite_with_report(exported, "unfuse")
    assert len(report.applied) == count(exported, "Conv") >= 17
    assert not any("classifier" in e.reason for e in report.skipped), report


# ----------------------------------------------------------------------------------------------
# options, errors, fidelity


def test_norm_option():
    b = Builder(30)
    x = b.input("x", ["N", 3, 5, 5])
    b.output(b.conv(b.node("Relu", [b.conv(x, 3, 4, 3, name="conv")]), 4, 2, 1, name="head"))
    model = b.model()
    for norm in ("frozen", "sync"):
        _, report = check(model, b.feeds(), policy=f"unfuse:norm={norm}", added=1)
        assert by_name(report)["conv"].details["norm"] == norm
        assert any("torch route" in note for note in report.notes)
    _, report = check(model, b.feeds(), added=1)
    assert not any("torch route" in note for note in report.notes)
    assert NO_DATA_NOTE in report.notes
    with pytest.raises(PolicyError, match="batchnorm, frozen, sync"):
        rewrite_with_report(model, "unfuse:norm=group")
    with pytest.raises(PolicyError, match="eps"):
        rewrite_with_report(model, "unfuse:eps=0")
    with pytest.raises(PolicyError, match="momentum"):
        rewrite_with_report(model, "unfuse:momentum=1.5")


def test_options_are_the_shared_ones():
    assert onnx_unfuse.NORMS is unfuse_options.NORMS
    assert not hasattr(onnx_unfuse, "_options") and not hasattr(onnx_unfuse, "LayerLocation")
    b = Builder(35)
    x = b.input("x", ["N", 3, 5, 5])
    b.output(b.conv(b.node("Relu", [b.conv(x, 3, 4, 3, name="conv")]), 4, 2, 1, name="head"))
    for bad, match in (("eps=inf", "finite"), ("eps=nan", "finite"), ("num_batches=-1", "num_batches")):
        with pytest.raises(PolicyError, match=match):
            rewrite_with_report(b.model(), f"unfuse:{bad}")


def test_model_without_layers_is_a_model_error():
    b = Builder(31)
    x = b.input("x", ["N", 3])
    b.output(b.node("Relu", [x]))
    with pytest.raises(ModelError, match="no Conv, ConvTranspose, Gemm or MatMul"):
        rewrite_with_report(b.model(), "unfuse")


def test_globs_strict_and_model_fields():
    b = Builder(32)
    x = b.input("x", ["N", 3, 5, 5])
    h = b.node("Relu", [b.conv(x, 3, 4, 3, name="stem.conv")])
    h = b.node("Relu", [b.conv(h, 4, 4, 1, name="block.conv")])
    b.output(b.conv(h, 4, 2, 1, name="head"))
    model = b.model(producer_name="tests", doc_string="model doc", model_version=3, domain="ai.tests")
    onnx.helper.set_model_props(model, {"author": "normfx"})
    out, report = check(model, b.feeds(), policy={"block.*": "unfuse", "*": "keep"}, added=1)
    assert by_name(report)["block.conv"].status == "applied" and "stem.conv" not in by_name(report)
    assert (out.producer_name, out.doc_string, out.model_version, out.domain) == ("tests", "model doc", 3, "ai.tests")
    with pytest.raises(RewriteError, match="head"):
        rewrite_with_report(model, "unfuse", strict=True)


def test_old_opset_is_skipped_with_reason():
    b = Builder(33, opset=6, ir_version=3)
    x = b.input("x", [2, 3, 5, 5])
    b.output(b.conv(b.node("Relu", [b.conv(x, 3, 4, 3, name="conv")]), 4, 2, 1, name="head"))
    report = by_name(unchanged(b.model()))
    assert "opset 6" in report["conv"].reason and "version_converter" in report["conv"].reason


# ----------------------------------------------------------------------------------------------
# statistics measured on data


def _layers_graph() -> tuple[Builder, onnx.ModelProto]:
    """Conv(+bias) → ConvTranspose(groups 2) → pool → MatMul+Add → Gemm head: three layers to unfuse."""
    b = Builder(70)
    x = b.input("x", ["N", 3, 6, 6])
    h = b.node("Relu", [b.conv(x, 3, 4, 3, pads=[1] * 4, name="conv")])
    h = b.node("Relu", [b.conv(h, 4, 6, 2, groups=2, transpose=True, strides=[2, 2], name="up")])
    h = b.node("Flatten", [b.node("GlobalAveragePool", [h])])
    h = b.node("Add", [b.node("MatMul", [h, b.weight("W", [6, 5])], name="mm"),
                       b.init("mm.bias", np.linspace(-1, 1, 5).astype(np.float32))], name="mm_add")
    b.output(b.node("Gemm", [b.node("Relu", [h]), b.weight("head.w", [3, 5]), b.init("head.b", np.ones(3, np.float32))],
                    name="head", transB=1))
    return b, b.model()


def _batches(b: Builder, n: int, size: int = 8) -> list[np.ndarray]:
    return [b.rng.normal(0.6, 1.7, (size, 3, 6, 6)).astype(np.float32) for _ in range(n)]


def _bn_inputs(model: onnx.ModelProto, names: list[str], batches: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Every batch's input of BN nodes ``names``, concatenated along axis 0 (float64), from onnxruntime."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    nodes = {n.name: n for n in probe.graph.node}
    probe.graph.output.extend(helper.make_empty_tensor_value_info(nodes[name].input[0]) for name in names)
    outs = [ort_run(probe, {"x": batch})[1:] for batch in batches]
    return {name: np.concatenate([o[i] for o in outs]).astype(np.float64) for i, name in enumerate(names)}


def test_statistics_are_measured_on_data():
    b, model = _layers_graph()
    data = _batches(b, 3)
    out, report = check(model, b.feeds(5), added=3, data=data, eps=1e-4)
    bns = {e.name: e.details["bn"] for e in report.applied}
    assert sorted(bns) == ["conv", "mm", "up"] and by_name(report)["head"].status == "skipped"
    seen = _bn_inputs(out, list(bns.values()), data)
    biases = {"conv": inits(model)["conv.bias"], "up": inits(model)["up.bias"], "mm": inits(model)["mm.bias"]}
    for layer, bn in bns.items():
        entry = by_name(report)[layer]
        assert entry.details["statistics"] == "data" and "statistics measured on data" in entry.reason
        z = seen[bn]
        axes = (0,) + tuple(range(2, z.ndim))
        mean, var = z.mean(axis=axes), z.var(axis=axes, ddof=1)  # unbiased, as PyTorch stores it
        assert entry.details["values_per_channel"] == z.size // z.shape[1]
        params, attrs = bn_params(out, bn)
        assert np.allclose(params["mean"], mean, rtol=1e-5, atol=1e-6)
        assert np.allclose(params["var"], var, rtol=1e-5)
        assert np.allclose(params["scale"], np.sqrt(var + 1e-4), rtol=1e-5)
        assert np.allclose(params["B"], mean + biases[layer], rtol=1e-5, atol=1e-6)
        assert attrs["epsilon"] == pytest.approx(1e-4) and attrs["momentum"] == pytest.approx(0.9)
        assert not np.allclose(params["var"], 1.0, atol=0.05)  # the data really moved them off identity
    assert not any("pass data=" in note for note in report.notes)


def test_train_mode_starts_close_to_the_fused_function_only_with_measured_statistics():
    """Train-mode BN (batch statistics) on a batch like the data, computed from the BN's input: with
    measured statistics it is close to the eval output (z + b), with identity statistics it is not."""
    b, model = _layers_graph()
    data = _batches(b, 4)
    measured = normfx.rewrite(model, "unfuse", data=data)
    identity = normfx.rewrite(model, "unfuse")
    batch = _batches(b, 1, size=16)
    deviations = {}
    for label, out in (("measured", measured), ("identity", identity)):
        name = next(n.name for n in out.graph.node if n.op_type == BN and n.input[0].startswith("conv"))
        z = _bn_inputs(out, [name], batch)[name]
        params, attrs = bn_params(out, name)
        c = (1, -1, 1, 1)
        eval_y = (z - params["mean"].reshape(c)) / np.sqrt(params["var"].reshape(c) + attrs["epsilon"])
        eval_y = eval_y * params["scale"].reshape(c) + params["B"].reshape(c)
        mu_b, var_b = z.mean(axis=(0, 2, 3), keepdims=True), z.var(axis=(0, 2, 3), keepdims=True)
        train_y = (z - mu_b) / np.sqrt(var_b + attrs["epsilon"]) * params["scale"].reshape(c) + params["B"].reshape(c)
        assert rel(z + inits(model)["conv.bias"].reshape(c), eval_y) <= TOL  # eval: exactly the fused layer
        deviations[label] = rel(eval_y, train_y)
    assert deviations["measured"] < 0.15 and 4 * deviations["measured"] < deviations["identity"], deviations


def test_num_batches_and_one_shot_data():
    b, model = _layers_graph()
    data = _batches(b, 3, size=4)
    _, report = rewrite_with_report(model, "unfuse", data=iter(data), num_batches=2)
    assert by_name(report)["conv"].details["values_per_channel"] == 2 * 4 * 36


class _Untouchable:
    def __iter__(self):
        raise AssertionError("explain must not run the data")


def test_explain_reports_without_running_the_data():
    b, model = _layers_graph()
    report = explain(model, "unfuse", data=_Untouchable())
    _, rewritten = rewrite_with_report(model, "unfuse", data=_batches(b, 2))
    assert entries(report) == entries(rewritten)
    assert all(e.details["statistics"] == "data" for e in report.applied)


def test_data_that_does_not_fit_is_an_input_error():
    b, model = _layers_graph()
    with pytest.raises(InputDataError, match="batch 0"):
        rewrite_with_report(model, "unfuse", data=[np.zeros((2, 4, 6, 6), np.float32)])


def _mlp() -> tuple[Builder, onnx.ModelProto]:
    """Gemm → Relu → MatMul+Add → Relu → Gemm head: BN inputs of shape (N, C), one value per sample."""
    b = Builder(81)
    x = b.input("x", ["N", 6])
    h = b.node("Relu", [b.node("Gemm", [x, b.weight("fc1.w", [8, 6]), b.init("fc1.b", np.full(8, 0.3, np.float32))],
                                name="fc1", transB=1)])
    h = b.node("Relu", [b.node("Add", [b.node("MatMul", [h, b.weight("W2", [8, 5])], name="mm"),
                                       b.init("mm.bias", np.linspace(-1, 1, 5).astype(np.float32))])])
    b.output(b.node("Gemm", [h, b.weight("head.w", [3, 5]), b.init("head.b", np.ones(3, np.float32))],
                    name="head", transB=1))
    return b, b.model()


def test_batches_of_one_sample_add_up_when_only_measuring():
    b, model = _mlp()
    data = [b.rng.normal(0.5, 1.5, (1, 6)).astype(np.float32) for _ in range(5)]
    out, report = check(model, b.feeds(4), added=2, data=(batch for batch in data))  # one-shot, batch of one
    bns = {e.name: e.details["bn"] for e in report.applied}
    seen = _bn_inputs(out, list(bns.values()), data)
    for layer, bn in bns.items():
        entry = by_name(report)[layer]
        assert entry.details["statistics"] == "data" and entry.details["values_per_channel"] == 5
        params, _ = bn_params(out, bn)
        assert np.allclose(params["mean"], seen[bn].mean(axis=0), rtol=1e-5, atol=1e-6)
        assert np.allclose(params["var"], seen[bn].var(axis=0, ddof=1), rtol=1e-5)
    # train mode on a batch of one sample is undefined (PyTorch raises): not measured, and said so
    assert "unfuse_train_mode_rel_error" not in report.metrics
    assert any("train-mode deviation not measured" in note and "one value per channel" in note for note in report.notes)
    # one value per channel in all: identity statistics, with the reason in the entry
    out, report = rewrite_with_report(model, "unfuse", data=data[:1])
    for entry in report.applied:
        assert entry.details["statistics"] == "identity" and "the data gave 1 value per channel; a variance needs 2" in entry.reason, entry
        params, _ = bn_params(out, entry.details["bn"])
        assert np.allclose(params["scale"], 1.0) and np.array_equal(params["mean"], np.zeros_like(params["mean"]))
    # on batch statistics (precise) each batch still needs 2 values per channel
    with pytest.raises(InputDataError, match="at least 2"):
        normfx.rewrite(out, "precise", data=data)


def test_train_mode_deviation_is_measured_on_the_first_batch():
    """The metric equals the deviation computed by hand (numpy, float64) from the BN input on batch 0."""
    b = Builder(82)
    x = b.input("x", ["N", 3, 6, 6])
    b.output(b.node("Relu", [b.conv(x, 3, 4, 3, name="conv")]))
    model = b.model()
    data = [b.rng.normal(0.6, 1.7, (8, 3, 6, 6)).astype(np.float32) for _ in range(3)]
    out, report = rewrite_with_report(model, "unfuse:classifier=true", data=data)
    name = by_name(report)["conv"].details["bn"]
    z = _bn_inputs(out, [name], data[:1])[name]
    params, attrs = bn_params(out, name)
    c = (1, -1, 1, 1)
    scale, shift = params["scale"].reshape(c), params["B"].reshape(c)
    eval_y = (z - params["mean"].reshape(c)) / np.sqrt(params["var"].reshape(c) + attrs["epsilon"]) * scale + shift
    mu, var = z.mean(axis=(0, 2, 3), keepdims=True), z.var(axis=(0, 2, 3), keepdims=True)
    train_y = (z - mu) / np.sqrt(var + attrs["epsilon"]) * scale + shift
    expected = rel(np.maximum(eval_y, 0), np.maximum(train_y, 0))
    deviation = report.metrics["unfuse_train_mode_rel_error"]
    assert 0 < deviation == pytest.approx(expected, rel=1e-3)
    assert unfuse_options.train_mode_note(deviation) in report.notes
    # the training-mode graph itself: eval output unchanged for every other node, unknown names refused
    train = with_batch_statistics(out, [name])
    assert rel(np.maximum(train_y, 0), ort_run(train, {"x": data[0]})[0]) <= 1e-5
    with pytest.raises(ModelError, match="no BatchNormalization node named 'nope'"):
        with_batch_statistics(out, ["nope"])


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_train_mode_deviation_on_zoo_models_and_one_shot_data(name):
    model = models.create(name, seed=5)
    x = models.example_input(name, batch=2, seed=5)
    exported = export_onnx(normfx.rewrite(model, "fuse", example_inputs=x).eval(), (x,))
    data = [models.example_input(name, batch=8, seed=s) for s in (21, 22)]
    _, report = rewrite_with_report(exported, "unfuse", data=data)
    deviation = report.metrics["unfuse_train_mode_rel_error"]
    assert 0 < deviation < 0.5, deviation
    _, once = rewrite_with_report(exported, "unfuse", data=(batch for batch in data))  # a generator: read once
    assert once.metrics["unfuse_train_mode_rel_error"] == pytest.approx(deviation, rel=1e-6)
    assert [e.details["values_per_channel"] for e in once.applied] == [e.details["values_per_channel"] for e in report.applied]


# ----------------------------------------------------------------------------------------------
# the zoo: fuse (torch) → export → unfuse (ONNX, with data) → fuse (ONNX)


@pytest.mark.parametrize("name", models.names())
def test_zoo_fused_export_unfuses_and_fuses_back(name):
    model = models.create(name, seed=5)
    x = models.example_input(name, batch=2, seed=5)
    fused = normfx.rewrite(model, "fuse", example_inputs=x).eval()
    exported = export_onnx(fused, (x,))
    with torch.no_grad():  # the fused model's float64 run: the reference, and its fp32 noise floor
        y64 = copy.deepcopy(fused).double()(x.double()).numpy()
    feeds = {"input": x.numpy()}
    floor = rel(y64, ort_run(exported, feeds)[0])
    bound = max(TOL, 2 * floor)
    data = [models.example_input(name, batch=4, seed=s) for s in (11, 12)]

    unfused, report = rewrite_with_report(exported, "unfuse", data=data)
    onnx.checker.check_model(unfused, full_check=True)
    onnx.shape_inference.infer_shapes(unfused, strict_mode=True)
    added = count(unfused) - count(exported)
    assert added == len(report.applied) >= 1, report
    assert all(e.details["statistics"] == "data" for e in report.applied)
    assert rel(y64, ort_run(unfused, feeds)[0]) <= bound
    skipped = [e for e in report.skipped if e.rule == "unfuse"]
    assert any("classifier" in e.reason for e in skipped), report

    refused = normfx.rewrite(unfused, "fuse")
    assert rel(y64, ort_run(refused, feeds)[0]) <= bound
    assert count(refused) <= count(exported)
    if count(exported) == 0:
        assert count(refused) == 0
