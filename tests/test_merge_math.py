"""normfx.merge: the branch-merge math and its geometry decision, against float64 torch convolutions summed
branch by branch (hypothesis over ranks, kernel sizes, groups, strides, dilations, asymmetric padding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from normfx.merge import Geometry, identity_kernel, merge_kernels, pad_kernel, plan_merge

CONV = {1: F.conv1d, 2: F.conv2d}


def _conv(x, w, b, stride, dilation, pads, groups):
    """A float64 conv with (begin, end) zero padding per axis."""
    flat = [p for pair in reversed(pads) for p in pair]  # F.pad: last axis first
    y = CONV[x.dim() - 2](F.pad(x, flat), torch.from_numpy(w), None if b is None else torch.from_numpy(b),
                          stride=stride, dilation=dilation, groups=groups)
    return y


@st.composite
def branch_sets(draw):
    rank = draw(st.sampled_from([1, 2]))
    groups = draw(st.sampled_from([1, 2, 3]))
    per_group_in = draw(st.integers(1, 3))
    cin = groups * per_group_in
    identity = draw(st.booleans())
    cout = cin if identity else groups * draw(st.integers(1, 3))
    stride = tuple(1 if identity else draw(st.integers(1, 3)) for _ in range(rank))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    kernel = tuple(draw(st.integers(1, 5)) for _ in range(rank))
    count = draw(st.integers(1, 3))
    ks = [kernel] + [tuple(draw(st.integers(1, K)) for K in kernel) for _ in range(count - 1)]
    offsets = [tuple(draw(st.integers(0, K - k)) for K, k in zip(kernel, kk)) for kk in ks]
    if identity:
        ks.append((1,) * rank)
        offsets.append(tuple(draw(st.integers(0, K - 1)) for K in kernel))
    begin = tuple(max(o[a] * dilation[a] for o in offsets) + draw(st.integers(0, 1)) for a in range(rank))
    end = tuple(max((kernel[a] - k[a] - o[a]) * dilation[a] for k, o in zip(ks, offsets)) + draw(st.integers(0, 1))
                for a in range(rank))
    if identity:  # the identity reads x unshifted: the merged conv keeps the size, tap o*d sits on x itself
        o = offsets[-1]
        begin = tuple(o[a] * dilation[a] for a in range(rank))
        end = tuple((kernel[a] - 1 - o[a]) * dilation[a] for a in range(rank))
        ok = all(begin[a] >= max(oo[a] * dilation[a] for oo in offsets[:-1]) for a in range(rank)) and all(
            end[a] >= max((kernel[a] - k[a] - oo[a]) * dilation[a] for k, oo in zip(ks[:-1], offsets[:-1]))
            for a in range(rank))
        if not ok:
            ks, offsets, identity = ks[:-1], offsets[:-1], False
            begin = tuple(max(oo[a] * dilation[a] for oo in offsets) for a in range(rank))
            end = tuple(max((kernel[a] - k[a] - oo[a]) * dilation[a] for k, oo in zip(ks, offsets)) for a in range(rank))
    size = tuple(draw(st.integers(max(1, dilation[a] * (kernel[a] - 1) + 1 - begin[a] - end[a]), 9)) for a in range(rank))
    seed = draw(st.integers(0, 2**31 - 1))
    return rank, groups, cin, cout, stride, dilation, kernel, ks, offsets, begin, end, size, identity, seed


@settings(max_examples=150, deadline=None)
@given(branch_sets())
def test_merged_conv_equals_the_sum_of_branches(case):
    rank, groups, cin, cout, stride, dilation, kernel, ks, offsets, begin, end, size, identity, seed = case
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(size=(2, cin, *size)))
    geoms, weights, biases, reference = [], [], [], 0
    n_convs = len(ks) - (1 if identity else 0)
    for i in range(n_convs):
        k, o = ks[i], offsets[i]
        pads = tuple((begin[a] - o[a] * dilation[a], end[a] - (kernel[a] - k[a] - o[a]) * dilation[a]) for a in range(rank))
        w = rng.normal(size=(cout, cin // groups, *k))
        b = rng.normal(size=cout) if i % 2 == 0 else None
        geoms.append(Geometry(f"conv{i}", k, stride, dilation, pads, groups, cin, cout))
        weights.append(w)
        biases.append(b)
        reference = reference + _conv(x, w, b, stride, dilation, pads, groups)
    if identity:
        scale = rng.normal(size=cin)
        geoms.append(Geometry.of_identity("identity", cin, rank))
        weights.append(identity_kernel(cin, groups, rank, scale))
        biases.append(rng.normal(size=cin))
        reference = reference + x * torch.from_numpy(scale).reshape(1, -1, *(1,) * rank) + \
            torch.from_numpy(biases[-1]).reshape(1, -1, *(1,) * rank)
    plan = plan_merge(geoms)
    if len(geoms) < 2:
        assert not plan.ok
        return
    assert plan.ok and plan.merged == list(range(len(geoms))) and not plan.declined, plan
    assert plan.kernel == kernel and plan.pads == tuple(zip(begin, end))
    w, b = merge_kernels([weights[i] for i in plan.merged], [biases[i] for i in plan.merged],
                         [plan.offsets[i] for i in plan.merged], plan.kernel)
    merged = _conv(x, w, b, plan.stride, plan.dilation, plan.pads, plan.groups)
    assert merged.shape == reference.shape
    torch.testing.assert_close(merged, reference, rtol=1e-12, atol=1e-12)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 4), st.integers(0, 2), st.integers(1, 2), st.sampled_from(["begin", "end"]))
def test_inconsistent_padding_is_declined(half, extra, dilation, side):
    """A small kernel whose padding does not centre it like the big one is declined, with the reason."""
    K = 2 * half + 1
    big = Geometry("big", (K, K), (1, 1), (dilation,) * 2, ((half * dilation,) * 2,) * 2, 1, 4, 4)
    pb, pe = extra, extra
    if side == "begin":
        pb += 1
    else:
        pe += 1
    small = Geometry("small", (1, 1), (1, 1), (dilation,) * 2, ((pb, pe), (pb, pe)), 1, 4, 4)
    plan = plan_merge([big, small])
    consistent = pb == half * dilation and pe == half * dilation
    assert not consistent
    assert not plan.ok and plan.declined[0][0] == 1
    assert "inconsistent padding" in plan.declined[0][1] and "borders" in plan.reason


def test_mismatched_stride_groups_channels_mode_are_declined_with_reasons():
    base = Geometry("a", (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), 2, 4, 4)
    cases = {
        "stride": Geometry("b", (1, 1), (2, 2), (1, 1), ((0, 0), (0, 0)), 2, 4, 4),
        "groups=1": Geometry("b", (1, 1), (1, 1), (1, 1), ((0, 0), (0, 0)), 1, 4, 4),
        "dilation": Geometry("b", (3, 3), (1, 1), (2, 2), ((2, 2), (2, 2)), 2, 4, 4),
        "output channels": Geometry("b", (1, 1), (1, 1), (1, 1), ((0, 0), (0, 0)), 2, 4, 8),
        "padding_mode 'reflect'": Geometry("b", (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), 2, 4, 4, "reflect"),
    }
    for word, other in cases.items():
        plan = plan_merge([base, other])
        assert not plan.ok and plan.declined == [(1, plan.declined[0][1])] and word in plan.reason, (word, plan)
    strided = Geometry("s", (3, 3), (2, 2), (1, 1), ((1, 1), (1, 1)), 1, 4, 4)
    plan = plan_merge([strided, Geometry.of_identity("x", 4, 2)])
    assert not plan.ok and "stride" in plan.reason
    widening = Geometry("w", (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), 1, 4, 8)
    plan = plan_merge([widening, Geometry.of_identity("x", 4, 2)])
    assert not plan.ok and "as many output channels" in plan.reason


def test_partial_merge_keeps_the_compatible_branches():
    a = Geometry("a", (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), 1, 4, 4)
    b = Geometry("b", (1, 1), (1, 1), (1, 1), ((0, 0), (0, 0)), 1, 4, 4)
    c = Geometry("c", (1, 1), (1, 1), (1, 1), ((1, 1), (1, 1)), 1, 4, 4)
    plan = plan_merge([a, b, c, Geometry.of_identity("x", 4, 2)])
    assert plan.merged == [0, 1, 3] and [i for i, _ in plan.declined] == [2]
    assert plan.offsets[1] == (1, 1) and plan.offsets[3] == (1, 1)


def test_dilation_of_one_tap_kernels_does_not_matter_and_acnet_cross_merges():
    row = Geometry("row", (1, 3), (1, 1), (1, 1), ((0, 0), (1, 1)), 1, 2, 2)
    col = Geometry("col", (3, 1), (1, 1), (1, 5), ((1, 1), (0, 0)), 1, 2, 2)  # dilation 5 on a 1-tap axis
    plan = plan_merge([row, col])
    assert plan.ok and plan.kernel == (3, 3) and plan.pads == ((1, 1), (1, 1)) and plan.dilation == (1, 1)
    assert plan.offsets == {0: (1, 0), 1: (0, 1)}


def test_identity_kernel_per_group_and_pad_kernel():
    w = identity_kernel(6, 3, 2, scale=np.arange(1, 7))
    assert w.shape == (6, 2, 1, 1)
    x = torch.randn(1, 6, 4, 4, dtype=torch.float64)
    y = F.conv2d(x, torch.from_numpy(w), groups=3)
    torch.testing.assert_close(y, x * torch.arange(1, 7, dtype=torch.float64).reshape(1, 6, 1, 1))
    padded = pad_kernel(np.ones((2, 1, 1, 3)), (3, 5), (1, 1))
    assert padded.shape == (2, 1, 3, 5) and padded.sum() == 6 and padded[0, 0, 1, 1:4].tolist() == [1, 1, 1]
    with pytest.raises(ValueError):
        pad_kernel(np.ones((1, 1, 3)), (3,), (1,))
    with pytest.raises(ValueError):
        identity_kernel(5, 2, 2)
