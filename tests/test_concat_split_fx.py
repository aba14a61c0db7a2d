"""Concat / split folds on the torch.fx route: conv outputs → channel concat → BN folds slice by slice into the
convs (backward); BN → channel split/slice → convs folds slice by slice into them (forward); the partial case
leaves the smallest exact remainder; every declined site names its reason."""

from __future__ import annotations

import operator
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_state_equal, rel_error, snapshot, storages
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

import normfx
from normfx import models
from normfx.inspect import batchnorm_calls
from normfx.layers import is_batchnorm
from normfx.models import BatchNormAct2d, randomize_batchnorm
from normfx.slices import chunk_sizes, concat_ranges, slice_channels, split_sizes

TOL = 1e-5


def _fused(model: nn.Module, x: torch.Tensor, policy: str = "fuse"):
    before = snapshot(model)
    with torch.no_grad():
        y = model(x)
    fused, report = normfx.rewrite_with_report(model, policy, example_inputs=x)
    assert_state_equal(before, model)
    assert not storages(fused) & storages(model)
    explained = normfx.explain(model, policy, example_inputs=x)
    assert [(e.name, e.status, e.reason) for e in explained.entries] == [(e.name, e.status, e.reason) for e in report.entries]
    with torch.no_grad():
        error = rel_error(y, fused(x))
    return fused, report, error


def _entry(report, name):
    found = [e for e in report.entries if e.name == name]
    assert len(found) == 1, report.entries
    return found[0]


def _ops(gm: fx.GraphModule) -> Counter:
    """What a graph computes, apart from module calls: (op, target) of every function/method node."""
    return Counter((n.op, str(n.target)) for n in gm.graph.nodes if n.op in ("call_function", "call_method"))


def _ready(model: nn.Module, seed: int = 3) -> nn.Module:
    randomize_batchnorm(model, seed)
    return model.eval()


# ------------------------------------------------------------------------------------------------- the zoo model


def test_mixconv_leaves_no_bn_and_no_elementwise_op():
    model = models.create("mixconv", seed=1)
    x = models.example_input("mixconv", batch=4, seed=1)
    fused, report, _ = _fused(model, x)
    assert batchnorm_calls(fused) == 0 and not report.skipped
    assert not any(is_batchnorm(m) for m in fused.modules())
    sliced = [e for e in report.applied if e.reason.startswith("folded slice by slice into")]
    assert len(sliced) == 7 and len(report.applied) == 9  # 2 plain conv → BN folds
    assert {e.details["direction"] for e in sliced} == {"backward", "forward"}
    # no op derived from a BN is left: the fused graph computes exactly the original's ops, minus the BNs
    assert _ops(fused) == _ops(fx.symbolic_trace(model))
    with torch.no_grad():
        reference = model.double()(x.double())
        own = rel_error(reference, model.float()(x))
        error = rel_error(reference, fused(x))
    assert error <= max(TOL, 2 * own), (error, own)


def test_zoo_models_tagged_concat_split_fold_completely():
    tagged = [n for n in models.names() if "concat_split" in models.info(n).tags]
    assert "mixconv" in tagged
    for name in tagged:
        fused, report, error = _fused(models.create(name), models.example_input(name, batch=2))
        assert batchnorm_calls(fused) == 0 and not report.skipped and error <= TOL, name


# ------------------------------------------------------------------------------------------------- concat → BN


class ConcatBN(nn.Module):
    """conv / ConvTranspose / functional-stride conv outputs → concat (dim) → BN."""

    def __init__(self, dim: int = 1, bn: nn.Module | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.a = nn.Conv2d(4, 3, 3, padding=1, bias=False)
        self.b = nn.ConvTranspose2d(4, 6, 3, padding=1, groups=2)
        self.c = nn.Conv2d(4, 5, 1, groups=1)
        self.bn = bn if bn is not None else nn.BatchNorm2d(14 if dim in (1, -3) else 3)
        if dim not in (1, -3):
            self.b = nn.Conv2d(4, 3, 1)
            self.c = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        return self.bn(torch.cat([self.a(x), self.b(x), self.c(x)], dim=self.dim))


@pytest.mark.parametrize("dim", [1, -3])
def test_concat_of_conv_outputs_folds_slice_by_slice(dim):
    model = _ready(ConcatBN(dim))
    x = torch.randn(2, 4, 7, 7)
    fused, report, error = _fused(model, x)
    entry = _entry(report, "bn")
    assert entry.status == "applied" and error <= TOL
    assert entry.reason == "folded slice by slice into a [0:3], b [3:9], c [9:14]"
    assert entry.details["into"] == ["a", "b", "c"] and entry.details["direction"] == "backward"
    assert batchnorm_calls(fused) == 0


def test_concat_on_a_non_channel_axis_is_declined():
    model = _ready(ConcatBN(dim=2))
    fused, report, error = _fused(model, torch.randn(2, 4, 5, 5))
    entry = _entry(report, "bn")
    assert entry.status == "skipped" and "concat on dim=2, not the channel axis 1" in entry.reason
    assert "not a Conv" in entry.reason  # the backward rule's own reason is kept first
    assert batchnorm_calls(fused) == 1 and error <= TOL


class Partial(nn.Module):
    """conv ∥ x (not a layer output) ∥ conv → concat → BN: one input cannot take its slice."""

    def __init__(self, bn: nn.Module | None = None, second_plain: bool = False) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 3, 1)
        self.b = nn.Conv2d(4, 5, 3, padding=1, bias=False)
        self.bn = bn if bn is not None else nn.BatchNorm2d(12)
        self.second_plain = second_plain

    def forward(self, x):
        parts = [self.a(x), F.relu(x), self.b(x)]
        if self.second_plain:
            parts.append(x * 2)
        return self.bn(torch.cat(parts, 1))


