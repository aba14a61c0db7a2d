"""``fuse`` on ONNX folds what Proxy Norm and Weight Standardization leave in an exported graph: constant
subgraphs (proxy statistics, standardized kernels), the per-channel pre-affine after the normalization and
the post-affine before the next layer. Torch models with randomized ProxyNormAct parameters exported by
both exporters, and hand-built graphs for every rule and every decline reason; numbers in onnxruntime
with its optimizations off."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from helpers import constant_nodes
from helpers import randomize_proxy_norm as randomize
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper
from onnx_graphs import FLOAT, Builder
from test_onnx_passes import TOL, check, count, ort_run, rel
from torch import nn

from normfx.affine import compose, per_group, shift_before_scale
from normfx.engine import explain, rewrite_with_report
from normfx.fold import fold_affine_into_norm
from normfx.layers import ProxyNormAct, StdConv2d

# ----------------------------------------------------------------------------------------------
# helpers


def by_fold(report) -> dict[str, list]:
    out: dict[str, list] = {}
    for e in report.entries:
        out.setdefault(e.details.get("fold", "?"), []).append(e)
    return out


def gnpn(c: int, act: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.GroupNorm(2, c, affine=False), ProxyNormAct(c, act))


def export(net: nn.Module, x: torch.Tensor, exporter: str = "torchscript", opset: int = 17) -> onnx.ModelProto:
    if exporter.startswith("dynamo"):
        optimize = exporter == "dynamo_optimized"
        return torch.onnx.export(net, (x,), dynamo=True, optimize=optimize, verbose=False).model_proto
    buffer = io.BytesIO()
    torch.onnx.export(net, (x,), buffer, dynamo=False, do_constant_folding=exporter == "torchscript_folded",
                      opset_version=opset, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    return onnx.load_from_string(buffer.getvalue())


def fuse_export(net: nn.Module, x: torch.Tensor, exporter: str = "torchscript", **options):
    """Export, fuse (checked: ORT equal, checker, explain = rewrite), compare with torch; (before, after, report)."""
    model = export(net, x, exporter)
    feeds = {model.graph.input[0].name: x.numpy()}
    out, report, _ = check(model, feeds, **options)
    with torch.no_grad():
        expected = net(x).numpy()
    assert rel(expected, ort_run(out, feeds)[0]) <= TOL
    return model, out, report


ACTS = {"relu": nn.ReLU, "silu": nn.SiLU}


class _Head(nn.Module):
    """Conv → GroupNorm(2, C, affine=False) → ProxyNormAct → a conv 1×1, a padded conv 3×3 or mean → Linear."""

    def __init__(self, head: str, act: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = gnpn(8, ACTS[act]())
        self.head = head
        self.out = nn.Linear(8, 5) if head == "linear" else nn.Conv2d(8, 4, 1 if head == "conv1x1" else 3,
                                                                       padding=0 if head == "conv1x1" else 1)

    def forward(self, x):
        h = self.norm(self.conv(x))
        return self.out(h.mean((2, 3))) if self.head == "linear" else self.out(h)


# ----------------------------------------------------------------------------------------------
# torch models


@pytest.mark.parametrize("act", ["relu", "silu"])
@pytest.mark.parametrize("head", ["conv1x1", "conv3x3", "linear"])
def test_gn_proxynorm_heads(head, act):
    torch.manual_seed(3)
    net = randomize(_Head(head, act))
    before, out, report = fuse_export(net, torch.randn(2, 3, 8, 8))
    assert constant_nodes(before) and not constant_nodes(out)
    ops = Counter(n.op_type for n in out.graph.node)
    silu = int(act == "silu")  # x * sigmoid(x)
    # the pre-affine (GN's Mul 1 / Add 0 and PN's Mul γ / Add β) merged into one Mul + one Add; the post-affine
    # folded into the 1x1 conv / the Linear, its scale into the padded conv (its shift kept as one Add after SiLU;
    # after ReLU the shift moves before it, relu(a) + c = max(a + c, c): the ReLU becomes a Max, relu_offset)
    kept_add = head == "conv3x3" and act == "silu"
    assert (ops["Mul"], ops["Add"], ops["Sub"], ops["Div"]) == (1 + silu, 1 + kept_add, 0, 0), ops
    assert ops["Max"] == (head == "conv3x3" and act == "relu"), ops
    assert ops["ReduceMean"] == (head == "linear") and not ops.keys() & {"Sqrt", "Reciprocal", "Sigmoid"} - (
        {"Sigmoid"} if silu else set())
    folds = by_fold(report)
    assert all(e.status == "applied" for e in report.entries), report
    assert len(folds["constant_subgraph"]) >= 2  # the proxy statistics, PN's reshaped γ/β, GN's default affine
    pre, post = sorted(folds.get("affine_merge", []) + folds.get("affine_conv", []) + folds.get("affine_gemm", []),
                       key=lambda e: e.details["nodes"][0])
    assert pre.details["fold"] == "affine_merge" and "per group" in pre.reason and "merged into Mul→Add" in pre.reason
    if head == "conv1x1":
        assert post.reason == "Sub→Mul folded into the following Conv '/out/Conv'"
    elif head == "conv3x3":
        assert "scale folded into Conv '/out/Conv'; shift kept as an Add" in post.reason
        assert "zero-padded" in post.reason and "border_correction=true" in post.reason
    else:
        assert post.details["fold"] == "affine_gemm"
        assert "moved past ReduceMean" in post.reason and "folded into the following Gemm '/out/Gemm'" in post.reason


def test_padded_conv_with_border_correction_folds_the_shift_exactly():
    torch.manual_seed(4)
    net = randomize(_Head("conv3x3", "relu"))
    _, out, report = fuse_export(net, torch.randn(2, 3, 8, 8), border_correction=True)
    post = next(e for e in report.entries if e.details.get("fold") == "affine_conv")
    assert post.reason == "Sub→Mul folded into the following Conv '/out/Conv'"
    assert "position-dependent" in post.details["steps"][0]["shift"]
    conv = [n for n in out.graph.node if n.op_type == "Conv"][-1]
    assert not any(i for i in conv.input if "shift" in i)  # no Add before the conv: the constant map is after it


class _Block(nn.Module):
    """A GN + PN residual block: conv → GN → PN → conv → GN(affine) → + shortcut → GN → PN."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.n1 = gnpn(c, nn.ReLU())
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.n2 = nn.GroupNorm(2, c)  # no activation after it: the norm keeps its affine, no Proxy Norm
        self.out = gnpn(c, nn.ReLU())

    def forward(self, x):
        return self.out(self.n2(self.conv2(self.n1(self.conv1(x)))) + x)


