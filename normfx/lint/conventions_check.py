"""Checks for another framework's convention in a PyTorch model: a momentum that is really a decay
(TF/Keras 0.9, 0.99, 0.997; Caffe 0.999), and γ drawn from U(0, 1) (LuaTorch's legacy init) in a model that
claims to be fresh.

"Claims to be fresh": every BN-like layer's running statistics are at their construction values (running_mean
all 0, running_var all 1) and its ``num_batches_tracked`` is 0 where it has one: nothing was trained or
calibrated, so γ should still be its init (PyTorch ≥ 1.2, TF, Keras: γ = 1). A γ that then looks like a
sample of U(0, 1) — at least 8 channels, all in [0, 1), not all equal, and a Kolmogorov–Smirnov distance to
U(0, 1) below the 1 % critical value 1.63/√C — was initialized by old code. Trained models are never flagged:
their γ are often inside [0, 1) for good reasons.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .fixes import Fixes
from .report import WARNING, LintReport

__all__ = ["OTHER_FRAMEWORK_MOMENTA", "check_momentum", "claims_fresh", "looks_uniform01", "check_fresh_gamma"]

#: momentum values that are another framework's decay (weight of the old running value), and whose they are
OTHER_FRAMEWORK_MOMENTA = {
    0.9: "TF/Keras/Caffe2/ONNX's decay 0.9",
    0.99: "Keras's default decay 0.99",
    0.997: "the TF official ResNet's decay 0.997",
    0.999: "Caffe's moving_average_fraction 0.999",
}
_MIN_CHANNELS = 8
_KS_CRITICAL_1PCT = 1.63


def check_momentum(report: LintReport, layer: str, momentum: float | None, fixes: Fixes) -> None:
    """momentum (PyTorch's weight of the *new* batch) equal to a known decay of another framework."""
    report.ran("momentum")
    if momentum is None:
        return
    for value, whose in OTHER_FRAMEWORK_MOMENTA.items():
        if math.isclose(float(momentum), value, rel_tol=0, abs_tol=1e-9):
            report.add(WARNING, "momentum", layer,
                       f"momentum = {momentum:g} looks like {whose} (weight of the old value); PyTorch weights the "
                       f"new batch by it, so the running statistics follow the last few batches: use "
                       f"{1 - value:.3g} (normfx.conventions.convert_momentum)", fixes.precise(), momentum=momentum,
                       pytorch_equivalent=round(1 - value, 12))
            return


def claims_fresh(bn_layers: list[tuple[str, nn.Module, tuple]]) -> bool:
    """True when every BN-like layer keeps its construction statistics (see the module docstring)."""
    seen = False
    for _, module, (mean, var, _, _) in bn_layers:
        if mean is None or var is None:
            continue
        tracked = getattr(module, "num_batches_tracked", None)
        if isinstance(tracked, torch.Tensor) and int(tracked) != 0:
            return False
        if not (bool(torch.all(mean == 0)) and bool(torch.all(var == 1))):
            return False
        seen = True
    return seen


def looks_uniform01(gamma: np.ndarray) -> tuple[bool, float]:
    """``(looks like U(0, 1), KS distance)`` for a vector of γ."""
    c = gamma.size
    if c < _MIN_CHANNELS or not np.all(np.isfinite(gamma)) or gamma.min() < 0 or gamma.max() >= 1 or np.ptp(gamma) == 0:
        return False, float("nan")
    x = np.sort(gamma)
    ranks = np.arange(1, c + 1) / c
    distance = float(max(np.max(ranks - x), np.max(x - (ranks - 1 / c))))
    return distance < _KS_CRITICAL_1PCT / math.sqrt(c), distance


def check_fresh_gamma(report: LintReport, bn_layers: list[tuple[str, nn.Module, tuple]], fixes: Fixes) -> None:
    report.ran("fresh_gamma")
    if not claims_fresh(bn_layers):
        return
    for name, _, (_, _, weight, _) in bn_layers:
        if weight is None:
            continue
        uniform, distance = looks_uniform01(weight.detach().double().cpu().numpy().ravel())
        if uniform:
            report.add(WARNING, "fresh_gamma", name,
                       f"the model is fresh (statistics at init, nothing tracked) but γ looks drawn from U(0, 1) "
                       f"(KS distance {distance:.2f}): LuaTorch/old-PyTorch init; PyTorch, TF and Keras start γ at 1 "
                       "(nn.init.ones_)", None, ks_distance=distance)
