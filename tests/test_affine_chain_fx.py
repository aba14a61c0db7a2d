"""fx rule family affine_chain: ``x * w + b`` with constant per-channel w, b folded as a BN (into the layer before
or after it) or merged into the BatchNorm next to it; declined chains kept with their reasons."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_state_equal, rel_error, snapshot, storages
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import normfx
from normfx import models


def _randomized(model: nn.Module, seed: int = 2) -> nn.Module:
    models.randomize_batchnorm(model, torch.Generator().manual_seed(seed))
    return model.eval()


def _affine_calls(gm: nn.Module) -> int:
    names = {operator.mul, operator.add, operator.sub, operator.truediv, torch.mul, torch.add, torch.sub, torch.div,
             "mul", "add", "sub", "div"}
    return sum(n.op in ("call_function", "call_method") and n.target in names for n in gm.graph.nodes)


def _entries(report, fold="affine_chain"):
    return [e for e in report.entries if e.details.get("fold") == fold]


def _vector(c: int, seed: int, low: float = 0.5, high: float = 1.5, negative: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(c, generator=g) * (high - low) + low
    if negative:
        v[0] = -v[0]
    return v


class _Scale(nn.Module):
    """Caffe's Scale layer written as ``x * w.view(shape) + b.view(shape)`` (parameters)."""

    def __init__(self, c: int, shape=(1, -1, 1, 1), seed: int = 0) -> None:
        super().__init__()
        self.shape = shape
        self.w = nn.Parameter(_vector(c, seed))
        self.b = nn.Parameter(torch.randn(c, generator=torch.Generator().manual_seed(seed + 1)))

    def forward(self, x):
        return x * self.w.view(*self.shape) + self.b.view(*self.shape)


class _ConvThen(nn.Module):
    """conv3x3 → ``affine(y, s, t)`` → ReLU, the constants as (C, 1, 1) buffers."""

    def __init__(self, affine, c: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.register_buffer("s", _vector(c, 3).reshape(c, 1, 1))
        self.register_buffer("t", torch.randn(c, 1, 1, generator=torch.Generator().manual_seed(4)))
        self.affine = affine

    def forward(self, x):
        return F.relu(self.affine(self.conv(x), self.s, self.t))


FORMS = {
    "x*s+t": lambda y, s, t: y * s + t,
    "t+s*x": lambda y, s, t: t + s * y,
    "torch.mul/add": lambda y, s, t: torch.add(torch.mul(y, s), t),
    "methods": lambda y, s, t: y.mul(s).add(t),
    "(x-t)/s": lambda y, s, t: (y - t) / s,
    "t-x*s": lambda y, s, t: t - y * s,
    "x*2*s+t-1": lambda y, s, t: y * 2.0 * s + t - 1,
}


@pytest.mark.parametrize("form", FORMS)
def test_chain_after_conv_folds_backward_and_leaves_nothing(form):
    model = _ConvThen(FORMS[form]).eval()
    x = torch.randn(2, 3, 8, 8)
    before, owned = snapshot(model), storages(model)
    fused, report = normfx.rewrite_with_report(model, "fuse")
    assert_state_equal(before, model) and not storages(fused) & owned
    [entry] = _entries(report)
    assert entry.status == "applied" and entry.details["direction"] == "backward" and entry.details["into"] == "conv"
    assert _affine_calls(fused) == 0
    assert set(fused.state_dict()) == {"conv.weight", "conv.bias"}  # the constants are gone
    assert rel_error(model(x), fused(x)) <= 1e-5
    explained = normfx.explain(model, "fuse")
    assert [(e.name, e.status, e.reason) for e in explained.entries] == [(e.name, e.status, e.reason) for e in report.entries]


def test_caffe_scale_layer_variants_fold_into_conv_and_linear():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
            self.scale = _Scale(6)
            self.conv2 = nn.Conv2d(6, 6, 1)
            self.scale2 = _Scale(6, (6, 1, 1), seed=5)
            self.fc = nn.Linear(6, 4)
            self.scale3 = _Scale(4, (-1,), seed=7)

        def forward(self, x):
            y = F.relu(self.scale2(self.conv2(F.relu(self.scale(self.conv(x))))))
            return self.scale3(self.fc(y.mean((2, 3))))

    model = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    fused, report = normfx.rewrite_with_report(model, "fuse", example_inputs=x)
    assert [(e.details["into"], e.status) for e in _entries(report)] == [("conv", "applied"), ("conv2", "applied"),
                                                                         ("fc", "applied")]
    assert _affine_calls(fused) == 0 and rel_error(model(x), fused(x)) <= 1e-5
    assert "assumes" not in _entries(report)[0].details  # example inputs prove the input is batched


def test_batched_assumption_is_stated_without_example_inputs():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), _Scale(4)).eval()
    fused, report = normfx.rewrite_with_report(model, "fuse")
    assert "batched" in _entries(report)[0].details["assumes"]