class _ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = StdConv2d(3, 8, 3, padding=1, bias=False)
        self.n0 = gnpn(8, nn.SiLU())
        self.blocks = nn.Sequential(_Block(8), _Block(8))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.blocks(self.n0(self.stem(x))).mean((2, 3)))


# the two ReLU ProxyNormActs before padded convs: their shifts move before the ReLU, which becomes a Max (relu_offset)
RESNET_AFTER = {"Conv": 5, "InstanceNormalization": 7, "Mul": 10, "Add": 9, "Max": 2, "Sub": 2, "Gemm": 1}


@pytest.mark.parametrize("exporter", ["torchscript", "torchscript_folded"])
def test_gn_proxynorm_resnet_block(exporter):
    torch.manual_seed(5)
    net = randomize(_ResNet())
    before, out, report = fuse_export(net, torch.randn(2, 3, 8, 8), exporter)
    assert not constant_nodes(out)
    ops = Counter(n.op_type for n in out.graph.node)
    assert {k: ops[k] for k in RESNET_AFTER} == RESNET_AFTER, ops
    assert ops["Sqrt"] == ops["Div"] == ops["Cast"] == 0 and len(out.graph.node) < len(before.graph.node) / 2
    entries = {e.name: e for e in report.entries}
    # a PN output that feeds the next block's conv *and* its shortcut Add keeps its affine
    kept = [e for e in report.entries if e.status == "kept"]
    assert {e.name for e in kept} == {"/n0/n0.1/Sub_1", "/blocks/blocks.0/out/out.1/Sub_1",
                                      "/blocks/blocks.0/n2/Mul", "/blocks/blocks.1/n2/Mul"}, [e.name for e in kept]
    assert "also feeds Add '/blocks/blocks.0/Add'" in entries["/n0/n0.1/Sub_1"].reason
    assert "per group (2 groups of 4 channels)" in entries["/blocks/blocks.0/n2/Mul"].reason
    # the stem's standardized kernel is a plain initializer now
    stem = next(n for n in out.graph.node if n.op_type == "Conv")
    assert stem.input[1] in {t.name for t in out.graph.initializer}
    with torch.no_grad():  # dynamic batch still works
        x1 = torch.randn(1, 3, 8, 8)
        assert rel(net(x1).numpy(), ort_run(out, {"x": x1.numpy()})[0]) <= TOL


@pytest.mark.parametrize("exporter", ["dynamo", "dynamo_optimized"])
def test_dynamo_exports(exporter):
    torch.manual_seed(6)
    net = randomize(_ResNet())
    _, out, report = fuse_export(net, torch.randn(2, 3, 8, 8), exporter)
    assert not constant_nodes(out)
    ops = Counter(n.op_type for n in out.graph.node)
    assert {k: ops[k] for k in RESNET_AFTER} == RESNET_AFTER, ops
    assert not ops.keys() & {"Shape", "Expand", "CastLike", "Concat", "Range", "Sqrt", "Reciprocal", "Pow"}


