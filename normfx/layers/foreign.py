"""Frozen BatchNorms of other libraries, recognized by behaviour.

torchvision's ``ops.misc.FrozenBatchNorm2d``, detectron2's ``FrozenBatchNorm2d``, timm's
``FrozenBatchNormAct2d`` and any module like them hold four per-channel buffers (``weight``, ``bias``,
``running_mean``, ``running_var``) and an ``eps``, and compute ``x * (w * rsqrt(rv + eps)) + (b - rm * scale)``
(then their child modules: timm's drop and activation). normfx cannot import those libraries, so it reads no
type name: a module that is not a torch/normfx BatchNorm and carries those tensors is a *candidate*; its own
forward is run on a random probe input in float64 (with and without ``requires_grad``: detectron2 branches on it)
and compared with a normfx :class:`~normfx.layers.FrozenBatchNorm` holding the same numbers and the module's
children as ``post`` modules. Equal → it is a frozen BN (:func:`recognize` returns that FrozenBatchNorm);
different → a lookalike, with the reason.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .frozen import FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d

__all__ = ["ForeignMatch", "is_candidate", "recognize", "find_foreign"]

_TENSORS = ("weight", "bias", "running_mean", "running_var")
#: probe ranks, most common first, and the normfx class each one gives
_RANKS = ((4, FrozenBatchNorm2d), (2, FrozenBatchNorm1d), (3, FrozenBatchNorm1d), (5, FrozenBatchNorm3d))
_SPATIAL = {2: (), 3: (7,), 4: (5, 5), 5: (3, 3, 3)}
_TOLERANCE = 1e-9  # relative, in float64: a frozen BN written as x*scale+bias differs from F.batch_norm by ~1e-16


@dataclass
class ForeignMatch:
    """The outcome for one candidate: ``frozen`` (a normfx FrozenBatchNorm with the same numbers, its children as
    post modules) when its forward is a frozen BN, else ``None`` and ``reason``."""

    source: str  # the candidate's class name
    frozen: FrozenBatchNorm | None
    reason: str = ""


def _is_normfx_or_torch_bn(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm))


def is_candidate(module: nn.Module) -> bool:
    """Not a torch/normfx BN, and holds 1-D ``weight``/``bias``/``running_mean``/``running_var`` tensors of one
    length (buffers or parameters) and a numeric ``eps``."""
    if _is_normfx_or_torch_bn(module):
        return False
    tensors = [getattr(module, name, None) for name in _TENSORS]
    if not all(isinstance(t, torch.Tensor) and t.dim() == 1 for t in tensors):
        return False
    if len({t.numel() for t in tensors}) != 1 or not tensors[0].is_floating_point():
        return False
    eps = getattr(module, "eps", None)
    return isinstance(eps, (int, float)) and not isinstance(eps, bool)


def _frozen_copy(module: nn.Module, cls: type[FrozenBatchNorm]) -> FrozenBatchNorm:
    """A normfx FrozenBatchNorm with ``module``'s numbers (new storage) and deep copies of its children as post."""
    ref = module.running_mean
    post = {name: copy.deepcopy(child) for name, child in module.named_children()}
    frozen = cls(ref.numel(), float(module.eps), momentum=0.1, post=post, device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        for name in _TENSORS:
            getattr(frozen, name).copy_(getattr(module, name).detach())
    frozen.train(module.training)
    return frozen


def _probe(reference: nn.Module, frozen: FrozenBatchNorm, rank: int, requires_grad: bool) -> tuple[bool, str]:
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn((3, frozen.num_features, *_SPATIAL[rank]), generator=generator, dtype=torch.float64)
    try:
        with torch.set_grad_enabled(requires_grad):
            expected = reference(x.clone().requires_grad_(requires_grad))
            got = frozen(x)
    except Exception as exc:  # a forward that does not accept this rank (or is no BN at all)
        return False, f"its forward raises {type(exc).__name__} on a {rank}-D probe"
    if not isinstance(expected, torch.Tensor) or expected.shape != got.shape:
        return False, f"its forward returns {type(expected).__name__} of another shape than a frozen BN on a {rank}-D probe"
    expected, got = expected.detach(), got.detach()
    error = float((expected - got).abs().max() / expected.abs().max().clamp_min(1e-30))
    if not error <= _TOLERANCE:
        mode = "with" if requires_grad else "without"
        return False, (f"its forward differs from x * (w * rsqrt(rv + eps)) + (b - rm * scale)"
                       f"{' then its children' if frozen.post_names else ''} by {error:.2e} (relative, float64, "
                       f"{rank}-D probe {mode} requires_grad)")
    return True, ""


def recognize(module: nn.Module) -> ForeignMatch:
    """Probe a candidate (see :func:`is_candidate`): a :class:`ForeignMatch` with the frozen BN, or the reason."""
    source = type(module).__name__
    if not is_candidate(module):
        return ForeignMatch(source, None, "not a frozen-BN candidate (needs 1-D weight/bias/running_mean/running_var "
                                          "and eps, and not a torch/normfx BatchNorm)")
    reference = copy.deepcopy(module).to(torch.float64)
    reasons = []
    for rank, cls in _RANKS:
        frozen = _frozen_copy(module, cls)
        probe = copy.deepcopy(frozen).to(torch.float64)
        results = [_probe(reference, probe, rank, grad) for grad in (False, True)]
        failed = [why for ok, why in results if not ok]
        if not failed:
            return ForeignMatch(source, frozen)
        reasons.append(failed[0])
    # the reason of the most common rank (4-D) unless its forward only raised there
    best = next((r for r in reasons if "raises" not in r), reasons[0])
    return ForeignMatch(source, None, f"lookalike {source} not matched as a frozen BatchNorm: {best}")


def find_foreign(model: nn.Module) -> dict[str, ForeignMatch]:
    """Every candidate in ``model`` (by module path, a module registered twice once), probed."""
    found: dict[str, ForeignMatch] = {}
    for name, module in model.named_modules():
        if is_candidate(module) and not any(name.startswith(prefix + ".") for prefix in found):
            found[name] = recognize(module)
    return found
