"""Checks on what a fold would do to the numbers: folded weights beyond fp16's range (max |W·γ/σ| > 65504), and
a BN scale γ/σ beyond 2^10 (the folded layer loses precision in fp16/int8).

Both routes call these with float64 arrays: the BN's numbers for :func:`check_scale`, the folded layer's
parameters (what ``fuse`` actually produced) for :func:`check_fold_overflow`.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from .fixes import Fixes
from .report import WARNING, LintReport

__all__ = ["FP16_MAX", "SCALE_LIMIT", "check_scale", "check_fold_overflow"]

FP16_MAX = 65504.0
SCALE_LIMIT = 2.0 ** 10  # fp16 has a 10-bit mantissa


def check_scale(report: LintReport, layer: str, var: np.ndarray | None, weight: np.ndarray | None, eps: float | None,
                fixes: Fixes) -> None:
    """|γ/σ| > 2^10 on some channel (σ = sqrt(running_var + eps)): folding multiplies that channel's weights by more
    than 2^10 relative to an unscaled one, so the folded layer's weights span more than fp16's 10-bit mantissa (a
    BN before a conv: its input channels are summed at that spread) and a per-tensor int8 scale loses the small
    channels. Undefined statistics are left to :mod:`.statistics`."""
    report.ran("fold_precision")
    if var is None:
        return
    gamma = np.ones_like(var) if weight is None else weight
    denom = var + (0.0 if eps is None else eps)
    if not (np.all(np.isfinite(denom)) and np.all(np.isfinite(gamma))) or np.any(denom <= 0):
        return
    scale = np.abs(gamma) / np.sqrt(denom)
    worst = int(np.argmax(scale))
    if scale[worst] > SCALE_LIMIT:
        report.add(WARNING, "fold_precision", layer,
                   f"γ/σ = {scale[worst]:.3g} in channel {worst} (beyond 2^10 = 1024, "
                   f"{int((scale > SCALE_LIMIT).sum())} channel(s)): folding scales those weights past fp16's 10-bit "
                   "mantissa relative to the others; the folded layer loses precision in fp16/int8",
                   fixes.keep_unfolded(layer), max_scale=float(scale[worst]), channel=worst)


def check_fold_overflow(report: LintReport, layer: str, into: str, folded: Mapping[str, np.ndarray],
                        fixes: Fixes) -> None:
    """A folded parameter (``folded``: name → values of the layer ``into`` after the fold) beyond fp16's largest
    value: the model is fine in fp32 and turns Inf in fp16."""
    report.ran("fold_fp16_overflow")
    worst_name, worst = "", 0.0
    for name, values in folded.items():
        if values.size:
            top = float(np.max(np.abs(values)))
            if not np.isfinite(top) or top > worst:
                worst_name, worst = name, top
    if worst > FP16_MAX or not np.isfinite(worst):
        report.add(WARNING, "fold_fp16_overflow", layer,
                   f"folding into '{into}' makes its {worst_name} reach {worst:.3g} > 65504 (fp16's largest value): "
                   "fine in fp32, Inf in fp16", fixes.keep_unfolded(layer), into=into, max_abs=worst,
                   tensor=worst_name)
