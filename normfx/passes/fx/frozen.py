"""Policies ``keep``, ``frozen`` and ``unfrozen``: module swaps, no tracing needed (work on any nn.Module).

``frozen`` turns every targeted ``_BatchNorm`` (1d/2d/3d, SyncBatchNorm, subclasses) into a
``FrozenBatchNorm*``. A subclass's child modules (an activation) are kept as ``post`` modules, and
since normfx cannot read a subclass's forward, the swap is checked numerically on a probe input:
when the frozen layer does not reproduce the subclass, the layer is skipped with that reason.
``unfrozen`` also takes the frozen BNs of other libraries (torchvision, detectron2, timm), matched by
behaviour (:mod:`.foreign_bn`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ...layers import FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, is_batchnorm
from ...report import APPLIED, KEPT, SKIPPED
from . import foreign_bn

STANDARD_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_PROBE_TOLERANCE = 1e-6


def _frozen_class(bn: nn.modules.batchnorm._BatchNorm) -> type[FrozenBatchNorm]:
    for base, frozen in ((nn.BatchNorm1d, FrozenBatchNorm1d), (nn.BatchNorm2d, FrozenBatchNorm2d), (nn.BatchNorm3d, FrozenBatchNorm3d)):
        if isinstance(bn, base):
            return frozen
    return FrozenBatchNorm


def _probe_input(frozen: FrozenBatchNorm, bn: nn.Module) -> torch.Tensor:
    spatial = {FrozenBatchNorm1d: (7,), FrozenBatchNorm2d: (5, 5), FrozenBatchNorm3d: (3, 3, 3)}.get(type(frozen), (5, 5))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((3, frozen.num_features, *spatial), generator=generator, dtype=torch.float64)
    return x.to(dtype=frozen.running_mean.dtype, device=frozen.running_mean.device)


def _reproduces(bn: nn.Module, frozen: FrozenBatchNorm) -> bool:
    """Does the frozen layer compute what ``bn`` computes in eval? (for subclasses with their own forward)"""
    reference = copy.deepcopy(bn).eval()
    x = _probe_input(frozen, bn)
    with torch.no_grad():
        expected, got = reference(x), frozen(x)
    if not isinstance(expected, torch.Tensor) or expected.shape != got.shape:
        return False
    scale = expected.abs().max().clamp_min(1e-12)
    return bool(((expected - got).abs().max() / scale) <= _PROBE_TOLERANCE)


def freeze_module(bn: nn.modules.batchnorm._BatchNorm) -> tuple[FrozenBatchNorm | None, str]:
    """A frozen copy of ``bn`` and ``""``, or ``None`` and the reason it cannot be frozen."""
    if not bn.track_running_stats or bn.running_mean is None:
        return None, "track_running_stats=False: the layer always uses batch statistics, so there is nothing to freeze"
    if isinstance(bn, nn.modules.lazy.LazyModuleMixin) and bn.has_uninitialized_params():
        return None, "lazy BatchNorm is not initialized yet: run one forward pass first"
    standard = type(bn) in STANDARD_BATCHNORM
    post = {} if standard else {name: copy.deepcopy(child) for name, child in bn.named_children()}
    frozen = _frozen_class(bn).from_batchnorm(bn, post=post)
    frozen.train(bn.training)
    if not standard and not _reproduces(bn, frozen):
        return None, (
            f"{type(bn).__name__} has a forward that is not BatchNorm followed by its child modules; "
            "normfx cannot freeze it generically (convert it by hand or exclude it with an override)"
        )
    return frozen, ""


def run_frozen(model: nn.Module, ctx) -> nn.Module:
    for name, module in list(model.named_modules()):
        if not ctx.targets(name) or not is_batchnorm(module):
            continue
        if isinstance(module, FrozenBatchNorm):
            ctx.report.add(name, ctx.rule, KEPT, "already a FrozenBatchNorm")
            continue
        frozen, reason = freeze_module(module)
        if frozen is None:
            ctx.report.add(name, ctx.rule, SKIPPED, reason)
            continue
        ctx.report.add(name, ctx.rule, APPLIED, "", source=type(module).__name__, result=type(frozen).__name__)
        model = _replace(model, name, frozen)  # also for explain: later steps must see this layer frozen
    _report_functional_calls(model, ctx)
    return model


FUNCTIONAL_KEPT = ("functional batch_norm call: no module to freeze; with training=False it is already a constant "
                   "affine (left as it is)")


def _report_functional_calls(model: nn.Module, ctx) -> None:
    """List every functional ``F.batch_norm`` call (found by a read-only trace) so that explain shows it."""
    from .norm_swap import analyze

    if is_batchnorm(model):
        return
    try:
        functional = analyze(model).functional
    except Exception as exc:  # tracing is only for the report here; a model fx cannot read at all still freezes
        ctx.report.note(f"functional batch_norm calls not searched: tracing failed ({type(exc).__name__})")
        return
    for name in functional:
        if ctx.targets(name):
            ctx.report.add(name, ctx.rule, KEPT, FUNCTIONAL_KEPT, source="F.batch_norm")


def run_unfrozen(model: nn.Module, ctx) -> nn.Module:
    model, swapped = foreign_bn.swap(model, ctx)  # frozen BNs of other libraries, matched by behaviour
    for name, module in list(model.named_modules()):
        if not ctx.targets(name) or not is_batchnorm(module):
            continue
        if not isinstance(module, FrozenBatchNorm):
            ctx.report.add(name, ctx.rule, KEPT, "already a trainable BatchNorm")
            continue
        bn = module.to_batchnorm()
        bn.train(module.training)
        ctx.report.add(name, ctx.rule, APPLIED, "", source=type(module).__name__, result=type(bn).__name__)
        model = _replace(model, name, bn)
    foreign_bn.annotate(ctx, swapped)
    return model


def run_keep(model: nn.Module, ctx) -> nn.Module:
    for name, module in model.named_modules():
        if ctx.targets(name) and is_batchnorm(module):
            ctx.report.add(name, ctx.rule, KEPT, "policy 'keep'")
    return model


def _replace(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``name``; returns the (possibly new) root, for a model that is itself a BN."""
    if name == "":
        return new
    model.set_submodule(name, new)
    return model
