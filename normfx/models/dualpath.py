"""Dual-path network (DPN-style, timm's ``DualPathBlock`` layout at small widths): every block reads the
concatenation of a residual path and a dense path through pre-activation units (BN→ReLU→conv), and its last
1x1 conv's output is split: the first channels are *added* to the residual path, the rest *concatenated* to
the dense path. The first block of a stage projects its input (BN→ReLU→conv1x1, split into both paths)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["DualPathBlock", "DualPathNet", "dualpath"]


class DualPathBlock(nn.Module):
    """BN→ReLU→conv1x1 → BN→ReLU→grouped conv3x3 (stride) → BN→ReLU→conv1x1 (residual + growth channels)."""

    def __init__(self, cin: int, residual: int, growth: int, mid: int, groups: int, stride: int = 1,
                 project: bool = False) -> None:
        super().__init__()
        self.residual = residual
        self.project = project
        if project:
            self.proj_bn = nn.BatchNorm2d(cin)
            self.proj_relu = nn.ReLU(inplace=True)
            self.proj = nn.Conv2d(cin, residual + 2 * growth, 1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.relu3 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(mid, residual + growth, 1, bias=False)

    def forward(self, x):
        x_in = torch.cat(x, 1) if isinstance(x, tuple) else x
        if self.project:
            w = self.proj(self.proj_relu(self.proj_bn(x_in)))
            res, dense = w[:, : self.residual], w[:, self.residual:]
        else:
            res, dense = x
        out = self.conv1(self.relu1(self.bn1(x_in)))
        out = self.conv2(self.relu2(self.bn2(out)))
        out = self.conv3(self.relu3(self.bn3(out)))
        return res + out[:, : self.residual], torch.cat([dense, out[:, self.residual:]], 1)


class DualPathNet(nn.Module):
    """Stem conv3x3/2→BN→ReLU→maxpool, dual-path stages, final BN→ReLU on the concatenated paths, pool, linear."""

    def __init__(self, stages: Sequence[tuple[int, int, int, int]] = ((16, 8, 16, 2), (32, 8, 32, 2)),
                 stem: int = 16, groups: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, stem, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(stem),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1))
        blocks, cin = [], stem
        for i, (residual, growth, mid, depth) in enumerate(stages):
            for j in range(depth):
                blocks.append(DualPathBlock(cin, residual, growth, mid, groups, stride=2 if i and not j else 1,
                                            project=j == 0))
                cin = residual + 2 * growth + (j + 1) * growth  # the projection's 2 growths, one per block
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat(self.blocks(self.stem(x)), 1)
        return self.fc(torch.flatten(self.pool(self.relu(self.norm(x))), 1))


def dualpath() -> DualPathNet:
    """Two stages of two dual-path blocks: residual 16/32, growth 8, grouped 3x3 (groups 4)."""
    return DualPathNet()
