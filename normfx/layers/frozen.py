"""Frozen BatchNorm: a constant per-channel affine with BatchNorm's state_dict layout.

Unlike detectron2's/timm's FrozenBatchNorm2d this covers 1d/2d/3d, keeps ``eps`` and ``momentum``
(so unfreezing restores the original layer), keeps an activation a BN subclass carried (the
``post`` modules, state_dict keys unchanged) and never aliases the source layer's storage.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .post import PostModules

__all__ = [
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "BatchNormPost",
    "BatchNormPost1d",
    "BatchNormPost2d",
    "BatchNormPost3d",
]


class FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed statistics and affine, stored as buffers (nothing to train).

    ``forward`` is ``F.batch_norm`` in inference mode, bit-identical to the source BN in eval.
    ``post`` holds modules applied after the normalization (an activation of a BN+act subclass);
    they keep their state_dict keys (``act.*``). A checkpoint of ``nn.BatchNorm*`` loads into
    this module (``affine=False`` ones included), and this module's state_dict loads into BN.
    """

    _version = 2
    _expected_dims: tuple[int, ...] = (2, 3, 4, 5)  # the dimension-agnostic form, frozen from SyncBatchNorm

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        *,
        affine: bool = True,
        post: Mapping[str, nn.Module] | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum  # not used here; remembered so that unfreezing restores it
        self.affine = affine  # False: no weight/bias (as BN with affine=False; state_dicts match it)
        self.register_buffer("weight", torch.ones(num_features, **factory) if affine else None)
        self.register_buffer("bias", torch.zeros(num_features, **factory) if affine else None)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        self.post_names: tuple[str, ...] = tuple(post or ())
        for name, module in (post or {}).items():
            self.add_module(name, module)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in self._expected_dims:
            raise ValueError(
                f"{type(self).__name__} expects a {' or '.join(f'{d}D' for d in self._expected_dims)} input, got {x.dim()}D"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        for name in self.post_names:
            y = getattr(self, name)(y)
        return y

    def scale_and_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-channel affine ``y = x * scale + shift`` this layer computes (in float64)."""
        from ..fold import bn_affine

        scale, shift = bn_affine(self.running_mean, self.running_var, self.weight, self.bias, self.eps)
        return torch.as_tensor(scale), torch.as_tensor(shift)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        version = local_metadata.get("version", None)
        # A BatchNorm checkpoint with affine=False has no weight/bias: identity affine.
        for key, fill in (("weight", 1.0), ("bias", 0.0)):
            if self.affine and prefix + key not in state_dict:
                state_dict[prefix + key] = torch.full_like(getattr(self, key), fill)
        # Version < 2 (old BN / detectron2 v1 checkpoints) has no num_batches_tracked.
        if (version is None or version < 2) and prefix + "num_batches_tracked" not in state_dict:
            state_dict[prefix + "num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}" + ("" if self.affine else ", affine=False")

    @classmethod
    def from_batchnorm(cls, bn: nn.Module, post: Mapping[str, nn.Module] | None = None) -> "FrozenBatchNorm":
        """A frozen copy of ``bn`` (any ``_BatchNorm``); no storage is shared with it."""
        ref = bn.running_mean if bn.running_mean is not None else bn.weight
        frozen = cls(bn.num_features, bn.eps, bn.momentum, affine=bn.weight is not None, post=post,
                     device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            if bn.weight is not None:
                frozen.weight.copy_(bn.weight.detach())
                frozen.bias.copy_(bn.bias.detach())
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
            if getattr(bn, "num_batches_tracked", None) is not None:
                frozen.num_batches_tracked.copy_(bn.num_batches_tracked)
        return frozen

    def to_batchnorm(self) -> nn.modules.batchnorm._BatchNorm:
        """A trainable BN (``BatchNormPost*`` when post modules exist) with the same numbers."""
        post = OrderedDict((n, getattr(self, n)) for n in self.post_names)
        cls = _BN_FOR_FROZEN[type(self)] if not post else _POST_FOR_FROZEN[type(self)]
        kwargs = {"post": post} if post else {}
        bn = cls(self.num_features, eps=self.eps, momentum=self.momentum, affine=self.affine,
                 device=self.running_mean.device, dtype=self.running_mean.dtype, **kwargs)
        with torch.no_grad():
            if self.affine:
                bn.weight.copy_(self.weight)
                bn.bias.copy_(self.bias)
            bn.running_mean.copy_(self.running_mean)
            bn.running_var.copy_(self.running_var)
            bn.num_batches_tracked.copy_(self.num_batches_tracked)
        return bn


class FrozenBatchNorm1d(FrozenBatchNorm):
    _expected_dims = (2, 3)


class FrozenBatchNorm2d(FrozenBatchNorm):
    _expected_dims = (4,)


class FrozenBatchNorm3d(FrozenBatchNorm):
    _expected_dims = (5,)


class BatchNormPost(PostModules):
    """Mixin: a trainable BN followed by ``post`` modules (what unfreezing a BN+act layer gives)."""


class BatchNormPost1d(BatchNormPost, nn.BatchNorm1d):
    pass


class BatchNormPost2d(BatchNormPost, nn.BatchNorm2d):
    pass


class BatchNormPost3d(BatchNormPost, nn.BatchNorm3d):
    pass


_BN_FOR_FROZEN = {FrozenBatchNorm: nn.SyncBatchNorm, FrozenBatchNorm1d: nn.BatchNorm1d, FrozenBatchNorm2d: nn.BatchNorm2d, FrozenBatchNorm3d: nn.BatchNorm3d}
_POST_FOR_FROZEN = {FrozenBatchNorm1d: BatchNormPost1d, FrozenBatchNorm2d: BatchNormPost2d, FrozenBatchNorm3d: BatchNormPost3d}
