"""ONNX per-channel affine chains next to a BN or a layer: Caffe's Scale after a BN merges into the BN
(``bn_affine``), a Mul+Add chain with no BN folds into the layer before it (``layer_affine``) or after it
(``affine_conv``, already there); declined merges leave the graph exact."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from onnx_graphs import Builder
from test_onnx_passes import prove_rewrite

C = 6


def _ops(model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def _scale(b: Builder, c: int = C, shape=None, zero: int | None = None) -> str:
    value = (b.rng.uniform(0.5, 1.5, c) * np.where(np.arange(c) == 0, -1.0, 1.0)).astype(np.float32)
    if zero is not None:
        value[zero] = 0.0
    return b.init(b._name("s"), value.reshape(shape or (1, c, 1, 1)))


def _shift(b: Builder, c: int = C, shape=None) -> str:
    return b.init(b._name("t"), b.rng.normal(0, 0.5, c).astype(np.float32).reshape(shape or (1, c, 1, 1)))


def _scale_layer(b: Builder, x: str, c: int = C, shape=None) -> str:
    """Caffe's Scale layer as the Caffe2 converter writes it: Mul then Add by per-channel constants."""
    return b.node("Add", [b.node("Mul", [x, _scale(b, c, shape)]), _shift(b, c, shape)])


def _run(b: Builder, out: str):
    b.output(out)
    model = b.model()
    fused, report, _, worst = prove_rewrite(model, b.feeds(), "fuse")
    return fused, report, worst


def _entry(report, fold: str):
    found = [e for e in report.entries if e.details.get("fold") == fold]
    assert len(found) == 1, [(e.name, e.status, e.reason, e.details) for e in report.entries]
    return found[0]


def test_densenet_caffe2_unit_keeps_one_bn_and_no_scale():
    """Concat → BN → Mul → Add → Relu → Conv (DenseNet-121 from the ONNX model zoo, Caffe2 converted)."""
    b = Builder(1)
    x, y = b.input("x", ["N", 3, 8, 8]), b.input("y", ["N", 3, 8, 8])
    bn = b.bn(b.node("Concat", [x, y], axis=1), C)
    out = b.conv(b.node("Relu", [_scale_layer(b, bn)]), C, 4, 3, pads=[1, 1, 1, 1])
    fused, report, _ = _run(b, out)
    assert _ops(fused) == {"Concat": 1, "BatchNormalization": 1, "Relu": 1, "Conv": 1}
    entry = _entry(report, "bn_affine")
    assert entry.status == "applied" and entry.details["side"] == "after"
    assert "Mul→Add merged into the preceding BatchNormalization" in entry.reason


def test_conv_bn_scale_folds_completely():
    b = Builder(2)
    x = b.input("x", ["N", 3, 8, 8])
    out = b.node("Relu", [_scale_layer(b, b.bn(b.conv(x, 3, C, 3), C))])
    fused, report, _ = _run(b, out)
    assert _ops(fused) == {"Conv": 1, "Relu": 1}
    assert [e.status for e in report.entries] == ["applied", "applied"]


@pytest.mark.parametrize("layer", ["conv", "conv_transpose", "gemm"])
def test_chain_without_bn_folds_into_the_layer_before(layer):
    b = Builder(3)
    if layer == "gemm":
        x = b.input("x", ["N", 5])
        h = b.node("Gemm", [x, b.weight("fc.w", [C, 5]), b.init("fc.b", np.zeros(C, np.float32))], transB=1)
        out = b.node("Relu", [_scale_layer(b, h, shape=(C,))])
    else:
        x = b.input("x", ["N", 3, 8, 8])
        h = b.conv(x, 3, C, 3, transpose=layer == "conv_transpose", groups=3 if layer == "conv" else 1)
        out = b.node("Relu", [_scale_layer(b, h)])
    fused, report, _ = _run(b, out)
    assert "Mul" not in _ops(fused) and "Add" not in _ops(fused)
    entry = _entry(report, "layer_affine")
    assert entry.status == "applied" and "folded into the preceding" in entry.reason


