"""Branch merge (structural reparameterization) on the torch.fx route: repvgg / mobileone end with one conv per
block and no BN or elementwise op left; every decline is reported with its reason and changes nothing."""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_error
from torch import fx, nn

import normfx
from normfx import models
from normfx.inspect import batchnorm_calls
from normfx.models.reparam import MobileOneBlock, RepVGGBlock

MULTI_BRANCH = ["repvgg", "mobileone"]
ELEMENTWISE = {operator.add, operator.mul, operator.sub, operator.truediv, torch.add, torch.mul, torch.sub}


def _randomized(model: nn.Module, seed: int = 3) -> nn.Module:
    models.randomize_batchnorm(model, seed)
    return model.eval()


def _float64_error(model: nn.Module, x: torch.Tensor, candidate: torch.Tensor) -> tuple[float, float]:
    """(candidate's error, the original fp32 model's own error), both against the original run in float64."""
    with torch.no_grad():
        reference = copy.deepcopy(model).double()(x.double())
        own = model(x)
    return rel_error(reference, candidate), rel_error(reference, own)


def _elementwise(gm: fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes
            if (n.op == "call_function" and n.target in ELEMENTWISE)
            or (n.op == "call_method" and n.target in {"add", "mul", "sub", "div", "add_", "mul_"})]


def _convs(module: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())


@pytest.mark.parametrize("name", MULTI_BRANCH)
def test_zoo_multi_branch_models_end_with_one_conv_per_block(name):
    model = models.create(name, seed=1)
    x = models.example_input(name, batch=2, seed=1)
    blocks = sum(isinstance(m, (RepVGGBlock, MobileOneBlock)) for m in model.modules())
    fused, report = normfx.rewrite_with_report(model, "fuse", example_inputs=x)
    assert batchnorm_calls(fused) == 0 and not report.skipped
    assert _elementwise(fused) == [], "no add / BN-derived elementwise op is left"
    assert _convs(fused) == blocks and _convs(model) >= 2 * blocks
    assert sum(isinstance(m, nn.ReLU) for m in fused.modules()) == blocks  # the activation after each sum stays
    with torch.no_grad():
        error, own = _float64_error(model, x, fused(x))
    assert error <= max(1e-5, 2 * own), (error, own)
    merges = [e for e in report.applied if e.details.get("fold") == "branch_merge" and "branches" in e.details]
    assert len(merges) == blocks
    identity_bns = [n for n, m in model.named_modules() if isinstance(m, (RepVGGBlock, MobileOneBlock))
                    and m.identity is not None]
    assert identity_bns
    for block in identity_bns:
        entry = next(e for e in report.entries if e.name == f"{block}.identity")
        assert entry.status == "applied" and entry.reason.startswith("merged as an identity branch"), entry
        merge = next(e for e in merges if f"identity BN '{block}.identity'" in e.details["branches"])
        assert merge.reason.startswith("merged ") and f"'{block}.identity'" in merge.reason
    explained = normfx.explain(model, "fuse", example_inputs=x)
    assert [(e.name, e.status, e.reason) for e in explained.entries] == [(e.name, e.status, e.reason)
                                                                          for e in report.entries]


def test_merge_branches_false_keeps_the_branches():
    model = models.create("repvgg")
    x = models.example_input("repvgg", batch=2)
    fused, report = normfx.rewrite_with_report(model, "fuse:merge_branches=false", example_inputs=x)
    assert _convs(fused) == _convs(model)
    assert batchnorm_calls(fused) == len(report.skipped) > 0  # the identity BNs, reported
    assert not any(e.details.get("fold") == "branch_merge" for e in report.entries)
    assert rel_error(model(x), fused(x)) <= 1e-5


class Sum(nn.Module):
    """``conv_a(x) + conv_b(x) (+ identity)`` with configurable convs, in the spelling given."""

    def __init__(self, a: nn.Module, b: nn.Module, identity: str = "", spelling: str = "+", channels: int = 4):
        super().__init__()
        self.a, self.b = a, b
        self.identity, self.spelling = identity, spelling
        self.bn = nn.BatchNorm2d(channels) if identity == "bn" else None

    def forward(self, x):
        if self.spelling == "torch.add":
            out = torch.add(self.a(x), self.b(x))
        elif self.spelling == "method":
            out = self.a(x).add(self.b(x))
        else:
            out = self.a(x) + self.b(x)
        if self.identity == "x":
            out = x + out
        elif self.identity == "bn":
            out = out + self.bn(x)
        return F.relu(out)