def test_partial_concat_folds_the_foldable_slices_and_moves_a_smaller_bn_before_the_concat():
    model = _ready(Partial())
    x = torch.randn(3, 4, 6, 6)
    fused, report, error = _fused(model, x)
    entry = _entry(report, "bn")
    assert entry.status == "applied" and error <= TOL
    assert entry.reason.startswith("folded slice by slice into a [0:3], b [7:12]; remainder: a BN on channels [3:7] "
                                   "of concat input 1 only, moved before the concat as 'bn_remainder'")
    assert "input 1 comes from relu(), not a Conv/ConvTranspose/Linear" in entry.reason
    remainder = fused.get_submodule("bn_remainder")
    assert type(remainder) is nn.BatchNorm2d and remainder.num_features == 4 and not remainder.training
    # the remainder is the original BN restricted to those channels, to the bit
    for key in ("running_mean", "running_var", "weight", "bias"):
        assert torch.equal(getattr(remainder, key), getattr(model.bn, key)[3:7])
    # the BN left in the graph is listed as skipped, with its reason (so strict mode refuses it)
    kept = _entry(report, "bn_remainder")
    assert kept.status == "skipped" and batchnorm_calls(fused) == len(report.skipped) == 1
    assert kept.reason == ("remainder of 'bn' on channels [3:7], kept before concat input 1: input 1 comes from "
                           "relu(), not a Conv/ConvTranspose/Linear; a smaller BN on that input alone is the cheapest "
                           "exact form")
    # it reads the unfoldable input and feeds the concat
    node = next(n for n in fused.graph.nodes if n.op == "call_module" and n.target == "bn_remainder")
    assert [u.target for u in node.users] == [torch.cat]


def test_partial_concat_with_a_bn_subclass_keeps_its_activation_after_the_concat():
    model = _ready(Partial(bn=BatchNormAct2d(12, act_layer=nn.SiLU)))
    x = torch.randn(2, 4, 5, 5)
    fused, report, error = _fused(model, x)
    entry = _entry(report, "bn")
    assert entry.status == "applied" and "remainder" in entry.reason and error <= TOL
    assert entry.details["kept_after"] == ["act"]
    remainder = fused.get_submodule("bn_remainder")  # an affine BN holding scale/shift: the subclass is not copied
    assert type(remainder) is nn.BatchNorm2d and remainder.eps == 0.0 and remainder.num_features == 4


def test_two_unfoldable_concat_inputs_keep_the_bn_with_every_reason():
    model = _ready(Partial(bn=nn.BatchNorm2d(16), second_plain=True))
    fused, report, error = _fused(model, torch.randn(2, 4, 5, 5))
    entry = _entry(report, "bn")
    assert entry.status == "skipped" and error <= TOL
    assert "2 of 4 concat inputs cannot take their slice" in entry.reason
    assert "input 1 comes from relu()" in entry.reason and "input 3 comes from a multiplication" in entry.reason
    assert "a smaller BN on each would cost more ops than the one BN" in entry.reason
    assert batchnorm_calls(fused) == 1


class SharedInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.a(x)
        return self.bn(torch.cat([y, self.b(x)], 1)), torch.sigmoid(y)


def test_concat_input_used_elsewhere_becomes_the_remainder():
    model = _ready(SharedInput())
    x = torch.randn(2, 4, 5, 5)
    fused, report = normfx.rewrite_with_report(model, "fuse")
    entry = _entry(report, "bn")
    assert entry.status == "applied"
    with torch.no_grad():
        assert all(rel_error(a, b) <= TOL for a, b in zip(model(x), fused(x)))
    assert "the output of 'a' (input 0) is also used by sigmoid()" in entry.reason
    assert entry.details["into"] == ["b"] and fused.get_submodule("bn_remainder").num_features == 4
    assert [e.name for e in report.skipped] == ["bn_remainder"]


