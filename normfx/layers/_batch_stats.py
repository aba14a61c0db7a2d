"""What the training-time BatchNorm variants share: input checks, the EMA factor, running-statistic updates,
copying a BN's state, and the pure momentum arithmetic (float math, no modules).

Conventions are PyTorch's: ``momentum`` is the weight of the *new* statistic (0.1 ≡ λ = 0.9), ``None`` means a
cumulative average (factor ``1 / num_batches_tracked``), ``running_var`` stores the unbiased variance while the
normalization uses the biased one, and a layer updates its statistics only when ``training`` and
``track_running_stats`` are both set (what :mod:`normfx.ema` switches).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import InputDataError, PolicyError

__all__ = [
    "horizon_momentum",
    "reduce_dims",
    "check_input_dim",
    "uses_batch_statistics",
    "updates_statistics",
    "ema_factors",
    "bn_factor",
    "update_running",
    "copy_bn_state",
    "check_positive_int",
]


def horizon_momentum(momentum: float, updates: int) -> float:
    """The momentum ``m'`` that gives ``updates`` EMA steps the horizon of one step with ``momentum``:
    ``(1 - m')**updates = 1 - momentum``. ``momentum`` itself (bit for bit) for one update."""
    if updates == 1:
        return momentum
    return 1.0 - (1.0 - momentum) ** (1.0 / updates)


def reduce_dims(x: torch.Tensor) -> list[int]:
    """Every axis but the channel axis 1: BatchNorm's statistics axes."""
    return [0, *range(2, x.dim())]


def check_input_dim(module: nn.Module, x: torch.Tensor, dims: Sequence[int]) -> None:
    if x.dim() not in dims:
        raise InputDataError(
            f"{type(module).__name__} expects a {' or '.join(f'{d}D' for d in dims)} input, got {x.dim()}D "
            f"(shape {list(x.shape)})"
        )


def uses_batch_statistics(module: nn.Module) -> bool:
    """BatchNorm's rule: batch statistics in training mode, and in eval when there are no running statistics."""
    return module.training or module.running_mean is None


def updates_statistics(module: nn.Module) -> bool:
    return bool(module.training and module.track_running_stats and module.running_mean is not None)


def ema_factors(module: nn.Module, updates: int) -> list[float]:
    """Count ``updates`` batches in ``num_batches_tracked`` and return the factor each of them gets.

    With a momentum, every update gets :func:`horizon_momentum` (so that ``updates`` batches of one forward move
    the EMA as far as one BN batch would); with ``momentum=None`` each gets ``1 / batches so far`` (the cumulative
    average over every batch, exactly BatchNorm run on each of them).
    """
    start = int(module.num_batches_tracked)
    module.num_batches_tracked.add_(updates)
    if module.momentum is None:
        return [1.0 / (start + i + 1) for i in range(updates)]
    return [horizon_momentum(float(module.momentum), updates)] * updates


def bn_factor(module: nn.Module) -> float:
    """BatchNorm's own bookkeeping for one batch: count it (training with running statistics) and return the
    ``exponential_average_factor`` to pass to ``F.batch_norm`` (``1 / num_batches_tracked`` for ``momentum=None``)."""
    factor = 0.0 if module.momentum is None else module.momentum
    if module.training and module.track_running_stats and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        if module.momentum is None:
            factor = 1.0 / float(module.num_batches_tracked)
    return factor


@torch.no_grad()
def update_running(module: nn.Module, means: Sequence[torch.Tensor], variances: Sequence[torch.Tensor],
                   counts: Sequence[int], factors: Sequence[float],
                   running_mean: torch.Tensor | None = None, running_var: torch.Tensor | None = None) -> None:
    """Fold batch statistics into the running ones, in order: ``r ← (1 − f) r + f s`` per batch, the variance
    made unbiased (``× n / (n − 1)``) as BatchNorm does. Done in float64, written back in the buffer's dtype."""
    rm = module.running_mean if running_mean is None else running_mean
    rv = module.running_var if running_var is None else running_var
    mean, var = rm.double(), rv.double()
    for m, v, n, f in zip(means, variances, counts, factors):
        unbiased = v.double() * (n / (n - 1)) if n > 1 else v.double()
        mean = (1.0 - f) * mean + f * m.double()
        var = (1.0 - f) * var + f * unbiased
    rm.copy_(mean)
    rv.copy_(var)


def copy_bn_state(source: nn.Module, target: nn.Module) -> nn.Module:
    """Copy affine, running statistics, counter and mode from one BN-like layer into another (same shapes)."""
    with torch.no_grad():
        for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            src, dst = getattr(source, key, None), getattr(target, key, None)
            if src is not None and dst is not None:
                dst.copy_(src.detach())
    target.train(source.training)
    return target


def check_positive_int(owner: str, name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PolicyError(f"{owner}: {name} must be an integer >= 1, got {value!r}")
    return value
