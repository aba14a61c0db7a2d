"""Checks on how BN layers are used, seen in one forward of the example inputs: a BN never reached, a BN reached
more than once per forward (its EMA is then updated once per call), a train-mode BN fed a batch of one; and,
without any forward, a BN left in training mode inside an eval-mode model.

The forward runs with the whole model in eval mode under ``torch.no_grad()``: forward pre-hooks only record
each BN module's calls and input shapes, nothing is updated, and every module's mode is restored afterwards
(the caller's model is otherwise untouched). Without example inputs the reach checks are reported as not run.
Every BN-like module is hooked (BN modules, Frozen BN of any library, modules calling ``F.batch_norm`` on their own
tensors: one call of such a module counts as one BN call). Frozen and functional BNs have no EMA: a second call or
no call is only an info for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import InputDataError
from ..models.init import bn_like_tensors
from .fixes import Fixes
from .report import ERROR, INFO, WARNING, LintReport

__all__ = ["Calls", "record_calls", "check_usage", "check_modes"]


@dataclass
class Calls:
    """What one BN module saw during the forward."""

    count: int = 0
    shapes: list[tuple[int, ...]] = field(default_factory=list)


def _feed(model: nn.Module, inputs: Any) -> None:
    if isinstance(inputs, dict):
        model(**inputs)
    elif isinstance(inputs, (tuple, list)):
        model(*inputs)
    else:
        model(inputs)


def record_calls(model: nn.Module, inputs: Any) -> dict[int, Calls]:
    """One forward of ``inputs`` in eval mode, no grad: ``{id(module): Calls}`` for every BN-like module."""
    watched = [m for _, m in _named_bns(model)]
    calls = {id(m): Calls() for m in watched}

    def hook(module: nn.Module, args: tuple) -> None:
        seen = calls[id(module)]
        seen.count += 1
        if args and isinstance(args[0], torch.Tensor):
            seen.shapes.append(tuple(args[0].shape))

    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_pre_hook(hook) for m in watched]
    try:
        model.eval()
        with torch.no_grad():
            _feed(model, inputs)
    except Exception as exc:  # the user's model on the user's inputs: any error means they do not fit
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InputDataError(f"example inputs do not run through the model ({type(exc).__name__}: {first}); "
                             "pass inputs the model's forward accepts") from None
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return calls


def _named_bns(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """BN-like modules: BN modules, Frozen BN (normfx's or another library's), modules calling ``F.batch_norm`` on
    their own tensors (``bn_tensor_names``); a module counts as one BN call per call of its forward."""
    return [(n, m) for n, m in model.named_modules() if bn_like_tensors(m) is not None]


def _has_ema(module: nn.Module) -> bool:
    """A BN whose running statistics move in training (a ``_BatchNorm``; Frozen and functional ones do not)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats


def check_usage(report: LintReport, model: nn.Module, inputs: Any, fixes: Fixes) -> None:
    """Reached never / more than once, and a train-mode BN on one sample; reported as not run without inputs."""
    for check in ("reached", "reached_twice", "batch_of_one"):
        report.ran(check)
    bns = _named_bns(model)
    if not bns:
        return
    if inputs is None:
        report.add(INFO, "reached", "", "reach checks not run (BN never reached / reached more than once / train-mode "
                   "BN fed one sample): pass example_inputs (CLI: --input-shape)", None, not_run=True)
        return
    calls = record_calls(model, inputs)
    for name, module in bns:
        seen = calls[id(module)]
        ema = _has_ema(module)
        if seen.count == 0:
            report.add(WARNING if ema else INFO, "reached", name,
                       "defined but never reached by the forward: " + (
                           "its statistics never see data (a BN used only in some branches keeps stale statistics)"
                           if ema else "a dead layer"), None)
        elif seen.count > 1:
            why = ("in training its EMA is updated once per call, towards each call's statistics in turn" if ema
                   else "it has no EMA to update twice")
            report.add(WARNING if ema else INFO, "reached_twice", name, f"reached {seen.count} times per forward ({why})",
                       fixes.precise() if ema else None, calls=seen.count)
        if module.training and isinstance(module, nn.modules.batchnorm._BatchNorm):
            _check_batch_of_one(report, name, seen, fixes)


def _check_batch_of_one(report: LintReport, name: str, seen: Calls, fixes: Fixes) -> None:
    for shape in seen.shapes:
        if not shape or shape[0] != 1:
            continue
        values = math.prod(shape[2:]) if len(shape) > 2 else 1
        if values <= 1:
            report.add(ERROR, "batch_of_one", name,
                       f"train-mode BN fed one sample of shape {list(shape)}: one value per channel, PyTorch raises "
                       "'Expected more than 1 value per channel when training'", fixes.frozen() or None,
                       shape=list(shape))
        else:
            report.add(WARNING, "batch_of_one", name,
                       f"train-mode BN fed a batch of one (input {list(shape)}): it normalizes each sample by its own "
                       "statistics (InstanceNorm) and the EMA tracks single samples; freeze BN for small batches",
                       fixes.frozen() or None, shape=list(shape))
        return


def check_modes(report: LintReport, model: nn.Module, fixes: Fixes) -> None:
    """A BN in training mode inside a model in eval mode: at inference it normalizes with batch statistics
    and updates its EMA (``model.eval()`` was undone for it, e.g. by a later ``.train()`` on a submodule)."""
    report.ran("mode")
    if model.training:
        return
    for name, module in _named_bns(model):
        if module.training and isinstance(module, nn.modules.batchnorm._BatchNorm):
            report.add(WARNING, "mode", name, "in training mode inside an eval-mode model: at inference it normalizes "
                       "with batch statistics and keeps updating its EMA; call model.eval()", None)
