"""Per-channel population moments in float64: one batch's (count, mean, M2) and Chan's merge.

Pure math on tensors; knows nothing about modules, hooks or data loaders.

A batch's moments are computed with shifted sums, accurate to float64 rounding of float32 partial
sums (relative error of the variance ~1e-7, measured): ``d = x - K`` with a per-channel shift ``K``
close to the batch mean, then ``r = sum(d)`` and ``q = sum(d**2)`` with float32 cascade summation
along each row of contiguous memory and float64 across rows; ``mean = K + r/n``,
``M2 = q - r**2/n``. Four kernels over the activation (subtract into a scratch buffer reused across
calls, sum, square in place, sum) and no float64 copy of it; float64 inputs are reduced in float64
with the same code.

The shift is the channel mean of the batch's first sample (a 1/N pass), or of the whole batch when a
sample has fewer than 16 values per channel. It depends on the batch alone, so a batch gives the same
bits wherever it is processed (alone, after other batches, on another rank). The rounding error of
``M2`` grows like ``1 + (mean - K)**2 / var``; when the shift turns out far from the mean
(``(mean - K)**2 > var`` in some channel, so the error could exceed 2x) the batch is redone with
``K = mean``.

The population estimate over many batches is Chan et al.'s parallel merge, done k-way in float64:
``mean = sum(n_i mean_i) / N``, ``M2 = sum(M2_i) + sum(n_i (mean_i - mean)**2)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["Moments", "BatchSums", "Workspace", "batch_sums", "to_moments", "batch_moments", "merge", "SHIFT_TOLERANCE"]

#: a batch is recomputed with its own mean as shift when (mean - shift)^2 > SHIFT_TOLERANCE * var
SHIFT_TOLERANCE = 1.0
#: below this many values per channel in one sample, the shift is the whole batch's mean
_MIN_SAMPLE_VALUES = 16


@dataclass
class Moments:
    """Count, mean and sum of squared deviations (M2) of each channel, in float64."""

    count: float
    mean: torch.Tensor
    m2: torch.Tensor

    @property
    def var_biased(self) -> torch.Tensor:
        """Population variance ``M2 / n`` (what BatchNorm normalizes with in training mode)."""
        return self.m2 / self.count

    @property
    def var_unbiased(self) -> torch.Tensor:
        """Sample variance ``M2 / (n - 1)`` (what PyTorch stores in ``running_var``)."""
        return self.m2 / (self.count - 1) if self.count > 1 else torch.full_like(self.m2, float("nan"))


@dataclass
class BatchSums:
    """One batch's shifted partial sums, as computed in the forward (in the input's float dtype).

    ``r[i, c]`` and ``q[i, c]`` are the sums of ``x - shift[c]`` and ``(x - shift[c])**2`` over the
    values of channel c in row i (one sample of a contiguous input; the whole batch otherwise).
    """

    count: int
    shift: torch.Tensor
    r: torch.Tensor
    q: torch.Tensor


class Workspace:
    """A scratch buffer reused for ``x - shift`` across calls: a fresh activation-sized temporary per
    BN call costs page faults on every call (large allocations go back to the OS when freed)."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def like(self, x: torch.Tensor) -> torch.Tensor:
        """An uninitialized tensor with the shape, dtype, device and strides of ``x``."""
        buf = self._buffer
        size = x.numel()
        if buf is None or buf.numel() < size or buf.dtype != x.dtype or buf.device != x.device:
            buf = self._buffer = torch.empty(size, dtype=x.dtype, device=x.device)
        if x.is_contiguous():
            return buf[:size].view(x.shape)
        return torch.empty_like(x)  # other layouts: let the allocator give matching strides


def _around(x: torch.Tensor, shift: torch.Tensor, workspace: Workspace | None) -> tuple[torch.Tensor, torch.Tensor]:
    k = shift.view((1, -1) + (1,) * (x.dim() - 2))
    d = torch.sub(x, k, out=workspace.like(x)) if workspace is not None else x - k
    if x.dim() == 3:  # (N, C, L) view of a contiguous input: cascade sums along each row
        return d.sum(2), d.square_().sum(2)
    dims = (0,) + tuple(range(2, x.dim()))  # channels_last and other layouts: walk the strides
    return d.sum(dims).unsqueeze(0), d.square_().sum(dims).unsqueeze(0)