def test_chain_before_conv_folds_forward():
    model = nn.Sequential(nn.ReLU(), _Scale(3), nn.Conv2d(3, 4, 1)).eval()
    x = torch.randn(2, 3, 6, 6)
    fused, report = normfx.rewrite_with_report(model, "fuse")
    assert [(e.status, e.details.get("direction"), e.details.get("into")) for e in _entries(report)] == [
        ("applied", "forward", "2")]
    assert _affine_calls(fused) == 0 and rel_error(model(x), fused(x)) <= 1e-5
    off, report = normfx.rewrite_with_report(model, "fuse:forward=false")
    assert "forward=false" in _entries(report)[0].reason and _affine_calls(off) == 2


def test_activation_between_chain_and_conv_keeps_the_chain():
    model = nn.Sequential(nn.ReLU(), _Scale(3), nn.ReLU(), nn.Conv2d(3, 4, 1)).eval()
    x = torch.randn(2, 3, 6, 6)
    fused, report = normfx.rewrite_with_report(model, "fuse")
    [entry] = _entries(report)
    assert entry.status == "kept" and "input comes from ReLU '0'" in entry.reason and "ReLU '2'" in entry.reason
    assert rel_error(model(x), fused(x)) <= 1e-5


def test_chain_before_padded_conv_is_kept_with_the_forward_rules_reason():
    model = nn.Sequential(nn.ReLU(), _Scale(3), nn.Conv2d(3, 4, 3, padding=1)).eval()
    x = torch.randn(2, 3, 6, 6)
    fused, report = normfx.rewrite_with_report(model, "fuse")
    [entry] = _entries(report)
    assert entry.status == "kept" and "zero-padded conv" in entry.reason and "border" in entry.reason
    assert _affine_calls(fused) == 2 and rel_error(model(x), fused(x)) <= 1e-5


def test_bn_then_chain_and_chain_then_bn_merge_into_the_bn():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn1 = nn.BatchNorm2d(4)
            self.scale1 = _Scale(4)  # Caffe: BN → Scale → ReLU
            self.scale2 = _Scale(4, (4, 1, 1), seed=9)
            self.bn2 = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn2(self.scale2(F.relu(self.scale1(self.bn1(F.relu(x))))))

    model = _randomized(Net())
    x = torch.randn(2, 4, 5, 5)
    fused, report = normfx.rewrite_with_report(model, "fuse")
    merged = _entries(report)
    assert [(e.status, e.details["into"], e.details["side"]) for e in merged] == [
        ("applied", "bn1", "after"), ("applied", "bn2", "before")]
    assert _affine_calls(fused) == 0 and rel_error(model(x), fused(x)) <= 1e-5
    assert {e.name for e in report.skipped} == {"bn1", "bn2"}  # no layer next to them: one BN each is left
    assert model.bn1.weight is not fused.bn1.weight  # merged into a private copy


def test_merged_bn_then_folds_into_the_conv():
    model = _randomized(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), _Scale(4), nn.ReLU()))
    x = torch.randn(2, 3, 6, 6)
    fused, report = normfx.rewrite_with_report(model, "fuse")
    assert [e.status for e in report.entries] == ["applied", "applied"]
    assert _affine_calls(fused) == 0 and set(fused.state_dict()) == {"0.weight", "0.bias"}
    assert rel_error(model(x), fused(x)) <= 1e-5


