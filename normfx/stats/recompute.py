"""Precise and adaptive BN: replace running statistics by the population estimate over data.

``precise``: the data is the training distribution; the stored EMA (biased, estimated on a moving
model) is replaced by the true average over N batches of the frozen model. ``adaptive``: the same
algorithm on target-domain data (AdaBN), to adapt a model to a shifted domain. The old statistics
are reset, not blended.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable

import torch
from torch import nn

from ..errors import InputDataError, ModelError, PolicyError
from ..layers.frozen import FrozenBatchNorm
from ..report import APPLIED, SKIPPED, Report
from .collect import Collected, collect_stats

__all__ = [
    "MODES",
    "recompute_stats",
    "recompute_stats_with_report",
    "run_precise",
    "run_adaptive",
    "select_layers",
    "apply_stats",
]

log = logging.getLogger(__name__)

MODES = ("precise", "adaptive")

_FROZEN_REASON = "FrozenBatchNorm has constant statistics by design; turn it back into BatchNorm ('unfrozen') to recompute them"
_UNTRACKED_REASON = "track_running_stats=False: the layer always normalizes with batch statistics; nothing to recompute"


def unwrap_parallel(model: nn.Module) -> nn.Module:
    parallel = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    if isinstance(model, parallel):
        log.info("using the module inside %s", type(model).__name__)
        return model.module
    return model


def select_layers(
    model: nn.Module, targets: Callable[[str], bool], report: Report | None, rule: str
) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The targeted BN layers whose statistics can be recomputed; others targeted are reported skipped.

    Raises :class:`ModelError` when the model has no BatchNorm-like layer at all.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise ModelError("TorchScript modules are not supported: pass the eager nn.Module (before torch.jit.script/trace)")
    found = False
    layers: dict[str, nn.modules.batchnorm._BatchNorm] = {}
    for name, module in model.named_modules():
        if isinstance(module, FrozenBatchNorm):
            found = True
            if targets(name) and report is not None:
                report.add(name, rule, SKIPPED, _FROZEN_REASON)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            found = True
            if not targets(name):
                continue
            if module.running_mean is None or module.running_var is None:
                if report is not None:
                    report.add(name, rule, SKIPPED, _UNTRACKED_REASON)
                continue
            layers[name] = module
    if not found:
        raise ModelError(
            f"{type(model).__name__} has no BatchNorm layer: precise/adaptive statistics only apply to BatchNorm "
            "(check that the model is the one you meant)"
        )
    return layers


def apply_stats(layers: dict[str, nn.Module], collected: Collected, report: Report | None, rule: str, mode: str) -> None:
    """Write each reached layer's population mean and unbiased variance into its running buffers.

    ``num_batches_tracked`` becomes the number of calls averaged, so a later ``momentum=None``
    (cumulative average) training run continues the estimate with the right weight. Layers never
    reached keep their statistics and are reported skipped (and logged as a warning).
    """
    if layers and not any(collected.layers[name].reached for name in layers):
        raise InputDataError(
            f"the data reached none of the {len(layers)} BatchNorm layer(s) in {collected.batches} batch(es); "
            "check the data and forward="
        )
    for name, module in layers.items():
        s = collected.layers[name]
        if not s.reached:
            reason = f"never reached by the data in {collected.batches} batch(es): running statistics left unchanged"
            log.warning("%s: %s", name, reason)
            if report is not None:
                report.add(name, rule, SKIPPED, reason, batches=collected.batches)
            continue
        m = s.moments
        mean, var = m.mean.to(module.running_mean.dtype), m.var_unbiased.to(module.running_var.dtype)
        if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
            raise InputDataError(
                f"layer {name!r}: the statistics of its input are not finite in {module.running_var.dtype} "
                "(NaN/inf activations, or a variance beyond the buffer's range); check the data, or use a float32 model"
            )
        with torch.no_grad():
            module.running_mean.copy_(mean)
            module.running_var.copy_(var)
            if getattr(module, "num_batches_tracked", None) is not None:
                module.num_batches_tracked.fill_(s.calls)
        if report is not None:
            report.add(
                name,
                rule,
                APPLIED,
                f"{mode} statistics over {int(m.count)} values per channel from {s.calls} call(s) in {s.batches} batch(es)",
                mode=mode,
                count=int(m.count),
                calls=s.calls,
                batches=s.batches,
                world_size=collected.world_size,
            )


def _recompute_into(
    model: nn.Module,
    data: Any,
    *,
    targets: Callable[[str], bool],
    report: Report | None,
    rule: str,
    mode: str,
    num_batches: int | None,
    forward: Callable[[nn.Module, Any], Any] | None,
    progress: bool,
) -> Collected | None:
    layers = select_layers(model, targets, report, rule)
    if not layers:
        return None
    collected = collect_stats(
        model, data, layers, num_batches=num_batches, forward=forward, progress=progress, desc=f"{mode} BN"
    )
    apply_stats(layers, collected, report, rule, mode)
    return collected


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise PolicyError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")


def recompute_stats_with_report(
    model: Any,
    data: Any,
    *,
    num_batches: int | None = None,
    mode: str = "precise",
    forward: Callable[[nn.Module, Any], Any] | None = None,
    progress: bool = True,
) -> tuple[Any, Report]:
    """Like :func:`recompute_stats`, and also return the :class:`~normfx.report.Report` (one entry per BN)."""
    check_mode(mode)
    from .onnx_recompute import check_no_forward, is_onnx_model, recompute_onnx

    if is_onnx_model(model):
        check_no_forward(forward)
        result, report, _, _ = recompute_onnx(model, data, num_batches=num_batches, mode=mode, progress=progress)
        return result, report
    if not isinstance(model, nn.Module):
        raise ModelError(f"recompute_stats needs a torch.nn.Module, got {type(model).__name__}")
    work = copy.deepcopy(unwrap_parallel(model))
    report = Report(policy=mode, model=type(work).__name__)
    collected = _recompute_into(
        work, data, targets=lambda name: True, report=report, rule=mode, mode=mode,
        num_batches=num_batches, forward=forward, progress=progress,
    )
    if collected is None:
        raise ModelError(
            f"{type(work).__name__} has no BatchNorm layer with running statistics to recompute "
            f"({len(report.skipped)} skipped: {'; '.join(str(e) for e in report.skipped[:3])})"
        )
    return work, report


def recompute_stats(
    model: Any,
    data: Any,
    *,
    num_batches: int | None = None,
    mode: str = "precise",
    forward: Callable[[nn.Module, Any], Any] | None = None,
    progress: bool = True,
) -> Any:
    """Return a copy of ``model`` whose BatchNorm running statistics are the population estimate over ``data``.

    Every BN layer's ``running_mean``/``running_var`` is replaced (not blended) by the per-channel
    mean and unbiased variance of all values its input took over the batches of ``data``, weighted
    by element count and accumulated in float64. During the pass only the BN layers normalize with
    batch statistics; everything else runs as in eval mode (dropout off); no gradients are computed;
    a BN called several times per forward accumulates every call. The input model is untouched; the
    copy keeps its train/eval modes and momenta.

    ONNX models: pass an ``onnx.ModelProto`` or a path to a ``.onnx`` file and get a new ``ModelProto``
    (the caller's proto and file are untouched). Every BatchNormalization node of the main graph gets
    the statistics of its own input, measured in onnxruntime with the node on batch statistics
    (:mod:`normfx.stats.onnx_recompute`); batches are arrays/tensors, ``(inputs, *targets)`` or
    ``{graph input name: array}`` dicts; ``forward`` does not apply.

    Args:
        model: any ``nn.Module`` with BatchNorm layers (DataParallel/DDP wrappers are unwrapped), or an
            ONNX model (``onnx.ModelProto`` or path).
        data: an iterable of batches: tensors, tuples/lists ``(inputs, *targets)`` (first element
            fed), or dicts (fed as keyword arguments). Tensors are moved to the model's device.
        num_batches: use only the first ``num_batches`` batches (``None``/0: all).
        mode: ``"precise"`` (training-distribution data) or ``"adaptive"`` (target-domain data);
            the algorithm is the same, the mode is recorded in the report.
        forward: ``forward(model, batch)`` feeds a batch yourself (the batch is passed untouched).
        progress: a tqdm bar on stderr (only when stderr is a terminal, and on rank 0).

    Under torch.distributed, call it on every rank with the rank's share of the data: sums are
    gathered so every rank ends with the same statistics, those of the union of the data.

    Raises:
        InputDataError: empty data, a batch with one value per channel at some BN, a batch the model
            cannot run (the message names the batch and its shapes), non-finite statistics.
        ModelError: the model has no BatchNorm layer with running statistics.

    BN layers no batch reached keep their statistics and are logged; see
    :func:`recompute_stats_with_report` for the per-layer report.
    """
    result, _ = recompute_stats_with_report(
        model, data, num_batches=num_batches, mode=mode, forward=forward, progress=progress
    )
    return result


def _run_pass(model: nn.Module, ctx: Any, mode: str) -> nn.Module:
    if ctx.dry_run:  # explain: say what would happen, with or without data
        layers = select_layers(model, ctx.targets, ctx.report, ctx.rule)
        needs = "" if ctx.data is not None else " (needs data=: an iterable of batches)"
        for name in layers:
            ctx.report.add(name, ctx.rule, APPLIED, f"would recompute {mode} statistics from data{needs}", mode=mode)
        return model
    if ctx.data is None:
        raise InputDataError(
            f"policy {ctx.rule!r} measures statistics and needs data: pass data= an iterable of batches"
        )
    num_batches = ctx.option("num_batches")
    _recompute_into(
        model, ctx.data, targets=ctx.targets, report=ctx.report, rule=ctx.rule, mode=mode,
        num_batches=num_batches or None, forward=ctx.feed, progress=True,
    )
    return model


def run_precise(model: nn.Module, ctx: Any) -> nn.Module:
    """Policy ``precise``: recompute the targeted BN layers' statistics over ``ctx.data`` (in place on the private copy)."""
    return _run_pass(model, ctx, "precise")


def run_adaptive(model: nn.Module, ctx: Any) -> nn.Module:
    """Policy ``adaptive``: the same on target-domain ``ctx.data`` (adaptive BN)."""
    return _run_pass(model, ctx, "adaptive")
