"""A two-level UNet: conv3x3+BN+ReLU pairs in the encoder, ConvTranspose2d+BN+ReLU upsampling in the
decoder (one plain without bias, one grouped with bias and output_padding), skip concatenations."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DoubleConv", "UNet", "unet"]


class DoubleConv(nn.Sequential):
    """(conv3x3 → BN → ReLU) × 2."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """Encoder 16→32→64 channels with max-pooling, decoder with transposed-conv upsampling and skips."""

    def __init__(self, in_channels: int = 3, num_classes: int = 4, width: int = 16) -> None:
        super().__init__()
        w = width
        self.enc1 = DoubleConv(in_channels, w)
        self.enc2 = DoubleConv(w, 2 * w)
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = DoubleConv(2 * w, 4 * w)
        # ConvTranspose without bias, kernel 2 stride 2.
        self.up2 = nn.Sequential(nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2, bias=False), nn.BatchNorm2d(2 * w),
                                 nn.ReLU(inplace=True))
        self.dec2 = DoubleConv(4 * w, 2 * w)
        # Grouped ConvTranspose (groups=4) with bias, kernel 3 stride 2 padding 1 output_padding 1.
        self.up1 = nn.Sequential(
            nn.ConvTranspose2d(2 * w, w, 3, stride=2, padding=1, output_padding=1, groups=4, bias=True),
            nn.BatchNorm2d(w), nn.ReLU(inplace=True),
        )
        self.dec1 = DoubleConv(2 * w, w)
        self.head = nn.Conv2d(w, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.enc1(x)
        s2 = self.enc2(self.pool(s1))
        b = self.bottleneck(self.pool(s2))
        d2 = self.dec2(torch.cat([self.up2(b), s2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), s1], 1))
        return self.head(d1)


def unet() -> UNet:
    """UNet with width 16, 4 output classes per pixel."""
    return UNet()
