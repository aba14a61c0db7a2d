"""Small nets for the other layer kinds: Conv1d audio, Conv3d video, an MLP with BatchNorm1d, and a
net with BN directly before its convs (the forward-fold patterns)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["AudioNet", "ResBlock1d", "VideoNet", "ResBlock3d", "MLP", "BNConvNet", "conv1d", "conv3d", "mlp", "bn_conv"]


class ResBlock1d(nn.Module):
    """conv1d→BN→ReLU→conv1d (dilated)→BN, identity shortcut, ReLU."""

    def __init__(self, channels: int, dilation: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv1d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm1d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + x)


class AudioNet(nn.Module):
    """M5-style raw-waveform net: wide strided Conv1d stem, depthwise and residual Conv1d blocks, BatchNorm1d."""

    def __init__(self, in_channels: int = 1, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(in_channels, width, 80, stride=4, padding=38, bias=False),
                                  nn.BatchNorm1d(width), nn.ReLU(), nn.MaxPool1d(4))
        self.block = nn.Sequential(nn.Conv1d(width, 2 * width, 3, padding=1, bias=True), nn.BatchNorm1d(2 * width),
                                   nn.ReLU(), nn.MaxPool1d(4))
        self.depthwise = nn.Sequential(nn.Conv1d(2 * width, 2 * width, 5, padding=2, groups=2 * width, bias=False),
                                       nn.BatchNorm1d(2 * width), nn.ReLU())
        self.res = ResBlock1d(2 * width)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.res(self.depthwise(self.block(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class ResBlock3d(nn.Module):
    """conv3d→BN→ReLU→conv3d→BN, identity shortcut, ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + x)


class VideoNet(nn.Module):
    """Small R3D-style net: Conv3d stem (spatial stride), a residual block, a (2+1)D-factorized strided stage."""

    def __init__(self, in_channels: int = 3, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, width, (3, 5, 5), stride=(1, 2, 2), padding=(1, 2, 2), bias=False),
            nn.BatchNorm3d(width), nn.ReLU(),
        )
        self.res = ResBlock3d(width)
        self.down = nn.Sequential(
            nn.Conv3d(width, 2 * width, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), bias=False),
            nn.BatchNorm3d(2 * width), nn.ReLU(),
            nn.Conv3d(2 * width, 2 * width, (3, 1, 1), stride=(2, 1, 1), padding=(1, 0, 0), bias=True),
            nn.BatchNorm3d(2 * width), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.down(self.res(self.stem(x)))), 1))


class MLP(nn.Module):
    """BN1d→Linear (input normalization), Linear→BN1d→ReLU ×2, then BN1d→Linear classifier."""

    def __init__(self, features: int = 32, hidden: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.bn_in = nn.BatchNorm1d(features)
        self.fc1 = nn.Linear(features, hidden, bias=True)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, hidden, bias=False)
        self.bn2 = nn.BatchNorm1d(hidden)
        self.relu2 = nn.ReLU()
        self.bn_out = nn.BatchNorm1d(hidden)
        self.fc_out = nn.Linear(hidden, num_classes, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.fc1(self.bn_in(x))))
        x = self.relu2(self.bn2(self.fc2(x)))
        return self.fc_out(self.bn_out(x))


class BNConvNet(nn.Module):
    """BN directly before each conv: 1x1 unpadded, 3x3 padded, depthwise, grouped, strided, dilated."""

    def __init__(self, in_channels: int = 3, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        w = width
        self.bn0 = nn.BatchNorm2d(in_channels)
        self.conv0 = nn.Conv2d(in_channels, w, 1, bias=True)  # BN → conv1x1, no padding
        self.bn1 = nn.BatchNorm2d(w)
        self.conv1 = nn.Conv2d(w, w, 3, padding=1, bias=False)  # BN → conv3x3, zero padding 1
        self.bn2 = nn.BatchNorm2d(w)
        self.conv2 = nn.Conv2d(w, w, 3, padding=1, groups=w, bias=True)  # BN → depthwise
        self.bn3 = nn.BatchNorm2d(w)
        self.conv3 = nn.Conv2d(w, 2 * w, 3, padding=1, groups=4, bias=False)  # BN → grouped
        self.bn4 = nn.BatchNorm2d(2 * w)
        self.conv4 = nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1, bias=True)  # BN → strided
        self.bn5 = nn.BatchNorm2d(2 * w)
        self.conv5 = nn.Conv2d(2 * w, 2 * w, 3, padding=2, dilation=2, bias=False)  # BN → dilated
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv0(self.bn0(x)))
        x = self.relu(self.conv1(self.bn1(x)))
        x = self.relu(self.conv2(self.bn2(x)))
        x = self.relu(self.conv3(self.bn3(x)))
        x = self.relu(self.conv4(self.bn4(x)))
        x = self.relu(self.conv5(self.bn5(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def conv1d() -> AudioNet:
    """Raw-audio Conv1d net, input (1, 2048)."""
    return AudioNet()


def conv3d() -> VideoNet:
    """Video Conv3d net, input (3, 8, 32, 32)."""
    return VideoNet()


def mlp() -> MLP:
    """MLP on 32 features with BatchNorm1d before and after Linear layers."""
    return MLP()


def bn_conv() -> BNConvNet:
    """BN→Conv patterns for the forward fold, input (3, 32, 32)."""
    return BNConvNet()
