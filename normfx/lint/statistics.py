"""Checks on a BN's numbers: eps below cuDNN's minimum, running_var <= 0, NaN/Inf in statistics or affine.

:func:`check_values` works on float64 arrays, so the torch route and the ONNX route share it.
"""

from __future__ import annotations

import numpy as np

from .fixes import MIN_EPS, Fixes
from .report import ERROR, WARNING, LintReport

__all__ = ["check_values", "check_eps"]


def _channels(mask: np.ndarray, limit: int = 5) -> str:
    idx = np.flatnonzero(mask)
    text = ", ".join(str(i) for i in idx[:limit])
    return text + (f", ... ({idx.size} channels)" if idx.size > limit else "")


def check_eps(report: LintReport, layer: str, eps: float | None, fixes: Fixes) -> None:
    """eps <= 0: the BN divides by zero on a constant channel (error); 0 < eps < 1e-5: below cuDNN's minimum
    (cuDNN refuses it: PyTorch silently leaves cuDNN for a slower kernel, TensorRT/cuDNN backends clamp it, so
    the deployed model normalizes differently; warning)."""
    report.ran("eps")
    if eps is None:
        return
    if eps <= 0:
        report.add(ERROR, "eps", layer, f"eps = {eps:g}: a channel with zero variance divides by zero (NaN/Inf)",
                   fixes.raise_eps(), eps=eps)
    elif np.float32(eps) < np.float32(MIN_EPS):  # compared in float32: ONNX stores epsilon as a float32 attribute
        report.add(WARNING, "eps", layer,
                   f"eps = {eps:g} is below cuDNN's minimum {MIN_EPS:g}: cuDNN refuses it (PyTorch silently falls back "
                   "to a slower kernel; cuDNN/TensorRT deployments clamp it and normalize differently)",
                   fixes.raise_eps(), eps=eps)


def check_values(report: LintReport, layer: str, mean: np.ndarray | None, var: np.ndarray | None,
                 weight: np.ndarray | None, bias: np.ndarray | None, fixes: Fixes) -> None:
    """NaN/Inf in statistics (error; fix: precise BN), NaN/Inf in γ/β (error; no normfx fix: the weights are
    broken), running_var < 0 (error: undefined normalization), running_var == 0 (warning: a dead channel whose
    output is the constant β, or statistics that never saw data)."""
    report.ran("statistics")
    for what, values in (("running_mean", mean), ("running_var", var)):
        if values is not None and not np.all(np.isfinite(values)):
            bad = ~np.isfinite(values)
            report.add(ERROR, "statistics", layer,
                       f"{what} has NaN/Inf in channel(s) {_channels(bad)}: every output of those channels is NaN",
                       fixes.precise(), tensor=what, channels=np.flatnonzero(bad).tolist())
    for what, values in (("weight (γ)", weight), ("bias (β)", bias)):
        if values is not None and not np.all(np.isfinite(values)):
            bad = ~np.isfinite(values)
            report.add(ERROR, "weights", layer,
                       f"{what} has NaN/Inf in channel(s) {_channels(bad)}: training diverged; restore a checkpoint "
                       "from before it", None, tensor=what.split()[0], channels=np.flatnonzero(bad).tolist())
    if var is None:
        return
    finite = np.where(np.isfinite(var), var, 1.0)
    if np.any(finite < 0):
        bad = finite < 0
        report.add(ERROR, "running_var", layer,
                   f"running_var < 0 in channel(s) {_channels(bad)} (min {finite.min():.3g}): a variance cannot be "
                   "negative; the statistics are corrupt", fixes.precise(), channels=np.flatnonzero(bad).tolist(),
                   min=float(finite.min()))
    if np.any(finite == 0):
        bad = finite == 0
        report.add(WARNING, "running_var", layer,
                   f"running_var == 0 in channel(s) {_channels(bad)}: a dead channel (its output is the constant β) "
                   "or statistics that never saw data", fixes.precise(), channels=np.flatnonzero(bad).tolist())