def _check(model: nn.Module, x: torch.Tensor, convs_left: int):
    model = _randomized(model)
    fused, report = normfx.rewrite_with_report(model, "fuse", example_inputs=x)
    with torch.no_grad():
        assert rel_error(model(x), fused(x)) <= 1e-5
    assert _convs(fused) == convs_left, fused.code
    return fused, report


@pytest.mark.parametrize("spelling", ["+", "torch.add", "method"])
@pytest.mark.parametrize("identity", ["", "x", "bn"])
def test_spellings_and_identity_branches_merge(spelling, identity):
    model = Sum(nn.Conv2d(4, 4, 3, padding=1), nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)),
                identity, spelling)
    fused, report = _check(model, torch.randn(2, 4, 7, 6), 1)
    assert _elementwise(fused) == [] and batchnorm_calls(fused) == 0
    merge = next(e for e in report.applied if e.details.get("fold") == "branch_merge" and "branches" in e.details)
    assert merge.details["kernel"] == [3, 3] and len(merge.details["branches"]) == (3 if identity else 2)


def test_grouped_and_depthwise_identity_and_dilation_and_1d_3d():
    dw = Sum(nn.Conv2d(6, 6, 5, padding=4, dilation=2, groups=6), nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=6),
             "bn", channels=6)
    _check(dw, torch.randn(2, 6, 9, 9), 1)
    grouped = Sum(nn.Conv2d(6, 6, 3, padding=1, groups=3), nn.Conv2d(6, 6, 1, groups=3), "x", channels=6)
    _check(grouped, torch.randn(2, 6, 5, 5), 1)
    one_d = Sum(nn.Conv1d(4, 4, 5, padding=2), nn.Conv1d(4, 4, 1), "x")
    _check(one_d, torch.randn(2, 4, 11), 1)
    three_d = Sum(nn.Conv3d(4, 4, 3, padding=1, stride=2), nn.Conv3d(4, 4, 1, stride=2))
    _check(three_d, torch.randn(2, 4, 5, 6, 7), 1)
    acnet = Sum(nn.Conv2d(4, 4, (3, 1), padding=(1, 0)), nn.Conv2d(4, 4, (1, 3), padding=(0, 1)), "x")
    _check(acnet, torch.randn(2, 4, 6, 5), 1)
    same = Sum(nn.Conv2d(4, 4, 4, padding="same"), nn.Conv2d(4, 4, 2, padding="same"))
    _check(same, torch.randn(2, 4, 7, 7), 1)


def _declined(model: nn.Module, x: torch.Tensor, convs_left: int) -> str:
    fused, report = _check(model, x, convs_left)
    kept = [e for e in report.kept if e.details.get("fold") == "branch_merge"]
    assert len(kept) == 1 and not [e for e in report.applied if e.details.get("fold") == "branch_merge"]
    return kept[0].reason


def test_inconsistent_padding_is_declined_with_the_reason():
    # 1×1 with padding 1 against 3×3 with padding 1: the sizes agree only through stride 3 on a 4×4 input
    model = Sum(nn.Conv2d(4, 4, 3, padding=1, stride=3), nn.Conv2d(4, 4, 1, padding=1, stride=3))
    reason = _declined(model, torch.randn(2, 4, 4, 4), 2)
    assert "inconsistent padding" in reason and "borders" in reason and "'b'" in reason


def test_different_strides_groups_and_padding_modes_are_declined():
    strides = Sum(nn.Conv2d(4, 4, 3, padding=1, stride=2), nn.Conv2d(4, 4, 3, padding=0, stride=1))
    assert "stride" in _declined(strides, torch.randn(2, 4, 5, 5), 2)
    groups = Sum(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1, groups=2))
    assert "groups" in _declined(groups, torch.randn(2, 4, 5, 5), 2)
    reflect = Sum(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.Conv2d(4, 4, 3, padding=1))
    assert "padding_mode 'reflect'" in _declined(reflect, torch.randn(2, 4, 5, 5), 2)


