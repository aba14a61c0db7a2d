"""Checks on the model's graph (torch.fx): a conv/linear bias right before a BN (redundant), Frozen BN and
trainable BN mixed in one residual block; and what ``fuse`` would do (:func:`probe_fuse`): each BN it cannot
fold, with ``explain``'s reason, and the folded parameters for the fp16 check.

The graph comes from the same tracer the passes use (a submodule torch.fx cannot trace becomes a leaf and its
children are traced in turn); a part that stays untraceable is reported as not seen. A residual block is read
from the graph, not from module names: for each addition of two computed tensors, the nodes between their
nearest common ancestor (the fork) and the addition; the block's name is the innermost module holding the
addition.
"""

from __future__ import annotations

import copy
import glob
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from ..errors import NormfxError
from ..layers import FrozenBatchNorm, is_batchnorm
from ..passes.fx.patterns import layer_info
from ..passes.fx.tracing import TracedPart, rewrite_traceable_parts
from ..report import APPLIED, SKIPPED, Report
from .fixes import Fixes
from .precision import check_fold_overflow
from .report import INFO, WARNING, LintReport

__all__ = ["trace_parts", "check_bias_before_bn", "check_mixed_frozen", "FuseProbe", "probe_fuse",
           "report_unfoldable"]

_ADDS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")


def trace_parts(model: nn.Module) -> tuple[list[TracedPart], list[tuple[str, str]]]:
    """Every traced part of ``model`` and the ``(path, why)`` of the parts torch.fx could not trace. The
    caller's model is not modified (an untraceable module is copied before its children are traced)."""
    parts: list[TracedPart] = []
    untraceable: list[tuple[str, str]] = []

    def keep(part: TracedPart) -> fx.GraphModule:
        parts.append(part)
        return part.graph_module

    rewrite_traceable_parts(model, keep, lambda path, why: untraceable.append((path, why)),
                            make_private=copy.deepcopy)
    return parts, untraceable


