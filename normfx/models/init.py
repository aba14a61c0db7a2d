"""Initialization for the zoo: randomized BatchNorm statistics and activation scaling.

A test on a freshly constructed BN (mean 0, var 1, gamma 1, beta 0) proves nothing, so every zoo
model gets non-trivial statistics from :func:`randomize_batchnorm`. Random weights through many
layers also drift in scale; :func:`scale_activations` rescales each conv/linear once, on a
calibration batch, so that every layer's output stays O(1) (a data-driven, LSUV-style init).
"""

from __future__ import annotations

import logging
from typing import Iterator

import torch
from torch import nn

__all__ = ["randomize_batchnorm", "randomize_bn_tensors", "bn_like_tensors", "scale_activations"]

log = logging.getLogger(__name__)

_AFFINE_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


def _generator(generator_or_seed: torch.Generator | int) -> torch.Generator:
    if isinstance(generator_or_seed, torch.Generator):
        return generator_or_seed
    return torch.Generator().manual_seed(int(generator_or_seed))


def bn_like_tensors(
    module: nn.Module,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] | None:
    """``(running_mean, running_var, weight, bias)`` of a BN-like module, or ``None`` if it is not one.

    BN-like: any ``_BatchNorm`` (SyncBatchNorm and subclasses included), anything with
    ``running_mean``/``running_var`` tensors (e.g. :class:`normfx.layers.FrozenBatchNorm`), and a
    module naming its functional-BN tensors in a ``bn_tensor_names = (mean, var, weight, bias)``
    class attribute. Entries are ``None`` where the layer has no such tensor (``affine=False``).
    """
    names = getattr(module, "bn_tensor_names", None)
    if names is None:
        if not isinstance(module, nn.modules.batchnorm._BatchNorm) and not (
            isinstance(getattr(module, "running_mean", None), torch.Tensor)
            and isinstance(getattr(module, "running_var", None), torch.Tensor)
        ):
            return None
        names = ("running_mean", "running_var", "weight", "bias")
    tensors = tuple(getattr(module, n, None) for n in names)
    return tuple(t if isinstance(t, torch.Tensor) else None for t in tensors)  # type: ignore[return-value]


@torch.no_grad()
def randomize_bn_tensors(
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    generator: torch.Generator,
) -> None:
    """Fill BN tensors in place: mean ~ N(0, 0.3), var ~ U(0.5, 2), |gamma| ~ U(0.5, 1.5), beta ~ N(0, 0.2).

    About 10 % of the gammas (at least one per layer) get a negative sign.
    """
    if running_mean is not None:
        running_mean.copy_(0.3 * torch.randn(running_mean.shape, generator=generator, dtype=torch.float64))
    if running_var is not None:
        running_var.copy_(0.5 + 1.5 * torch.rand(running_var.shape, generator=generator, dtype=torch.float64))
    if weight is not None:
        n = weight.numel()
        gamma = 0.5 + torch.rand(n, generator=generator, dtype=torch.float64)
        flipped = torch.randperm(n, generator=generator)[: max(1, round(0.1 * n))]
        gamma[flipped] = -gamma[flipped]
        weight.copy_(gamma.reshape(weight.shape))
    if bias is not None:
        bias.copy_(0.2 * torch.randn(bias.shape, generator=generator, dtype=torch.float64))


@torch.no_grad()
def randomize_batchnorm(model: nn.Module, generator_or_seed: torch.Generator | int) -> nn.Module:
    """Give every BN-like layer of ``model`` random non-trivial statistics, in place; returns ``model``.

    BN-like layers are those :func:`bn_like_tensors` recognizes (``_BatchNorm``, FrozenBatchNorm,
    functional-BN modules declaring ``bn_tensor_names``); their tensors are drawn by
    :func:`randomize_bn_tensors`. Conv/ConvTranspose/Linear biases, where present, get N(0, 0.2).
    Modules are visited in ``named_modules`` order, so a seed gives the same numbers every time.
    """
    gen = _generator(generator_or_seed)
    count = 0
    for _, module in model.named_modules():
        tensors = bn_like_tensors(module)
        if tensors is not None:
            randomize_bn_tensors(*tensors, generator=gen)
            count += 1
        elif isinstance(module, _AFFINE_LAYERS) and module.bias is not None:
            module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=gen, dtype=torch.float64))
    log.debug("randomized %d BN-like layers of %s", count, type(model).__name__)
    return model


def _affine_layers(model: nn.Module) -> Iterator[nn.Module]:
    for module in model.modules():
        if isinstance(module, _AFFINE_LAYERS):
            yield module


@torch.no_grad()
def scale_activations(model: nn.Module, example: torch.Tensor, target_std: float = 1.0) -> nn.Module:
    """Rescale each conv/linear's weight and bias so its output on ``example`` has std ``target_std``.

    One forward pass in the model's current mode: a forward hook on every Conv/ConvTranspose/Linear
    scales the layer at its first call and passes the rescaled output on, so each later layer is
    calibrated on already-calibrated inputs. BN statistics are not touched. In place; returns ``model``.
    """
    done: set[int] = set()

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if id(module) in done:
            return None
        done.add(id(module))
        std = float(output.detach().double().std())
        if not torch.isfinite(torch.tensor(std)) or std == 0.0:
            log.warning("cannot scale %s: output std is %s", type(module).__name__, std)
            return None
        scale = target_std / std
        module.weight.mul_(scale)
        if module.bias is not None:
            module.bias.mul_(scale)
        return output * scale

    handles = [m.register_forward_hook(hook) for m in _affine_layers(model)]
    try:
        model(example)
    finally:
        for handle in handles:
            handle.remove()
    return model
