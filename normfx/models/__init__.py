"""normfx's built-in model zoo: small, fast, plain-``torch.nn`` architectures with randomized BN.

Models: ``resnet18``, ``resnet50`` (bottleneck, conv1x1+BN shortcuts), ``preact_resnet`` (v2,
BN→ReLU→Conv), ``mobilenet_v2`` (depthwise, ReLU6, inverted residuals, linear bottleneck),
``efficientnet_b0`` (MBConv, SiLU, squeeze-excitation), ``densenet`` (BN→ReLU→Conv over
concatenations, transitions), ``unet`` (ConvTranspose2d+BN decoder, grouped and with/without bias),
``conv1d`` (audio, BatchNorm1d), ``conv3d`` (video, BatchNorm3d), ``mlp`` (Linear↔BatchNorm1d),
``bn_conv`` (BN directly before 1x1/3x3/depthwise/grouped/strided/dilated convs), ``repvgg`` and ``mobileone``
(multi-branch blocks for structural reparameterization), ``mixconv`` (MixNet-style mixed-kernel
concat → BN and BN → split → convs, Inception-style concat), ``dualpath`` (DPN-style pre-activation
blocks: residual path added, dense path concatenated), ``deep_silu`` (deep SiLU/SE net that is
ill-conditioned in float32 on purpose: noise-aware verification's test case), and the trap
models ``trap_bn_act`` (timm-style BatchNormAct2d), ``trap_functional_bn`` (``F.batch_norm`` on
buffers), ``trap_shared_conv``, ``trap_shared_bn``, ``trap_untraceable`` (data-dependent branch)
``trap_syncbn`` and ``trap_foreign_frozen`` (other libraries' frozen BNs). :func:`create` returns a new eval-mode module whose BN layers carry random
non-trivial statistics (mean ≠ 0, var ≠ 1, some gamma < 0, beta ≠ 0) and whose conv/linear layers
are scaled so activations stay O(1) through depth; the same seed gives the same state_dict.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputDataError, ModelError
from .catalog import CATALOG, TAGS, Entry, ModelInfo
from .init import bn_like_tensors, randomize_batchnorm, scale_activations
from .traps import BatchNormAct2d

__all__ = [
    "DEFAULT_MODEL",
    "TAGS",
    "ModelInfo",
    "BatchNormAct2d",
    "names",
    "info",
    "create",
    "example_input",
    "randomize_batchnorm",
    "bn_like_tensors",
]

DEFAULT_MODEL = "resnet18"

# Calibration batch for activation scaling: drawn from a seed apart from example_input's defaults.
_CALIBRATION_BATCH = 8
_CALIBRATION_SEED_OFFSET = 1_000_003


def names() -> list[str]:
    """The zoo's model names, in catalog order."""
    return list(CATALOG)


def _entry(name: str) -> Entry:
    try:
        return CATALOG[name]
    except (KeyError, TypeError):
        raise ModelError(f"unknown zoo model {name!r}; choose one of: {', '.join(CATALOG)}") from None


def info(name: str) -> ModelInfo:
    """Description, input shape (without batch) and tags of the zoo model ``name``."""
    return _entry(name).info


def example_input(name: str, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A float32 N(0, 1) input of shape ``(batch, *info(name).input_shape)``, deterministic for ``seed``."""
    entry = _entry(name)
    if not isinstance(batch, int) or batch < 1:
        raise InputDataError(f"example_input({name!r}): batch must be a positive int, got {batch!r}")
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn((batch, *entry.info.input_shape), generator=generator)


def create(name: str, seed: int = 0) -> nn.Module:
    """A new instance of the zoo model ``name`` in eval mode, deterministic for ``seed``.

    Weights are initialized under a private RNG state (the global torch RNG is left untouched), BN
    statistics are randomized by :func:`randomize_batchnorm`, and every conv/linear is rescaled once
    on a calibration batch so its output has unit standard deviation.
    """
    entry = _entry(name)
    seed = int(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = entry.builder()
    model.eval()
    randomize_batchnorm(model, torch.Generator().manual_seed(seed))
    scale_activations(model, example_input(name, _CALIBRATION_BATCH, seed + _CALIBRATION_SEED_OFFSET))
    return model