def test_identity_bn_of_a_declined_merge_stays_reported():
    model = Sum(nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Conv2d(4, 4, 1, padding=0), "bn")
    fused, report = _check(model, torch.randn(2, 4, 5, 5), 2)  # conv a + the BN merge; conv b kept apart
    merge = next(e for e in report.applied if e.details.get("fold") == "branch_merge" and "branches" in e.details)
    assert "kept apart" in merge.reason and "groups=1" in merge.reason
    # an identity BN next to a strided conv: the sum runs only on 1×1 maps
    bn = _randomized(nn.BatchNorm2d(4))

    class Strided(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 1, stride=2), bn

        def forward(self, x):
            return self.conv(x) + self.bn(x)

    x = torch.randn(2, 4, 1, 1)  # 1×1 maps: stride 2 keeps the size, so the sum runs
    strided = _randomized(Strided())
    fused, report = normfx.rewrite_with_report(strided, "fuse", example_inputs=x)
    entry = next(e for e in report.entries if e.name == "bn")
    assert entry.status == "skipped" and "branch merge declined" in entry.reason and "stride" in entry.reason
    with torch.no_grad():
        assert batchnorm_calls(fused) == 1 and rel_error(strided(x), fused(x)) <= 1e-6


class TwoSources(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.c, self.d = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = torch.relu(x)
        return self.a(x) + self.c(y) + self.b(x) + self.d(y)


def test_branches_reading_different_tensors_are_merged_per_tensor_only():
    fused, report = _check(TwoSources(), torch.randn(2, 4, 5, 5), 2)
    merges = [e for e in report.applied if e.details.get("fold") == "branch_merge"]
    assert [e.details["branches"] for e in merges] == [["conv 'a'", "conv 'b'"], ["conv 'c'", "conv 'd'"]]
    assert len(_elementwise(fused)) == 1  # the two merged convs, added

    class Different(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.a(x) + self.b(torch.relu(x)) + x

    fused, report = _check(Different(), torch.randn(2, 4, 5, 5), 2)  # a(x) + x merge; b reads relu(x)
    assert [e.details["branches"] for e in report.applied] == [["conv 'a'", "identity 'x'"]]
    assert len(_elementwise(fused)) == 1


class SharedAndReused(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        side = self.b(x)
        return self.a(x) + side + self.a(torch.relu(x)), side


def test_conv_output_used_elsewhere_is_kept_apart_and_shared_modules_stay_intact():
    model = _randomized(SharedAndReused())
    x = torch.randn(2, 4, 5, 5)
    fused, report = normfx.rewrite_with_report(model, "fuse", example_inputs=x)
    kept = [e for e in report.kept if e.details.get("fold") == "branch_merge"]
    assert len(kept) == 1 and "conv 'b''s output is also used by the model output" in kept[0].reason, kept
    with torch.no_grad():
        for y, z in zip(model(x), fused(x)):
            assert rel_error(y, z) <= 1e-5


def test_multi_branch_tag_matches_the_graphs():
    """A model is tagged multi_branch exactly when fuse merges branches in it."""
    for name in models.names():
        if "traceable" not in models.info(name).tags:
            continue
        report = normfx.explain(models.create(name), "fuse", example_inputs=models.example_input(name))
        merged = any(e.details.get("fold") == "branch_merge" and e.status == "applied" for e in report.entries)
        assert merged == ("multi_branch" in models.info(name).tags), name


def test_layers_the_policy_does_not_target_are_not_merged():
    model = models.create("repvgg")
    x = models.example_input("repvgg", batch=2)
    policy = {"stages.2.*": "keep", "*": "fuse"}
    fused, report = normfx.rewrite_with_report(model, policy, example_inputs=x)
    merged = [e.name for e in report.applied if "branches" in e.details]
    assert merged and not any(name.startswith("stages.2.") for name in merged)
    assert isinstance(fused.get_submodule("stages.2.conv_1x1.0"), nn.Conv2d)  # the kept block keeps its branches
    assert batchnorm_calls(fused) == 3  # its 3×3, 1×1 and identity BNs
    with torch.no_grad():
        assert rel_error(model(x), fused(x)) <= 1e-5
