"""Property tests for normfx.fold: folds checked against F.batch_norm + F.conv* in float64.

Every case draws randomized BN statistics (mean != 0, var != 1, gamma != 1 with some negative,
beta != 0). Folded fp32 layers must match the float64 reference to max|d|/max|y| <= 1e-5 and
all-float64 folds to <= 1e-12.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from normfx.errors import RewriteError
from normfx.fold import (
    bn_affine,
    fold_affine_into_norm,
    fold_bn_after,
    fold_bn_before,
    is_uniform,
    layer_channels,
    per_channel,
    shift_response,
    unfold_bn_params,
)

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FP32_TOL = 1e-5
FP64_TOL = 1e-12

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


# ----------------------------------------------------------------------------------------------
# helpers


def rel_err(y, ref) -> float:
    y64 = torch.as_tensor(np.asarray(y, dtype=np.float64)) if isinstance(y, np.ndarray) else y.double()
    # an all-zero reference (an output made only of cropped/padded positions) must be met exactly
    return float((y64 - ref).abs().max()) / max(float(ref.abs().max()), np.finfo(np.float64).tiny)


def bn_stats(c: int, gen: torch.Generator, affine: bool = True):
    """Non-trivial eval-BN parameters, fp32-representable, as float64 tensors (gamma[0] < 0)."""
    mean = (torch.randn(c, generator=gen, dtype=torch.float64) * 1.5 + 0.7).float().double()
    var = (torch.rand(c, generator=gen, dtype=torch.float64) * 3.0 + 0.05).float().double()
    if not affine:
        return mean, var, None, None
    sign = torch.where(torch.rand(c, generator=gen) < 0.3, -1.0, 1.0).double()
    sign[0] = -1.0
    gamma = ((torch.rand(c, generator=gen, dtype=torch.float64) * 1.7 + 0.3) * sign).float().double()
    beta = (torch.randn(c, generator=gen, dtype=torch.float64) - 0.4).float().double()
    return mean, var, gamma, beta


def bn_eval(x, stats, eps):
    mean, var, gamma, beta = stats
    return F.batch_norm(x, mean, var, gamma, beta, False, 0.0, eps)


def layer_params(w_shape, cout, bias, gen):
    """fp32 weight/bias (bias None when not wanted) and their float64 twins."""
    fan_in = math.prod(w_shape[1:]) if len(w_shape) > 1 else 1
    w32 = (torch.randn(w_shape, generator=gen) / math.sqrt(fan_in)).float()
    b32 = (torch.randn(cout, generator=gen) * 0.5 + 0.2).float() if bias else None
    return w32, b32, w32.double(), (b32.double() if b32 is not None else None)


@st.composite
def conv_geometry(draw, transpose: bool = False):
    nd = draw(st.integers(1, 3))
    mode = draw(st.sampled_from(["plain", "grouped", "depthwise"]))
    if mode == "plain":
        groups, cin_g, cout_g = 1, draw(st.integers(1, 4)), draw(st.integers(1, 4))
    elif mode == "grouped":
        groups, cin_g, cout_g = draw(st.integers(2, 3)), draw(st.integers(1, 3)), draw(st.integers(2, 3))
    else:  # depthwise, with a channel multiplier of 1 or 2
        groups, cin_g, cout_g = draw(st.integers(2, 4)), 1, draw(st.integers(1, 2))
    kmax = 3 if nd < 3 else 2
    kernel = tuple(draw(st.integers(1, kmax)) for _ in range(nd))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    padding = tuple(draw(st.integers(0, 2)) for _ in range(nd))
    smax = 9 if nd < 3 else 5
    if transpose:
        size = tuple(draw(st.integers(1, smax - 3)) for _ in range(nd))
        output_padding = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
    else:
        span = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
        size = tuple(draw(st.integers(max(1, sp - 2 * p), max(1, sp - 2 * p) + smax - 3)) for sp, p in zip(span, padding))
        output_padding = (0,) * nd
    return dict(nd=nd, groups=groups, cin=cin_g * groups, cout=cout_g * groups, kernel=kernel, stride=stride,
                dilation=dilation, padding=padding, size=size, output_padding=output_padding)


def conv_args(g):
    return dict(stride=g["stride"], padding=g["padding"], dilation=g["dilation"], groups=g["groups"])


def convt_args(g):
    return dict(stride=g["stride"], padding=g["padding"], output_padding=g["output_padding"],
                groups=g["groups"], dilation=g["dilation"])


def convt_out_ok(g) -> bool:
    return all((i - 1) * s - 2 * p + d * (k - 1) + op + 1 >= 1 for i, s, p, d, k, op in
               zip(g["size"], g["stride"], g["padding"], g["dilation"], g["kernel"], g["output_padding"]))


# ----------------------------------------------------------------------------------------------
# bn_affine


@SETTINGS
@given(c=st.integers(1, 8), affine=st.booleans(), eps=st.sampled_from([1e-5, 1e-3, 0.1]), seed=st.integers(0, 2**31 - 1))
def test_bn_affine_matches_batch_norm(c, affine, eps, seed):
    gen = torch.Generator().manual_seed(seed)
    stats = bn_stats(c, gen, affine)
    x = torch.randn(3, c, 5, generator=gen, dtype=torch.float64)
    scale, shift = bn_affine(*stats, eps=eps)
    assert isinstance(scale, np.ndarray) and scale.dtype == np.float64 and scale.shape == (c,)
    y = x * per_channel(torch.from_numpy(scale), 3) + per_channel(torch.from_numpy(shift), 3)
    assert rel_err(y, bn_eval(x, stats, eps)) <= FP64_TOL
    if not affine:  # affine=False: scale = 1/sqrt(var+eps), shift = -mean*scale
        expect = 1.0 / np.sqrt(stats[1].numpy() + eps)
        np.testing.assert_allclose(scale, expect, rtol=1e-15)
        np.testing.assert_allclose(shift, -stats[0].numpy() * expect, rtol=1e-15)


def test_bn_affine_accepts_numpy_and_fp32_torch_identically():
    gen = torch.Generator().manual_seed(0)
    stats32 = [s.float() for s in bn_stats(6, gen)]
    from_torch = bn_affine(*stats32, eps=1e-3)
    from_numpy = bn_affine(*[s.numpy() for s in stats32], eps=1e-3)
    for a, b in zip(from_torch, from_numpy):
        assert a.dtype == np.float64 and np.array_equal(a, b)


def test_bn_affine_rejects_bad_statistics():
    with pytest.raises(RewriteError, match="running_var"):
        bn_affine(np.zeros(3), np.array([1.0, -1.0, 1.0]), eps=1e-5)
    with pytest.raises(RewriteError, match="NaN"):
        bn_affine(np.array([0.0, np.nan]), np.ones(2))
    with pytest.raises(RewriteError, match="expected \\(3,\\)"):
        bn_affine(np.zeros(3), np.ones(4))
    with pytest.raises(RewriteError, match="expected \\(3,\\)"):
        bn_affine(np.zeros(3), np.ones(3), np.ones(3), np.ones(2))
    with pytest.raises(RewriteError, match="1-D"):
        bn_affine(np.zeros((3, 1)), np.ones(3))


# ----------------------------------------------------------------------------------------------
# BN after a layer


@SETTINGS
@given(g=conv_geometry(), bias=st.booleans(), affine=st.booleans(), eps=st.sampled_from([1e-5, 1e-3]), seed=st.integers(0, 2**31 - 1))
def test_fold_after_conv(g, bias, affine, eps, seed):
    gen = torch.Generator().manual_seed(seed)
    w_shape = (g["cout"], g["cin"] // g["groups"]) + g["kernel"]
    w32, b32, w64, b64 = layer_params(w_shape, g["cout"], bias, gen)
    stats = bn_stats(g["cout"], gen, affine)
    x64 = torch.randn((2, g["cin"]) + g["size"], generator=gen).double()
    conv = CONV[g["nd"]]
    ref = bn_eval(conv(x64, w64, b64, **conv_args(g)), stats, eps)
    scale, shift = bn_affine(*stats, eps=eps)

    wf, bf = fold_bn_after(w32, b32, scale, shift, kind="conv", groups=g["groups"])
    assert wf.dtype == torch.float32 and bf.dtype == torch.float32 and wf.shape == w32.shape
    assert rel_err(conv(x64.float(), wf, bf, **conv_args(g)), ref) <= FP32_TOL

    wf, bf = fold_bn_after(w64, b64, scale, shift, kind="conv", groups=g["groups"])
    assert rel_err(conv(x64, wf, bf, **conv_args(g)), ref) <= FP64_TOL


@SETTINGS
@given(g=conv_geometry(transpose=True), bias=st.booleans(), affine=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fold_after_conv_transpose(g, bias, affine, seed):
    assume(convt_out_ok(g))
    gen = torch.Generator().manual_seed(seed)
    w_shape = (g["cin"], g["cout"] // g["groups"]) + g["kernel"]
    w32, b32, w64, b64 = layer_params(w_shape, g["cout"], bias, gen)
    stats = bn_stats(g["cout"], gen, affine)
    x64 = torch.randn((2, g["cin"]) + g["size"], generator=gen).double()
    convt = CONV_T[g["nd"]]
    ref = bn_eval(convt(x64, w64, b64, **convt_args(g)), stats, 1e-5)
    scale, shift = bn_affine(*stats)

    wf, bf = fold_bn_after(w32, b32, scale, shift, kind="conv_transpose", groups=g["groups"])
    assert wf.dtype == torch.float32 and wf.shape == w32.shape
    assert rel_err(convt(x64.float(), wf, bf, **convt_args(g)), ref) <= FP32_TOL

    wf, bf = fold_bn_after(w64, b64, scale, shift, kind="conv_transpose", groups=g["groups"])
    assert rel_err(convt(x64, wf, bf, **convt_args(g)), ref) <= FP64_TOL


@SETTINGS
@given(cin=st.integers(1, 9), cout=st.integers(1, 9), bias=st.booleans(), affine=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fold_after_linear(cin, cout, bias, affine, seed):
    gen = torch.Generator().manual_seed(seed)
    w32, b32, w64, b64 = layer_params((cout, cin), cout, bias, gen)
    stats = bn_stats(cout, gen, affine)
    x64 = torch.randn(5, cin, generator=gen).double()
    ref = bn_eval(F.linear(x64, w64, b64), stats, 1e-5)
    scale, shift = bn_affine(*stats)
    wf, bf = fold_bn_after(w32, b32, scale, shift, kind="linear")
    assert rel_err(F.linear(x64.float(), wf, bf), ref) <= FP32_TOL
    wf, bf = fold_bn_after(w64, b64, scale, shift, kind="linear")
    assert rel_err(F.linear(x64, wf, bf), ref) <= FP64_TOL


# ----------------------------------------------------------------------------------------------
# BN before a layer


@SETTINGS
@given(g=conv_geometry(), bias=st.booleans(), affine=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fold_before_unpadded_conv_is_exact_and_uniform(g, bias, affine, seed):
    g = dict(g, padding=(0,) * g["nd"])
    assume(all(s >= d * (k - 1) + 1 for s, d, k in zip(g["size"], g["dilation"], g["kernel"])))
    gen = torch.Generator().manual_seed(seed)
    w_shape = (g["cout"], g["cin"] // g["groups"]) + g["kernel"]
    w32, b32, w64, b64 = layer_params(w_shape, g["cout"], bias, gen)
    stats = bn_stats(g["cin"], gen, affine)
    x64 = torch.randn((2, g["cin"]) + g["size"], generator=gen).double()
    conv = CONV[g["nd"]]
    ref = conv(bn_eval(x64, stats, 1e-5), w64, b64, **conv_args(g))
    scale, shift = bn_affine(*stats)

    wf, bf = fold_bn_before(w32, b32, scale, shift, kind="conv", groups=g["groups"])
    assert wf.shape == w32.shape and bf.shape == (g["cout"],)
    assert rel_err(conv(x64.float(), wf, bf, **conv_args(g)), ref) <= FP32_TOL
    wf, bf = fold_bn_before(w64, b64, scale, shift, kind="conv", groups=g["groups"])
    assert rel_err(conv(x64, wf, bf, **conv_args(g)), ref) <= FP64_TOL

    # unpadded: the exact response is the plain bias fold_bn_before computed
    resp = shift_response(w64, shift, kind="conv", input_shape=g["size"], **conv_args(g))
    assert resp.dtype == torch.float64 and resp.shape == ref.shape[1:]
    assert is_uniform(resp)
    b0 = b64 if b64 is not None else torch.zeros(g["cout"], dtype=torch.float64)
    flat = resp.reshape(g["cout"], -1)
    assert float((flat + b0[:, None] - bf[:, None]).abs().max()) <= FP64_TOL * max(1.0, float(bf.abs().max()))


@SETTINGS
@given(g=conv_geometry(), bias=st.booleans(), affine=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fold_before_padded_conv_with_shift_response(g, bias, affine, seed):
    gen = torch.Generator().manual_seed(seed)
    w_shape = (g["cout"], g["cin"] // g["groups"]) + g["kernel"]
    w32, b32, w64, b64 = layer_params(w_shape, g["cout"], bias, gen)
    stats = bn_stats(g["cin"], gen, affine)
    x64 = torch.randn((2, g["cin"]) + g["size"], generator=gen).double()
    conv = CONV[g["nd"]]
    ref = conv(bn_eval(x64, stats, 1e-5), w64, b64, **conv_args(g))
    scale, shift = bn_affine(*stats)
    b0 = b64 if b64 is not None else torch.zeros(g["cout"], dtype=torch.float64)
    spatial = (slice(None),) + (None,) * g["nd"]

    resp = shift_response(w32, shift, kind="conv", input_shape=(2, g["cin"]) + g["size"], **conv_args(g))
    assert resp.dtype == torch.float64 and resp.shape == ref.shape[1:]
    wf, _ = fold_bn_before(w32, None, scale, shift, kind="conv", groups=g["groups"])
    bias_map = (resp + b0[spatial]).float()
    assert rel_err(conv(x64.float(), wf, None, **conv_args(g)) + bias_map, ref) <= FP32_TOL

    wf, _ = fold_bn_before(w64, None, scale, shift, kind="conv", groups=g["groups"])
    assert rel_err(conv(x64, wf, None, **conv_args(g)) + resp + b0[spatial], ref) <= FP64_TOL


@SETTINGS
@given(nd=st.integers(1, 3), k=st.integers(2, 3), p=st.integers(1, 2), extra=st.integers(0, 3), groups=st.integers(1, 2),
       seed=st.integers(0, 2**31 - 1))
def test_is_uniform_false_for_padded_conv_with_shift(nd, k, p, extra, groups, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn((2 * groups, 2) + (k,) * nd, generator=gen)
    shift = bn_affine(*bn_stats(2 * groups, gen))[1]
    assume(np.all(np.abs(shift) > 1e-3))
    resp = shift_response(w, shift, kind="conv", input_shape=(k + extra,) * nd, padding=p, groups=groups)
    assert not is_uniform(resp)
    assert is_uniform(shift_response(w, np.zeros(2 * groups), kind="conv", input_shape=(k + extra,) * nd, padding=p, groups=groups))


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_non_zero_padding_modes_fold_exactly(mode):
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    conv = torch.nn.Conv2d(4, 6, 3, padding=2, stride=2, groups=2, padding_mode=mode, dtype=torch.float64)
    stats = bn_stats(4, gen)
    x = torch.randn(2, 4, 7, 6, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        ref = conv(bn_eval(x, stats, 1e-5))
        scale, shift = bn_affine(*stats)
        resp = shift_response(conv.weight, shift, kind="conv", input_shape=(7, 6), stride=2, padding=2, groups=2, padding_mode=mode)
        assert is_uniform(resp)
        wf, bf = fold_bn_before(conv.weight.float(), conv.bias.float(), scale, shift, kind="conv", groups=2)
        folded = torch.nn.Conv2d(4, 6, 3, padding=2, stride=2, groups=2, padding_mode=mode)
        folded.weight.copy_(wf)
        folded.bias.copy_(bf)
        assert rel_err(folded(x.float()), ref) <= FP32_TOL


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_shift_response_asymmetric_and_same_padding():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(5, 3, 4, 3, generator=gen, dtype=torch.float64)
    stats = bn_stats(3, gen)
    scale, shift = bn_affine(*stats)
    x = torch.randn(2, 3, 8, 7, generator=gen, dtype=torch.float64)
    wf, _ = fold_bn_before(w, None, scale, shift, kind="conv")
    # ONNX-style pads (begin_h, begin_w, end_h, end_w)
    pads = (1, 0, 2, 1)
    ref = F.conv2d(F.pad(bn_eval(x, stats, 1e-5), [0, 1, 1, 2]), w, stride=(2, 1), dilation=(1, 2))
    resp = shift_response(w, shift, kind="conv", input_shape=(8, 7), padding=pads, stride=(2, 1), dilation=(1, 2))
    got = F.conv2d(F.pad(x, [0, 1, 1, 2]), wf, stride=(2, 1), dilation=(1, 2)) + resp
    assert rel_err(got, ref) <= FP64_TOL
    # PyTorch's padding="same" (odd total pad goes at the end)
    ref = F.conv2d(bn_eval(x, stats, 1e-5), w, padding="same", dilation=(1, 2))
    resp = shift_response(w, shift, kind="conv", input_shape=(8, 7), padding="same", dilation=(1, 2))
    assert rel_err(F.conv2d(x, wf, padding="same", dilation=(1, 2)) + resp, ref) <= FP64_TOL


@SETTINGS
@given(g=conv_geometry(transpose=True), bias=st.booleans(), affine=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fold_before_conv_transpose_with_shift_response(g, bias, affine, seed):
    assume(convt_out_ok(g))
    gen = torch.Generator().manual_seed(seed)
    w_shape = (g["cin"], g["cout"] // g["groups"]) + g["kernel"]
    w32, b32, w64, b64 = layer_params(w_shape, g["cout"], bias, gen)
    stats = bn_stats(g["cin"], gen, affine)
    x64 = torch.randn((2, g["cin"]) + g["size"], generator=gen).double()
    convt = CONV_T[g["nd"]]
    ref = convt(bn_eval(x64, stats, 1e-5), w64, b64, **convt_args(g))
    scale, shift = bn_affine(*stats)
    b0 = b64 if b64 is not None else torch.zeros(g["cout"], dtype=torch.float64)
    spatial = (slice(None),) + (None,) * g["nd"]
    resp = shift_response(w32, shift, kind="conv_transpose", input_shape=g["size"], **convt_args(g))
    assert resp.shape == ref.shape[1:]
    wf, _ = fold_bn_before(w32, None, scale, shift, kind="conv_transpose", groups=g["groups"])
    got = convt(x64.float(), wf, None, **convt_args(g)) + (resp + b0[spatial]).float()
    assert rel_err(got, ref) <= FP32_TOL
    wf, _ = fold_bn_before(w64, None, scale, shift, kind="conv_transpose", groups=g["groups"])
    assert rel_err(convt(x64, wf, None, **convt_args(g)) + resp + b0[spatial], ref) <= FP64_TOL


@SETTINGS
@given(nd=st.integers(1, 3), k=st.integers(1, 3), d=st.integers(1, 2), extra=st.integers(0, 1), size=st.integers(0, 3),
       groups=st.integers(1, 3), bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fold_before_conv_transpose_valid_geometry_is_exact(nd, k, d, extra, size, groups, bias, seed):
    """stride 1 and padding >= dilation*(k-1): every output pixel sees every tap, the bias fold is exact."""
    gen = torch.Generator().manual_seed(seed)
    cin, cout = 2 * groups, 3 * groups
    pad = d * (k - 1) + extra
    size = size + d * (k - 1) + 2 * extra + 1
    w32, b32, w64, b64 = layer_params((cin, cout // groups) + (k,) * nd, cout, bias, gen)
    stats = bn_stats(cin, gen)
    x64 = torch.randn((2, cin) + (size,) * nd, generator=gen).double()
    convt = CONV_T[nd]
    args = dict(padding=pad, dilation=d, groups=groups)
    ref = convt(bn_eval(x64, stats, 1e-5), w64, b64, **args)
    scale, shift = bn_affine(*stats)
    wf, bf = fold_bn_before(w32, b32, scale, shift, kind="conv_transpose", groups=groups)
    assert rel_err(convt(x64.float(), wf, bf, **args), ref) <= FP32_TOL
    assert is_uniform(shift_response(w64, shift, kind="conv_transpose", input_shape=(size,) * nd, **args))


@SETTINGS
@given(nd=st.integers(1, 3), k=st.integers(2, 3), size=st.integers(1, 3), groups=st.integers(1, 2), seed=st.integers(0, 2**31 - 1))
def test_conv_transpose_with_stride_is_not_uniform(nd, k, size, groups, seed):
    """kernel == stride: each output pixel sees one tap (its phase), so the shift is position-dependent."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn((2 * groups, 2) + (k,) * nd, generator=gen, dtype=torch.float64)
    shift = bn_affine(*bn_stats(2 * groups, gen))[1]
    assume(np.all(np.abs(shift) > 1e-3))
    resp = shift_response(w, shift, kind="conv_transpose", input_shape=(size,) * nd, stride=k, groups=groups)
    assert resp.shape == (2 * groups,) + (size * k,) * nd
    assert not is_uniform(resp)


