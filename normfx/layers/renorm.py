"""Batch Renormalization (Ioffe 2017): ``x̂ = (x − μ_B)/σ_B · r + d`` in training, with
``r = sg(clip(σ_B/σ_EMA, 1/r_max, r_max))`` and ``d = sg(clip((μ_B − μ_EMA)/σ_EMA, −d_max, d_max))``
(``sg``: stop-gradient; ``σ = sqrt(var + eps)``), so training sees statistics pulled towards the EMA that
evaluation uses. In eval mode it is BatchNorm (same state_dict: ``running_mean``/``running_var``/
``num_batches_tracked`` are the usual registered buffers; no new state).

Warm-up schedule (the paper's: plain BN first, then the limits relaxed gradually): for the first
``warmup_steps`` training steps ``r_max = 1, d_max = 0`` (BatchNorm), then over ``ramp_steps`` steps they
grow linearly to ``r_max`` and ``d_max``. The step is ``num_batches_tracked`` (before the current batch).
r and d are computed from the running statistics *before* the current batch updates them; the update itself
is BatchNorm's (momentum, unbiased variance; its own kernel). With ``r_max=1, d_max=0`` the layer is BatchNorm
bit for bit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PolicyError
from ._batch_stats import bn_factor, check_input_dim, copy_bn_state, reduce_dims, updates_statistics

__all__ = ["BatchRenorm", "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "renorm_limits"]


def renorm_limits(step: int, r_max: float, d_max: float, warmup_steps: int = 0, ramp_steps: int = 0) -> tuple[float, float]:
    """``(r_max, d_max)`` in force at training step ``step`` (0-based) under the warm-up schedule."""
    if step < warmup_steps:
        return 1.0, 0.0
    if ramp_steps and step < warmup_steps + ramp_steps:
        frac = (step - warmup_steps) / ramp_steps
        return 1.0 + (r_max - 1.0) * frac, d_max * frac
    return float(r_max), float(d_max)


class BatchRenorm(nn.modules.batchnorm._BatchNorm):
    """Batch Renormalization (the dimension-agnostic form: 2D–5D inputs); needs running statistics."""

    _expected_dims: tuple[int, ...] = (2, 3, 4, 5)

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, r_max: float = 3.0, d_max: float = 5.0, warmup_steps: int = 0,
                 ramp_steps: int = 0, device=None, dtype=None) -> None:
        name = type(self).__name__
        if not track_running_stats:
            raise PolicyError(f"{name}: Batch Renorm needs running statistics; track_running_stats must be True")
        if not (isinstance(r_max, (int, float)) and math.isfinite(r_max) and r_max >= 1.0):
            raise PolicyError(f"{name}: r_max must be a finite number >= 1, got {r_max!r}")
        if not (isinstance(d_max, (int, float)) and math.isfinite(d_max) and d_max >= 0.0):
            raise PolicyError(f"{name}: d_max must be a finite number >= 0, got {d_max!r}")
        for key, value in (("warmup_steps", warmup_steps), ("ramp_steps", ramp_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise PolicyError(f"{name}: {key} must be an integer >= 0, got {value!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.r_max, self.d_max = float(r_max), float(d_max)
        self.warmup_steps, self.ramp_steps = warmup_steps, ramp_steps

    def _check_input_dim(self, x: torch.Tensor) -> None:
        check_input_dim(self, x, self._expected_dims)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", r_max={self.r_max:g}, d_max={self.d_max:g}"
                + (f", warmup_steps={self.warmup_steps}, ramp_steps={self.ramp_steps}"
                   if self.warmup_steps or self.ramp_steps else ""))

    def limits(self) -> tuple[float, float]:
        """The ``(r_max, d_max)`` the next training step uses."""
        return renorm_limits(int(self.num_batches_tracked), self.r_max, self.d_max, self.warmup_steps, self.ramp_steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x̂ r + d`` then the affine is BatchNorm with weight ``γ r`` and bias ``β + γ d`` (r, d constants):
        BatchNorm's kernel does the normalization, its gradient through μ_B, σ_B, and the EMA update."""
        self._check_input_dim(x)
        if not self.training:
            return super().forward(x)
        r_max, d_max = self.limits()
        with torch.no_grad():
            var_b, mean_b = torch.var_mean(x, dim=reduce_dims(x), correction=0)
            std_ema = torch.sqrt(self.running_var + self.eps)
            r = (torch.sqrt(var_b + self.eps) / std_ema).clamp(1.0 / r_max, r_max).to(x.dtype)
            d = ((mean_b - self.running_mean) / std_ema).clamp(-d_max, d_max).to(x.dtype)
        weight, bias = (self.weight * r, self.bias + self.weight * d) if self.weight is not None else (r, d)
        tracking = updates_statistics(self)
        factor = bn_factor(self)
        return F.batch_norm(x, self.running_mean if tracking else None, self.running_var if tracking else None,
                            weight, bias, True, factor, self.eps)

    @classmethod
    def from_batchnorm(cls, bn: nn.Module, r_max: float = 3.0, d_max: float = 5.0, warmup_steps: int = 0,
                       ramp_steps: int = 0) -> "BatchRenorm":
        """A Batch Renorm layer with ``bn``'s eps, momentum, affine, statistics and mode (no storage shared)."""
        ref = bn.running_mean if bn.running_mean is not None else bn.weight
        layer = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, r_max, d_max,
                    warmup_steps, ramp_steps, device=None if ref is None else ref.device,
                    dtype=None if ref is None else ref.dtype)
        return copy_bn_state(bn, layer)


class BatchRenorm1d(BatchRenorm):
    _expected_dims = (2, 3)


class BatchRenorm2d(BatchRenorm):
    _expected_dims = (4,)


class BatchRenorm3d(BatchRenorm):
    _expected_dims = (5,)
