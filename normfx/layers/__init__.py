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
from .ghost import GhostBatchNorm, GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from .groupnorm import GroupNormPost
from .proxynorm import ProxyNormAct, param_groups, proxy_quantiles
from .renorm import BatchRenorm, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from .separate import SeparateBatchNorm, SeparateBatchNorm1d, SeparateBatchNorm2d, SeparateBatchNorm3d, use_domain
from .stdconv import StdConv, StdConv1d, StdConv2d, StdConv3d
from .sync import SyncBatchNorm
from .virtual import VirtualBatchNorm, VirtualBatchNorm1d, VirtualBatchNorm2d, VirtualBatchNorm3d, capture_reference

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
    "GhostBatchNorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "BatchRenorm",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "SeparateBatchNorm",
    "SeparateBatchNorm1d",
    "SeparateBatchNorm2d",
    "SeparateBatchNorm3d",
    "use_domain",
    "SyncBatchNorm",
    "VirtualBatchNorm",
    "VirtualBatchNorm1d",
    "VirtualBatchNorm2d",
    "VirtualBatchNorm3d",
    "capture_reference",
]


def is_batchnorm(module: nn.Module) -> bool:
    """True for every BatchNorm-like module normfx knows: ``_BatchNorm`` subclasses and Frozen BN."""
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm))
