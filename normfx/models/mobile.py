"""Mobile architectures, torchvision-style layout at reduced width and depth: MobileNetV2 (inverted
residuals, depthwise convs, ReLU6, linear bottleneck) and EfficientNet-B0 (MBConv with SiLU and
squeeze-excitation)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

__all__ = ["ConvBNAct", "InvertedResidual", "MobileNetV2", "SqueezeExcitation", "MBConv", "EfficientNet",
           "mobilenet_v2", "efficientnet_b0"]


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor`` without going below 90 % of it."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias, 'same' padding) → BatchNorm2d → activation."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                 act: Callable[[], nn.Module] = lambda: nn.ReLU6(inplace=True)) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            act(),
        )


class InvertedResidual(nn.Module):
    """Expand 1x1 (if ratio > 1) → depthwise 3x3 → linear projection 1x1 + BN (no activation)."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNAct(cin, hidden, 1))
        layers += [ConvBNAct(hidden, hidden, 3, stride, groups=hidden), nn.Conv2d(hidden, cout, 1, bias=False),
                   nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """Stem conv3x3/2, inverted residual stages ``(t, c, n, s)``, 1x1 head conv, pool, dropout, linear."""

    def __init__(self, settings: Sequence[tuple[int, int, int, int]], width_mult: float = 0.5,
                 last_channel: int = 640, num_classes: int = 10) -> None:
        super().__init__()
        cin = make_divisible(32 * width_mult)
        layers: list[nn.Module] = [ConvBNAct(3, cin, 3, 2)]
        for t, c, n, s in settings:
            cout = make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(ConvBNAct(cin, last_channel, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last_channel, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class SqueezeExcitation(nn.Module):
    """Global pool → conv1x1 (bias) → SiLU → conv1x1 (bias) → sigmoid gate on the input."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.act = nn.SiLU(inplace=True)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.act(self.fc1(self.avgpool(x)))))


class MBConv(nn.Module):
    """Expand 1x1 (SiLU) → depthwise kxk (SiLU) → squeeze-excitation → projection 1x1 + BN;
    residual if the shapes match."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = make_divisible(cin * expand_ratio)
        self.use_res_connect = stride == 1 and cin == cout
        silu = lambda: nn.SiLU(inplace=True)  # noqa: E731
        layers: list[nn.Module] = []
        if hidden != cin:
            layers.append(ConvBNAct(cin, hidden, 1, act=silu))
        layers += [
            ConvBNAct(hidden, hidden, kernel, stride, groups=hidden, act=silu),
            SqueezeExcitation(hidden, max(1, cin // 4)),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.block(x)
        return self.block(x)


class EfficientNet(nn.Module):
    """Stem conv3x3/2 (SiLU), MBConv stages ``(expand, kernel, stride, channels, repeats)``, 1x1 head,
    pool, dropout, linear."""

    def __init__(self, stages: Sequence[tuple[int, int, int, int, int]], width_mult: float = 0.5,
                 head_channels: int = 640, num_classes: int = 10) -> None:
        super().__init__()
        silu = lambda: nn.SiLU(inplace=True)  # noqa: E731
        cin = make_divisible(32 * width_mult)
        layers: list[nn.Module] = [ConvBNAct(3, cin, 3, 2, act=silu)]
        for expand, kernel, stride, channels, repeats in stages:
            cout = make_divisible(channels * width_mult)
            blocks = []
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if i == 0 else 1, expand))
                cin = cout
            layers.append(nn.Sequential(*blocks))
        layers.append(ConvBNAct(cin, head_channels, 1, act=silu))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(head_channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def mobilenet_v2() -> MobileNetV2:
    """MobileNetV2 at width 0.5 with fewer repeats per stage (11 inverted residual blocks)."""
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 2, 2), (6, 96, 1, 1), (6, 160, 2, 2),
                (6, 320, 1, 1)]
    return MobileNetV2(settings)


def efficientnet_b0() -> EfficientNet:
    """EfficientNet-B0 stages (B0 kernels, strides, expansions) at width 0.5 with fewer repeats (10 MBConv blocks)."""
    stages = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 2), (6, 5, 1, 112, 1),
              (6, 5, 2, 192, 1), (6, 3, 1, 320, 1)]
    return EfficientNet(stages)