def test_stdconv_then_batchnorm_folds_after_the_weight_is_evaluated():
    torch.manual_seed(7)
    net = nn.Sequential(StdConv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), StdConv2d(6, 4, 1, bias=False))
    with torch.no_grad():
        bn = net[1]
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.3, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    net.eval()
    before, out, report = fuse_export(net, torch.randn(2, 3, 6, 6))
    assert count(before) == 1 and not constant_nodes(out)
    assert [n.op_type for n in out.graph.node] == ["Conv", "Relu", "Conv"]
    status = {e.name: e for e in report.entries}
    bn_entry = next(e for e in report.entries if e.details.get("fold") == "conv_bn")
    assert bn_entry.status == "applied" and len(status) == 3  # the BN, two standardized kernels


# ----------------------------------------------------------------------------------------------
# constant subgraphs (hand-built)


def _ws_conv(b: Builder, x: str, cin: int, cout: int, name: str) -> str:
    """A Weight-Standardization kernel computed in the graph: (W - mean) / sqrt(var + eps)."""
    w = b.weight(f"{name}.weight", [cout, cin, 3, 3])
    mean = b.node("ReduceMean", [w], axes=[1, 2, 3], keepdims=1)
    centered = b.node("Sub", [w, mean])
    var = b.node("ReduceMean", [b.node("Mul", [centered, centered])], axes=[1, 2, 3], keepdims=1)
    eps = b.node("Constant", [], value=numpy_helper.from_array(np.array(1e-6, np.float32)))
    std = b.node("Sqrt", [b.node("Add", [var, eps])])
    kernel = b.node("Div", [centered, std], name=f"{name}.ws")
    return b.node("Conv", [x, kernel], name=name, pads=[1, 1, 1, 1])


def test_constant_subgraph_weight_standardization():
    b = Builder(100)
    x = b.input("x", ["N", 3, 6, 6])
    b.output(b.node("Relu", [_ws_conv(b, x, 3, 4, "conv")]))
    model = b.model()
    out, report, _ = check(model, b.feeds())
    assert [n.op_type for n in out.graph.node] == ["Conv", "Relu"]
    entry = report.entries[0]
    assert entry.name == "conv.ws" and entry.status == "applied" and entry.details["fold"] == "constant_subgraph"
    assert entry.details["ops"] == {"ReduceMean": 2, "Sub": 1, "Mul": 1, "Add": 1, "Sqrt": 1, "Div": 1}
    kernel = out.graph.node[0].input[1]
    assert kernel == model.graph.node[-3].output[0]  # the initializer keeps the tensor's name
    assert {t.name for t in out.graph.initializer} == {kernel}  # the raw weight is gone


def test_constant_subgraph_static_shape_and_dead_code():
    b = Builder(101)
    x = b.input("x", ["N", 4, 5, 5])
    channels = b.node("Shape", [x], start=1, end=2, name="channels")  # static under a dynamic batch
    ones = b.node("Expand", [b.init("one", np.array([1.5], np.float32)), channels], name="expand")
    gain = b.node("Unsqueeze", [ones, b.init("axes", np.array([1, 2], np.int64))], name="gain")
    b.node("Sqrt", [b.init("dead_in", np.ones(3, np.float32))], name="dead")  # read by nothing: left alone
    b.output(b.node("Relu", [b.node("Mul", [x, gain], name="mul")], name="relu"))
    out, report, _ = check(b.model(), b.feeds())
    assert [n.name for n in out.graph.node] == ["dead", "mul", "relu"]
    assert report.entries[0].details["ops"] == {"Shape": 1, "Expand": 1, "Unsqueeze": 1}