def batch_sums(x: torch.Tensor, workspace: Workspace | None = None) -> tuple[BatchSums, torch.Tensor, torch.Tensor]:
    """Shifted sums of each channel (dim 1) of ``x``, plus the batch mean and biased variance in
    ``x``'s float dtype (what BatchNorm normalizes with in training mode).

    Half/bfloat16 inputs are widened to float32; ``x`` is never modified. See the module docstring
    for the shift and the redo rule. ``workspace`` holds the temporary ``x - shift`` between calls.
    """
    if x.dim() < 2 or x.shape[1] == 0:
        raise ValueError(f"expected an input with a channel dimension (N, C, ...), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    channels = x.shape[1]
    n = x.numel() // channels
    if x.is_contiguous():
        x = x.view(x.shape[0], channels, -1)
    if x.shape[0] > 1 and n // x.shape[0] >= _MIN_SAMPLE_VALUES:
        head = x[0].reshape(channels, -1)
    else:
        head = x.transpose(0, 1).reshape(channels, -1)
    shift = head.sum(1).div_(head.shape[1])
    for attempt in range(2):
        r, q = _around(x, shift, workspace)
        delta = r.sum(0).div_(n)  # mean - shift
        square = delta * delta
        var = q.sum(0).div_(n).sub_(square)
        # the rounding error of M2 grows like 1 + (mean - shift)^2 / var: redo around the mean
        bound = var if SHIFT_TOLERANCE == 1.0 else var * SHIFT_TOLERANCE
        if attempt or not bool((square > bound).any()):
            break
        shift = delta.add_(shift)
    return BatchSums(n, shift, r, q), delta.add_(shift), var.clamp_(min=0.0)


def to_moments(sums: Sequence[BatchSums]) -> list[Moments]:
    """Float64 moments of each batch: ``mean = shift + R/n``, ``M2 = Q - R**2/n`` with the row sums
    ``R``, ``Q`` added in float64. Batches of the same shape are converted together."""
    out: list[Moments | None] = [None] * len(sums)
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(sums):
        groups.setdefault((tuple(s.r.shape), s.count), []).append(i)
    for (_, n), index in groups.items():
        r = torch.stack([sums[i].r for i in index]).sum(1, dtype=torch.float64)  # (k, C)
        q = torch.stack([sums[i].q for i in index]).sum(1, dtype=torch.float64)
        shift = torch.stack([sums[i].shift for i in index]).to(torch.float64)
        delta = r / n
        m2 = (q - r * delta).clamp_(min=0.0)
        mean = delta + shift
        for j, i in enumerate(index):
            out[i] = Moments(float(n), mean[j], m2[j])
    return out  # type: ignore[return-value]


def batch_moments(x: torch.Tensor) -> Moments:
    """Moments of each channel (dim 1) of ``x`` over every other dimension, in float64."""
    return to_moments([batch_sums(x)[0]])[0]


def merge(parts: Sequence[Moments]) -> Moments | None:
    """Chan's parallel merge of many per-batch moments into the population moments (float64).

    Parts with a zero count are ignored; ``None`` when nothing is left.
    """
    parts = [p for p in parts if p.count > 0]
    if not parts:
        return None
    if len(parts) == 1:
        p = parts[0]
        return Moments(p.count, p.mean.clone(), p.m2.clone())
    counts = torch.tensor([p.count for p in parts], dtype=torch.float64, device=parts[0].mean.device)
    means = torch.stack([p.mean for p in parts])
    m2s = torch.stack([p.m2 for p in parts])
    total = float(counts.sum())
    weights = counts.unsqueeze(1)
    mean = (weights * means).sum(0) / total
    m2 = m2s.sum(0) + (weights * (means - mean).square()).sum(0)
    return Moments(total, mean, m2)
