"""Trap models: patterns that naive BN rewrites get wrong or skip silently.

- ``trap_bn_act``: a timm-style ``BatchNormAct2d`` (a BatchNorm2d subclass owning its activation);
  ``torch.fx.experimental.optimization.fuse`` ignores it, and folding must keep the activation.
- ``trap_functional_bn``: ``F.batch_norm`` on a module's own buffers/parameters, no BN module.
- ``trap_shared_conv``: one conv called twice, only one call followed by a BN.
- ``trap_shared_bn``: one BN called twice per forward, after two different convs.
- ``trap_untraceable``: a submodule with data-dependent control flow (torch.fx cannot trace it)
  holding a conv+BN, between ordinary traceable conv+BN blocks.
- ``trap_syncbn``: ``nn.SyncBatchNorm`` after a conv, used in eval without torch.distributed.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BatchNormAct2d", "ConvFunctionalBN", "DataDependentBlock", "conv_bn_relu",
    "trap_bn_act", "trap_functional_bn", "trap_shared_conv", "trap_shared_bn", "trap_untraceable", "trap_syncbn",
]


def conv_bn_relu(
    cin: int, cout: int, stride: int = 1, bn: Callable[[int], nn.Module] = nn.BatchNorm2d
) -> nn.Sequential:
    """conv3x3 (no bias) → BN → ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), bn(cout), nn.ReLU())


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm2d followed by its own activation ``self.act``, as timm's ``BatchNormAct2d``.

    The forward calls ``F.batch_norm`` directly (as timm does), so torch.fx traces through it.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, act_layer: Callable[[], nn.Module] = nn.ReLU,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        x = F.batch_norm(
            x,
            self.running_mean if use_running else None,
            self.running_var if use_running else None,
            self.weight,
            self.bias,
            bn_training,
            factor,
            self.eps,
        )
        return self.act(x)


class ConvFunctionalBN(nn.Module):
    """conv3x3 → ``F.batch_norm`` on registered buffers ``rm``/``rv`` and parameters ``w``/``b`` → ReLU."""

    #: where :func:`normfx.models.init.randomize_batchnorm` finds this module's BN tensors
    bn_tensor_names = ("rm", "rv", "w", "b")

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.register_buffer("rm", torch.zeros(cout))
        self.register_buffer("rv", torch.ones(cout))
        self.w = nn.Parameter(torch.ones(cout))
        self.b = nn.Parameter(torch.zeros(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.batch_norm(self.conv(x), self.rm, self.rv, self.w, self.b, False, 0.1, 1e-5)
        return F.relu(y)


class DataDependentBlock(nn.Module):
    """conv3x3 → BN, then a branch on the data (``if y.sum() > 0``) that torch.fx cannot trace."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if y.sum() > 0:
            return torch.relu(y)
        return torch.relu(-y)


class _Classifier(nn.Module):
    """Global average pool → linear."""

    def __init__(self, channels: int, num_classes: int = 10) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))


class BNActNet(nn.Module):
    """conv/2 → BatchNormAct2d(ReLU) → conv/2 → BatchNormAct2d(SiLU), then a residual
    conv → BatchNormAct2d(ReLU)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn2 = BatchNormAct2d(2 * width, act_layer=nn.SiLU)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=True)
        self.bn3 = BatchNormAct2d(2 * width)
        self.head = _Classifier(2 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        x = x + self.bn3(self.conv3(x))
        return self.head(x)


class FunctionalBNNet(nn.Module):
    """conv+BN module stem, then two conv + functional-BN blocks."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, width, stride=2)
        self.block1 = ConvFunctionalBN(width, width)
        self.block2 = ConvFunctionalBN(width, 2 * width)
        self.head = _Classifier(2 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.block1(self.stem(x))))


class SharedConvNet(nn.Module):
    """``shared`` conv called twice: ``relu(bn(shared(y))) + shared(branch(y))``; only one call has a BN."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, width, stride=2)
        self.branch = conv_bn_relu(width, width)
        self.shared = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.head = _Classifier(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        a = self.relu(self.bn(self.shared(y)))
        b = self.shared(self.branch(y))
        return self.head(a + b)


class SharedBNNet(nn.Module):
    """One ``bn`` module applied after two different convs in the same forward."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, width, stride=2)
        self.conv_a = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.conv_b = nn.Conv2d(width, width, 1, bias=True)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.head = _Classifier(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        a = self.relu(self.bn(self.conv_a(y)))
        b = self.relu(self.bn(self.conv_b(y)))
        return self.head(a + b)


class UntraceableNet(nn.Module):
    """Traceable conv+BN blocks around a :class:`DataDependentBlock`."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, width, stride=2)
        self.gate = DataDependentBlock(width)
        self.tail = conv_bn_relu(width, 2 * width, stride=2)
        self.head = _Classifier(2 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.tail(self.gate(self.stem(x))))


class SyncBNNet(nn.Module):
    """conv → SyncBatchNorm → ReLU, then an ordinary conv → BatchNorm2d → ReLU."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.block1 = conv_bn_relu(3, width, stride=2, bn=nn.SyncBatchNorm)
        self.block2 = conv_bn_relu(width, 2 * width, stride=2)
        self.head = _Classifier(2 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.block1(x)))


def trap_bn_act() -> BNActNet:
    return BNActNet()


def trap_functional_bn() -> FunctionalBNNet:
    return FunctionalBNNet()


def trap_shared_conv() -> SharedConvNet:
    return SharedConvNet()


def trap_shared_bn() -> SharedBNNet:
    return SharedBNNet()


def trap_untraceable() -> UntraceableNet:
    return UntraceableNet()


def trap_syncbn() -> SyncBNNet:
    return SyncBNNet()
