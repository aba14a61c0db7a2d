"""``normfx.lint``: find the silent BatchNorm bugs of a torch model or an ONNX graph.

Each check lives in a small module by family: :mod:`.statistics` (eps, running_var, NaN/Inf),
:mod:`.precision` (fold range and precision in fp16), :mod:`.usage` (reached never / more than once, batch of
one, stray training mode), :mod:`.conventions_check` (another framework's momentum, γ from U(0, 1)),
:mod:`.structure` (bias before BN, Frozen/BN mixed in a residual block, what ``fuse`` cannot fold) and
:mod:`.onnx_checks`. The caller's model is never modified: the graph checks trace it, the fold checks run
``fuse`` on a private copy, and the one forward (only with example inputs) runs in eval mode under no_grad
with every module's mode restored.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ModelError
from ..models.init import bn_like_tensors
from . import conventions_check, precision, statistics, structure, usage
from .fixes import TORCH
from .report import ERROR, INFO, SEVERITIES, WARNING, Finding, LintReport

__all__ = ["lint", "LintReport", "Finding", "INFO", "WARNING", "ERROR", "SEVERITIES"]

log = logging.getLogger(__name__)


def _numpy(tensor: torch.Tensor | None) -> np.ndarray | None:
    return None if tensor is None else tensor.detach().double().cpu().numpy().ravel()


def _bn_layers(model: nn.Module) -> list[tuple[str, nn.Module, tuple]]:
    """``(name, module, (mean, var, weight, bias))`` of every BN-like layer (BN modules, Frozen BN, functional-BN
    modules declaring ``bn_tensor_names``)."""
    found = []
    for name, module in model.named_modules():
        tensors = bn_like_tensors(module)
        if tensors is not None:
            found.append((name, module, tensors))
    return found


def _lint_torch(model: nn.Module, example_inputs: Any, report: LintReport) -> LintReport:
    report.kind = "torch"
    layers = _bn_layers(model)
    report.layers = len(layers)
    keep: list[str] = []
    for name, module, (mean, var, weight, bias) in layers:
        eps = getattr(module, "eps", None)
        eps = float(eps) if isinstance(eps, (int, float)) else None
        values = [_numpy(t) for t in (mean, var, weight, bias)]
        errors_before = len(report.errors)
        statistics.check_eps(report, name, eps, TORCH)
        statistics.check_values(report, name, *values, TORCH)
        if len(report.errors) > errors_before:
            keep.append(name)
        precision.check_scale(report, name, values[1], values[2], eps, TORCH)
        if hasattr(module, "momentum"):
            conventions_check.check_momentum(report, name, module.momentum, TORCH)
    conventions_check.check_fresh_gamma(report, layers, TORCH)
    usage.check_modes(report, model, TORCH)
    usage.check_usage(report, model, example_inputs, TORCH)
    parts, untraceable = structure.trace_parts(model)
    bn_like = {name for name, _, _ in layers}
    structure.report_untraceable(report, [(p, why) for p, why in untraceable if p not in bn_like])
    structure.check_bias_before_bn(report, parts)
    structure.check_mixed_frozen(report, parts)
    if layers:
        subject = model
        if model.training:
            report.add(INFO, "fold", "", "the model is in training mode: the fold checks describe it in eval mode", None)
            subject = copy.deepcopy(model).eval()
        probe = structure.probe_fuse(subject, _fold_inputs(example_inputs), keep)
        structure.report_unfoldable(report, probe, TORCH, structure.torch_folded_params)
    return report


def _fold_inputs(example_inputs: Any) -> Any:
    """``fuse`` takes a tensor or a tuple of tensors; keyword inputs cannot be given to it."""
    if isinstance(example_inputs, (torch.Tensor, tuple)):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return None


def lint(model: Any, example_inputs: Any = None) -> LintReport:
    """Check every BatchNorm of ``model`` (a ``torch.nn.Module``, an ``onnx.ModelProto`` or a path to a ``.onnx``
    file) for the silent bugs of BN implementations; returns a :class:`LintReport` of findings, each with a
    severity (info / warning / error), the layer, a one-line explanation and the normfx fix when there is one.

    ``example_inputs`` (a tensor, a tuple of tensors or a dict of keyword inputs; torch only) lets the linter run
    one forward (eval mode, no grad, hooks only) to see which BN layers are reached and how often; without it
    those checks are reported as not run (an info finding). The model is never modified.
    """
    import os

    import onnx

    if isinstance(model, nn.Module):
        return _lint_torch(model, example_inputs, LintReport(model=type(model).__name__))
    if isinstance(model, (onnx.ModelProto, str, os.PathLike)):
        from .onnx_checks import lint_onnx

        label = os.fspath(model) if isinstance(model, (str, os.PathLike)) else (model.graph.name or "ModelProto")
        return lint_onnx(model, LintReport(model=label))
    raise ModelError(f"cannot lint a {type(model).__name__}: pass a torch.nn.Module, an onnx.ModelProto or a .onnx path")
