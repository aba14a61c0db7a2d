"""The zoo's table: every model's builder, description, input shape and tags."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from . import deep_silu as deep_silu_module
from . import densenet, dualpath, foreign_frozen, mixconv, mobile, reparam, resnet, small, traps, unet

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
    "foreign_bn": (
        "its BNs are other libraries' frozen BNs (no torch/normfx BatchNorm module): fuse, unfrozen and explain "
        "recognize them by behaviour; the batch-independent policies (groupnorm, proxynorm, ...) do not"
    ),
    "1d": "Conv1d + BatchNorm1d on (N, C, L) input",
    "3d": "Conv3d + BatchNorm3d on (N, C, D, H, W) input",
    "linear": "Linear + BatchNorm1d on (N, F) input, both Linear→BN and BN→Linear",
    "forward_fold": (
        "has a BN that only a forward fold removes: its only user is a Conv/Linear (BN→Conv with nothing "
        "between) and its input is not a Conv/ConvTranspose/Linear output without other users"
    ),
    "multi_branch": (
        "has blocks that sum parallel conv(+BN) branches and an identity (BN) branch reading one tensor: "
        "structural reparameterization (fuse's branch merge) leaves one conv per block"
    ),
    "concat_split": (
        "every BN not after a lone conv sits after a channel concat of conv outputs or before a channel split "
        "into convs (unpadded where the BN has a shift), so fuse's slice-by-slice folds leave no BN"
    ),
    "fp32_noise": (
        "ill-conditioned in float32: its float32 output differs from its float64 run by more than 1e-5 (relative), "
        "so verification must judge rewrites against float64 and the model's own noise floor"
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
        _entry("dualpath", dualpath.dualpath,
               "DPN-style dual-path blocks (BN→ReLU→Conv units over concat(residual, dense); output split: added to "
               "the residual path, concatenated to the dense path), 2 stages of 2 blocks",
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
        _entry("mixconv", mixconv.mixconv,
               "MixNet-style mixed kernels (split → depthwise 3x3/5x5/7x7 → concat → BN, grouped 1x1 via chunk → "
               "concat(dim=-3) → BN), BN → split/slice → 1x1 convs, Inception-style 1x1∥3x3∥5x5∥pool-1x1 concat → BN",
               SMALL_IMG, "traceable", "concat_split"),
        _entry("repvgg", reparam.repvgg,
               "RepVGG-A style: 3x3-BN ∥ 1x1-BN ∥ identity-BN → add → ReLU blocks, stride-2 first block per stage",
               IMG, "traceable", "multi_branch"),
        _entry("mobileone", reparam.mobileone,
               "MobileOne style: 3 parallel depthwise 3x3-BN + 1x1-BN scale + identity-BN, then 3 parallel "
               "pointwise 1x1-BN + identity-BN, each summed → ReLU",
               IMG, "traceable", "multi_branch"),
        _entry("deep_silu", deep_silu_module.deep_silu,
               "deep SiLU/SE net (16 residual MBConv-SE blocks) whose pooled features ride on a common offset the "
               "zero-sum classifier cancels: float32 noise ~3e-5 vs float64, by construction",
               SMALL_IMG, "traceable", "all_bn_after_conv", "fp32_noise"),
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
        _entry("trap_foreign_frozen", foreign_frozen.trap_foreign_frozen,
               "detection-style backbone with other libraries' frozen BNs written in the zoo: torchvision's "
               "FrozenBatchNorm2d (x*scale+bias), detectron2's (branches on x.requires_grad, so torch.fx cannot "
               "trace it), timm's FrozenBatchNormAct2d (with and without its activation)",
               SMALL_IMG, "untraceable", "trap", "foreign_bn"),
    ]
}
