"""Policies ``ghost``, ``virtual``, ``renorm``, ``separate``, ``sync`` and the way back (``unsync``,
``batchnorm``): module swaps between BatchNorm and its training-time variants (:mod:`normfx.layers`).

Each swap keeps the layer's path, eps, momentum, affine, running statistics, counter and mode, so the
state_dict keys stay those of the BatchNorm (Separate BN stacks them per domain: a BN checkpoint still loads)
and the eval-mode output is the BN's own (the variants differ only in how *training* normalizes). No tracing:
they work on any ``nn.Module``, also in parts torch.fx cannot trace.

Targeted layers: ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` (torch's or normfx's). Anything else that is
BatchNorm-like is reported with its reason: Frozen BN (no batch statistics), BN subclasses with their own
forward or modules (timm's ``BatchNormAct2d``: normfx cannot carry the activation over), another variant
(turn it back with ``batchnorm`` first), an uninitialized lazy BN, and — for ``renorm``/``separate`` — a BN
without running statistics. The dimension-agnostic ``SyncBatchNorm`` becomes the dimension-agnostic variant
(``GhostBatchNorm`` …); going back to ``BatchNorm{1,2,3}d`` from a dimension-agnostic layer needs its input
rank, measured on ``example_inputs``.
"""

from __future__ import annotations

import math
from typing import Callable

from torch import nn

from ...errors import PolicyError
from ...layers import (
    BatchRenorm,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    FrozenBatchNorm,
    GhostBatchNorm,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    SeparateBatchNorm,
    SeparateBatchNorm1d,
    SeparateBatchNorm2d,
    SeparateBatchNorm3d,
    SyncBatchNorm,
    VirtualBatchNorm,
    VirtualBatchNorm1d,
    VirtualBatchNorm2d,
    VirtualBatchNorm3d,
    is_batchnorm,
)
from ...layers._batch_stats import copy_bn_state
from ...report import APPLIED, KEPT, SKIPPED
from .frozen import _replace
from .norm_swap import input_ranks

__all__ = ["run_ghost", "run_virtual", "run_renorm", "run_separate", "run_sync", "run_unsync", "run_batchnorm",
           "VARIANT_TYPES"]

PLAIN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
STANDARD = PLAIN + (nn.SyncBatchNorm,)
VARIANT_TYPES = (GhostBatchNorm, VirtualBatchNorm, BatchRenorm, SeparateBatchNorm, nn.SyncBatchNorm)
_FAMILIES: dict[type, dict[int | None, type]] = {
    GhostBatchNorm: {None: GhostBatchNorm, 1: GhostBatchNorm1d, 2: GhostBatchNorm2d, 3: GhostBatchNorm3d},
    VirtualBatchNorm: {None: VirtualBatchNorm, 1: VirtualBatchNorm1d, 2: VirtualBatchNorm2d, 3: VirtualBatchNorm3d},
    BatchRenorm: {None: BatchRenorm, 1: BatchRenorm1d, 2: BatchRenorm2d, 3: BatchRenorm3d},
    SeparateBatchNorm: {None: SeparateBatchNorm, 1: SeparateBatchNorm1d, 2: SeparateBatchNorm2d,
                        3: SeparateBatchNorm3d},
    nn.SyncBatchNorm: {None: SyncBatchNorm, 1: SyncBatchNorm, 2: SyncBatchNorm, 3: SyncBatchNorm},
}
_PLAIN_BY_RANK = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_RANK_BY_INPUT_DIM = {2: 1, 3: 1, 4: 2, 5: 3}


def _static_rank(module: nn.Module) -> int | None:
    """1/2/3 for a layer whose class fixes its input rank, None for a dimension-agnostic one."""
    for rank, plain in _PLAIN_BY_RANK.items():
        if isinstance(module, plain):
            return rank
    for family in _FAMILIES.values():
        for rank, cls in family.items():
            if rank is not None and type(module) is cls and cls is not family[None]:
                return rank
    return None


def _family_of(module: nn.Module) -> type | None:
    for base in _FAMILIES:
        if isinstance(module, base):
            return base
    return None