def test_constant_subgraph_declines():
    b = Builder(102, opset=17)
    x = b.input("x", ["N", 3])
    c = b.init("c", np.full(3, 2.0, np.float32))
    noise = b.node("RandomNormalLike", [c], name="noise")
    custom = b.node("Neg", [c], name="custom")  # made a custom-domain op below
    shown = b.node("Neg", [c], name="shown")  # a graph output
    bad = b.node("Reshape", [c, b.init("shape", np.array([2, 2], np.int64))], name="bad")
    big = b.node("Expand", [b.init("z", np.zeros(1, np.float32)), b.init("big", np.array([600, 600], np.int64))],
                 name="big")
    y = b.node("Add", [b.node("Add", [x, noise]), b.node("Mul", [x, custom])])
    y = b.node("Add", [y, bad])
    b.output(y)
    b.output(shown)
    b.output(b.node("Add", [b.input("x2", [1, 600]), big]))  # a 1.4 MiB zeros tensor read at run time
    model = b.model()
    node = next(n for n in model.graph.node if n.name == "custom")
    node.op_type, node.domain = "Custom", "ai.custom"
    model.opset_import.append(helper.make_opsetid("ai.custom", 1))
    _, report = rewrite_with_report(model, "fuse")
    status = {e.name: (e.status, e.reason) for e in report.entries}
    assert status["noise"] == ("kept", "RandomNormalLike is random (or has a training mode); it must run every time")
    assert status["custom"] == ("kept", "its domain 'ai.custom' is not the default ONNX domain")
    assert status["shown"] == ("kept", "its output 'neg_out3' is a graph output")
    assert status["bad"][0] == "kept" and "reference implementation cannot evaluate it" in status["bad"][1]
    assert status["big"][0] == "kept" and "1.4 MiB initializer" in status["big"][1]
    assert explain(model, "fuse").entries == report.entries


