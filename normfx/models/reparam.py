"""Multi-branch blocks trained for structural reparameterization, at a small width:

- ``repvgg``: RepVGG-A-style stages — each block sums a 3×3 conv+BN, a 1×1 conv+BN and (when the shapes
  allow: stride 1, as many output as input channels) an identity BN reading the block input, then ReLU;
  the first block of each stage has stride 2 and no identity branch.
- ``mobileone``: MobileOne-style stages — a depthwise block (k parallel depthwise 3×3 conv+BN branches, a
  depthwise 1×1 conv+BN scale branch, an identity BN when the shapes allow) then a pointwise block (k parallel
  1×1 conv+BN branches, an identity BN when the shapes allow), each followed by ReLU.

A fused deployment holds exactly one conv per block (:class:`RepVGGBlock`, :class:`MobileOneBlock`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["RepVGGBlock", "MobileOneBlock", "RepVGG", "MobileOne", "repvgg", "mobileone"]


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout))


class RepVGGBlock(nn.Module):
    """3×3 conv+BN ∥ 1×1 conv+BN ∥ identity BN (stride 1 and cin == cout only) → add → ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv_kxk = _conv_bn(cin, cout, 3, stride, groups)
        self.conv_1x1 = _conv_bn(cin, cout, 1, stride, groups)
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_kxk(x) + self.conv_1x1(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return self.act(out)


class MobileOneBlock(nn.Module):
    """``branches`` parallel k×k conv+BN, a 1×1 conv+BN scale branch (k > 1 only), an identity BN (stride 1 and
    cin == cout only), summed, then ReLU. ``groups=cin`` makes it the depthwise block."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, branches: int = 3) -> None:
        super().__init__()
        self.conv_kxk = nn.ModuleList(_conv_bn(cin, cout, kernel, stride, groups) for _ in range(branches))
        self.conv_scale = _conv_bn(cin, cout, 1, stride, groups) if kernel > 1 else None
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_kxk[0](x)
        for branch in self.conv_kxk[1:]:
            out = out + branch(x)
        if self.conv_scale is not None:
            out = out + self.conv_scale(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return self.act(out)


class _Head(nn.Module):
    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))


class RepVGG(nn.Module):
    """Stem block (stride 2), then stages of RepVGG blocks (stride 2 first), global pool, linear classifier."""

    def __init__(self, widths: Sequence[int] = (16, 24, 32, 48), depths: Sequence[int] = (1, 2, 3, 1),
                 num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = RepVGGBlock(in_channels, widths[0], stride=2)
        blocks: list[nn.Module] = []
        cin = widths[0]
        for width, depth in zip(widths, depths):
            for i in range(depth):
                blocks.append(RepVGGBlock(cin, width, stride=2 if i == 0 else 1))
                cin = width
        self.stages = nn.Sequential(*blocks)
        self.head = _Head(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


class MobileOne(nn.Module):
    """Stem block (dense 3×3, stride 2, one branch + scale branch), then stages of depthwise + pointwise
    MobileOne blocks (the first depthwise block of a stage strided), global pool, linear classifier."""

    def __init__(self, widths: Sequence[int] = (16, 32, 48), depths: Sequence[int] = (1, 2, 2), branches: int = 3,
                 num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = MobileOneBlock(in_channels, widths[0], 3, stride=2, branches=1)
        blocks: list[nn.Module] = []
        cin = widths[0]
        for width, depth in zip(widths, depths):
            for i in range(depth):
                stride = 2 if i == 0 else 1
                blocks.append(MobileOneBlock(cin, cin, 3, stride=stride, groups=cin, branches=branches))
                blocks.append(MobileOneBlock(cin, width, 1, branches=branches))
                cin = width
        self.stages = nn.Sequential(*blocks)
        self.head = _Head(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


def repvgg() -> nn.Module:
    return RepVGG()


def mobileone() -> nn.Module:
    return MobileOne()