def _decline(module: nn.Module, policy: str, target: type) -> str:
    """Why ``policy`` cannot turn ``module`` (BN-like, not a standard BN) into a ``target``; '' when it can."""
    if isinstance(module, FrozenBatchNorm):
        return "Frozen BN has no batch statistics to normalize with; unfreeze it first (policy unfrozen)"
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return "lazy BatchNorm is not initialized yet: run one forward pass first"
    family = _family_of(module)
    if family is not None and family is not target and not (family is nn.SyncBatchNorm and type(module) in STANDARD
                                                             + (SyncBatchNorm,)):
        return (f"already a {type(module).__name__}; turn it back into BatchNorm first (policy batchnorm), "
                f"then apply {policy}")
    if family is None and type(module) not in STANDARD:
        return (f"{type(module).__name__} is a BatchNorm subclass with its own forward or modules; {policy} swaps "
                "only BatchNorm1d/2d/3d and SyncBatchNorm (exclude it with an override or convert it by hand)")
    return ""


def _swap(model: nn.Module, ctx, target: type, build: Callable[[nn.Module, type], nn.Module],
          same: Callable[[nn.Module], bool], *, needs_running_stats: bool = False, **details) -> nn.Module:
    """Turn every targeted standard BN into ``build(bn, cls)`` (cls: ``target``'s class for the BN's rank)."""
    for name, module in list(model.named_modules()):
        if not ctx.targets(name) or not (is_batchnorm(module) or isinstance(module, SeparateBatchNorm)):
            continue
        if isinstance(module, target) and same(module):
            ctx.report.add(name, ctx.rule, KEPT, f"already a {type(module).__name__} with these options")
            continue
        reason = _decline(module, ctx.rule, target)
        if not reason and needs_running_stats and getattr(module, "running_mean", None) is None:
            reason = f"track_running_stats=False: {ctx.rule} needs running statistics (the BN always uses batch ones)"
        if reason:
            ctx.report.add(name, ctx.rule, SKIPPED, reason)
            continue
        new = build(module, _FAMILIES[target][_static_rank(module)])
        ctx.report.add(name, ctx.rule, APPLIED, "", source=type(module).__name__, result=type(new).__name__, **details)
        model = _replace(model, name, new)
    return model


def _int_option(ctx, key: str, minimum: int) -> int:
    value = int(ctx.option(key))
    if value < minimum:
        raise PolicyError(f"policy {ctx.rule!r}: {key} must be >= {minimum}, got {value}")
    return value


def run_ghost(model: nn.Module, ctx) -> nn.Module:
    size = _int_option(ctx, "virtual_batch_size", 1)
    return _swap(model, ctx, GhostBatchNorm, lambda bn, cls: cls.from_batchnorm(bn, size),
                 lambda m: m.virtual_batch_size == size, virtual_batch_size=size)


def run_virtual(model: nn.Module, ctx) -> nn.Module:
    size = _int_option(ctx, "reference_size", 1)
    before = len(ctx.report.applied)
    model = _swap(model, ctx, VirtualBatchNorm, lambda bn, cls: cls.from_batchnorm(bn, size),
                  lambda m: m.reference_size == size and m.reference_mode == "recent", reference_size=size)
    if len(ctx.report.applied) > before:
        ctx.report.note(f"virtual: every VirtualBatchNorm takes its training statistics over the batch plus up to "
                        f"{size} recent samples (forward-only, no gradient): per layer and step, statistics over N + "
                        f"{size} samples instead of N and a buffer of {size} samples; measured overhead in "
                        "benchmarks/bench_bn_variants.py")
    return model