def test_concat_of_linear_outputs_folds_with_its_rank_proven():
    class Lin(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.bn = nn.Linear(6, 3), nn.Linear(6, 4, bias=False), nn.BatchNorm1d(7)

        def forward(self, x):
            return self.bn(torch.concat([self.a(x), self.b(x)], dim=1))

    model = _ready(Lin())
    fused, report, error = _fused(model, torch.randn(5, 6))
    assert _entry(report, "bn").reason == "folded slice by slice into a [0:3], b [3:7]" and error <= TOL
    # without example inputs the Linear's 2-D input is not proven: declined with that reason
    report = normfx.explain(model, "fuse")
    assert "pass example_inputs to prove it" in _entry(report, "bn").reason


# ------------------------------------------------------------------------------------------------- BN → split


class SplitNet(nn.Module):
    """BN on a sum → split (``how``) → convs / other consumers."""

    def __init__(self, how: str, padding: int = 0, second: str = "conv") -> None:
        super().__init__()
        self.how, self.second = how, second
        self.bn = nn.BatchNorm2d(10)
        self.a = nn.Conv2d(4, 3, 1, bias=False)
        self.b = nn.Conv2d(6, 5, 3, padding=padding)

    def forward(self, x):
        y = self.bn(x + 1.0)
        if self.how == "split":
            p, q = torch.split(y, [4, 6], dim=1)
        elif self.how == "method":
            p, q = y.split([4, 6], 1)
        elif self.how == "chunk":  # 10 channels in 2 chunks of 5: conv a reads 4 of them through a slice
            p, q = torch.chunk(y, 2, dim=-3)
            p, q = p[:, :4], torch.cat([p[:, 4:], q], 1)
        else:
            p, q = y[:, :4], y[:, 4:]
        second = self.b(q) if self.second == "conv" else F.max_pool2d(q, 2)
        return self.a(p).mean((2, 3)), second.mean((2, 3))


@pytest.mark.parametrize("how", ["split", "method", "slice"])
def test_bn_split_into_convs_folds_forward_slice_by_slice(how):
    model = _ready(SplitNet(how))
    x = torch.randn(2, 10, 6, 6)
    before = snapshot(model)
    with torch.no_grad():
        ya, yb = model(x)
    fused, report = normfx.rewrite_with_report(model, "fuse", example_inputs=x)
    assert_state_equal(before, model)
    entry = _entry(report, "bn")
    assert entry.status == "applied" and entry.reason == "folded slice by slice into a [0:4], b [4:10]"
    assert entry.details["direction"] == "forward" and batchnorm_calls(fused) == 0
    with torch.no_grad():
        fa, fb = fused(x)
    assert rel_error(ya, fa) <= TOL and rel_error(yb, fb) <= TOL


def test_bn_chunk_whose_piece_is_concatenated_is_declined():
    model = _ready(SplitNet("chunk"))
    report = normfx.explain(model, "fuse", example_inputs=torch.randn(2, 10, 6, 6))
    entry = _entry(report, "bn")
    assert entry.status == "skipped"
    assert "the pieces of" not in entry.reason  # pieces are taken one by one
    assert "split pieces do not all fold" in entry.reason and "cat()" in entry.reason


def test_split_piece_read_by_a_non_conv_is_declined():
    model = _ready(SplitNet("split", second="pool"))
    x = torch.randn(2, 10, 6, 6)
    fused, report = normfx.rewrite_with_report(model, "fuse", example_inputs=x)
    entry = _entry(report, "bn")
    assert entry.status == "skipped"
    assert "split pieces do not all fold" in entry.reason and "max_pool2d()" in entry.reason
    assert batchnorm_calls(fused) == 1
    with torch.no_grad():
        assert all(rel_error(a, b) <= TOL for a, b in zip(model(x), fused(x)))


def test_split_into_a_padded_conv_needs_the_border_correction():
    model = _ready(SplitNet("slice", padding=1))
    x = torch.randn(2, 10, 6, 6)
    report = normfx.explain(model, "fuse", example_inputs=x)
    entry = _entry(report, "bn")
    assert entry.status == "skipped"
    assert "BN slice [4:10] before a zero-padded conv 'b'" in entry.reason and "border_correction=true" in entry.reason
    fused, report = normfx.rewrite_with_report(model, "fuse:border_correction=true", example_inputs=x)
    entry = _entry(report, "bn")
    assert entry.status == "applied" and "b (border correction, exact for input shape [2, 6, 6, 6] only)" in entry.reason
    assert batchnorm_calls(fused) == 0
    with torch.no_grad():
        assert all(rel_error(a, b) <= TOL for a, b in zip(model(x), fused(x)))


class SplitOther(nn.Module):
    def __init__(self, dim: int = 1, whole: bool = False) -> None:
        super().__init__()
        self.dim, self.whole = dim, whole
        self.bn = nn.BatchNorm2d(6)
        self.a = nn.Conv2d(6, 2, 1)
        self.b = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = self.bn(x * 2)
        pieces = torch.split(y, 3, dim=self.dim)
        if self.whole:
            return torch.cat(pieces, 1)
        return self.a(pieces[0]) + self.b(pieces[1])


def test_split_on_a_non_channel_axis_and_pieces_used_whole_are_declined():
    x = torch.randn(2, 6, 6, 6)
    entry = _entry(normfx.explain(_ready(SplitOther(dim=2)), "fuse", example_inputs=x), "bn")
    assert entry.status == "skipped" and "the BN output is split on dim=2, not the channel axis 1" in entry.reason
    entry = _entry(normfx.explain(_ready(SplitOther(whole=True)), "fuse", example_inputs=x), "bn")
    assert entry.status == "skipped" and "used as a whole by cat()" in entry.reason


def test_split_folds_are_off_with_forward_false():
    model = _ready(SplitNet("split"))
    entry = _entry(normfx.explain(model, "fuse:forward=false", example_inputs=torch.randn(1, 10, 4, 4)), "bn")
    assert entry.status == "skipped" and "(forward fold disabled)" in entry.reason


# ------------------------------------------------------------------------------------------------- slice math


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 12))
def test_split_and_chunk_sizes_match_torch(channels, n):
    x = torch.arange(channels).reshape(1, channels)
    assert [p.shape[1] for p in torch.split(x, n, dim=1)] == split_sizes(channels, n)
    assert [p.shape[1] for p in torch.chunk(x, n, dim=1)] == chunk_sizes(channels, n)
    starts = np.cumsum([0] + split_sizes(channels, n))[:-1]
    assert [int(r[0]) for r in concat_ranges(split_sizes(channels, n))] == list(starts)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 30), st.one_of(st.none(), st.integers(-40, 40)), st.one_of(st.none(), st.integers(-40, 40)),
       st.one_of(st.none(), st.integers(-4, 4).filter(lambda s: s != 0)))
