"""Ghost BatchNorm: normalize each *virtual batch* of ``virtual_batch_size`` samples on its own statistics.

Decreases the normalization batch size (NBS) below the SGD batch (tensorpack/TF's ``virtual_batch_size=``).

Rules (documented in docs/training.md, tested in tests/test_ghost_bn.py):

* A batch of N samples is cut, in order, into virtual batches of ``virtual_batch_size`` samples; when N is
  not a multiple, the **last virtual batch holds the remainder** (``torch.split``'s rule). A remainder with a
  single value per channel cannot be normalized: :class:`~normfx.errors.InputDataError` says so. A batch of
  at most ``virtual_batch_size`` samples is one virtual batch: the layer is then BatchNorm, bit for bit
  (output, running statistics and ``num_batches_tracked``).
* **Every virtual batch updates the EMA**, in order, with the momentum ``m' = 1 − (1 − m)^(1/k)`` for k
  virtual batches, so that one forward moves the EMA as far as one BatchNorm step (the same horizon in
  steps); ``num_batches_tracked`` counts virtual batches. With ``momentum=None`` the running statistics are
  the cumulative average over all virtual batches. So a forward equals BatchNorm (momentum ``m'``) run on each
  virtual batch separately — output, gradients and state.
* In eval mode (with running statistics) the layer is BatchNorm: the same state_dict, the same output.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputDataError
from ._batch_stats import (
    check_input_dim,
    check_positive_int,
    copy_bn_state,
    ema_factors,
    updates_statistics,
    uses_batch_statistics,
)

__all__ = ["GhostBatchNorm", "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d", "virtual_batch_sizes"]


def virtual_batch_sizes(batch: int, virtual_batch_size: int) -> list[int]:
    """The sizes of the virtual batches a batch of ``batch`` samples is cut into (the last holds the remainder)."""
    full, rest = divmod(batch, virtual_batch_size)
    return [virtual_batch_size] * full + ([rest] if rest else [])


class GhostBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over virtual batches of ``virtual_batch_size`` samples (the dimension-agnostic form: 2D–5D)."""

    _expected_dims: tuple[int, ...] = (2, 3, 4, 5)

    def __init__(self, num_features: int, virtual_batch_size: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.virtual_batch_size = check_positive_int(type(self).__name__, "virtual_batch_size", virtual_batch_size)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        check_input_dim(self, x, self._expected_dims)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not uses_batch_statistics(self) or x.shape[0] <= self.virtual_batch_size:
            return super().forward(x)  # eval, or one virtual batch: BatchNorm itself
        sizes = virtual_batch_sizes(x.shape[0], self.virtual_batch_size)
        per_channel = math.prod(x.shape[2:])
        if self.virtual_batch_size * per_channel == 1:
            raise InputDataError(
                f"{type(self).__name__}: virtual_batch_size=1 on input of shape {list(x.shape)} leaves 1 value per "
                "channel in every virtual batch; use virtual_batch_size >= 2"
            )
        if sizes[-1] * per_channel == 1:
            raise InputDataError(
                f"{type(self).__name__}: a batch of {x.shape[0]} leaves a last virtual batch of 1 sample with 1 value "
                f"per channel (virtual_batch_size={self.virtual_batch_size}); use a batch size that leaves 0 or >= 2 "
                "samples over"
            )
        full = (len(sizes) - (sizes[-1] != self.virtual_batch_size)) * self.virtual_batch_size
        parts = [self._normalize_equal(x[:full])] if full else []
        if full < x.shape[0]:
            parts.append(F.batch_norm(x[full:], None, None, self.weight, self.bias, True, 0.0, self.eps))
        if updates_statistics(self):
            self._update_ema(x.detach(), sizes)
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _normalize_equal(self, x: torch.Tensor) -> torch.Tensor:
        """k equal virtual batches in one BatchNorm kernel: samples of virtual batch i become channels i·C … i·C+C−1."""
        v, c, rest = self.virtual_batch_size, x.shape[1], x.shape[2:]
        k = x.shape[0] // v
        grouped = x.reshape(k, v, c, *rest).transpose(0, 1).reshape(v, k * c, *rest)
        weight = self.weight.repeat(k) if self.weight is not None else None
        bias = self.bias.repeat(k) if self.bias is not None else None
        y = F.batch_norm(grouped, None, None, weight, bias, True, 0.0, self.eps)
        return y.reshape(v, k, c, *rest).transpose(0, 1).reshape(x.shape)

    @torch.no_grad()
    def _update_ema(self, x: torch.Tensor, sizes: list[int]) -> None:
        """Each virtual batch in order through BatchNorm's own statistics-update kernel (bit for bit BatchNorm
        run on that chunk with the factor given)."""
        start = 0
        for size, factor in zip(sizes, ema_factors(self, len(sizes))):
            torch.batch_norm_update_stats(x[start:start + size], self.running_mean, self.running_var, factor)
            start += size

    @classmethod
    def from_batchnorm(cls, bn: nn.Module, virtual_batch_size: int) -> "GhostBatchNorm":
        """A Ghost BN with ``bn``'s eps, momentum, affine, statistics and mode (no storage shared)."""
        ref = bn.weight if bn.weight is not None else bn.running_mean
        ghost = cls(bn.num_features, virtual_batch_size, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                    device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)
        return copy_bn_state(bn, ghost)


class GhostBatchNorm1d(GhostBatchNorm):
    _expected_dims = (2, 3)


class GhostBatchNorm2d(GhostBatchNorm):
    _expected_dims = (4,)


class GhostBatchNorm3d(GhostBatchNorm):
    _expected_dims = (5,)