def run_renorm(model: nn.Module, ctx) -> nn.Module:
    r_max, d_max = float(ctx.option("r_max")), float(ctx.option("d_max"))
    if not (math.isfinite(r_max) and r_max >= 1.0):
        raise PolicyError(f"policy 'renorm': r_max must be a finite number >= 1, got {r_max}")
    if not (math.isfinite(d_max) and d_max >= 0.0):
        raise PolicyError(f"policy 'renorm': d_max must be a finite number >= 0, got {d_max}")
    warmup, ramp = _int_option(ctx, "warmup_steps", 0), _int_option(ctx, "ramp_steps", 0)
    options = {"r_max": r_max, "d_max": d_max, "warmup_steps": warmup, "ramp_steps": ramp}
    return _swap(model, ctx, BatchRenorm, lambda bn, cls: cls.from_batchnorm(bn, r_max, d_max, warmup, ramp),
                 lambda m: all(getattr(m, k) == v for k, v in options.items()), needs_running_stats=True, **options)


def run_separate(model: nn.Module, ctx) -> nn.Module:
    domains, shared = _int_option(ctx, "num_domains", 1), bool(ctx.option("shared_affine"))
    return _swap(model, ctx, SeparateBatchNorm, lambda bn, cls: cls.from_batchnorm(bn, domains, shared),
                 lambda m: m.num_domains == domains and m.shared_affine == shared, needs_running_stats=True,
                 num_domains=domains, shared_affine=shared)


def run_sync(model: nn.Module, ctx) -> nn.Module:
    return _swap(model, ctx, nn.SyncBatchNorm,
                 lambda bn, cls: SyncBatchNorm.from_batchnorm(bn, getattr(bn, "process_group", None)),
                 lambda m: isinstance(m, SyncBatchNorm))


# ------------------------------------------------------------------------------------------------ the way back


def _to_plain(module: nn.Module, cls: type, domain: int) -> nn.Module:
    if isinstance(module, SeparateBatchNorm):
        return module.to_batchnorm(domain, cls)
    ref = module.running_mean if module.running_mean is not None else module.weight
    bn = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
             device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)
    return copy_bn_state(module, bn)


def _back(model: nn.Module, ctx, kinds: tuple[type, ...], what: str, domain: int = 0) -> nn.Module:
    found = [(name, m) for name, m in model.named_modules()
             if ctx.targets(name) and (is_batchnorm(m) or isinstance(m, SeparateBatchNorm))]
    agnostic = {name: m for name, m in found if isinstance(m, kinds) and _static_rank(m) is None}
    measured = input_ranks(model, ctx.example_inputs, agnostic)
    for name, module in found:
        if not isinstance(module, kinds):
            ctx.report.add(name, ctx.rule, KEPT, f"not {what}")
            continue
        if isinstance(module, SeparateBatchNorm) and not 0 <= domain < module.num_domains:
            raise PolicyError(f"policy {ctx.rule!r}: domain={domain} but layer {name} has {module.num_domains} domains")
        rank = _static_rank(module)
        if rank is None:
            ranks = {_RANK_BY_INPUT_DIM.get(d) for d in measured.get(name, ())}
            if len(ranks) != 1 or None in ranks:
                seen = sorted(measured.get(name, ()))
                reason = ("its input rank is unknown: pass example_inputs (CLI: --input-shape) so normfx can pick "
                          "BatchNorm1d/2d/3d" if not seen else
                          f"it sees inputs of rank {seen}, which no single BatchNorm1d/2d/3d accepts")
                ctx.report.add(name, ctx.rule, SKIPPED, f"{type(module).__name__}: {reason}")
                continue
            rank = ranks.pop()
        bn = _to_plain(module, _PLAIN_BY_RANK[rank], domain)
        details = {"domain": domain} if isinstance(module, SeparateBatchNorm) else {}
        ctx.report.add(name, ctx.rule, APPLIED, "", source=type(module).__name__, result=type(bn).__name__, **details)
        model = _replace(model, name, bn)
    return model


def run_unsync(model: nn.Module, ctx) -> nn.Module:
    return _back(model, ctx, (nn.SyncBatchNorm,), "a SyncBatchNorm")


def run_batchnorm(model: nn.Module, ctx) -> nn.Module:
    domain = _int_option(ctx, "domain", 0)
    return _back(model, ctx, VARIANT_TYPES, "a Ghost/Virtual/Renorm/Separate/Sync BatchNorm", domain)
