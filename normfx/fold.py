"""Pure fold/unfold math for normalization layers: arrays in, arrays out, float64 inside.

This module knows nothing about graphs. The torch.fx passes and the ONNX passes both call it, so the
two routes compute the same numbers to the bit: every input (torch tensor on any device, numpy array,
list) is converted to a float64 numpy array, the algebra is done in numpy float64 on the CPU, and the
result is cast back with numpy (``ml_dtypes`` for bfloat16) before it becomes a torch tensor again.

Conventions (PyTorch's; ONNX uses the same layouts):

=================  ===========================  ===================  ====================
kind               weight shape                 output-channel axis  input-channel axis
=================  ===========================  ===================  ====================
``conv``           ``(Cout, Cin/g, *k)``        0                    1 (within a group)
``conv_transpose`` ``(Cin, Cout/g, *k)``        1 (within a group)   0
``linear``         ``(out, in)``                0                    1
=================  ===========================  ===================  ====================

An ONNX ``MatMul``/``Gemm(transB=0)`` weight is ``(in, out)``: callers transpose it to the linear
layout first. BatchNorm in eval mode is the per-channel affine ``y = x * scale + shift`` with
``scale = gamma / sqrt(var + eps)`` and ``shift = beta - mean * scale`` (:func:`bn_affine`).

Folding a BN that *follows* a layer is always exact (:func:`fold_bn_after`). Folding a BN that
*precedes* a layer is exact for the scale; the shift becomes a plain bias only when every output
position sees every kernel tap over real input — true for linear layers and unpadded convs
(:func:`fold_bn_before`). For a zero-padded conv, or a conv_transpose (stride > 1 gives each output
pixel its own subset of taps; borders see fewer), :func:`shift_response` gives the exact
position-dependent constant, and :func:`is_uniform` says whether it is a plain bias after all.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import RewriteError

__all__ = [
    "KINDS",
    "as_float64",
    "bn_affine",
    "fold_bn_after",
    "fold_bn_before",
    "shift_response",
    "is_uniform",
    "unfold_bn_params",
    "layer_channels",
    "per_channel",
]

KINDS = ("conv", "conv_transpose", "linear")
"""The layer kinds the fold functions understand."""

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


# ----------------------------------------------------------------------------------------------
# array plumbing


def as_float64(x: Any, name: str = "value") -> np.ndarray:
    """``x`` (torch tensor, numpy array, list, scalar) as a fresh float64 numpy array on the CPU."""
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise RewriteError(f"{name}: dtype {x.dtype} is not a real number type")
        return x.detach().to(device="cpu", dtype=torch.float64).numpy().copy()
    try:
        return np.array(x, dtype=np.float64, copy=True)
    except (TypeError, ValueError) as exc:
        raise RewriteError(f"{name}: cannot be read as a float64 array ({exc})") from None


_f64 = as_float64


def _is_float_dtype(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or (dtype.kind == "V" and "float" in dtype.name)


def _check_weight(weight: Any) -> None:
    if isinstance(weight, torch.Tensor):
        if not weight.is_floating_point():
            raise RewriteError(f"weight dtype {weight.dtype} is not floating point; fold before quantizing the layer")
    elif isinstance(weight, np.ndarray):
        if not _is_float_dtype(weight.dtype):
            raise RewriteError(f"weight dtype {weight.dtype} is not floating point; fold before quantizing the layer")
    else:
        raise RewriteError(f"weight must be a torch.Tensor or a numpy.ndarray, got {type(weight).__name__}")


def _np_dtype_for(dtype: torch.dtype) -> np.dtype | None:
    """The numpy dtype matching a torch floating dtype (None when numpy cannot represent it)."""
    if dtype == torch.bfloat16:
        try:
            import ml_dtypes
        except ImportError:  # pragma: no cover - ml_dtypes ships with onnx
            return None
        return np.dtype(ml_dtypes.bfloat16)
    try:
        return torch.empty((), dtype=dtype).numpy().dtype
    except TypeError:  # float8 types and friends
        return None


def _like(value: np.ndarray, weight: Any, *, keep_float64: bool = False) -> Any:
    """``value`` (float64 numpy) as the array kind of ``weight``, in its dtype and on its device.

    The cast to a narrow dtype is done by numpy in both routes (torch in / numpy in), so a torch
    caller and a numpy caller get the same bits. ``keep_float64`` keeps float64 (kind and device still
    follow ``weight``).
    """
    if isinstance(weight, np.ndarray):
        return value.copy() if keep_float64 else value.astype(weight.dtype)
    if keep_float64:
        return torch.from_numpy(value.copy()).to(device=weight.device)
    np_dtype = _np_dtype_for(weight.dtype)
    if np_dtype is None:  # no numpy twin: let torch round (rare dtypes only)
        return torch.from_numpy(value.copy()).to(device=weight.device, dtype=weight.dtype)
    cast = np.ascontiguousarray(value.astype(np_dtype))
    if np_dtype.kind == "V":  # ml_dtypes bfloat16: hand the bits over as int16
        tensor = torch.from_numpy(cast.view(np.int16)).view(weight.dtype)
    else:
        tensor = torch.from_numpy(cast)
    return tensor.to(device=weight.device)


def per_channel(vector: Any, ndim: int, axis: int = 1) -> Any:
    """Reshape a ``(C,)`` vector so that it broadcasts along ``axis`` of an ``ndim``-d array.

    Works on numpy arrays and torch tensors alike (returns a view when the input allows it), e.g.
    ``x * per_channel(scale, x.ndim, 1)`` scales the channels of an ``(N, C, H, W)`` activation.
    """
    if not 0 <= axis < ndim:
        raise RewriteError(f"per_channel: axis {axis} is outside an array of {ndim} dimensions")
    shape = [1] * ndim
    shape[axis] = -1
    return vector.reshape(shape)


def layer_channels(weight_shape: Sequence[int], kind: str, groups: int = 1) -> tuple[int, int]:
    """``(in_channels, out_channels)`` of a layer given its weight shape, kind and groups.

    Raises :class:`RewriteError` when the shape does not fit the kind or ``groups`` does not divide it.
    """
    shape = tuple(int(s) for s in weight_shape)
    _check_kind(kind)
    if not isinstance(groups, (int, np.integer)) or isinstance(groups, bool) or groups < 1:
        raise RewriteError(f"groups must be a positive integer, got {groups!r}")
    if kind == "linear":
        if len(shape) != 2:
            raise RewriteError(f"linear weight must be 2-D (out, in), got shape {shape}")
        if groups != 1:
            raise RewriteError(f"linear layers have no groups, got groups={groups}")
        return shape[1], shape[0]
    if len(shape) < 3:
        raise RewriteError(f"{kind} weight must be at least 3-D (channels, channels, *kernel), got shape {shape}")
    if kind == "conv":
        if shape[0] % groups:
            raise RewriteError(f"conv weight has {shape[0]} output channels, not divisible by groups={groups}")
        return shape[1] * groups, shape[0]
    if shape[0] % groups:
        raise RewriteError(f"conv_transpose weight has {shape[0]} input channels, not divisible by groups={groups}")
    return shape[0], shape[1] * groups


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise RewriteError(f"unknown layer kind {kind!r}; use one of {', '.join(KINDS)}")


def _vector(x: Any, n: int, name: str, *, default: float | None = None) -> np.ndarray:
    """A float64 ``(n,)`` vector; ``None`` gives ``default`` everywhere when one is allowed."""
    if x is None:
        if default is None:
            raise RewriteError(f"{name} is required")
        return np.full(n, default, dtype=np.float64)
    v = _f64(x, name)
    if v.shape != (n,):
        raise RewriteError(f"{name} has shape {tuple(v.shape)}, expected ({n},) to match the layer's channels")
    return v


# ----------------------------------------------------------------------------------------------
# BatchNorm as an affine map


def bn_affine(mean: Any, var: Any, weight: Any = None, bias: Any = None, eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(scale, shift)`` (float64 numpy) of an eval-mode BatchNorm: ``y = x * scale + shift``.

    ``scale = weight / sqrt(var + eps)``, ``shift = bias - mean * scale``; ``weight``/``bias`` ``None``
    is a BN with ``affine=False`` (1 and 0). Raises :class:`RewriteError` on shape mismatches and on
    statistics that make the BN undefined (``var + eps <= 0`` or non-finite values).
    """
    m = _f64(mean, "running_mean")
    if m.ndim != 1:
        raise RewriteError(f"running_mean must be 1-D (C,), got shape {tuple(m.shape)}")
    c = m.shape[0]
    v = _vector(var, c, "running_var")
    w = _vector(weight, c, "BN weight", default=1.0)
    b = _vector(bias, c, "BN bias", default=0.0)
    eps = float(eps)
    denom = v + eps
    if not (np.all(np.isfinite(m)) and np.all(np.isfinite(v)) and np.all(np.isfinite(w)) and np.all(np.isfinite(b))):
        raise RewriteError("BN parameters or statistics contain NaN/inf; recompute the statistics (precise BN) before folding")
    if np.any(denom <= 0):
        bad = int(np.argmin(denom))
        raise RewriteError(f"BN channel {bad} has running_var + eps = {denom[bad]:.3g} <= 0; recompute the statistics before folding")
    scale = w / np.sqrt(denom)
    shift = b - m * scale
    return scale, shift


