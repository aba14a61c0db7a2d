"""The zoo's table: every model's builder, description, input shape and tags."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from . import densenet, mobile, resnet, small, traps, unet

__all__ = ["ModelInfo", "Entry", "TAGS", "CATALOG"]

#: every tag a zoo model can carry, and what it promises
TAGS: dict[str, str] = {
    "traceable": "torch.fx.symbolic_trace(model) succeeds",
    "untraceable": "torch.fx.symbolic_trace(model) raises (data-dependent control flow)",
    "preact": (
        "has pre-activation units: a BN not fed by a conv/linear, whose output goes through an activation into a conv"
    ),
    "conv_transpose": "has ConvTranspose → BN",
    "trap": (
        "built to catch naive rewrites (BN subclass with activation, functional BN, shared modules, "
        "untraceable, SyncBN)"
    ),
    "1d": "Conv1d + BatchNorm1d on (N, C, L) input",
    "3d": "Conv3d + BatchNorm3d on (N, C, D, H, W) input",
    "linear": "Linear + BatchNorm1d on (N, F) input, both Linear→BN and BN→Linear",
    "forward_fold": (
        "has a BN that only a forward fold removes: its only user is a Conv/Linear (BN→Conv with nothing "
        "between) and its input is not a Conv/ConvTranspose/Linear output without other users"
    ),
    "all_bn_after_conv": (
        "every BN call (BN module, BN subclass or F.batch_norm) takes the output of a Conv/ConvTranspose/Linear "
        "call that has no other user, so a complete backward fold leaves no BN (a conv module called twice, "
        "or a BN module called twice, is allowed: each call is checked)"
    ),
}


@dataclass(frozen=True)
class ModelInfo:
    """What the zoo knows about a model: its name, a one-line description, the input shape without
    the batch dimension, and its tags (see :data:`TAGS`)."""

    name: str
    description: str
    input_shape: tuple[int, ...]
    tags: frozenset[str]


@dataclass(frozen=True)
class Entry:
    info: ModelInfo
    builder: Callable[[], nn.Module]


def _entry(name: str, builder: Callable[[], nn.Module], description: str, shape: tuple[int, ...], *tags: str) -> Entry:
    unknown = set(tags) - set(TAGS)
    if unknown:  # a programming error in this table, not a user error
        raise RuntimeError(f"zoo entry {name!r} has unknown tags {sorted(unknown)}")
    return Entry(ModelInfo(name, description, shape, frozenset(tags)), builder)


IMG = (3, 64, 64)
SMALL_IMG = (3, 32, 32)

CATALOG: dict[str, Entry] = {
    e.info.name: e
    for e in [
        _entry("resnet18", resnet.resnet18, "ResNet-18 (basic blocks [2,2,2,2], conv1x1+BN shortcuts), 1/4 width",
               IMG, "traceable", "all_bn_after_conv"),
        _entry("resnet50", resnet.resnet50, "ResNet-50 (bottlenecks [3,4,6,3], conv1x1+BN shortcuts), 1/4 width",
               IMG, "traceable", "all_bn_after_conv"),
        _entry("preact_resnet", resnet.preact_resnet,
               "pre-activation ResNet-18 v2 (BN→ReLU→Conv units, final BN before the pool), 1/4 width",
               IMG, "traceable", "preact"),
        _entry("mobilenet_v2", mobile.mobilenet_v2,
               "MobileNetV2 (depthwise convs, ReLU6, inverted residuals, linear bottleneck), width 0.5, 11 blocks",
               IMG, "traceable", "all_bn_after_conv"),
        _entry("efficientnet_b0", mobile.efficientnet_b0,
               "EfficientNet-B0 style (MBConv, SiLU, squeeze-excitation, depthwise), width 0.5, 10 blocks",
               IMG, "traceable", "all_bn_after_conv"),
        _entry("densenet", densenet.densenet,
               "DenseNet-BC (BN→ReLU→Conv over concatenations, transition layers), growth 8, blocks (2,3,4)",
               IMG, "traceable", "preact"),
        _entry("unet", unet.unet,
               "UNet (conv+BN encoder, ConvTranspose2d+BN decoder incl. grouped with bias and plain without bias)",
               IMG, "traceable", "conv_transpose", "all_bn_after_conv"),
        _entry("conv1d", small.conv1d, "raw-audio net: Conv1d + BatchNorm1d (strided, depthwise, dilated, residual)",
               (1, 2048), "traceable", "1d", "all_bn_after_conv"),
        _entry("conv3d", small.conv3d, "video net: Conv3d + BatchNorm3d (residual, (2+1)D strided stage)",
               (3, 8, 32, 32), "traceable", "3d", "all_bn_after_conv"),
        _entry("mlp", small.mlp, "MLP: BatchNorm1d→Linear and Linear→BatchNorm1d→ReLU", (32,),
               "traceable", "linear", "forward_fold"),
        _entry("bn_conv", small.bn_conv,
               "BN directly before convs: 1x1 unpadded, 3x3 padded, depthwise, grouped, strided, dilated",
               SMALL_IMG, "traceable", "forward_fold"),
        _entry("trap_bn_act", traps.trap_bn_act,
               "timm-style BatchNormAct2d (BatchNorm2d subclass owning its ReLU/SiLU) after convs",
               SMALL_IMG, "traceable", "trap", "all_bn_after_conv"),
        _entry("trap_functional_bn", traps.trap_functional_bn,
               "F.batch_norm on registered buffers/parameters after convs (no BN module)",
               SMALL_IMG, "traceable", "trap", "all_bn_after_conv"),
        _entry("trap_shared_conv", traps.trap_shared_conv,
               "one conv module called twice, once followed by BN and once not",
               SMALL_IMG, "traceable", "trap", "all_bn_after_conv"),
        _entry("trap_shared_bn", traps.trap_shared_bn, "one BN module called twice, after two different convs",
               SMALL_IMG, "traceable", "trap", "all_bn_after_conv"),
        _entry("trap_untraceable", traps.trap_untraceable,
               "conv+BN blocks around a submodule (with its own conv+BN) whose data-dependent branch "
               "torch.fx cannot trace",
               SMALL_IMG, "untraceable", "trap"),
        _entry("trap_syncbn", traps.trap_syncbn, "nn.SyncBatchNorm after a conv, used in eval",
               SMALL_IMG, "traceable", "trap", "all_bn_after_conv"),
    ]
}
