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
from .groupnorm import GroupNormPost
from .proxynorm import ProxyNormAct, param_groups, proxy_quantiles
from .stdconv import StdConv, StdConv1d, StdConv2d, StdConv3d

__all__ = [
    "BatchNormPost",
    "BatchNormPost1d",
    "BatchNormPost2d",
    "BatchNormPost3d",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GroupNormPost",
    "is_batchnorm",
    "ProxyNormAct",
    "param_groups",
    "proxy_quantiles",
    "StdConv",
    "StdConv1d",
    "StdConv2d",
    "StdConv3d",
]


def is_batchnorm(module: nn.Module) -> bool:
    """True for every BatchNorm-like module normfx knows: ``_BatchNorm`` subclasses and Frozen BN."""
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm))
