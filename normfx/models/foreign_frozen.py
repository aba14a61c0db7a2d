"""Trap ``trap_foreign_frozen``: a small detection-style backbone whose BNs are other libraries' frozen BNs.

The three layers are written here as those libraries write them (torchvision and detectron2 cannot be
installed beside the pinned torch; timm's layer is reproduced the same way):

- :class:`TorchvisionFrozenBatchNorm2d` — ``torchvision.ops.misc.FrozenBatchNorm2d``: four buffers, ``eps``,
  forward ``x * scale + bias`` with reshaped buffers (torch.fx traces it into Mul/Add on computed constants);
- :class:`Detectron2FrozenBatchNorm2d` — detectron2's: the same buffers, ``F.batch_norm(training=False)``
  unless ``x.requires_grad`` (then the affine), so torch.fx cannot trace it (it branches on a tensor flag);
- :class:`TimmFrozenBatchNormAct2d` — timm's ``FrozenBatchNormAct2d``: ``F.batch_norm`` then ``drop``
  (Identity) and ``act``, with ``apply_act`` choosing an activation or Identity.

Today a naive fold leaves the torchvision layer as elementwise ops and reports nothing; ``fuse`` must fold
every one of them and ``unfrozen`` must make them trainable. Their buffers are randomized like every zoo BN.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TorchvisionFrozenBatchNorm2d", "Detectron2FrozenBatchNorm2d", "TimmFrozenBatchNormAct2d",
           "ForeignFrozenNet", "trap_foreign_frozen"]


class _FourBuffers(nn.Module):
    def __init__(self, num_features: int, eps: float, var_init: float = 1.0) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.full((num_features,), var_init))


class TorchvisionFrozenBatchNorm2d(_FourBuffers):
    """As ``torchvision.ops.misc.FrozenBatchNorm2d`` (no ``num_batches_tracked`` in its state_dict)."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__(num_features, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # move reshapes to the beginning to make it fuser-friendly (torchvision's comment)
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias


class Detectron2FrozenBatchNorm2d(_FourBuffers):
    """As detectron2's ``FrozenBatchNorm2d`` (running_var initialized to ``1 - eps``, as there)."""

    _version = 3

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__(num_features, eps, var_init=1.0 - eps)
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            # when gradients are needed, F.batch_norm would use extra memory (detectron2's comment)
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            bias = self.bias - self.running_mean * scale
            scale = scale.reshape(1, -1, 1, 1)
            bias = bias.reshape(1, -1, 1, 1)
            out_dtype = x.dtype  # may be half
            return x * scale.to(out_dtype) + bias.to(out_dtype)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False,
                            eps=self.eps)


class TimmFrozenBatchNormAct2d(_FourBuffers):
    """As timm's ``FrozenBatchNormAct2d``: frozen BN, then ``drop`` (Identity without a drop layer), then ``act``."""

    def __init__(self, num_features: int, eps: float = 1e-5, apply_act: bool = True,
                 act_layer: Callable[..., nn.Module] = nn.ReLU, inplace: bool = True) -> None:
        super().__init__(num_features, eps)
        self.drop = nn.Identity()
        self.act = act_layer(inplace=inplace) if apply_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        x = self.drop(x)
        return self.act(x)


class _Bottleneck(nn.Module):
    """1x1 → 3x3 → 1x1 with torchvision-style frozen BNs, detectron2-style shortcut, ReLU after the sum."""

    def __init__(self, cin: int, width: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = TorchvisionFrozenBatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = TorchvisionFrozenBatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = TorchvisionFrozenBatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), Detectron2FrozenBatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return torch.relu(self.bn3(self.conv3(y)) + self.shortcut(x))


class ForeignFrozenNet(nn.Module):
    """Stem conv/2 → timm FrozenBatchNormAct2d(ReLU); detectron2-style conv → FrozenBN → ReLU; two bottlenecks
    (torchvision FrozenBN inside, detectron2 FrozenBN on the shortcut); an FPN-like lateral conv →
    timm FrozenBatchNormAct2d(apply_act=False); pooled head."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, 2, 1, bias=False)
        self.stem_bn = TimmFrozenBatchNormAct2d(width)
        self.conv = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.conv_bn = Detectron2FrozenBatchNorm2d(width)
        self.layer1 = _Bottleneck(width, width // 2, 2 * width, 1)
        self.layer2 = _Bottleneck(2 * width, width, 4 * width, 2)
        self.lateral = nn.Conv2d(4 * width, 2 * width, 1, bias=False)
        self.lateral_bn = TimmFrozenBatchNormAct2d(2 * width, apply_act=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_bn(self.stem(x))
        x = torch.relu(self.conv_bn(self.conv(x)))
        x = self.layer2(self.layer1(x))
        x = self.lateral_bn(self.lateral(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def trap_foreign_frozen() -> ForeignFrozenNet:
    return ForeignFrozenNet()
