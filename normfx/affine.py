"""Pure math for elementwise affine maps ``y = x * scale + shift``: arrays in, float64 arrays out.

Exporters write a per-channel affine as a chain of elementwise ops with constants — a GroupNorm's own
affine (``Mul γ``, ``Add β``), Proxy Norm's pre-affine (``Mul γ``, ``Add β``) and post-affine
(``Sub m``, ``Mul s``) — whose constants broadcast against the data (``(1, C, 1, 1)``, ``(C, 1, 1)``,
scalars). :func:`compose` turns such a chain into one ``(scale, shift)`` pair; the helpers below say
whether that pair varies along one axis only (:func:`along_axis`), is constant within groups of
channels (:func:`per_group`), or split it for a padded conv (:func:`shift_before_scale`). Folding it into a
normalization's own scale/bias is :func:`normfx.fold.fold_affine_into_norm`, the one function both routes call.

This module knows nothing about graphs (like :mod:`normfx.fold`); the ONNX passes call it.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

__all__ = [
    "AFFINE_OPS",
    "compose",
    "align",
    "along_axis",
    "is_identity",
    "per_group",
    "shift_before_scale",
    "grows",
    "affine_before_bn",
]

AFFINE_OPS = ("Mul", "Add", "Sub", "Div")


def _f64(value: Any) -> np.ndarray:
    return np.asarray(value, dtype=np.float64)


def compose(steps: Iterable[tuple[str, Any, bool]]) -> tuple[np.ndarray, np.ndarray]:
    """The ``(scale, shift)`` of a chain of elementwise ops applied in order to ``x``.

    Each step is ``(op, constant, constant_first)``: ``op`` one of ``Mul``, ``Add``, ``Sub``, ``Div``;
    ``constant_first`` is True when the constant is the first operand (``c - x``). ``x / c`` divides by
    the constant; ``c / x`` is not affine and raises ``ValueError``. The results broadcast like the
    constants do (numpy rules), in float64.
    """
    scale, shift = np.ones(()), np.zeros(())
    for op, const, first in steps:
        c = _f64(const)
        if op == "Mul":
            scale, shift = scale * c, shift * c
        elif op == "Add":
            shift = shift + c
        elif op == "Sub":
            scale, shift = (-scale, c - shift) if first else (scale, shift - c)
        elif op == "Div":
            if first:
                raise ValueError("c / x is not an affine map of x")
            scale, shift = scale / c, shift / c
        else:
            raise ValueError(f"{op} is not an affine op (one of {', '.join(AFFINE_OPS)})")
    scale, shift = np.broadcast_arrays(scale, shift)
    return np.array(scale), np.array(shift)


def align(value: np.ndarray, rank: int) -> np.ndarray:
    """``value`` with leading 1-dims added up to ``rank`` (its broadcast against a rank-``rank`` tensor)."""
    value = np.asarray(value)
    if value.ndim > rank:
        raise ValueError(f"a constant of rank {value.ndim} does not broadcast into rank {rank} without growing it")
    return value.reshape((1,) * (rank - value.ndim) + value.shape)


def grows(shape: Sequence[int], data: Sequence[int | None]) -> int | None:
    """The first axis along which a constant of ``shape`` would grow data of shape ``data`` under numpy
    broadcasting (``None`` when it never does). ``data`` holds ``None`` for dims not known statically:
    a constant dim other than 1 there is counted as growing (it cannot be proven not to)."""
    if len(shape) > len(data):
        return 0
    offset = len(data) - len(shape)
    for i, d in enumerate(shape):
        if d != 1 and data[offset + i] != d:
            return offset + i
    return None


def along_axis(value: np.ndarray, rank: int, axis: int, size: int | None = None) -> np.ndarray | None:
    """``value`` (broadcast against rank ``rank``) as a vector along ``axis``, or None when it varies along
    another axis. A value constant along ``axis`` gives a vector of length ``size`` (None: length 1)."""
    full = align(value, rank)
    if any(d != 1 for i, d in enumerate(full.shape) if i != axis):
        return None
    vec = full.reshape(-1).astype(np.float64)
    if vec.size == 1 and size is not None:
        return np.full(size, vec[0])
    if size is not None and vec.size != size:
        return None
    return vec.copy()


def is_identity(scale: np.ndarray, shift: np.ndarray) -> tuple[bool, bool]:
    """``(scale is all ones, shift is all zeros)``."""
    return bool(np.all(scale == 1.0)), bool(np.all(shift == 0.0))


def per_group(vector: np.ndarray, groups: int) -> np.ndarray | None:
    """A per-channel vector as one value per group of ``C / groups`` consecutive channels, or None when
    it varies within a group (or ``groups`` does not divide its length)."""
    vector = _f64(vector).reshape(-1)
    if groups < 1 or vector.size % groups:
        return None
    table = vector.reshape(groups, -1)
    if not np.all(table == table[:, :1]):
        return None
    return table[:, 0].copy()


def shift_before_scale(scale: Any, shift: Any) -> np.ndarray | None:
    """``x * s + t = (x + t / s) * s``: the shift ``t / s`` applied *before* the scale (float64), or None
    when some channel has ``s = 0`` and ``t != 0`` (its output is the constant ``t``, not a scaled input)."""
    s, t = np.broadcast_arrays(_f64(scale), _f64(shift))
    if np.any((s == 0.0) & (t != 0.0)) or not np.all(np.isfinite(s)):
        return None
    out = np.zeros(s.shape)
    nonzero = s != 0.0
    out[nonzero] = t[nonzero] / s[nonzero]
    return out


def affine_before_bn(mean: Any, weight: Any, scale: Any, shift: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """A per-channel affine ``x * s + t`` followed by a BatchNorm (running mean ``μ``, weight ``γ``), as the same
    BatchNorm with ``μ' = (μ − t) / s`` and ``γ' = γ s`` (float64; the variance, bias and eps are unchanged):
    ``γ (x s + t − μ) / σ + β = γ s (x − (μ − t) / s) / σ + β``. Exact; None when some channel has ``s = 0``
    (the BN would see a constant there) or a value is not finite."""
    s, t, mu, w = (_f64(v).reshape(-1) for v in (scale, shift, mean, weight))
    if np.any(s == 0.0) or not all(np.all(np.isfinite(v)) for v in (s, t, mu, w)):
        return None
    s, t = np.broadcast_to(s, mu.shape), np.broadcast_to(t, mu.shape)
    return (mu - t) / s, w * s