@SETTINGS
@given(cin=st.integers(1, 9), cout=st.integers(1, 9), bias=st.booleans(), affine=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fold_before_linear(cin, cout, bias, affine, seed):
    gen = torch.Generator().manual_seed(seed)
    w32, b32, w64, b64 = layer_params((cout, cin), cout, bias, gen)
    stats = bn_stats(cin, gen, affine)
    x64 = torch.randn(5, cin, generator=gen).double()
    ref = F.linear(bn_eval(x64, stats, 1e-5), w64, b64)
    scale, shift = bn_affine(*stats)
    wf, bf = fold_bn_before(w32, b32, scale, shift, kind="linear")
    assert rel_err(F.linear(x64.float(), wf, bf), ref) <= FP32_TOL
    wf, bf = fold_bn_before(w64, b64, scale, shift, kind="linear")
    assert rel_err(F.linear(x64, wf, bf), ref) <= FP64_TOL


# ----------------------------------------------------------------------------------------------
# unfusion


@SETTINGS
@given(g=conv_geometry(), bias=st.booleans(), dead=st.booleans(), eps=st.sampled_from([1e-5, 1e-3]), seed=st.integers(0, 2**31 - 1))
def test_unfold_round_trip_exact_in_eval(g, bias, dead, eps, seed):
    gen = torch.Generator().manual_seed(seed)
    w_shape = (g["cout"], g["cin"] // g["groups"]) + g["kernel"]
    w32, b32, w64, b64 = layer_params(w_shape, g["cout"], bias, gen)
    if dead:  # a dead channel: variance 0
        w32[0] = 0.0
        w64 = w32.double()
    x64 = (torch.randn((4, g["cin"]) + g["size"], generator=gen) * 2.0 + 0.5).double()
    conv = CONV[g["nd"]]
    fused = conv(x64, w64, b64, **conv_args(g))
    z = conv(x64, w64, None, **conv_args(g))
    axes = [0] + list(range(2, z.ndim))
    mean, var = z.mean(axes), z.var(axes)

    cw, bn = unfold_bn_params(w32, b32, kind="conv", groups=g["groups"], channel_mean=mean.float(), channel_var=var.float(), eps=eps)
    assert cw.dtype == torch.float32 and torch.equal(cw, w32) and cw.data_ptr() != w32.data_ptr()
    assert set(bn) == {"weight", "bias", "running_mean", "running_var"}
    assert all(v.dtype == torch.float32 and v.shape == (g["cout"],) for v in bn.values())
    assert bool((bn["running_var"] >= 0).all())
    y = F.batch_norm(conv(x64.float(), cw, None, **conv_args(g)), bn["running_mean"], bn["running_var"], bn["weight"], bn["bias"], False, 0.0, eps)
    assert rel_err(y, fused) <= FP32_TOL

    cw, bn = unfold_bn_params(w64, b64, kind="conv", groups=g["groups"], channel_mean=mean, channel_var=var, eps=eps)
    y = F.batch_norm(conv(x64, cw, None, **conv_args(g)), bn["running_mean"], bn["running_var"], bn["weight"], bn["bias"], False, 0.0, eps)
    assert rel_err(y, fused) <= FP64_TOL


def test_unfold_formula_linear_and_train_mode_close():
    gen = torch.Generator().manual_seed(11)
    w, b = torch.randn(6, 5, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    x = torch.randn(400, 5, generator=gen, dtype=torch.float64) * 1.5 + 0.3
    z = F.linear(x, w)
    mean, var = z.mean(0), z.var(0)
    cw, bn = unfold_bn_params(w, b, kind="linear", channel_mean=mean, channel_var=var, eps=1e-5)
    torch.testing.assert_close(bn["running_mean"], mean, rtol=0, atol=0)
    torch.testing.assert_close(bn["running_var"], var, rtol=0, atol=0)
    torch.testing.assert_close(bn["weight"], (var + 1e-5).sqrt(), rtol=1e-15, atol=0)  # gamma = sigma
    torch.testing.assert_close(bn["bias"], mean + b, rtol=1e-15, atol=0)  # beta = mu + b
    fused = F.linear(x, w, b)
    # train mode on the measuring data: (z - mu_B) / sqrt(var_B + eps) * sqrt(var + eps) + mu + b ~ z + b
    y_train = F.batch_norm(F.linear(x, cw), None, None, bn["weight"], bn["bias"], True, 0.0, 1e-5)
    # var_B is the biased variance, var the unbiased one: the output is off by the factor sqrt(400/399)
    expected = float((1 - np.sqrt(399 / 400)) * (F.linear(x, w) - mean).abs().max() / fused.abs().max())
    assert rel_err(y_train, fused) <= 1.1 * expected
    with pytest.raises(RewriteError, match="channel_var"):
        unfold_bn_params(w, b, kind="linear", channel_mean=mean, channel_var=-var, eps=1e-5)
    with pytest.raises(RewriteError, match="channel_mean"):
        unfold_bn_params(w, b, kind="linear", channel_mean=mean[:3], channel_var=var, eps=1e-5)
    with pytest.raises(RewriteError, match="both"):
        unfold_bn_params(w, b, kind="linear", channel_mean=mean, eps=1e-5)


def test_unfold_identity_statistics_without_data():
    gen = torch.Generator().manual_seed(12)
    w, b = torch.randn(6, 5, generator=gen), torch.randn(6, generator=gen)
    cw, bn = unfold_bn_params(w, b, kind="linear", eps=1e-3)
    assert torch.equal(bn["running_mean"], torch.zeros(6)) and torch.equal(bn["weight"], torch.ones(6))
    assert torch.equal(bn["bias"], b) and torch.allclose(bn["running_var"], torch.full((6,), 1 - 1e-3))
    x = torch.randn(7, 5, generator=gen)
    y = F.batch_norm(F.linear(x, cw), bn["running_mean"], bn["running_var"], bn["weight"], bn["bias"], False, 0.0, 1e-3)
    assert rel_err(y, F.linear(x, w, b)) <= 1e-6


# ----------------------------------------------------------------------------------------------
# array kinds, dtypes, no mutation, errors


def _bits(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.view(torch.int16) if a.dtype in (torch.bfloat16, torch.float16) else a
        return a.numpy().view(np.uint8)
    return np.ascontiguousarray(a).view(np.uint8)


@pytest.mark.parametrize("tdtype,ndtype", [(torch.float32, np.float32), (torch.float16, np.float16),
                                            (torch.bfloat16, ml_dtypes.bfloat16), (torch.float64, np.float64)])
@pytest.mark.parametrize("fn", ["after", "before", "unfold"])
def test_array_kind_dtype_and_routes_agree_to_the_bit(tdtype, ndtype, fn):
    gen = torch.Generator().manual_seed(2)
    w64 = torch.randn(6, 2, 3, 3, generator=gen, dtype=torch.float64)
    b64 = torch.randn(6, generator=gen, dtype=torch.float64)
    wt, bt = w64.to(tdtype), b64.to(tdtype)
    wn, bn_ = wt.double().numpy().astype(ndtype), bt.double().numpy().astype(ndtype)
    if fn == "unfold":
        call = lambda w, b: unfold_bn_params(w, b, kind="conv", groups=3, channel_mean=np.linspace(-1, 1, 6),
                                             channel_var=np.linspace(0.5, 2, 6))
        out_t, out_n = call(wt, bt), call(wn, bn_)
        out_t, out_n = [out_t[0], *out_t[1].values()], [out_n[0], *out_n[1].values()]
    else:
        scale, shift = bn_affine(*bn_stats(6, gen))  # conv(6 <- 6, groups=3): 6 in and 6 out channels
        f = fold_bn_after if fn == "after" else fold_bn_before
        out_t, out_n = f(wt, bt, scale, shift, kind="conv", groups=3), f(wn, bn_, scale, shift, kind="conv", groups=3)
        # the value is the float64 result rounded once to the narrow dtype
        exact = f(wt.double(), bt.double(), scale, shift, kind="conv", groups=3)
        for got, want in zip(out_n, exact):
            assert np.array_equal(_bits(got), _bits(want.numpy().astype(ndtype)))
    for t, n in zip(out_t, out_n):
        assert isinstance(t, torch.Tensor) and t.dtype == tdtype and t.device == wt.device
        assert isinstance(n, np.ndarray) and n.dtype == np.dtype(ndtype)
        assert np.array_equal(_bits(t), _bits(n))


def test_shift_response_numpy_in_numpy_out_matches_torch():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(4, 3, 3, 3, generator=gen)
    shift = torch.randn(3, generator=gen)
    rt = shift_response(w, shift, kind="conv", input_shape=(5, 6), padding=1, stride=2)
    rn = shift_response(w.numpy(), shift.numpy(), kind="conv", input_shape=(5, 6), padding=1, stride=2)
    assert isinstance(rn, np.ndarray) and rn.dtype == np.float64 and np.array_equal(rt.numpy(), rn)


def test_inputs_not_mutated_and_outputs_not_aliased():
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(4, 2, 3, generator=gen, requires_grad=True)
    b = torch.randn(4, generator=gen)
    stats = [s.float() for s in bn_stats(4, gen)]
    wn, bn_ = w.detach().numpy().copy(), b.numpy().copy()
    snap = [w.detach().clone(), b.clone(), *[s.clone() for s in stats], wn.copy(), bn_.copy()]
    scale, shift = bn_affine(*stats)
    sc, sh = scale.copy(), shift.copy()
    outs = [
        *fold_bn_after(w, b, scale, shift, kind="conv", groups=2),
        *fold_bn_before(w, b, scale, shift, kind="conv", groups=2),
        *fold_bn_after(wn, bn_, scale, shift, kind="conv", groups=2),
        *fold_bn_before(wn, bn_, scale, shift, kind="conv", groups=2),
        shift_response(w, shift, kind="conv", input_shape=(6,), padding=1, groups=2),
        unfold_bn_params(w, b, kind="conv", groups=2, channel_mean=stats[0], channel_var=stats[1])[0],
        unfold_bn_params(wn, bn_, kind="conv", groups=2, channel_mean=stats[0], channel_var=stats[1])[0],
    ]
    for o in outs:  # writing to an output never reaches an input
        if isinstance(o, torch.Tensor):
            assert not o.requires_grad
            o.data.fill_(123.0)
        else:
            o.fill(123.0)
    after = [w.detach(), b, *stats, wn, bn_]
    for before, now in zip(snap, after):
        assert np.array_equal(np.asarray(before), np.asarray(now))
    assert np.array_equal(sc, scale) and np.array_equal(sh, shift)


def test_shape_mismatches_raise_rewrite_error():
    w = torch.randn(6, 2, 3, 3)  # conv 6 <- 2*groups
    s, t = np.ones(6), np.zeros(6)
    bad = [
        lambda: fold_bn_after(w, None, np.ones(5), t, kind="conv"),
        lambda: fold_bn_after(w, torch.zeros(5), s, t, kind="conv"),
        lambda: fold_bn_after(w, None, s, t, kind="conv", groups=4),
        lambda: fold_bn_after(w, None, s, t, kind="conv", groups=0),
        lambda: fold_bn_after(w, None, s, t, kind="conv_transpose", groups=4),  # Cin=6 not divisible by 4
        lambda: fold_bn_after(w, None, s, t, kind="deconv"),
        lambda: fold_bn_after(torch.randn(6, 2, 3), None, s, t, kind="linear"),
        lambda: fold_bn_after(torch.randn(6, 2), None, s, t, kind="linear", groups=2),
        lambda: fold_bn_after(torch.randn(6), None, s, t, kind="conv"),
        lambda: fold_bn_after(torch.randint(0, 3, (6, 2, 3)), None, s, t, kind="conv"),
        lambda: fold_bn_before(w, None, s, t, kind="conv"),  # conv has 2 inputs, not 6
        lambda: fold_bn_before(w, None, np.ones(6), np.zeros(6), kind="conv", groups=2),  # 4 inputs
        lambda: fold_bn_before(w, None, np.ones(2), np.zeros(3), kind="conv"),
        lambda: shift_response(w, np.zeros(2), kind="conv", input_shape=(5,)),
        lambda: shift_response(w, np.zeros(2), kind="conv", input_shape=(1, 3, 5, 5)),
        lambda: shift_response(w, np.zeros(2), kind="conv", input_shape=(2, 2)),  # smaller than the kernel
        lambda: shift_response(w, np.zeros(2), kind="conv", input_shape=(5, 5), stride=(1, 1, 1)),
        lambda: shift_response(w, np.zeros(2), kind="linear", input_shape=(5, 5)),
        lambda: shift_response(w, np.zeros(2), kind="conv", input_shape=(5, 5), padding_mode="mirror"),
        lambda: shift_response(w, np.zeros(6), kind="conv_transpose", input_shape=(5, 5), padding=9),
        lambda: unfold_bn_params(w, None, kind="conv", channel_mean=np.zeros(5), channel_var=np.ones(6)),
        lambda: per_channel(np.ones(3), 2, axis=2),
    ]
    for i, call in enumerate(bad):
        with pytest.raises(RewriteError) as info:
            call()
        assert "\n" not in str(info.value), i


def test_layer_channels_and_per_channel():
    assert layer_channels((8, 2, 3, 3), "conv", groups=4) == (8, 8)
    assert layer_channels((8, 3, 3), "conv_transpose", groups=2) == (8, 6)
    assert layer_channels((5, 7), "linear") == (7, 5)
    v = torch.arange(3.0)
    assert per_channel(v, 4, 1).shape == (1, 3, 1, 1)
    assert per_channel(v.numpy(), 3, 0).shape == (3, 1, 1)


# ----------------------------------------------------------------------------------------------
# a per-channel affine after a normalization (both routes: ProxyNormAct's pre-affine, ONNX Mul/Add chains)


@SETTINGS
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), per_channel_form=st.booleans(),
       affine=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fold_affine_into_norm_is_the_composition(shape, per_channel_form, affine, seed):
    rng = np.random.default_rng(seed)
    shape = tuple(shape)
    c = shape[0]
    w = rng.uniform(-2, 2, shape) if affine else None
    b = rng.normal(size=shape) if affine else None
    s_vec, t_vec = rng.uniform(-2, 2, c), rng.normal(size=c)
    s_full, t_full = (np.broadcast_to(per_channel(v, len(shape), 0), shape) for v in (s_vec, t_vec))
    s, t = (s_vec, t_vec) if per_channel_form else (s_full, t_full)
    new_w, new_b = fold_affine_into_norm(w, b, s, t, shape=shape)
    assert new_w.dtype == np.float64 and new_w.shape == shape and new_b.shape == shape
    x = rng.normal(size=(2, *shape))  # normalized values, the affine's shape trailing
    ref = (x * (1.0 if w is None else w) + (0.0 if b is None else b)) * s_full + t_full
    assert np.allclose(x * new_w + new_b, ref, rtol=FP64_TOL, atol=FP64_TOL)
    # torch in / numpy in: the same bits, in the kind and dtype of ``like``
    wt = None if w is None else torch.from_numpy(w).float()
    bt = None if b is None else torch.from_numpy(b).float()
    out_t = fold_affine_into_norm(wt, bt, s, t, shape=shape, like=torch.zeros(1))
    out_n = fold_affine_into_norm(None if w is None else wt.numpy(), None if b is None else bt.numpy(), s, t,
                                  shape=shape, like=np.zeros(1, np.float32))
    for got_t, got_n in zip(out_t, out_n):
        assert got_t.dtype == torch.float32 and got_n.dtype == np.float32
        assert np.array_equal(got_t.numpy(), got_n)


def test_fold_affine_into_norm_bias_broadcasts_and_bad_shapes_raise():
    w, b = np.full((2, 3), 2.0), np.array([1.0, 2.0, 3.0])  # an ONNX LayerNormalization B smaller than its scale
    new_w, new_b = fold_affine_into_norm(w, b, np.full((2, 3), 3.0), np.ones((2, 3)), shape=(2, 3))
    assert np.array_equal(new_w, np.full((2, 3), 6.0)) and np.array_equal(new_b, np.tile([4.0, 7.0, 10.0], (2, 1)))
    bad = [
        lambda: fold_affine_into_norm(None, None, np.ones(3), np.zeros(3), shape=(2, 3)),  # not per channel
        lambda: fold_affine_into_norm(np.ones(3), None, np.ones(2), np.zeros(2), shape=(2, 3)),  # weight too small
        lambda: fold_affine_into_norm(None, np.ones(4), np.ones(2), np.zeros(2), shape=(2, 3)),
        lambda: fold_affine_into_norm(None, None, np.ones(()), np.zeros(()), shape=()),
    ]
    for i, call in enumerate(bad):
        with pytest.raises(RewriteError) as info:
            call()
        assert "\n" not in str(info.value), i