# ----------------------------------------------------------------------------------------------
# folds


def fold_bn_after(weight: Any, bias: Any, scale: Any, shift: Any, *, kind: str, groups: int = 1) -> tuple[Any, Any]:
    """Fold ``BN(layer(x))`` into ``layer'(x)``; returns ``(new_weight, new_bias)``.

    ``scale``/``shift`` come from :func:`bn_affine` (one value per output channel of the layer).
    ``W' = W * scale`` along the output-channel axis (for ``conv_transpose`` axis 1 within each group),
    ``b' = b * scale + shift``. ``bias=None`` means no bias (0); a bias is always returned. Exact for
    any padding, stride, dilation and groups. Results have ``weight``'s array kind, dtype and device.
    """
    _check_weight(weight)
    cin, cout = layer_channels(weight.shape, kind, groups)
    s = _vector(scale, cout, "BN scale")
    t = _vector(shift, cout, "BN shift")
    b = _vector(bias, cout, "layer bias", default=0.0)
    w = _f64(weight, "weight")
    if kind == "conv_transpose":
        g = groups
        wr = w.reshape(g, cin // g, cout // g, -1) * s.reshape(g, 1, cout // g, 1)
        new_w = wr.reshape(w.shape)
    else:
        new_w = w * per_channel(s, w.ndim, 0)
    new_b = b * s + t
    return _like(new_w, weight), _like(new_b, weight)


def _shift_taps(w: np.ndarray, t: np.ndarray, kind: str, groups: int) -> np.ndarray:
    """``V[o, *k] = sum_i W[o, i, *k] * shift[i]`` over the inputs ``o`` sees (float64, ``(Cout, *k)``)."""
    cin, cout = layer_channels(w.shape, kind, groups)
    g = groups
    if kind == "linear":
        return w * t[None, :]
    kernel = w.shape[2:]
    if kind == "conv":
        wr = w.reshape(g, cout // g, cin // g, -1)
        v = (wr * t.reshape(g, 1, cin // g, 1)).sum(axis=2)
    else:
        wr = w.reshape(g, cin // g, cout // g, -1)
        v = (wr * t.reshape(g, cin // g, 1, 1)).sum(axis=1)
    return v.reshape((cout,) + tuple(kernel))


def fold_bn_before(weight: Any, bias: Any, scale: Any, shift: Any, *, kind: str, groups: int = 1) -> tuple[Any, Any]:
    """Fold ``layer(BN(x))`` into ``layer'(x)``; returns ``(new_weight, new_bias)``.

    ``scale``/``shift`` have one value per *input* channel of the layer. The scale goes into the
    input-channel axis (conv: axis 1 within each group, depthwise included; conv_transpose: axis 0;
    linear: axis 1) — always exact. The shift becomes ``b' = b + sum_{inputs, taps} W * shift``, which
    is exact only when every output position sees every kernel tap over real (non-padding) input:

    - ``linear``: always exact;
    - ``conv``: exact when the conv is unpadded (``padding=0``, or a non-zero padding mode such as
      reflect/replicate/circular, which pads a constant with itself);
    - ``conv_transpose``: exact only when every output pixel receives *every* kernel tap: stride 1
      and ``padding >= dilation * (k - 1) + output_padding`` per dim (a valid conv in disguise). With
      stride > 1 each output pixel sees its own subset (phase) of the taps — even ``kernel == stride``
      is position-dependent — and with smaller padding the border pixels see fewer taps.

    Otherwise use the weight from this function with ``bias=None`` and add
    ``shift_response(weight, shift, ...) + b`` (a per-position constant) instead of ``new_bias``.
    """
    _check_weight(weight)
    cin, cout = layer_channels(weight.shape, kind, groups)
    s = _vector(scale, cin, "BN scale")
    t = _vector(shift, cin, "BN shift")
    b = _vector(bias, cout, "layer bias", default=0.0)
    w = _f64(weight, "weight")
    g = groups
    if kind == "linear":
        new_w = w * s[None, :]
    elif kind == "conv":
        new_w = (w.reshape(g, cout // g, cin // g, -1) * s.reshape(g, 1, cin // g, 1)).reshape(w.shape)
    else:
        new_w = w * per_channel(s, w.ndim, 0)
    taps = _shift_taps(w, t, kind, groups)
    new_b = b + taps.reshape(cout, -1).sum(axis=1)
    return _like(new_w, weight), _like(new_b, weight)


# ----------------------------------------------------------------------------------------------
# the exact constant through a padded conv


def _tuple(value: Any, n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        out = (int(value),) * n
    else:
        try:
            out = tuple(int(v) for v in value)
        except TypeError:
            raise RewriteError(f"{name} must be an int or a sequence of {n} ints, got {value!r}") from None
        if len(out) == 1 and n > 1:
            out = out * n
    if len(out) != n:
        raise RewriteError(f"{name} has {len(out)} entries, expected {n} for a {n}-d layer")
    return out


def _pads(padding: Any, n: int, kernel: Sequence[int], dilation: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(begin, end)`` pads per spatial dim from an int, ``n`` symmetric ints, ``2n`` ONNX-style
    ints (all begins, then all ends), or the strings ``"valid"`` / ``"same"`` (PyTorch's rule: the odd
    extra pad goes at the end)."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0,) * n, (0,) * n
        if padding == "same":
            total = [d * (k - 1) for k, d in zip(kernel, dilation)]
            begin = tuple(tt // 2 for tt in total)
            return begin, tuple(tt - bb for tt, bb in zip(total, begin))
        raise RewriteError(f"padding {padding!r} is not understood; use an int, a sequence, 'valid' or 'same'")
    if isinstance(padding, (int, np.integer)) and not isinstance(padding, bool):
        begin = end = (int(padding),) * n
    else:
        try:
            seq = tuple(int(v) for v in padding)
        except (TypeError, ValueError):
            raise RewriteError(f"padding must be an int, {n} or {2 * n} ints, 'valid' or 'same', got {padding!r}") from None
        if len(seq) == 2 * n:
            begin, end = seq[:n], seq[n:]
        else:
            begin = end = _tuple(seq, n, "padding")
    if min(begin + end, default=0) < 0:
        raise RewriteError(f"padding must be non-negative, got {padding!r}")
    return begin, end


def shift_response(
    weight: Any,
    shift: Any,
    *,
    kind: str,
    input_shape: Sequence[int],
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
    output_padding: Any = 0,
    padding_mode: str = "zeros",
) -> Any:
    """The exact output of a conv / conv_transpose *without bias* for the constant input ``shift[c]``.

    ``layer(BN(x)) == layer_{W*scale}(x) + shift_response(W, shift, ...) + b`` for a layer with the
    given geometry, also where zero padding makes the constant position-dependent (border outputs see
    fewer taps). Returns a ``(Cout, *out_spatial)`` array in **float64** (array kind and device of
    ``weight``): add the layer's bias in float64, then cast once to the layer's dtype.

    ``input_shape`` is the input's spatial shape ``(*spatial)`` or its full shape ``(N, C, *spatial)``.
    ``padding``: an int, one int per spatial dim (symmetric), ``2 * ndim`` ints in ONNX order (all
    begins, then all ends; asymmetric pads), or ``"valid"``/``"same"`` (conv only). ``padding_mode``
    (conv only) is PyTorch's; any mode but ``"zeros"`` pads a constant with itself, so the response is
    uniform. ``output_padding`` is for conv_transpose (extra outputs at the end of each dim).

    How: the input channels collapse first, ``V[o, *k] = sum_i W[o, i, *k] * shift[i]``, then ``V``
    runs as a one-input-channel conv over an all-ones (zero-padded) image in float64 — cheap even for
    large feature maps.
    """
    _check_kind(kind)
    if kind == "linear":
        raise RewriteError("shift_response is for conv and conv_transpose; a linear layer's shift is a plain bias (fold_bn_before)")
    _check_weight(weight)
    cin, cout = layer_channels(weight.shape, kind, groups)
    n = weight.ndim - 2
    if n not in _CONV_FN:
        raise RewriteError(f"{kind} with {n} spatial dims is not supported (1d/2d/3d only)")
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == n + 2:
        if shape[1] != cin:
            raise RewriteError(f"input_shape {shape} has {shape[1]} channels, the layer expects {cin}")
        shape = shape[2:]
    if len(shape) != n or min(shape) < 1:
        raise RewriteError(f"input_shape {tuple(input_shape)} does not fit a {n}-d {kind} (give (*spatial) or (N, C, *spatial))")
    t = _vector(shift, cin, "BN shift")
    kernel = tuple(weight.shape[2:])
    stride_t = _tuple(stride, n, "stride")
    dilation_t = _tuple(dilation, n, "dilation")
    if min(stride_t + dilation_t) < 1:
        raise RewriteError(f"stride and dilation must be >= 1, got stride={stride!r} dilation={dilation!r}")
    if padding_mode not in _PADDING_MODES:
        raise RewriteError(f"padding_mode {padding_mode!r} is not one of {', '.join(_PADDING_MODES)}")
    begin, end = _pads(padding, n, kernel, dilation_t)
    taps = torch.from_numpy(_shift_taps(_f64(weight, "weight"), t, kind, groups))  # (Cout, *k)

    if kind == "conv":
        if output_padding not in (0, None) and any(_tuple(output_padding, n, "output_padding")):
            raise RewriteError("output_padding applies to conv_transpose only")
        padded = tuple(s + b + e for s, b, e in zip(shape, begin, end))
        if padding_mode == "zeros":
            ones = torch.ones((1, 1) + shape, dtype=torch.float64)
            pad_arg = [p for i in reversed(range(n)) for p in (begin[i], end[i])]
            ones = F.pad(ones, pad_arg)
        else:  # reflect / replicate / circular copy the constant: the padded image is still all ones
            ones = torch.ones((1, 1) + padded, dtype=torch.float64)
        span = [d * (k - 1) + 1 for k, d in zip(kernel, dilation_t)]
        if any(p < s for p, s in zip(padded, span)):
            raise RewriteError(f"input_shape {shape} with padding {padding!r} is smaller than the kernel span {tuple(span)}")
        out = _CONV_FN[n](ones, taps.unsqueeze(1), None, stride_t, 0, dilation_t)
    else:
        if padding_mode != "zeros":
            raise RewriteError(f"conv_transpose supports only padding_mode='zeros', got {padding_mode!r}")
        if isinstance(padding, str):
            raise RewriteError("conv_transpose takes numeric padding, not 'same'/'valid'")
        out_pad = _tuple(output_padding if output_padding is not None else 0, n, "output_padding")
        if min(out_pad) < 0:
            raise RewriteError(f"output_padding must be non-negative, got {output_padding!r}")
        ones = torch.ones((1, 1) + shape, dtype=torch.float64)
        full = _CONV_T_FN[n](ones, taps.unsqueeze(0), None, stride_t, 0, 0, 1, dilation_t)
        # Padding crops `begin` at the start and `end` at the end; output_padding appends positions
        # that no input reaches (zeros). Same rule as PyTorch and ONNX ConvTranspose.
        full = F.pad(full, [p for i in reversed(range(n)) for p in (0, out_pad[i])])
        index = [slice(None), slice(None)]
        for i in range(n):
            length = full.shape[2 + i] - begin[i] - end[i]
            if length < 1:
                raise RewriteError(f"conv_transpose padding {padding!r} leaves no output for input_shape {shape}")
            index.append(slice(begin[i], begin[i] + length))
        out = full[tuple(index)]
    response = out[0].numpy()
    return _like(np.ascontiguousarray(response), weight, keep_float64=True)


def is_uniform(response: Any, rtol: float = 1e-12) -> bool:
    """True when a :func:`shift_response` is constant over space in every output channel.

    Channel ``c`` counts as constant when ``max - min <= rtol * max|response|`` (the scale is the
    whole response's largest magnitude, so float64 rounding in a channel that cancels to ~0 does not
    read as structure). Then the response is a plain bias, e.g. ``fold_bn_before``'s. A response with
    NaN/inf is never uniform; an empty one is.
    """
    r = _f64(response, "response")
    if r.ndim < 1:
        raise RewriteError("response must be (Cout, *spatial), got a scalar")
    if r.size == 0:
        return True
    if not np.all(np.isfinite(r)):
        return False
    flat = r.reshape(r.shape[0], -1)
    spread = flat.max(axis=1) - flat.min(axis=1)
    scale = float(np.abs(flat).max())
    return bool(np.all(spread <= float(rtol) * scale))


# ----------------------------------------------------------------------------------------------
# unfusion


def unfold_bn_params(
    weight: Any,
    bias: Any,
    *,
    kind: str,
    groups: int = 1,
    channel_mean: Any = None,
    channel_var: Any = None,
    eps: float = 1e-5,
) -> tuple[Any, dict[str, Any]]:
    """Split a fused layer ``y = layer_W(x) + b`` into ``BN(layer_W_nobias(x))``, exact in eval mode.

    ``channel_mean``/``channel_var`` are per-output-channel statistics of ``layer_W(x)`` *without its
    bias*, measured on data (``mu_c``, ``var_c``; PyTorch stores the unbiased variance). Returns
    ``(layer_weight, bn)`` where ``layer_weight`` is a copy of ``weight`` (the layer loses its bias)
    and ``bn`` has

    - ``running_mean = mu``, ``running_var = var``
    - ``weight = gamma = sqrt(var + eps)``
    - ``bias = beta = mu + b``

    Eval-mode BN computes ``(z - mu) * gamma / sqrt(var + eps) + beta = (z - mu) + mu + b = z + b``,
    exactly the fused layer. In train mode on batches like the measured data the batch statistics are
    ``~ (mu, var)`` and the output is ``~ z + b`` as well, so fine-tuning starts from the fused
    function with BN's parameterization (``gamma = sigma``, ``beta = mu`` as in the Proxy Norm paper's
    expressivity argument).

    Without statistics (both ``None``): identity statistics, ``mu = 0`` and ``var = 1 - eps`` (so
    ``gamma = 1``, ``beta = b``): exact in eval mode, but train mode normalizes with the batch's own
    statistics, a different function. Arrays come back in ``weight``'s kind, dtype and device.
    """
    _check_weight(weight)
    _, cout = layer_channels(weight.shape, kind, groups)
    eps = float(eps)
    if not eps > 0:
        raise RewriteError(f"eps must be > 0 to unfold a BN, got {eps}")
    if (channel_mean is None) != (channel_var is None):
        raise RewriteError("give both channel_mean and channel_var (statistics measured on data), or neither")
    if channel_mean is None:
        mu, var = np.zeros(cout), np.full(cout, max(1.0 - eps, 0.0))
    else:
        mu = _vector(channel_mean, cout, "channel_mean")
        var = _vector(channel_var, cout, "channel_var")
    b = _vector(bias, cout, "layer bias", default=0.0)
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(var))):
        raise RewriteError("channel_mean/channel_var contain NaN/inf; measure the statistics on finite data")
    if np.any(var < 0):
        raise RewriteError("channel_var must be >= 0 to unfold a BN")
    gamma = np.sqrt(var + eps)
    beta = mu + b
    bn = {
        "weight": _like(gamma, weight),
        "bias": _like(beta, weight),
        "running_mean": _like(mu, weight),
        "running_var": _like(var, weight),
    }
    copy = weight.detach().clone() if isinstance(weight, torch.Tensor) else weight.copy()
    return copy, bn


# ----------------------------------------------------------------------------------------------
# batch-independent layers in eval mode: Proxy Norm and Weight Standardization


def proxy_norm_moments(layer: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, inv_std)`` (float64 numpy, one value per channel) of a ``ProxyNormAct``'s proxy statistics.

    The layer's own :meth:`proxy_moments` runs on a float64 copy (quantiles recomputed in float64, the
    activation evaluated in float64), so the recipe is never restated here; ``inv_std = 1 / sqrt(var + eps)``.
    In eval mode ``layer(y) == inv_std * (φ(weight * y + bias) - mean)`` per channel. Raises
    :class:`RewriteError` on non-finite statistics.
    """
    import copy

    twin = copy.deepcopy(layer).double()
    with torch.no_grad():
        mean, var = twin.proxy_moments()
    m = _f64(mean, "proxy mean")
    v = _f64(var, "proxy variance")
    eps = float(layer.eps)
    if m.ndim != 1 or v.shape != m.shape:
        raise RewriteError(f"proxy moments must be two (C,) vectors, got shapes {m.shape} and {v.shape}")
    if not (np.all(np.isfinite(m)) and np.all(np.isfinite(v))) or np.any(v + eps <= 0):
        raise RewriteError("the proxy statistics are not finite (NaN/inf parameters or activation): cannot fold them")
    return m, 1.0 / np.sqrt(v + eps)


class ProxyNormSplit:
    """A ProxyNormAct in eval mode as ``post(φ'(pre(y)))``, per channel, float64 arrays:

    - ``pre(y) = y * pre_scale + pre_shift``;
    - ``φ'`` is the layer's activation, or ``clamp(·, lower, upper)`` when ``lower``/``upper`` are set;
    - ``post(z) = (z + offset) * scale`` (equivalently ``z * scale + shift`` with ``shift = offset * scale``).
    """

    def __init__(self, pre_scale, pre_shift, offset, scale, lower=None, upper=None) -> None:
        self.pre_scale, self.pre_shift, self.offset, self.scale = pre_scale, pre_shift, offset, scale
        self.lower, self.upper = lower, upper

    @property
    def shift(self) -> np.ndarray:
        return self.offset * self.scale

    @property
    def post_is_identity(self) -> bool:
        return bool(np.all(self.offset == 0) and np.all(self.scale == 1))

    @property
    def post_has_scale(self) -> bool:
        return not bool(np.all(self.scale == 1))

    def __repr__(self) -> str:
        return (f"ProxyNormSplit(channels={len(self.scale)}, clamp={self.lower is not None}, "
                f"post_scale={self.post_has_scale}, post_offset={bool(np.any(self.offset != 0))})")


def split_proxy_norm(weight: Any, bias: Any, mean: Any, inv_std: Any, *, move_scale: bool = False,
                     unit_offset: bool = False, bounds: tuple[float, float] | None = None,
                     absorb_offset: bool = False) -> ProxyNormSplit:
    """Rewrite ``inv_std * (φ(weight * y + bias) - mean)`` as a :class:`ProxyNormSplit`, exactly.

    - Default: ``pre = (weight, bias)``, ``post = (z - mean) * inv_std``.
    - ``move_scale`` (φ positively homogeneous, ``φ(k x) = k φ(x)`` for ``k > 0``: ReLU, LeakyReLU, PReLU, and
      clamps with scaled bounds): ``inv_std`` (always > 0) moves before φ, ``pre = inv_std * (weight, bias)``,
      ``post = z - mean * inv_std``.
    - ``unit_offset`` (φ positively homogeneous, every ``mean > 0``; excludes ``move_scale``): ``1 / mean`` moves
      before φ instead and ``mean`` joins the post scale, ``pre = (weight, bias) / mean``,
      ``post = (z - 1) * mean * inv_std``: the same offset, -1, in every channel. With a ReLU and
      ``absorb_offset`` the activation becomes ``clamp(x, min=-1)`` — one scalar bound — and only the scale
      ``mean * inv_std`` is left after it (for the next layer's input channels).
    - ``bounds=(lo, hi)`` says φ is ``clamp(x, lo, hi)`` (ReLU: ``(0, inf)``, ReLU6: ``(0, 6)``); the bounds
      follow the moved scale. ``absorb_offset`` (needs ``bounds``) moves the post offset into the clamp:
      ``clamp(x, lo, hi) + o = clamp(x + o, lo + o, hi + o)``, so nothing but a scale (or nothing at all,
      with ``move_scale``) is left after the activation.
    """
    m = _f64(mean, "proxy mean")
    if m.ndim != 1:
        raise RewriteError(f"proxy mean must be 1-D (C,), got shape {tuple(m.shape)}")
    c = m.shape[0]
    s = _vector(inv_std, c, "proxy inv_std")
    w = _vector(weight, c, "ProxyNormAct weight")
    b = _vector(bias, c, "ProxyNormAct bias")
    offset = -m
    lower = upper = None
    if bounds is not None:
        lo, hi = float(bounds[0]), float(bounds[1])
        if not lo <= hi:
            raise RewriteError(f"clamp bounds must satisfy lower <= upper, got {bounds}")
        lower, upper = np.full(c, lo), np.full(c, hi)
    if move_scale:
        if not np.all(s > 0) or not np.all(np.isfinite(s)):
            raise RewriteError("the proxy scale must be finite and > 0 to move before a homogeneous activation")
        w, b, offset = w * s, b * s, offset * s
        if lower is not None:
            lower, upper = lower * s, upper * s
        s = np.ones(c)
    if unit_offset:
        if move_scale:
            raise RewriteError("move_scale and unit_offset exclude each other")
        if not np.all(m > 0) or not np.all(np.isfinite(m)):
            raise RewriteError("unit_offset needs a finite proxy mean > 0 in every channel")
        w, b, offset, s = w / m, b / m, np.full(c, -1.0), s * m
        if lower is not None:
            lower, upper = lower / m, upper / m
    if absorb_offset:
        if lower is None:
            raise RewriteError("absorb_offset needs bounds: only a clamp activation absorbs an offset")
        b, lower, upper = b + offset, lower + offset, upper + offset
        offset = np.zeros(c)
    return ProxyNormSplit(w, b, offset, s, lower, upper)


def fold_affine_into_norm(weight: Any, bias: Any, scale: Any, shift: Any, *, shape: Sequence[int],
                          like: Any = None) -> tuple[Any, Any]:
    """A normalization's output affine ``x̂ * weight + bias`` followed by the affine ``y * scale + shift``, as one
    affine ``x̂ * weight' + bias'``. Exact: ``(x̂ w + b) s + t = x̂ (w s) + (b s + t)``, computed in float64.

    ``shape`` is the shape of the norm's affine, its axis 0 the channel (or group): ``(C,)`` for a GroupNorm /
    InstanceNorm, ``(G,)`` for a GroupNormalization-18 (per-group scale), ``normalized_shape`` ``(C, *spatial)``
    for a LayerNorm over a channels-first tensor. ``scale``/``shift`` have that shape, or are ``(shape[0],)``
    vectors along axis 0 (one value per channel). ``weight``/``bias`` ``None`` mean 1 and 0 (a norm without
    affine); ``weight`` has ``shape``, ``bias`` broadcasts to it (an ONNX LayerNormalization's B may be smaller
    than its scale). Returns ``(weight', bias')`` in ``like``'s kind, dtype and device; float64 numpy without ``like``.
    Both routes call this: the torch route folding a ProxyNormAct's pre-affine, the ONNX route an elementwise
    Mul/Add chain after a normalization.
    """
    shape = tuple(int(d) for d in shape)
    if not shape:
        raise RewriteError("the norm's affine shape must have at least the channel axis")
    s = _along_channels(scale, shape, "affine scale")
    t = _along_channels(shift, shape, "affine shift")
    w = np.ones(shape) if weight is None else _f64(weight, "norm weight")
    b = np.zeros(shape) if bias is None else _f64(bias, "norm bias")
    try:
        fits = w.shape == shape and np.broadcast_shapes(b.shape, shape) == shape
    except ValueError:
        fits = False
    if not fits:
        raise RewriteError(f"norm weight/bias have shapes {w.shape}/{b.shape}, expected {shape}")
    new_weight, new_bias = w * s, b * s + t
    if like is None:
        return new_weight, new_bias
    return _like(new_weight, like), _like(new_bias, like)


def _along_channels(x: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    """``x`` (float64) of ``shape`` as is, or a ``(shape[0],)`` vector broadcasting along axis 0 of ``shape``."""
    v = _f64(x, name)
    if v.shape == shape:
        return v
    return per_channel(_vector(v, shape[0], name), len(shape), 0)


def std_conv_weight(layer: Any) -> Any:
    """The standardized kernel of a StdConv (Weight Standardization) in its weight's dtype and device: the
    layer's own :meth:`standardized_weight` evaluated on a float64 copy, rounded once."""
    import copy

    twin = copy.deepcopy(layer).double()
    with torch.no_grad():
        value = _f64(twin.standardized_weight(), "standardized weight")
    if not np.all(np.isfinite(value)):
        raise RewriteError("the standardized weight is not finite: cannot fold the StdConv")
    return _like(value, layer.weight.detach())


__all__ += ["proxy_norm_moments", "ProxyNormSplit", "split_proxy_norm", "fold_affine_into_norm", "std_conv_weight"]