def _module(part: TracedPart, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    try:
        return part.graph_module.get_submodule(str(node.target))
    except AttributeError:
        return None


def check_bias_before_bn(report: LintReport, parts: list[TracedPart]) -> None:
    """A Conv/ConvTranspose/Linear with a bias whose only use is a trainable BatchNorm: the BN subtracts the
    (batch) mean, so the bias gets zero gradient and changes nothing but the running mean. Not flagged: a
    layer called more than once, an output with other users, a Frozen BN after it (there the bias is the only
    trainable shift)."""
    report.ran("bias_before_bn")
    for part in parts:
        calls: dict[str, int] = {}
        for node in part.graph_module.graph.nodes:
            if node.op == "call_module":
                calls[str(node.target)] = calls.get(str(node.target), 0) + 1
        for node in part.graph_module.graph.nodes:
            bn = _module(part, node)
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not node.args:
                continue
            source = node.args[0]
            layer = _module(part, source) if isinstance(source, fx.Node) else None
            if layer is None or layer_info(layer) is None or getattr(layer, "bias", None) is None:
                continue
            if len(source.users) != 1 or calls[str(source.target)] != 1:
                continue
            name, bn_name = part.qualified(str(source.target)), part.qualified(str(node.target))
            report.add(WARNING, "bias_before_bn", name,
                       f"'{name}' has a bias and its only use is BatchNorm '{bn_name}', which subtracts the mean: a "
                       "redundant parameter (zero gradient in training); build it with bias=False (in eval the bias "
                       "only shifts running_mean)", None, bn=bn_name)


def _is_residual_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADDS:
        args = node.args[:2]
    elif node.op == "call_method" and node.target in _ADD_METHODS:
        args = node.args[:2]
    else:
        return False
    return len(args) == 2 and all(isinstance(a, fx.Node) for a in args)


def _block_name(part: TracedPart, node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    inner = next(reversed(stack), "") if stack else ""
    return part.qualified(inner) if inner else part.qualified(node.name)


def _is_frozen(module: nn.Module) -> bool:
    return isinstance(module, FrozenBatchNorm) or "FrozenBatchNorm" in type(module).__name__


def check_mixed_frozen(report: LintReport, parts: list[TracedPart]) -> None:
    """Frozen BN and trainable BN in one residual block: half of the block adapts its normalization while the
    other half stays fixed, usually an override glob that caught only part of a block."""
    report.ran("mixed_frozen")
    for part in parts:
        nodes = list(part.graph_module.graph.nodes)
        index = {node: i for i, node in enumerate(nodes)}
        ancestors: dict[fx.Node, int] = {}  # bit i set: nodes[i] is an ancestor
        for node in nodes:
            mask = 0
            for arg in node.all_input_nodes:
                mask |= ancestors[arg] | (1 << index[arg])
            ancestors[node] = mask
        seen: set[str] = set()
        for node in nodes:
            if not _is_residual_add(node):
                continue
            a, b = node.args[:2]
            reach_a, reach_b = ancestors[a] | (1 << index[a]), ancestors[b] | (1 << index[b])
            common = reach_a & reach_b
            if not common:
                continue
            fork = common.bit_length() - 1
            inside = (reach_a | reach_b) & ~(ancestors[nodes[fork]] | (1 << fork))
            frozen, trainable = [], []
            for i in range(inside.bit_length()):
                if inside >> i & 1:
                    module = _module(part, nodes[i])
                    if module is not None and (is_batchnorm(module) or _is_frozen(module)):
                        (frozen if _is_frozen(module) else trainable).append(part.qualified(str(nodes[i].target)))
            block = _block_name(part, node)
            if frozen and trainable and block not in seen:
                seen.add(block)
                report.add(WARNING, "mixed_frozen", block,
                           f"residual block mixes Frozen BN ({', '.join(frozen)}) and trainable BN "
                           f"({', '.join(trainable)}): one branch keeps fixed statistics while the other follows the "
                           "batch; freeze or train the whole block", None, frozen=frozen, trainable=trainable)


def report_untraceable(report: LintReport, untraceable: list[tuple[str, str]]) -> None:
    """Each part torch.fx could not trace, once, with the most specific reason (its own trace's error)."""
    reasons: dict[str, str] = {}
    for path, why in untraceable:
        if path not in reasons or reasons[path] == "torch.fx cannot trace it":
            reasons[path] = why
    for path, why in reasons.items():
        report.add(INFO, "structure", path, f"torch.fx cannot trace it ({why}): the graph checks (bias before BN, "
                   "mixed Frozen/BN blocks) do not see its own forward", None)


@dataclass
class FuseProbe:
    """What ``fuse`` does to the model: its report and the fused model (``None`` when fuse could not run)."""

    report: Report | None
    result: Any
    failure: str = ""


def probe_fuse(model: Any, example_inputs: Any, keep: list[str]) -> FuseProbe:
    """Run ``fuse`` on a private copy (the same code as ``normfx.explain(model, "fuse")``, keeping the result), with
    the layers in ``keep`` (undefined statistics, already reported) left out."""
    from ..engine import rewrite_with_report

    policy: Any = {**{glob.escape(name): "keep" for name in keep}, "*": "fuse"} if keep else "fuse"
    if keep and isinstance(model, nn.Module):
        model = _neutralized(model, keep)
    try:
        result, fuse_report = rewrite_with_report(model, policy, example_inputs=example_inputs)
    except NormfxError as exc:
        return FuseProbe(None, None, " ".join(str(exc).split()))
    return FuseProbe(fuse_report, result)


@torch.no_grad()
def _neutralized(model: nn.Module, names: list[str]) -> nn.Module:
    """A copy of ``model`` whose layers ``names`` hold identity statistics: torch's ``fuse`` reads every BN's affine
    before applying the policy, and undefined statistics (NaN, var + eps <= 0) would stop it for the whole model."""
    from ..models.init import bn_like_tensors

    copied = copy.deepcopy(model)
    for name in names:
        tensors = bn_like_tensors(copied.get_submodule(name)) if name else None
        for tensor, value in zip(tensors or (), (0.0, 1.0, 1.0, 0.0)):
            if tensor is not None:
                tensor.fill_(value)
    return copied


def _fold_hint(reason: str, fixes: Fixes) -> str | None:
    if "border_correction=true" in reason:
        return fixes.border_correction()
    return None


def report_unfoldable(report: LintReport, probe: FuseProbe, fixes: Fixes, folded_params) -> None:
    """Each BN ``fuse`` skips (info, with ``explain``'s reason), and the fp16 range of each fold it applies
    (``folded_params(result, into)`` → ``{name: float64 array}`` of the folded layer)."""
    report.ran("fold")
    if probe.report is None:
        report.add(INFO, "fold", "", f"fuse could not run, so the fold checks did not: {probe.failure}", None)
        return
    for entry in probe.report.entries:
        if entry.status == SKIPPED:
            report.add(INFO, "fold", entry.name, f"fuse cannot fold it: {entry.reason}", _fold_hint(entry.reason, fixes),
                       reason=entry.reason)
        elif entry.status == APPLIED and "into" in entry.details:
            params = folded_params(probe.result, entry.details["into"])
            if params is not None:
                check_fold_overflow(report, entry.name, entry.details["into"], params, fixes)


def torch_folded_params(result: nn.Module, into: str) -> dict[str, np.ndarray] | None:
    try:
        module = result.get_submodule(into)
    except AttributeError:
        return None
    return {name: p.detach().double().cpu().numpy() for name, p in module.named_parameters(recurse=False)}
