"""A deep SiLU/squeeze-excitation network whose float32 run is measurably far from its float64 run.

Deep SiLU/SE networks with random weights and BN statistics are ill-conditioned in float32 (timm's
efficientnet_b0 and mixnet_s with randomized BN differ from their own float64 runs by 2.5e-4 and 3.1e-4),
while the zoo's calibrated models stay near 1e-7: every conv is rescaled to unit output, which keeps them
well-conditioned. This model carries the ill-conditioning on purpose, by the mechanism that makes fp32
logits noisy in practice — **cancellation**: its pooled features ride on a large offset common to every
channel (a linear "embedding" with a positive mean weight, after SiLU and pooling), and its classifier ignores that
common direction (every class's weight vector sums to zero). The offset cancels exactly in real arithmetic;
in float32 the rounding of the large values does not, so the logits' relative error is about
``eps32 x offset / logit``: measured 3.5e-5 for seed 0 (3.2e-5 with one torch thread), 6.2e-6 to 3.5e-5
over seeds 0-3 — by construction rather than by chance. The noise is made in the tail, which the fused
model shares, so a correct fold's error is about the floor (0.6-1.2x measured), within k = 2.

Layout: stem conv3x3/2 (SiLU), 16 MBConv blocks (expand 1x1 → depthwise 3x3 → SE → project 1x1 + BN,
residual), head conv 1x1 + BN + SiLU, global pool, embedding linear (no bias, no BN), linear classifier. Every BN follows
a conv, so ``fuse`` removes them all; the tail (embedding, pool, classifier) is the same in the original
and in the fused model.
"""

from __future__ import annotations

import torch
from torch import nn

from .mobile import ConvBNAct, SqueezeExcitation

__all__ = ["MBConvSE", "DeepSiLU", "deep_silu", "OFFSET_RATIO"]

#: mean of the embedding's weights, in units of their spread (sets the common offset)
OFFSET_RATIO = 5.0


def _silu() -> nn.Module:
    return nn.SiLU(inplace=True)


class MBConvSE(nn.Module):
    """Expand 1x1 (SiLU) → depthwise 3x3 (SiLU) → squeeze-excitation → projection 1x1 + BN, plus the input."""

    def __init__(self, channels: int, expand_ratio: int = 4) -> None:
        super().__init__()
        hidden = channels * expand_ratio
        self.block = nn.Sequential(
            ConvBNAct(channels, hidden, 1, act=_silu),
            ConvBNAct(hidden, hidden, 3, groups=hidden, act=_silu),
            SqueezeExcitation(hidden, max(1, channels // 4)),
            nn.Conv2d(hidden, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class DeepSiLU(nn.Module):
    """Stem, ``depth`` MBConv/SE blocks of ``width`` channels, head, offset embedding, pool, zero-sum classifier."""

    def __init__(self, depth: int = 16, width: int = 16, head_channels: int = 1024, num_classes: int = 100,
                 offset_ratio: float = OFFSET_RATIO) -> None:
        super().__init__()
        self.stem = ConvBNAct(3, width, 3, 2, act=_silu)
        self.blocks = nn.Sequential(*[MBConvSE(width) for _ in range(depth)])
        self.head = ConvBNAct(width, head_channels, 1, act=_silu)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.embed = nn.Linear(head_channels, head_channels, bias=False)
        self.classifier = nn.Linear(head_channels, num_classes)
        with torch.no_grad():  # the structure survives the zoo's per-layer rescaling (one scalar per layer)
            self.embed.weight.add_(offset_ratio * self.embed.weight.std())
            self.classifier.weight.sub_(self.classifier.weight.mean(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(self.embed(torch.flatten(self.avgpool(x), 1)))


def deep_silu() -> DeepSiLU:
    """16 residual MBConv/SE blocks of 16 channels, SiLU, 1024 head channels, a common feature offset that the
    100-class classifier cancels."""
    return DeepSiLU()
