"""MixNet-style mixed-kernel net with Inception-style concatenations: every BN sits after a channel concat of
conv outputs or before a channel split into convs, so only the slice-by-slice folds remove it.

- :class:`MixedDepthwise` (MixNet's MixConv): ``torch.split`` → depthwise 3×3 / 5×5 / 7×7 → ``torch.cat`` → BN.
- :class:`GroupedPointwise` (MixNet's grouped 1×1 projection): ``x.chunk`` → 1×1 convs → ``torch.concat(dim=-3)``
  → BN.
- :class:`NormSplit`: a BN on a residual sum (or an activation) → channel split (slicing ``y[:, :a]`` or
  ``y.split``) → unpadded 1×1 convs → ``torch.cat`` → BN → ReLU.
- :class:`Inception`: 1×1 ∥ 3×3 ∥ 5×5 ∥ pool→1×1 → ``torch.cat`` → BN → ReLU.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MixedDepthwise", "GroupedPointwise", "NormSplit", "Inception", "MixBlock", "MixConvNet", "mixconv"]


def _sizes(channels: int, parts: int) -> list[int]:
    """MixNet's channel split: equal parts, the first ones one larger when it does not divide."""
    base, extra = divmod(channels, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class MixedDepthwise(nn.Module):
    """Channel split → depthwise convs of kernels 3/5/7 (zero-padded, same size) → concat → BN → SiLU."""

    def __init__(self, channels: int, kernels: tuple[int, ...] = (3, 5, 7)) -> None:
        super().__init__()
        self.sizes = _sizes(channels, len(kernels))
        self.convs = nn.ModuleList(nn.Conv2d(c, c, k, padding=k // 2, groups=c, bias=False)
                                   for c, k in zip(self.sizes, kernels))
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.sizes, dim=1)
        y = torch.cat([conv(parts[i]) for i, conv in enumerate(self.convs)], dim=1)
        return self.act(self.bn(y))


class GroupedPointwise(nn.Module):
    """MixNet's grouped 1×1 conv: ``x.chunk(groups, 1)`` → one 1×1 conv per chunk → ``torch.concat(dim=-3)`` → BN."""

    def __init__(self, cin: int, cout: int, groups: int = 2) -> None:
        super().__init__()
        self.groups = groups
        self.convs = nn.ModuleList(nn.Conv2d(cin // groups, cout // groups, 1, bias=i % 2 == 1) for i in range(groups))
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = x.chunk(self.groups, 1)
        return self.bn(torch.concat([conv(parts[i]) for i, conv in enumerate(self.convs)], dim=-3))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.expand(self.act(self.reduce(x.mean((2, 3), keepdim=True)))))
        return x * gate


class MixBlock(nn.Module):
    """MixNet block: 1×1 expand (conv → BN → SiLU) → mixed depthwise → squeeze-excite → grouped 1×1 projection,
    residual add."""

    def __init__(self, channels: int, expand: int = 2) -> None:
        super().__init__()
        hidden = channels * expand
        self.expand = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.SiLU())
        self.mix = MixedDepthwise(hidden)
        self.se = SqueezeExcite(hidden, max(4, channels // 4))
        self.project = GroupedPointwise(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.se(self.mix(self.expand(x))))


class NormSplit(nn.Module):
    """BN on a tensor no layer produces alone (a residual sum, an activation) → channel split → 1×1 convs →
    concat → BN → ReLU. ``by_method`` splits with ``y.split(size, dim=1)``, else slices ``y[:, :a]``, ``y[:, a:]``."""

    def __init__(self, cin: int, cout: int, by_method: bool = False) -> None:
        super().__init__()
        self.half, self.by_method = cin // 2, by_method
        self.bn_in = nn.BatchNorm2d(cin)
        self.conv_a = nn.Conv2d(self.half, cout // 2, 1, bias=False)
        self.conv_b = nn.Conv2d(cin - self.half, cout - cout // 2, 1, bias=True)
        self.bn_out = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn_in(x)
        if self.by_method:
            a, b = y.split(self.half, dim=1)
        else:
            a, b = y[:, : self.half], y[:, self.half :]
        return self.act(self.bn_out(torch.cat([self.conv_a(a), self.conv_b(b)], 1)))


class Inception(nn.Module):
    """Inception-style block: 1×1 ∥ 3×3 ∥ 5×5 ∥ 3×3 max-pool → 1×1, concatenated → BN → ReLU."""

    def __init__(self, cin: int, branch: int) -> None:
        super().__init__()
        self.b1 = nn.Conv2d(cin, branch, 1, bias=False)
        self.b3 = nn.Conv2d(cin, branch, 3, padding=1, bias=False)
        self.b5 = nn.Conv2d(cin, branch, 5, padding=2, bias=True)
        self.pool = nn.MaxPool2d(3, stride=1, padding=1)
        self.bp = nn.Conv2d(cin, branch, 1, bias=False)
        self.bn = nn.BatchNorm2d(4 * branch)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(self.pool(x))], 1)
        return self.act(self.bn(y))


class MixConvNet(nn.Module):
    """stem conv-BN-SiLU → MixBlock → NormSplit (slicing) → max-pool → Inception → NormSplit (``.split``) →
    pool → linear."""

    def __init__(self, in_channels: int = 3, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.SiLU())
        self.block = MixBlock(width)
        self.split1 = NormSplit(width, 24)
        self.down = nn.MaxPool2d(2)
        self.inception = Inception(24, 8)
        self.split2 = NormSplit(32, 32, by_method=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.split1(self.block(self.stem(x)))
        x = self.split2(self.inception(self.down(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def mixconv() -> nn.Module:
    return MixConvNet()
