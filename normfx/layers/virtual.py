"""Virtual BatchNorm: a larger normalization batch from extra forward-only samples.

In training, the statistics are taken over the batch **concatenated with a reference batch** of up to
``reference_size`` samples at this layer; only the batch is normalized and returned, and no gradient flows
into the reference part (it is detached). The reference is

* ``reference="recent"`` (default): a FIFO of the most recent ``reference_size`` inputs this layer saw in
  training (filled after each step; empty at first, reset when the per-sample shape changes), or
* ``reference="fixed"``: a batch you set with :meth:`VirtualBatchNorm.set_reference` or, for every layer of a
  model at once, with :func:`capture_reference` (one forward of a reference input batch; each layer keeps its
  own input, normalized on the reference's own statistics as in Salimans et al. 2016).

The running statistics (EMA) follow the statistics used (batch ∪ reference). In eval mode the layer is
BatchNorm (same state_dict; the reference is a non-persistent buffer). Cost: each training step normalizes
over N + R samples instead of N (``last_reference_samples`` holds R of the last step); measured in
``benchmarks/bench_bn_variants.py``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from ..errors import InputDataError, PolicyError
from ._batch_stats import (
    check_input_dim,
    check_positive_int,
    copy_bn_state,
    reduce_dims,
    updates_statistics,
    uses_batch_statistics,
)

__all__ = ["VirtualBatchNorm", "VirtualBatchNorm1d", "VirtualBatchNorm2d", "VirtualBatchNorm3d", "capture_reference"]

_MODES = ("recent", "fixed")


class VirtualBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics also cover a detached reference batch (2D–5D inputs)."""

    _expected_dims: tuple[int, ...] = (2, 3, 4, 5)

    def __init__(self, num_features: int, reference_size: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, reference: str = "recent",
                 device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.reference_size = check_positive_int(type(self).__name__, "reference_size", reference_size)
        if reference not in _MODES:
            raise PolicyError(f"{type(self).__name__}: reference must be one of {', '.join(_MODES)}, got {reference!r}")
        self.reference_mode = reference
        self.register_buffer("reference", None, persistent=False)
        self.last_reference_samples = 0
        self._capturing = False

    def _check_input_dim(self, x: torch.Tensor) -> None:
        check_input_dim(self, x, self._expected_dims)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", reference_size={self.reference_size}, reference={self.reference_mode!r}"

    @torch.no_grad()
    def set_reference(self, reference: torch.Tensor | None) -> None:
        """Use ``reference`` (samples × channels × …, at most ``reference_size`` kept) as the fixed reference."""
        if reference is not None:
            self._check_input_dim(reference)
            if reference.shape[1] != self.num_features:
                raise InputDataError(f"{type(self).__name__}: reference has {reference.shape[1]} channels, the layer "
                                     f"{self.num_features}")
            reference = reference.detach()[: self.reference_size].clone()
        self.reference = reference

    def _usable_reference(self, x: torch.Tensor) -> torch.Tensor | None:
        ref = self.reference
        if ref is None or ref.shape[1:] != x.shape[1:]:
            if ref is not None and self.reference_mode == "fixed":
                raise InputDataError(f"{type(self).__name__}: the fixed reference has per-sample shape "
                                     f"{list(ref.shape[1:])}, the input {list(x.shape[1:])}; capture a new one")
            return None
        return ref.to(dtype=x.dtype, device=x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if self._capturing:
            return self._capture(x)
        if not uses_batch_statistics(self):
            return super().forward(x)
        ref = self._usable_reference(x)
        self.last_reference_samples = 0 if ref is None else ref.shape[0]
        tracking = updates_statistics(self)
        # BatchNorm over the union (its kernel, its EMA update on the union's statistics), the batch's rows kept
        y = super().forward(x if ref is None else torch.cat([x, ref]))[: x.shape[0]]
        if tracking and self.reference_mode == "recent":
            self._remember(x.detach())
        return y

    def _normalize(self, x: torch.Tensor, stats_from: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(stats_from, dim=reduce_dims(x), correction=0)
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.weight is not None:
            scale, shift = scale * self.weight, shift * self.weight + self.bias
        view = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.view(view) + shift.view(view)

    @torch.no_grad()
    def _remember(self, x: torch.Tensor) -> None:
        ref = self.reference
        keep = [x] if ref is None or ref.shape[1:] != x.shape[1:] else [x, ref.to(dtype=x.dtype, device=x.device)]
        self.reference = torch.cat(keep)[: self.reference_size].clone()

    @torch.no_grad()
    def _capture(self, x: torch.Tensor) -> torch.Tensor:
        self.set_reference(x)
        return self._normalize(x, x)

    @classmethod
    def from_batchnorm(cls, bn: nn.Module, reference_size: int, reference: str = "recent") -> "VirtualBatchNorm":
        ref = bn.weight if bn.weight is not None else bn.running_mean
        layer = cls(bn.num_features, reference_size, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                    reference, device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)
        return copy_bn_state(bn, layer)


class VirtualBatchNorm1d(VirtualBatchNorm):
    _expected_dims = (2, 3)


class VirtualBatchNorm2d(VirtualBatchNorm):
    _expected_dims = (4,)


class VirtualBatchNorm3d(VirtualBatchNorm):
    _expected_dims = (5,)


@torch.no_grad()
def capture_reference(model: nn.Module, *inputs: Any, **kwargs: Any) -> int:
    """Run ``model(*inputs, **kwargs)`` once (no gradient, no running statistics updated) and make each
    :class:`VirtualBatchNorm` keep its input as its fixed reference; returns the number of layers set.

    Each layer normalizes the reference on the reference's own statistics during the capture, so deeper
    layers see reference activations as training would produce them.
    """
    layers = [m for m in model.modules() if isinstance(m, VirtualBatchNorm)]
    if not layers:
        raise InputDataError(f"capture_reference: {type(model).__name__} has no VirtualBatchNorm layer")
    from ..ema import statistics  # other BN layers of the model: batch statistics as in training, EMA untouched

    with contextlib.ExitStack() as stack:
        stack.enter_context(statistics(model, update_ema=False))
        for layer in layers:
            layer._capturing = True
            layer.reference_mode = "fixed"
            stack.callback(setattr, layer, "_capturing", False)
        model(*inputs, **kwargs)
    missing = [layer for layer in layers if layer.reference is None]
    if missing:
        raise InputDataError(f"capture_reference: {len(missing)} VirtualBatchNorm layer(s) were not called by the "
                             "forward; their reference is unset")
    return len(layers)