def test_slice_channels_match_tensor_slicing(channels, start, stop, step):
    x = np.arange(channels).reshape(1, channels)  # ONNX Slice clamps like Python; torch has no negative steps
    assert slice_channels(channels, start, stop, step).tolist() == x[:, start:stop:step].reshape(-1).tolist()
    if step is None or step > 0:
        assert slice_channels(channels, start, stop, step).tolist() == torch.arange(channels)[start:stop:step].tolist()


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=4), st.integers(0, 10_000))
def test_concat_fold_over_random_input_widths(widths, seed):
    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv2d(3, w, 1 + 2 * (i % 2), padding=i % 2) for i, w in enumerate(widths))
            self.bn = nn.BatchNorm2d(sum(widths))

        def forward(self, x):
            return self.bn(torch.cat([conv(x) for conv in self.convs], 1))

    model = _ready(Net(), seed)
    x = torch.randn(2, 3, 5, 5)
    fused, report = normfx.rewrite_with_report(model, "fuse")
    assert report.applied and batchnorm_calls(fused) == 0
    with torch.no_grad():
        assert rel_error(model(x), fused(x)) <= TOL


def test_getitem_on_split_is_the_only_piece_access():
    # guards the fx shapes this rule reads: torch.split under tracing is a call_function, pieces are getitem
    gm = fx.symbolic_trace(SplitNet("split"))
    split = next(n for n in gm.graph.nodes if n.op == "call_function" and "split" in str(n.target))
    assert all(u.target is operator.getitem for u in split.users)


class SharedConv(nn.Module):
    """A conv module called twice: once into the concat, once elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.other, self.bn = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(torch.cat([self.conv(x), self.other(x)], 1)), self.conv(torch.sigmoid(x))


def test_shared_conv_in_a_concat_is_copied_or_left_to_the_remainder():
    model = _ready(SharedConv())
    x = torch.randn(2, 4, 5, 5)
    fused, report = normfx.rewrite_with_report(model, "fuse")
    entry = _entry(report, "bn")
    assert entry.status == "applied" and "'conv' is called 2 times: folded into a private copy" in entry.details["note"]
    assert batchnorm_calls(fused) == 0
    with torch.no_grad():
        assert all(rel_error(a, b) <= TOL for a, b in zip(model(x), fused(x)))
    fused, report = normfx.rewrite_with_report(model, "fuse:duplicate_shared=false")
    entry = _entry(report, "bn")
    assert entry.status == "applied" and entry.details["into"] == ["other"]
    assert "'conv' is called 2 times; folding into it would change its other uses" in entry.reason
    assert batchnorm_calls(fused) == len(report.skipped) == 1
    with torch.no_grad():
        assert all(rel_error(a, b) <= TOL for a, b in zip(model(x), fused(x)))
