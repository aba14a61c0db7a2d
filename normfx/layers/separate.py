"""Separate BatchNorm: one set of running statistics per data domain (non-i.i.d. data from several sources).

Each training batch comes from one domain; it is normalized with its batch statistics (as BatchNorm) and
updates only that domain's EMA. In eval, the chosen domain's running statistics are used. The affine is
shared by all domains (default) or per domain (``shared_affine=False``).

The domain is an argument (``layer(x, domain=1)``) or, for a layer deep inside a model whose forward does not
pass it on, a context: ``with use_domain(model, 1): model(x)``; otherwise the layer's ``domain`` attribute
(0 by default).

State: the keys of BatchNorm, stacked per domain — ``running_mean``/``running_var`` ``(K, C)``,
``num_batches_tracked`` ``(K,)``, ``weight``/``bias`` ``(C,)`` shared or ``(K, C)``. A BatchNorm checkpoint
loads into it (every domain gets the BN's numbers); :meth:`SeparateBatchNorm.to_batchnorm` gives one domain
back as a BatchNorm.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputDataError, PolicyError
from ._batch_stats import check_input_dim, check_positive_int

__all__ = ["SeparateBatchNorm", "SeparateBatchNorm1d", "SeparateBatchNorm2d", "SeparateBatchNorm3d", "use_domain"]


class SeparateBatchNorm(nn.Module):
    """BatchNorm with per-domain running statistics (and optionally per-domain affine); 2D–5D inputs."""

    _version = 2
    _expected_dims: tuple[int, ...] = (2, 3, 4, 5)

    def __init__(self, num_features: int, num_domains: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, shared_affine: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        name = type(self).__name__
        check_positive_int(name, "num_features", num_features)
        self.num_domains = check_positive_int(name, "num_domains", num_domains)
        if not track_running_stats:
            raise PolicyError(f"{name}: without running statistics there is nothing to separate; "
                              "track_running_stats must be True")
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.shared_affine, self.track_running_stats = affine, bool(shared_affine), True
        self.domain = 0
        shape = (num_features,) if shared_affine else (num_domains, num_features)
        self.weight = nn.Parameter(torch.ones(shape, **factory)) if affine else None
        self.bias = nn.Parameter(torch.zeros(shape, **factory)) if affine else None
        self.register_buffer("running_mean", torch.zeros(num_domains, num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_domains, num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.zeros(num_domains, dtype=torch.long, device=device))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, num_domains={self.num_domains}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, shared_affine={self.shared_affine}")

    def _domain(self, domain: int | None) -> int:
        d = self.domain if domain is None else domain
        if isinstance(d, torch.Tensor) and d.numel() == 1:
            d = int(d)
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d < self.num_domains:
            raise InputDataError(f"{type(self).__name__}: domain must be an integer in [0, {self.num_domains}), "
                                 f"got {d!r}")
        return d

    def affine_of(self, domain: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.weight is None or self.shared_affine:
            return self.weight, self.bias
        return self.weight[domain], self.bias[domain]

    def forward(self, x: torch.Tensor, domain: int | None = None) -> torch.Tensor:
        check_input_dim(self, x, self._expected_dims)
        d = self._domain(domain)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked[d].add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked[d])
        use_running = not self.training or self.track_running_stats  # BatchNorm's rule (normfx.ema switches it)
        weight, bias = self.affine_of(d)
        return F.batch_norm(x, self.running_mean[d] if use_running else None,
                            self.running_var[d] if use_running else None, weight, bias, self.training, factor, self.eps)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A BatchNorm checkpoint (per-channel tensors, a scalar counter): every domain gets its numbers.
        for key in ("running_mean", "running_var", "num_batches_tracked", "weight", "bias"):
            ours, theirs = getattr(self, key, None), state_dict.get(prefix + key)
            if isinstance(ours, torch.Tensor) and isinstance(theirs, torch.Tensor) and theirs.dim() < ours.dim():
                state_dict[prefix + key] = theirs.expand_as(ours).clone()
        if prefix + "num_batches_tracked" not in state_dict and (local_metadata.get("version") or 0) < 2:
            state_dict[prefix + "num_batches_tracked"] = torch.zeros_like(self.num_batches_tracked)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @classmethod
    def from_batchnorm(cls, bn: nn.Module, num_domains: int, shared_affine: bool = True) -> "SeparateBatchNorm":
        """Every domain starts from ``bn``'s statistics (and affine); no storage is shared with ``bn``."""
        ref = bn.running_mean if bn.running_mean is not None else bn.weight
        layer = cls(bn.num_features, num_domains, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                    shared_affine, device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)
        layer.load_state_dict({k: v.detach().clone() for k, v in bn.state_dict().items()})
        layer.train(bn.training)
        return layer

    def to_batchnorm(self, domain: int = 0, cls: type[nn.modules.batchnorm._BatchNorm] | None = None):
        """One domain as a plain BatchNorm (``cls``: default by input rank, dimension-agnostic → SyncBatchNorm)."""
        d = self._domain(domain)
        cls = cls or _BN_FOR_SEPARATE[type(self)]
        bn = cls(self.num_features, eps=self.eps, momentum=self.momentum, affine=self.affine,
                 device=self.running_mean.device, dtype=self.running_mean.dtype)
        weight, bias = self.affine_of(d)
        with torch.no_grad():
            if weight is not None:
                bn.weight.copy_(weight)
                bn.bias.copy_(bias)
            bn.running_mean.copy_(self.running_mean[d])
            bn.running_var.copy_(self.running_var[d])
            bn.num_batches_tracked.copy_(self.num_batches_tracked[d])
        return bn.train(self.training)


class SeparateBatchNorm1d(SeparateBatchNorm):
    _expected_dims = (2, 3)


class SeparateBatchNorm2d(SeparateBatchNorm):
    _expected_dims = (4,)


class SeparateBatchNorm3d(SeparateBatchNorm):
    _expected_dims = (5,)


_BN_FOR_SEPARATE = {SeparateBatchNorm: nn.SyncBatchNorm, SeparateBatchNorm1d: nn.BatchNorm1d,
                    SeparateBatchNorm2d: nn.BatchNorm2d, SeparateBatchNorm3d: nn.BatchNorm3d}


@contextlib.contextmanager
def use_domain(model: nn.Module, domain: int) -> Iterator[nn.Module]:
    """Inside the block every :class:`SeparateBatchNorm` of ``model`` uses ``domain``; restored afterwards."""
    layers = [m for m in model.modules() if isinstance(m, SeparateBatchNorm)]
    if not layers:
        raise InputDataError(f"use_domain: {type(model).__name__} has no SeparateBatchNorm layer "
                             "(rewrite it with the 'separate' policy first)")
    before = [m.domain for m in layers]
    for m in layers:
        m.domain = m._domain(domain)
    try:
        yield model
    finally:
        for m, d in zip(layers, before):
            m.domain = d