def test_constant_read_inside_a_subgraph_and_overridable_initializer_are_kept():
    b = Builder(103)
    b.input("x", ["N", 3])
    cond = b.input("cond", [])
    scale = b.node("Neg", [b.init("s", np.full(3, 2.0, np.float32))], name="neg")
    branch = helper.make_graph([helper.make_node("Mul", ["x", scale], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", FLOAT, None)])
    y = b.node("If", [cond], name="if", then_branch=branch, else_branch=other)
    gain = b.init("gain", np.full(3, 0.5, np.float32))
    b.inputs.append(helper.make_tensor_value_info(gain, FLOAT, [3]))  # an overridable default: not a constant
    b.output(b.node("Mul", [y, b.node("Exp", [gain], name="exp")]))
    model = b.model()
    model.graph.input[1].CopyFrom(helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []))
    _, report = rewrite_with_report(model, "fuse")
    assert [(e.name, e.status) for e in report.entries] == [("neg", "kept")]
    assert "is read inside a subgraph (Mul" in report.entries[0].reason


# ----------------------------------------------------------------------------------------------
# normalization → affine (hand-built)


def _affine(b: Builder, y: str, c: int, rank: int = 4, *, name: str = "aff", scale=None, shift=None) -> str:
    shape = (1, c) + (1,) * (rank - 2)
    s = b.rng.uniform(0.5, 1.5, c) if scale is None else np.asarray(scale, np.float64)
    t = b.rng.normal(0, 0.5, c) if shift is None else np.asarray(shift, np.float64)
    y = b.node("Mul", [y, b.init(f"{name}.s", s.reshape(shape).astype(np.float32))], name=f"{name}.mul")
    return b.node("Add", [y, b.init(f"{name}.t", t.reshape(shape).astype(np.float32))], name=f"{name}.add")


def _gn_pattern(b: Builder, x: str, groups: int, name: str) -> str:
    """The torch exporter's GroupNorm: Reshape(x, [0, G, -1]) → InstanceNormalization → Reshape(Shape(x))."""
    r = b.node("Reshape", [x, b.init(f"{name}.shape", np.array([0, groups, -1], np.int64))])
    n = b.node("InstanceNormalization", [r, b.init(f"{name}.s", b.rng.uniform(0.5, 1.5, groups).astype(np.float32)),
                                         b.init(f"{name}.b", b.rng.normal(0, 0.5, groups).astype(np.float32))],
               name=name, epsilon=1e-5)
    return b.node("Reshape", [n, b.node("Shape", [x])])


def test_instance_norm_then_affine_folds():
    b = Builder(110)
    x = b.input("x", ["N", 4, 5, 5])
    n = b.node("InstanceNormalization", [x, b.init("s", np.ones(4, np.float32)), b.init("bias", np.zeros(4, np.float32))],
               name="in")
    b.output(b.node("Relu", [_affine(b, n, 4)]))
    out, report, _ = check(b.model(), b.feeds())
    assert [n.op_type for n in out.graph.node] == ["InstanceNormalization", "Relu"]
    entry = report.entries[0]
    assert (entry.name, entry.status, entry.details["fold"]) == ("aff.mul", "applied", "norm_affine")
    assert entry.reason == "Mul→Add folded into the preceding InstanceNormalization 'in' (per channel)"


def test_group_norm_pattern_folds_a_group_uniform_affine_and_keeps_a_per_channel_one():
    b = Builder(111)
    x = b.input("x", ["N", 6, 4, 4])
    y = _gn_pattern(b, x, 2, "gn1")
    y = _affine(b, y, 6, name="uniform", scale=[2.0] * 3 + [0.5] * 3, shift=[0.1] * 3 + [-0.3] * 3)
    y = b.node("Relu", [y])
    y = _gn_pattern(b, y, 3, "gn2")
    y = _affine(b, y, 6, name="gn_affine")  # GroupNorm's own per-channel affine
    b.output(_affine(b, b.node("Sigmoid", [y]), 6, name="alone"))
    out, report, _ = check(b.model(), b.feeds())
    status = {e.name: e for e in report.entries}
    assert status["uniform.mul"].status == "applied" and "(per group)" in status["uniform.mul"].reason
    kept = status["gn_affine.mul"]
    assert kept.status == "kept" and "per group (3 groups of 2 channels)" in kept.reason
    assert kept.reason.endswith("varies within a group; kept (one Mul/Add per channel is the cheapest exact form here)")
    alone = status["alone.mul"]
    assert alone.status == "kept" and "no normalization before it and no Conv" in alone.reason
    assert "input from Sigmoid" in alone.reason and "the graph output" in alone.reason
    assert count(out, "Mul") == 2 and count(out, "Add") == 2


def test_group_norm_pattern_needs_its_leading_dim():
    b = Builder(112)
    x = b.input("x", [2, 6, 4, 4])
    r = b.node("Reshape", [x, b.init("gshape", np.array([1, 2, -1], np.int64))])  # the batch folded into groups
    n = b.node("InstanceNormalization", [r, b.init("s", np.ones(2, np.float32)), b.init("bias", np.zeros(2, np.float32))],
               name="in")
    y = b.node("Reshape", [n, b.init("back", np.array([2, 6, 4, 4], np.int64))])
    b.output(b.node("Relu", [_affine(b, y, 6, scale=[2.0] * 6, shift=[1.0] * 6)]))
    _, report = rewrite_with_report(b.model(), "fuse")
    assert "not the GroupNorm pattern" in report.entries[0].reason


@pytest.mark.parametrize("opset,uniform,folds", [(21, False, True), (18, True, True), (18, False, False)])
def test_group_normalization_op(opset, uniform, folds):
    b = Builder(113, opset=opset, ir_version=10)
    x = b.input("x", ["N", 6, 4, 4])
    n = 6 if opset >= 21 else 2
    gn = b.node("GroupNormalization", [x, b.init("s", b.rng.uniform(0.5, 1.5, n).astype(np.float32)),
                                       b.init("bias", b.rng.normal(0, 0.5, n).astype(np.float32))],
                name="gn", num_groups=2, epsilon=1e-5)
    scale = [1.5] * 3 + [0.5] * 3 if uniform else None
    shift = [0.2] * 3 + [-0.1] * 3 if uniform else None
    b.output(b.node("Relu", [_affine(b, gn, 6, scale=scale, shift=shift)]))
    model, feeds = b.model(), b.feeds()
    out, report = rewrite_with_report(model, "fuse")  # GroupNormalization-18 is deprecated: no checker here
    entry = report.entries[0]
    assert (entry.status == "applied") == folds, entry
    assert count(out, "Mul") == (0 if folds else 1)
    assert rel(ort_run(model, feeds)[0], ort_run(out, feeds)[0]) <= TOL
    if not folds:
        assert "GroupNormalization-18 scale/bias are per group" in entry.reason


def test_layer_norm_then_affine():
    b = Builder(114, opset=17)
    x = b.input("x", ["N", 7, 6])
    s, t = b.rng.uniform(0.5, 1.5, 6).astype(np.float32), b.rng.normal(0, 0.5, 6).astype(np.float32)
    ln = b.node("LayerNormalization", [x, b.init("ln.s", np.ones(6, np.float32)), b.init("ln.b", np.zeros(6, np.float32))],
                name="ln", axis=-1)
    y = b.node("Add", [b.node("Mul", [ln, b.init("s", s)], name="last.mul"), b.init("t", t)])
    ln2 = b.node("LayerNormalization", [y, b.init("ln2.s", np.ones(6, np.float32))], name="ln2", axis=-1)  # no B
    y = b.node("Sub", [b.node("Mul", [ln2, b.init("s2", s)], name="noB.mul"), b.init("t2", t)])
    ln3 = b.node("LayerNormalization", [y, b.init("ln3.s", np.ones(6, np.float32))], name="ln3", axis=-1)
    y = b.node("Mul", [ln3, b.init("rows", b.rng.uniform(0.5, 1.5, (7, 1)).astype(np.float32))], name="rows.mul")
    ln4 = b.node("LayerNormalization", [y, b.init("ln4.s", np.ones(1, np.float32))], name="ln4", axis=-1)
    b.output(b.node("Mul", [ln4, b.init("s4", s)], name="grow.mul"))
    out, report, _ = check(b.model(), b.feeds())
    status = {e.name: e for e in report.entries}
    assert status["last.mul"].status == status["noB.mul"].status == "applied"
    assert "outside the axes LayerNormalization 'ln3' normalizes" in status["rows.mul"].reason
    assert "would enlarge it" in status["grow.mul"].reason
    assert count(out, "Mul") == 2 and count(out, "Add") + count(out, "Sub") == 0


def test_norm_affine_declines_shared_and_read_elsewhere():
    b = Builder(115)
    x = b.input("x", ["N", 4, 3, 3])
    s, bias = b.init("s", np.ones(4, np.float32)), b.init("bias", np.zeros(4, np.float32))
    n1 = b.node("InstanceNormalization", [x, s, bias], name="in1")
    n2 = b.node("InstanceNormalization", [b.node("Relu", [_affine(b, n1, 4, name="a1")]), s, bias], name="in2")
    y = _affine(b, n2, 4, name="a2")
    b.output(b.node("Add", [b.node("Relu", [y]), n2]))  # in2's output is also read by the Add
    model, feeds = b.model(), b.feeds()
    _, report = rewrite_with_report(model, "fuse", duplicate_shared=False)
    status = {e.name: e for e in report.entries}
    assert "duplicate_shared=false" in status["a1.mul"].reason and status["a1.mul"].status == "kept"
    assert "also feeds Add" in status["a2.mul"].reason
    out, report, _ = check(model, feeds)  # duplicate_shared=true (default): a1 folds into a private copy
    assert {e.name: e.status for e in report.entries} == {"a1.mul": "applied", "a2.mul": "kept"}
    assert {"s", "bias"} <= {t.name for t in out.graph.initializer}


# ----------------------------------------------------------------------------------------------
# affine → Conv / Gemm / MatMul, pooling, merge (hand-built)


def _post_affine(b: Builder, y: str, c: int, name: str = "pn", rank: int = 4) -> str:
    """Proxy Norm's post-affine as the torch exporter writes it: Sub m, Mul s."""
    shape = (1, c) + (1,) * (rank - 2)
    m = b.init(f"{name}.m", b.rng.normal(0.5, 0.3, shape).astype(np.float32))
    s = b.init(f"{name}.s", b.rng.uniform(0.6, 2.0, shape).astype(np.float32))
    return b.node("Mul", [b.node("Sub", [y, m], name=f"{name}.sub"), s], name=f"{name}.mul")


@pytest.mark.parametrize("pads,static,border,partial", [
    ([0, 0, 0, 0], False, False, False),
    ([1, 1, 1, 1], True, False, True),
    ([1, 1, 1, 1], False, False, True),  # dynamic spatial dims: the scale still folds
    ([1, 1, 1, 1], True, True, False),
])
def test_affine_conv(pads, static, border, partial):
    b = Builder(120)
    x = b.input("x", ["N", 4, 6, 6] if static else ["N", 4, "H", "W"])
    y = _post_affine(b, b.node("Relu", [x]), 4)
    b.output(b.conv(y, 4, 3, 3, name="conv", pads=pads))
    model = b.model()
    feeds = {"x": b.rng.normal(size=(2, 4, 6, 6)).astype(np.float32)}
    out, report, _ = check(model, feeds, border_correction=border)
    entry = report.entries[0]
    assert entry.status == "applied" and entry.details["fold"] == "affine_conv"
    assert ("partial" in entry.details["steps"][0]) == partial
    assert count(out, "Sub") == count(out, "Mul") == 0
    assert count(out, "Add") == int(partial or border)
    if partial:
        add = next(n for n in out.graph.node if n.op_type == "Add")
        assert next(n for n in out.graph.node if n.op_type == "Conv").input[0] == add.output[0]
        declined = entry.details["steps"][0]["declined"]  # the full fold's reason, said of the affine
        assert "zero-padded" in declined and "the affine shift" in declined
        assert entry.reason.endswith(f"(what is left is kept: {declined})")


def test_affine_conv_transpose_gemm_matmul():
    b = Builder(121)
    x = b.input("x", ["N", 4, 5, 5])
    t = b.conv(_post_affine(b, b.node("Relu", [x]), 4, "a"), 4, 3, 2, transpose=True, name="convt", strides=[2, 2])
    g = b.node("Gemm", [_post_affine(b, b.node("Flatten", [b.node("GlobalAveragePool", [t])]), 3, "b", rank=2),
                        b.weight("W", [5, 3]), b.init("C", np.full(5, 0.1, np.float32))], name="gemm", transB=1)
    b.output(b.node("MatMul", [_post_affine(b, b.node("Tanh", [g]), 5, "c", rank=2), b.weight("W2", [5, 2])],
                    name="mm"))
    out, report, _ = check(b.model(), b.feeds(), border_correction=True)
    folds = {e.name: e.details["fold"] for e in report.entries}
    assert folds == {"a.sub": "affine_conv", "b.sub": "affine_gemm", "c.sub": "affine_matmul"}
    assert count(out, "Sub") == count(out, "Mul") == 0


def test_affine_conv_declines():
    b = Builder(122)
    x = b.input("x", ["N", 4, 5, 5])
    r = b.node("Relu", [x])
    shown = _post_affine(b, r, 4, "shown")  # a graph output and a conv input
    b.output(b.conv(shown, 4, 2, 1, name="c1"))
    b.output(shown)
    zero = _affine(b, b.node("Relu", [x]), 4, name="zero", scale=[0.0, 1.0, 2.0, 1.0], shift=[1.0, 0.5, 0.0, 0.0])
    b.output(b.conv(zero, 4, 2, 3, name="c2", pads=[1, 1, 1, 1]))  # s = 0 where t != 0: no partial fold
    b.output(b.node("Conv", [x, _post_affine(b, b.weight("w", [2, 4, 1, 1]), 4, "weight")], name="c3"))
    flat = b.node("Flatten", [b.node("GlobalAveragePool", [x])])
    b.output(b.node("Gemm", [_affine(b, b.node("Relu", [flat]), 4, 2, name="ta"), b.weight("W", [4, 3])], name="g",
                    transA=1))
    model = b.model()
    _, report = rewrite_with_report(model, "fuse")
    status = {e.name: e for e in report.entries}
    assert status["shown.sub"].reason.startswith("the affine output ")
    assert "is a graph output; not folded forward" in status["shown.sub"].reason
    assert "zero-padded: the affine shift is position-dependent" in status["zero.mul"].reason
    assert status["zero.mul"].status == "kept"
    assert "contracts over the affine's batch axis" in status["ta.mul"].reason
    for entry in report.entries:  # the BN rules' checks, said of an affine (and no BN latency claim)
        assert "BatchNormalization" not in entry.reason and "BN" not in entry.reason and "slower" not in entry.reason
    assert "weight.sub" not in status  # computed from constants: folded into the conv's weight instead
    assert status["weight.mul"].details["fold"] == "constant_subgraph"


def test_affine_pooling():
    b = Builder(123)
    x = b.input("x", ["N", 4, 6, 6])
    y = b.node("AveragePool", [_post_affine(b, b.node("Relu", [x]), 4, "p1")], kernel_shape=[2, 2], strides=[2, 2],
               name="avg")
    y = b.node("AveragePool", [_post_affine(b, b.node("Relu", [y]), 4, "p2")], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
               count_include_pad=1, name="avg_pad")
    y = b.node("ReduceMean", [_post_affine(b, b.node("Relu", [y]), 4, "p3")], axes=[1], keepdims=1, name="over_c")
    y = b.node("ReduceMean", [_post_affine(b, b.node("Relu", [y]), 1, "p4")], axes=[2, 3], keepdims=0, name="mean")
    b.output(b.node("Gemm", [y, b.weight("W", [3, 1])], name="fc", transB=1))
    out, report, _ = check(b.model(), b.feeds())
    status = {e.name: e for e in report.entries}
    assert status["p1.sub"].reason.startswith("Sub→Mul moved past AveragePool 'avg' (what is left is kept: no "
                                              "normalization before it and no Conv")
    assert "count_include_pad=1" in status["p2.sub"].reason
    assert "reduces over axes [1], across channels" in status["p3.sub"].reason
    assert "moved past ReduceMean 'mean'; then Mul→Add folded into the following Gemm 'fc'" in status["p4.sub"].reason


def test_affine_merge_and_identity():
    b = Builder(124)
    x = b.input("x", ["N", 3, 4, 4])
    c = lambda v: b.init(f"k{len(b.inits)}", np.asarray(v, np.float32).reshape(-1, 1, 1))  # noqa: E731
    y = b.node("Relu", [x])
    y = b.node("Div", [b.node("Add", [b.node("Mul", [b.node("Mul", [y, c([2.0, 1.0, 3.0])], name="m1"),
                                                          c([0.5, 0.5, 0.5])]), c([1.0, 2.0, 3.0])]), c([2.0])])
    y = b.node("Sigmoid", [y])
    y = b.node("Sub", [b.node("Mul", [y, c([1.0, 1.0, 1.0])], name="id"), c([0.0])])
    b.output(b.node("Tanh", [y]))
    out, report, _ = check(b.model(), b.feeds())
    status = {e.name: e for e in report.entries}
    assert status["m1"].reason.startswith("Mul→Mul→Add→Div merged into Mul→Add")
    assert status["id"].reason.startswith("Mul→Sub merged into the identity")
    assert [n.op_type for n in out.graph.node] == ["Relu", "Mul", "Add", "Sigmoid", "Tanh"]


def test_bias_like_and_scalar_chains_are_not_reported():
    b = Builder(125)
    x = b.input("x", ["N", 6])
    y = b.node("Add", [b.node("MatMul", [x, b.weight("W", [6, 5])]), b.init("bias", np.ones(5, np.float32))])
    b.output(b.node("Mul", [b.node("Softmax", [y]), b.init("half", np.array(0.5, np.float32))]))
    model = b.model()
    out, report = rewrite_with_report(model, "fuse")
    assert report.entries == [] and out.SerializeToString() == model.SerializeToString()


# ----------------------------------------------------------------------------------------------
# the math


_OPS = st.sampled_from(["Mul", "Add", "Sub", "Div"])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_OPS, st.booleans(), st.integers(0, 2)), min_size=1, max_size=5), st.integers(0, 10_000))
def test_compose_matches_the_chain(ops, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, 3, 4))
    steps, y = [], x
    shapes = [(), (3, 1), (1, 3, 1)]
    for op, first, shape in ops:
        c = rng.uniform(0.5, 2.0, shapes[shape])
        first = first and op != "Div"
        steps.append((op, c, first))
        fn = {"Mul": np.multiply, "Add": np.add, "Sub": np.subtract, "Div": np.divide}[op]
        y = fn(c, y) if first else fn(y, c)
    scale, shift = compose(steps)
    assert np.allclose(x * scale + shift, y, rtol=1e-12, atol=1e-12)


