"""Planted-devils models for ``normfx.lint`` (not in the zoo catalog): every BatchNorm bug the linter finds, each
on its own, named layer.

- :func:`devil_net` → ``(model, example_input)``: a small eval-mode CNN whose layers carry, one each:
  ``eps_bn`` eps 1e-8; ``nan_bn`` NaN running_mean; ``negvar_bn`` negative running_var; ``overflow_bn`` a fold that
  overflows fp16 (its conv's weights × γ/σ > 65504); ``precision_bn`` γ/σ > 2^10; ``bias_conv`` a bias right before
  ``bias_bn``; ``twice_bn`` one BN reached twice per forward; ``unused_bn`` never reached; ``momentum_bn``
  momentum 0.9 (TF's convention); ``block`` a residual block mixing a Frozen BN (``block.bn1``) and a trainable BN
  (``block.bn2``); ``train_bn`` a BN2d left in training mode fed a batch of one, ``head_bn`` a BN1d in training
  mode fed one sample (one value per channel); ``standalone_bn`` a BN after a ReLU before pooling (nothing to fold
  it into). Every other BN statistic is randomized as in the zoo.
- :func:`fresh_legacy_net` → ``(model, example_input)``: a fresh model (statistics at init, nothing tracked) whose
  ``bn2`` has γ drawn from U(0, 1) (LuaTorch's legacy init) and whose ``bn1`` has PyTorch's γ = 1.

Both work as ``normfx lint --model normfx.models.devils:devil_net``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import FrozenBatchNorm2d
from .init import randomize_batchnorm

__all__ = ["DevilNet", "FreshLegacyNet", "devil_net", "fresh_legacy_net", "DEVILS"]

#: (layer, check, severity) of every planted devil of :func:`devil_net`
DEVILS = [
    ("eps_bn", "eps", "warning"),
    ("nan_bn", "statistics", "error"),
    ("negvar_bn", "running_var", "error"),
    ("overflow_bn", "fold_fp16_overflow", "warning"),
    ("precision_bn", "fold_precision", "warning"),
    ("bias_conv", "bias_before_bn", "warning"),
    ("twice_bn", "reached_twice", "warning"),
    ("unused_bn", "reached", "warning"),
    ("momentum_bn", "momentum", "warning"),
    ("block", "mixed_frozen", "warning"),
    ("train_bn", "batch_of_one", "warning"),
    ("train_bn", "mode", "warning"),
    ("head_bn", "batch_of_one", "error"),
    ("head_bn", "mode", "warning"),
    ("standalone_bn", "fold", "info"),
]


def _conv(cin: int, cout: int, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, bias=bias)


class MixedBlock(nn.Module):
    """conv → Frozen BN → ReLU → conv → trainable BN, identity shortcut, ReLU."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = _conv(c, c)
        self.bn1 = FrozenBatchNorm2d(c)
        self.conv2 = _conv(c, c)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + x)


class DevilNet(nn.Module):
    def __init__(self, c: int = 8, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = _conv(3, c)
        self.eps_bn = nn.BatchNorm2d(c, eps=1e-8)
        self.nan_conv, self.nan_bn = _conv(c, c), nn.BatchNorm2d(c)
        self.negvar_conv, self.negvar_bn = _conv(c, c), nn.BatchNorm2d(c)
        self.overflow_conv, self.overflow_bn = _conv(c, c), nn.BatchNorm2d(c)
        self.precision_conv, self.precision_bn = _conv(c, c), nn.BatchNorm2d(c)
        self.bias_conv, self.bias_bn = _conv(c, c, bias=True), nn.BatchNorm2d(c)
        self.twice_conv1, self.twice_conv2, self.twice_bn = _conv(c, c), _conv(c, c), nn.BatchNorm2d(c)
        self.unused_bn = nn.BatchNorm2d(c)
        self.momentum_conv, self.momentum_bn = _conv(c, c), nn.BatchNorm2d(c, momentum=0.9)
        self.block = MixedBlock(c)
        self.train_conv, self.train_bn = _conv(c, c), nn.BatchNorm2d(c)
        self.standalone_bn = nn.BatchNorm2d(c)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head_bn = nn.BatchNorm1d(c)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.eps_bn(self.stem(x)))
        x = torch.relu(self.nan_bn(self.nan_conv(x)))
        x = torch.relu(self.negvar_bn(self.negvar_conv(x)))
        x = torch.relu(self.overflow_bn(self.overflow_conv(x)))
        x = torch.relu(self.precision_bn(self.precision_conv(x)))
        x = torch.relu(self.bias_bn(self.bias_conv(x)))
        x = torch.relu(self.twice_bn(self.twice_conv1(x)) + self.twice_bn(self.twice_conv2(x)))
        x = torch.relu(self.momentum_bn(self.momentum_conv(x)))
        x = self.block(x)
        x = torch.relu(self.train_bn(self.train_conv(x)))
        x = self.pool(self.standalone_bn(torch.relu(x)))
        return self.fc(self.head_bn(torch.flatten(x, 1)))


@torch.no_grad()
def _plant(model: DevilNet) -> None:
    c = model.eps_bn.num_features
    model.nan_bn.running_mean[1] = float("nan")
    model.negvar_bn.running_var[2] = -0.5
    # overflow: conv weights up to 1000, γ/σ = 100 → folded weights up to 1e5 > 65504 (γ/σ stays below 2^10)
    model.overflow_conv.weight.mul_(1000.0 / model.overflow_conv.weight.abs().max())
    model.overflow_bn.weight.fill_(1.0)
    model.overflow_bn.running_var.fill_(1e-4 - 1e-5)
    # precision: γ/σ = 5 / sqrt(1e-6 + 1e-5) ≈ 1508 > 2^10 on one channel, folded weights far below 65504
    model.precision_bn.weight[3] = 5.0
    model.precision_bn.running_var[3] = 1e-6
    model.precision_conv.weight.mul_(0.01)
    assert c > 3


def devil_net(seed: int = 0) -> tuple[DevilNet, torch.Tensor]:
    """The planted-devils model (eval mode, ``train_bn`` and ``head_bn`` left in training mode) and its example
    input, a batch of one 3×16×16 image."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DevilNet()
    randomize_batchnorm(model, seed)
    _plant(model)
    model.eval()
    model.train_bn.train()
    model.head_bn.train()
    return model, torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


class FreshLegacyNet(nn.Module):
    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv(3, c), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = _conv(c, c), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def fresh_legacy_net(seed: int = 0) -> tuple[FreshLegacyNet, torch.Tensor]:
    """A fresh model whose ``bn2`` γ come from U(0, 1), and its example input (a batch of two 3×8×8 images)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FreshLegacyNet()
    with torch.no_grad():
        model.bn2.weight.copy_(torch.rand(model.bn2.num_features, generator=generator))
    return model.eval(), torch.randn(2, 3, 8, 8, generator=generator)
