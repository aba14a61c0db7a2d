"""Branch merge on the ONNX route: exports that keep every BatchNormalization (the identity-branch BN included)
and graphs built with onnx.helper; the deployed model of ``normfx.export``; declines with their reasons."""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx_graphs import Builder

import normfx
from normfx import models
from normfx.export import export_onnx
from normfx.models.reparam import MobileOneBlock, RepVGGBlock
from normfx.runtime import make_session

ELEMENTWISE = {"Add", "Mul", "Sub", "Div", "BatchNormalization"}


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray] | np.ndarray) -> np.ndarray:
    session = make_session(model, optimization="disable")
    if isinstance(feeds, np.ndarray):
        feeds = {session.get_inputs()[0].name: feeds}
    return session.run(None, feeds)[0]


def _rel(reference, candidate) -> float:
    reference, candidate = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    return float(np.abs(reference - candidate).max() / np.abs(reference).max())


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


@pytest.mark.parametrize("name", ["repvgg", "mobileone"])
def test_zoo_models_on_the_onnx_route_and_deployed(name):
    model = models.create(name, seed=4)
    x = models.example_input(name, batch=2, seed=4)
    blocks = sum(isinstance(m, (RepVGGBlock, MobileOneBlock)) for m in model.modules())
    with torch.no_grad():
        y64 = copy.deepcopy(model).double()(x.double()).numpy()
        own = _rel(y64, model(x).numpy())
    bound = max(1e-5, 2 * own)

    plain = export_onnx(model, (x,))
    assert _ops(plain)["BatchNormalization"] > 2 * blocks  # branch BNs and identity BNs are all there
    onnx_route, report = normfx.rewrite_with_report(plain, "fuse")
    deployed = normfx.export(model, x, None, policy="fuse")
    assert deployed.verification.ok
    for graph in (onnx_route, deployed.model):
        ops = _ops(graph)
        assert not set(ops) & ELEMENTWISE, ops
        assert ops["Conv"] == blocks and ops["Relu"] == blocks
        assert _rel(y64, _run(graph, x.numpy())) <= bound
    onnx.checker.check_model(onnx_route, full_check=True)
    assert not report.skipped
    merges = [e for e in report.applied if e.details.get("fold") == "branch_merge" and "branches" in e.details]
    assert len(merges) == blocks
    identity = [e for e in report.applied if e.reason.startswith("merged as an identity branch")]
    assert identity and all("identity" in e.name for e in identity)
    assert all(any(f"{e.name!r}" in m.reason for m in merges) for e in identity)
    explained = normfx.explain(plain, "fuse")
    assert [(e.name, e.status, e.reason) for e in explained.entries] == [(e.name, e.status, e.reason)
                                                                          for e in report.entries]
    off = normfx.rewrite(plain, "fuse:merge_branches=false")
    assert _ops(off)["Conv"] > blocks and _ops(off)["BatchNormalization"] > 0


def _block(conv_b: dict, *, identity: str = "bn", conv_a: dict | None = None, size=(6, 6), c: int = 4, seed: int = 0):
    """conv_a(x) + conv_b(x) [+ BN(x) | + x] → Relu, with x = Relu(input) so the BN reads no graph input."""
    b = Builder(seed)
    inp = b.input("input", ["N", c, *size])
    x = b.node("Relu", [inp])
    a = b.conv(x, c, c, **(conv_a or {"k": 3, "pads": [1, 1, 1, 1]}), name="conv_a")
    other = b.conv(x, c, c, **conv_b, name="conv_b")
    total = b.node("Add", [a, other], name="add1")
    if identity == "bn":
        total = b.node("Add", [total, b.bn(x, c, name="bn_id")], name="add2")
    elif identity == "x":
        total = b.node("Add", [x, total], name="add2")
    b.output(b.node("Relu", [total], name="act"))
    return b.model(), b.feeds(2)


