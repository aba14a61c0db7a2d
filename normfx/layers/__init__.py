"""nn.Modules that normfx swaps into models."""

from torch import nn

from .frozen import (
    BatchNormPost,
    BatchNormPost1d,
    BatchNormPost2d,
    BatchNormPost3d,
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
)

__all__ = [
    "BatchNormPost",
    "BatchNormPost1d",
    "BatchNormPost2d",
    "BatchNormPost3d",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "is_batchnorm",
]


def is_batchnorm(module: nn.Module) -> bool:
    """True for every BatchNorm-like module normfx knows: ``_BatchNorm`` subclasses and Frozen BN."""
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm))