def test_chain_before_bn_merges_and_zero_scale_is_declined():
    b = Builder(4)
    x = b.input("x", ["N", C, 6, 6])
    out = b.node("Relu", [b.bn(_scale_layer(b, b.node("Relu", [x])), C)])
    fused, report, _ = _run(b, out)
    assert _ops(fused) == {"Relu": 2, "BatchNormalization": 1}
    assert _entry(report, "bn_affine").details["side"] == "before"

    b = Builder(4)
    x = b.input("x", ["N", C, 6, 6])
    mul = b.node("Mul", [b.node("Relu", [x]), _scale(b, zero=2)])
    out = b.node("Relu", [b.bn(mul, C)])
    fused, report, _ = _run(b, out)  # exact either way
    assert _ops(fused)["Mul"] == 1 and not [e for e in report.entries if e.details.get("fold") == "bn_affine"]


def test_affine_on_both_sides_of_a_bn_and_sub_div_forms():
    b = Builder(5)
    x = b.input("x", ["N", C, 6, 6])
    before = b.node("Mul", [b.node("Relu", [x]), _scale(b)])
    bn = b.bn(before, C)
    after = b.node("Div", [b.node("Sub", [bn, _shift(b)]), _scale(b)])
    fused, report, _ = _run(b, b.node("Relu", [after]))
    assert _ops(fused) == {"Relu": 2, "BatchNormalization": 1}
    sides = sorted(e.details["side"] for e in report.entries if e.details.get("fold") == "bn_affine")
    assert sides == ["after", "before"]


def test_bn_output_read_twice_or_affine_not_per_channel_is_not_merged():
    b = Builder(6)
    x = b.input("x", ["N", C, 6, 6])
    bn = b.bn(b.node("Relu", [x]), C)
    scaled = b.node("Mul", [bn, _scale(b)])
    fused, report, _ = _run(b, b.node("Add", [scaled, bn]))  # the BN output also feeds the Add
    assert _ops(fused)["Mul"] == 1 and _ops(fused)["BatchNormalization"] == 1

    b = Builder(7)
    x = b.input("x", ["N", C, 6, 6])
    bn = b.bn(b.node("Relu", [x]), C)
    along_h = b.init("h", b.rng.uniform(0.5, 1.5, (1, 1, 6, 1)).astype(np.float32))
    fused, report, _ = _run(b, b.node("Relu", [b.node("Mul", [bn, along_h])]))
    assert _ops(fused)["Mul"] == 1 and _ops(fused)["BatchNormalization"] == 1


def test_what_already_worked_forward_into_the_next_conv():
    """Before this rule family: a chain with no BN before a 1x1 conv already folded forward (affine_conv)."""
    b = Builder(8)
    x = b.input("x", ["N", C, 8, 8])
    out = b.conv(_scale_layer(b, b.node("Relu", [x])), C, 4, 1)
    fused, report, _ = _run(b, out)
    assert _ops(fused) == {"Relu": 1, "Conv": 1}
    assert _entry(report, "affine_conv").status == "applied"


def test_conv_output_read_twice_keeps_the_chain_after_it():
    b = Builder(9)
    x = b.input("x", ["N", 3, 8, 8])
    h = b.conv(x, 3, C, 3)
    out = b.node("Add", [_scale_layer(b, h), h])
    fused, report, _ = _run(b, out)
    assert _ops(fused)["Mul"] == 1


def test_onnx_route_alone_folds_the_frozen_bns_of_an_unfolded_export():
    """torchvision/detectron2-style frozen BNs exported as Mul/Add on computed constants: constant subgraphs are
    evaluated, then each chain after a Conv folds into it (layer_affine); before this rule 9 Mul + 11 Add stayed."""
    import torch

    from normfx import models
    from normfx.export import export_onnx

    name = "trap_foreign_frozen"
    x = models.example_input(name, batch=2)
    model = export_onnx(models.create(name), (x,))
    assert _ops(model)["Mul"] > 0 and _ops(model)["BatchNormalization"] == 2
    with torch.no_grad():
        fused, report, _, worst = prove_rewrite(model, {model.graph.input[0].name: x.numpy()}, "fuse")
    ops = _ops(fused)
    assert ops["Mul"] == 0 and ops["Add"] == 2 and ops["BatchNormalization"] == 0 and ops["Conv"] == 11
    assert sum(e.details.get("fold") == "layer_affine" for e in report.entries) == 9