@pytest.mark.parametrize("identity", ["bn", "x", ""])
def test_identity_batchnorm_before_an_add_merges(identity):
    model, feeds = _block({"k": 1, "bias": False}, identity=identity)
    out, report = normfx.rewrite_with_report(model, "fuse")
    ops = _ops(out)
    assert ops["Conv"] == 1 and not set(ops) & ELEMENTWISE and ops["Relu"] == 2
    assert _rel(_run(model, feeds), _run(out, feeds)) <= 1e-5
    merge = next(e for e in report.applied if "branches" in e.details)
    assert merge.name == "conv_a" and len(merge.details["branches"]) == (3 if identity else 2)
    if identity == "bn":
        assert report.entries[0].name == "bn_id" and report.entries[0].status == "applied"


def test_grouped_dilated_and_asymmetric_padding_merge():
    conv_a = {"k": 3, "pads": [2, 2, 2, 2], "dilations": [2, 2], "groups": 2}
    model, feeds = _block({"k": 1, "groups": 2}, conv_a=conv_a)
    out = normfx.rewrite(model, "fuse")
    assert _ops(out)["Conv"] == 1 and _rel(_run(model, feeds), _run(out, feeds)) <= 1e-5
    # 2×2 with pads (0, 0, 1, 1) sits in the top-left of a 3×3 with pads 1: exact, asymmetric on ONNX
    model, feeds = _block({"k": 2, "pads": [0, 0, 1, 1]}, identity="")
    out = normfx.rewrite(model, "fuse")
    assert _ops(out)["Conv"] == 1 and _rel(_run(model, feeds), _run(out, feeds)) <= 1e-5


@pytest.mark.parametrize("conv_b, conv_a, size, words", [
    ({"k": 1, "pads": [1, 1, 1, 1], "strides": [3, 3]}, {"k": 3, "pads": [1, 1, 1, 1], "strides": [3, 3]}, (4, 4),
     "inconsistent padding"),
    ({"k": 3, "pads": [0, 0, 0, 0], "strides": [1, 1]}, {"k": 3, "pads": [1, 1, 1, 1], "strides": [2, 2]}, (5, 5),
     "stride"),
    ({"k": 3, "pads": [1, 1, 1, 1], "groups": 2}, None, (6, 6), "groups"),
    ({"k": 1, "auto_pad": "SAME_UPPER"}, None, (6, 6), "auto_pad"),
])
def test_declined_merges_keep_the_graph_and_say_why(conv_b, conv_a, size, words):
    model, feeds = _block(conv_b, conv_a=conv_a, size=size, identity="")
    out, report = normfx.rewrite_with_report(model, "fuse")
    assert _ops(out)["Conv"] == 2 and _ops(out)["Add"] == 1
    assert _rel(_run(model, feeds), _run(out, feeds)) <= 1e-6
    kept = [e for e in report.kept if e.details.get("fold") == "branch_merge"]
    assert len(kept) == 1 and words in kept[0].reason and "not merged" in kept[0].reason, kept


def test_branches_reading_different_tensors_are_not_merged():
    b = Builder(3)
    inp = b.input("input", ["N", 4, 5, 5])
    x = b.node("Relu", [inp])
    y = b.node("Sigmoid", [inp])
    total = b.node("Add", [b.conv(x, 4, 4, 3, pads=[1, 1, 1, 1]), b.conv(y, 4, 4, 1)])
    b.output(b.node("Add", [total, b.bn(y, 4, name="bn_y")]))
    model, feeds = b.model(), b.feeds(2)
    out, report = normfx.rewrite_with_report(model, "fuse")
    ops = _ops(out)  # conv(y) + BN(y) merge; conv(x) stays apart
    assert ops["Conv"] == 2 and ops["BatchNormalization"] == 0 and ops["Add"] == 1
    merge = next(e for e in report.applied if "branches" in e.details)
    assert len(merge.details["branches"]) == 2 and "bn_y" in merge.reason
    assert _rel(_run(model, feeds), _run(out, feeds)) <= 1e-5