def test_group_and_split_helpers():
    assert per_group(np.array([1.0, 1, 2, 2]), 2).tolist() == [1.0, 2.0]
    assert per_group(np.array([1.0, 2, 2, 2]), 2) is None and per_group(np.ones(3), 2) is None
    g, bias = fold_affine_into_norm(np.array([2.0]), None, np.array([3.0]), np.array([1.0]), shape=(1,))
    assert g.tolist() == [6.0] and bias.tolist() == [1.0]
    assert shift_before_scale(np.array([2.0, 0.0]), np.array([1.0, 0.0])).tolist() == [0.5, 0.0]
    assert shift_before_scale(np.array([0.0]), np.array([1.0])) is None
    with pytest.raises(ValueError):
        compose([("Div", 2.0, True)])


@pytest.mark.parametrize("transpose,attrs", [(False, {"pads": [1, 1, 1, 1]}),
                                             (True, {"strides": [2, 2], "output_shape": [10, 13]})])
def test_scale_only_affine_folds_into_a_padded_conv_of_any_input_shape(transpose, attrs):
    b = Builder(126)
    x = b.input("x", ["N", 4, "H", "W"])
    s = b.init("s", b.rng.uniform(0.5, 2.0, (1, 4, 1, 1)).astype(np.float32))
    y = b.node("Div", [b.node("Relu", [x]), s], name="div")
    b.output(b.conv(y, 4, 3, 3, transpose=transpose, name="conv", **attrs))
    out, report, _ = check(b.model(), {"x": b.rng.normal(size=(2, 4, 5, 7)).astype(np.float32)})
    op = "ConvTranspose" if transpose else "Conv"
    assert [n.op_type for n in out.graph.node] == ["Relu", op]
    assert report.entries[0].reason == f"Div folded into the following {op} 'conv'"
    assert report.entries[0].details["steps"][0]["pattern"] == f"Div→{op}"


def test_affine_moves_past_max_pooling_when_increasing():
    b = Builder(127)
    x = b.input("x", ["N", 4, 6, 6])
    y = b.node("MaxPool", [_post_affine(b, b.node("Relu", [x]), 4, "up")], kernel_shape=[3, 3], strides=[2, 2],
               pads=[1, 1, 1, 1], name="max")
    y = b.conv(y, 4, 4, 1, name="conv")
    neg = _affine(b, b.node("Relu", [y]), 4, name="neg", scale=[1.0, -1.0, 2.0, 1.0])
    b.output(b.node("GlobalMaxPool", [neg], name="gmax"))
    out, report, _ = check(b.model(), b.feeds())
    status = {e.name: e for e in report.entries}
    assert status["up.sub"].reason == ("Sub→Mul moved past MaxPool 'max'; then Mul→Add folded into the following "
                                       "Conv 'conv'")
    assert "not positive in every channel" in status["neg.mul"].reason and status["neg.mul"].status == "kept"
    assert [n.op_type for n in out.graph.node] == ["Relu", "MaxPool", "Conv", "Relu", "Mul", "Add", "GlobalMaxPool"]