def test_zero_scale_before_bn_is_declined_and_the_chain_kept_with_reasons():
    scale = _Scale(4)
    with torch.no_grad():
        scale.w[1] = 0.0
    model = _randomized(nn.Sequential(nn.ReLU(), scale, nn.BatchNorm2d(4), nn.ReLU()))
    x = torch.randn(2, 4, 5, 5)
    fused, report = normfx.rewrite_with_report(model, "fuse")
    [entry] = _entries(report)
    assert entry.status == "kept" and "multiplies some channel by 0" in entry.reason
    assert "not a Conv/ConvTranspose/Linear" in entry.reason
    assert rel_error(model(x), fused(x)) <= 1e-5


@pytest.mark.parametrize("shape, reason", [
    ((1, 1, 1, 6), "vary along more than the channel axis"),  # varies along W
    ((5,), "vary along more than the channel axis"),  # (C,) after a conv2d broadcasts along W, not C
    ((1, 1, 4, 1, 1), "more axes than the data"),
])
def test_chain_not_per_channel_is_kept_with_the_reason(shape, reason):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.register_buffer("w", torch.rand(shape) + 0.5)

        def forward(self, x):
            return self.conv(x) * self.w

    model = Net().eval()
    x = torch.randn(2, 3, 6, 6)
    if len(shape) == 1:
        x = torch.randn(2, 3, 6, 5)
    fused, report = normfx.rewrite_with_report(model, "fuse", example_inputs=x)
    [entry] = _entries(report)
    assert entry.status == "kept" and reason in entry.reason
    assert rel_error(model(x), fused(x)) <= 1e-5


def test_conv_output_used_twice_keeps_the_chain():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.scale = _Scale(4)

        def forward(self, x):
            y = self.conv(x)
            return self.scale(y) + y

    model = Net().eval()
    fused, report = normfx.rewrite_with_report(model, "fuse")
    [entry] = _entries(report)
    assert entry.status == "kept" and "also used by" in entry.reason


def test_scalar_chain_folds_into_a_layer_and_is_not_reported_when_kept():
    class ConvHalf(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return torch.relu(self.conv(x) * 0.5 - 1.0)

    model = ConvHalf().eval()
    x = torch.randn(2, 3, 6, 6)
    fused, report = normfx.rewrite_with_report(model, "fuse")
    assert [e.status for e in _entries(report)] == ["applied"] and _affine_calls(fused) == 0
    assert rel_error(model(x), fused(x)) <= 1e-5

    class Half(nn.Module):
        def forward(self, x):
            return torch.relu(x) * 0.5 + 1.0

    fused, report = normfx.rewrite_with_report(Half(), "fuse")
    assert report.entries == [] and _affine_calls(fused) == 2  # nothing to fold into: left alone, not listed


@settings(max_examples=25, deadline=None)
@given(ops=st.lists(st.sampled_from(["mul", "add", "sub", "rsub", "div", "smul"]), min_size=1, max_size=4),
       seed=st.integers(0, 1000), after=st.booleans())
def test_any_chain_of_per_channel_ops_folds_exactly(ops, seed, after):
    g = torch.Generator().manual_seed(seed)
    consts = [(torch.rand(1, 4, 1, 1, generator=g) + 0.5) * (1 if i % 2 else -1) for i in range(len(ops))]

    class Chain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for i, c in enumerate(consts):
                self.register_buffer(f"c{i}", c)

        def forward(self, y):
            for i, op in enumerate(ops):
                c = getattr(self, f"c{i}")
                y = {"mul": lambda: y * c, "add": lambda: y + c, "sub": lambda: y - c, "rsub": lambda: c - y,
                     "div": lambda: y / c, "smul": lambda: 1.5 * y}[op]()
            return y

    layers = [nn.Conv2d(3, 4, 3, stride=2), Chain(), nn.ReLU()] if after else [nn.ReLU(), Chain(), nn.Conv2d(4, 2, 1)]
    model = nn.Sequential(*layers).eval()
    x = torch.randn(2, 3 if after else 4, 9, 9, generator=g)
    fused, report = normfx.rewrite_with_report(model, "fuse")
    assert _affine_calls(fused) == 0, report
    assert rel_error(model(x), fused(x)) <= 1e-5
