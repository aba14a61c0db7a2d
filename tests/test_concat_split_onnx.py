"""Concat / split folds on the ONNX route, on graphs that keep their BatchNormalization nodes (onnx.helper
graphs and exports with constant folding off): Conv outputs → Concat → BN folds slice by slice (backward),
BN → Split / Slice → Convs folds slice by slice (forward), the partial remainder, and each declined case."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx_graphs import Builder
from test_onnx_passes import TOL, check, count, ort_run, prove_rewrite, rel

import normfx
from normfx import models
from normfx.export import export_onnx

BN = "BatchNormalization"
ELEMENTWISE = ("Add", "Sub", "Mul", "Div")


def _entry(report, name: str):
    found = [e for e in report.entries if e.name == name]
    assert len(found) == 1, report.entries
    return found[0]


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


# ------------------------------------------------------------------------------------------------- the zoo model


def test_mixconv_onnx_route_leaves_no_bn_and_no_elementwise_op():
    model = models.create("mixconv", seed=4)
    x = models.example_input("mixconv", batch=2, seed=4)
    plain = export_onnx(model, (x,))  # constant folding off: every BN is in the graph
    assert count(plain) == 9
    out, report, _, worst = prove_rewrite(plain, {plain.graph.input[0].name: x.numpy()}, "fuse")
    assert count(out) == 0 and not report.skipped
    sliced = [e for e in report.applied if e.reason.startswith("folded slice by slice into")]
    assert len(sliced) == 7 and {e.details["fold"] for e in sliced} == {"concat_bn", "bn_split"}
    for op in ELEMENTWISE:  # nothing added in place of a BN
        assert _ops(out)[op] <= _ops(plain)[op], op
    with torch.no_grad():
        reference = model.double()(x.double()).numpy()
        own = rel(reference, model.float()(x).numpy())
    error = rel(reference, ort_run(out, {plain.graph.input[0].name: x.numpy()})[0])
    assert error <= max(TOL, 2 * own), (error, own, worst)


def test_mixconv_deployed_by_export_has_no_bn_and_no_elementwise_op():
    model = models.create("mixconv", seed=5)
    x = models.example_input("mixconv", batch=2, seed=5)
    result = normfx.export(model, x, None, policy="fuse")
    assert result.verification.ok and result.batchnorm_left == 0 and count(result.model) == 0
    plain = export_onnx(model, (x,))
    for op in ELEMENTWISE:
        assert _ops(result.model)[op] <= _ops(plain)[op], op
    with torch.no_grad():
        reference = model.double()(x.double()).numpy()
        own = rel(reference, model.float()(x).numpy())
    feeds = {result.model.graph.input[0].name: x.numpy()}
    assert rel(reference, ort_run(result.model, feeds)[0]) <= max(TOL, 2 * own)


# ------------------------------------------------------------------------------------------------- Concat → BN


def _concat_graph(axis: int = 1, partial: int = 0, seed: int = 0, opset: int = 15):
    """Conv 3x3 ∥ ConvTranspose (grouped) ∥ Conv 1x1 → Concat(axis) → BN; ``partial`` inputs replaced by Relu(x)."""
    b = Builder(seed, opset=opset)
    x = b.input("x", ["N", 4, 6, 6])
    parts = [b.conv(x, 4, 3, 3, pads=[1, 1, 1, 1], bias=False, name="a"),
             b.conv(x, 4, 6, 3, transpose=True, groups=2, pads=[1, 1, 1, 1], name="t"),
             b.conv(x, 4, 5, 1, name="c")]
    for i in range(partial):
        parts[1 + i] = b.node("Relu", [x], name=f"relu{i}")  # 4 channels, not a layer output
    channels = {0: 14, 1: 12, 2: 11}[partial]
    cat = b.node("Concat", parts, name="cat", axis=axis)
    b.output(b.bn(cat, channels if axis in (1, -3) else 3, name="bn", out="y"))
    return b.model(), b.feeds(2)


@pytest.mark.parametrize("axis", [1, -3])
def test_concat_of_conv_outputs_folds_slice_by_slice(axis):
    model, feeds = _concat_graph(axis)
    out, report, worst = check(model, feeds)
    entry = _entry(report, "bn")
    assert entry.status == "applied" and entry.details["fold"] == "concat_bn"
    assert entry.reason == "folded slice by slice into Conv 'a' [0:3], ConvTranspose 't' [3:9], Conv 'c' [9:14]"
    assert _ops(out) == Counter({"Conv": 2, "ConvTranspose": 1, "Concat": 1})


def test_partial_concat_folds_the_conv_slices_and_keeps_a_smaller_bn_on_the_other_input():
    model, feeds = _concat_graph(partial=1)
    out, report, worst = check(model, feeds, bn_left=1)
    entry = _entry(report, "bn")
    assert entry.status == "applied"
    assert entry.reason.startswith("folded slice by slice into Conv 'a' [0:3], Conv 'c' [7:12]; remainder: a "
                                   "BatchNormalization on channels [3:7] of Concat input 1 only, moved before the Concat")
    assert "input 1 comes from Relu 'relu0', not a Conv/ConvTranspose" in entry.reason
    remainder = next(n for n in out.graph.node if n.op_type == BN)
    assert remainder.name == entry.details["added"]
    kept = _entry(report, remainder.name)  # the BN left in the graph is listed as skipped, with its reason
    assert kept.status == "skipped" and len(report.skipped) == count(out) == 1
    assert kept.reason.startswith("remainder of 'bn' on channels [3:7], kept before Concat input 1: input 1 comes "
                                  "from Relu 'relu0'")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    original = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    source = next(n for n in model.graph.node if n.op_type == BN)
    for new, old in zip(remainder.input[1:], source.input[1:]):  # the same statistics, on channels 3..6 only
        assert np.array_equal(inits[new], original[old][3:7])
    concat = next(n for n in out.graph.node if n.op_type == "Concat")
    assert concat.input[1] == remainder.output[0]


def test_two_unfoldable_concat_inputs_keep_the_bn():
    model, feeds = _concat_graph(partial=2)
    out, report, _ = check(model, feeds, bn_left=1)
    entry = _entry(report, "bn")
    assert entry.status == "skipped"
    assert "2 of 3 Concat inputs cannot take their slice" in entry.reason
    assert "a smaller BN on each would cost more ops than the one BN" in entry.reason
    assert "BatchNormalization kept" in entry.reason


def test_concat_on_a_non_channel_axis_is_declined():
    b = Builder(1)
    x = b.input("x", ["N", 4, 6, 6])
    parts = [b.conv(x, 4, 3, 1, name=f"c{i}") for i in range(2)]
    cat = b.node("Concat", parts, name="cat", axis=2)
    b.output(b.bn(cat, 3, name="bn", out="y"))
    out, report, _ = check(b.model(), b.feeds(2), bn_left=1)
    entry = _entry(report, "bn")
    assert entry.status == "skipped" and "Concat 'cat' concatenates on axis 2, not the channel axis 1" in entry.reason


def test_concat_output_read_elsewhere_is_declined():
    b = Builder(2)
    x = b.input("x", ["N", 4, 5, 5])
    cat = b.node("Concat", [b.conv(x, 4, 3, 1, name="c0"), b.conv(x, 4, 2, 1, name="c1")], name="cat", axis=1)
    b.output(b.bn(cat, 5, name="bn", out="y"))
    b.output(b.node("Relu", [cat], name="side", out=["side_out"]))
    out, report, _ = check(b.model(), b.feeds(2), bn_left=1)
    assert "the Concat output" in _entry(report, "bn").reason and "also feeds Relu 'side'" in _entry(report, "bn").reason


# ------------------------------------------------------------------------------------------------- BN → Split / Slice


def _split_graph(kind: str = "split", opset: int = 15, pads: int = 0, second: str = "conv", seed: int = 0):
    """Relu → BN → Split/Slice (channels 4 | 6) → Conv 1x1 and Conv 3x3 (``pads``) (or ``second`` = Relu)."""
    b = Builder(seed, opset=opset)
    x = b.input("x", ["N", 10, 6, 6])
    y = b.bn(b.node("Relu", [x], name="r"), 10, name="bn")
    if kind == "split":
        if opset >= 18:
            p, q = b.node("Split", [y], n_out=2, name="split", axis=1, num_outputs=2)  # even: 5 | 5
        elif opset >= 13:
            p, q = b.node("Split", [y, b.init("sizes", np.array([4, 6], np.int64))], n_out=2, name="split", axis=1)
        else:
            p, q = b.node("Split", [y], n_out=2, name="split", axis=1, split=[4, 6])
    else:
        ints = lambda *v: np.array(v, np.int64)  # noqa: E731
        p = b.node("Slice", [y, b.init("s0", ints(0)), b.init("e0", ints(4)), b.init("a0", ints(1))], name="slice0")
        q = b.node("Slice", [y, b.init("s1", ints(4)), b.init("e1", ints(2**62)), b.init("a1", ints(1))],
                   name="slice1")
    first = 5 if kind == "split" and opset >= 18 else 4
    b.output(b.conv(p, first, 3, 1, name="pa", bias=False))
    if second == "conv":
        b.output(b.conv(q, 10 - first, 5, 3, name="pb", pads=[pads] * 4))
    else:
        b.output(b.node("Relu", [q], name="relu"))
    return b.model(), b.feeds(2)


@pytest.mark.parametrize("kind, opset", [("split", 11), ("split", 15), ("split", 18), ("slice", 15)])
def test_bn_split_into_convs_folds_forward_slice_by_slice(kind, opset):
    model, feeds = _split_graph(kind, opset)
    out, report, _ = check(model, feeds)
    entry = _entry(report, "bn")
    assert entry.status == "applied" and entry.details["fold"] == "bn_split"
    first = 5 if opset >= 18 and kind == "split" else 4
    assert entry.reason == f"folded slice by slice into Conv 'pa' [0:{first}], Conv 'pb' [{first}:10]"
    assert _ops(out) == Counter({"Relu": 1, kind.capitalize(): 1 if kind == "split" else 2, "Conv": 2})


def test_split_piece_read_by_a_non_conv_is_declined():
    model, feeds = _split_graph(second="relu")
    out, report, _ = check(model, feeds, bn_left=1)
    entry = _entry(report, "bn")
    assert entry.status == "skipped"
    assert "Split 'split' piece" in entry.reason and "not a Conv/ConvTranspose/Gemm/MatMul" in entry.reason


@pytest.mark.parametrize("kind", ["split", "slice"])
def test_split_into_a_padded_conv_needs_the_border_correction(kind):
    model, feeds = _split_graph(kind, pads=1, seed=3)
    out, report, _ = check(model, feeds, bn_left=1)
    entry = _entry(report, "bn")
    assert entry.status == "skipped" and "Conv 'pb' is zero-padded" in entry.reason
    assert "set border_correction=true to fold anyway" in entry.reason
    # with static spatial dims and the option on, the exact border constant is added after that conv
    out, report, _ = check(model, feeds, policy="fuse:border_correction=true")
    entry = _entry(report, "bn")
    assert entry.status == "applied" and entry.details["added"] and count(out, "Add") == 1


def test_split_on_a_non_channel_axis_is_declined():
    b = Builder(4)
    x = b.input("x", ["N", 4, 6, 6])
    y = b.bn(b.node("Relu", [x], name="r"), 4, name="bn")
    p, q = b.node("Split", [y, b.init("sizes", np.array([3, 3], np.int64))], n_out=2, name="split", axis=2)
    b.output(b.conv(p, 4, 2, 1, name="pa"))
    b.output(b.conv(q, 4, 2, 1, name="pb"))
    out, report, _ = check(b.model(), b.feeds(2), bn_left=1)
    assert "Split 'split' splits axis 2, not the channel axis 1" in _entry(report, "bn").reason


def test_split_folds_are_off_with_forward_false():
    model, feeds = _split_graph()
    out, report, _ = check(model, feeds, policy="fuse:forward=false", bn_left=1)
    assert "forward folding into the next layer is off" in _entry(report, "bn").reason


def test_fx_and_onnx_routes_agree_on_mixconv():
    model = models.create("mixconv", seed=6)
    x = models.example_input("mixconv", batch=2, seed=6)
    fx_route = normfx.export(model, x, None).model
    onnx_route = normfx.rewrite(export_onnx(model, (x,)), "fuse")
    feeds = {fx_route.graph.input[0].name: x.numpy()}
    with torch.no_grad():
        y = model(x).numpy()
    a, b = ort_run(fx_route, feeds)[0], ort_run(onnx_route, {onnx_route.graph.input[0].name: x.numpy()})[0]
    assert rel(y, a) <= TOL and rel(y, b) <= TOL and rel(a, b) <= TOL
