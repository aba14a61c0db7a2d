"""Rule: Conv / ConvTranspose / Linear outputs → concat on the channel axis → BatchNorm folds slice by slice.

A per-channel affine after ``torch.cat([a, b, …], dim=1)`` is the concatenation of its restrictions to each
input's channels, so each slice folds backward into the layer producing that input (``fold_bn_after``), exactly.
Every input must be such a layer's output with no other user (Inception, dual-path and MixNet's mixed-kernel
concatenations). When exactly one input is not, the others still fold and the exact remainder is the BN on
that input's channels only, moved before the concat (a smaller BN: the same one op, on fewer channels).
With two or more such inputs the BN is kept whole: one BN is cheaper than one per input; the reason lists each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx, nn

from ...fold import fold_bn_after
from ...report import APPLIED, SKIPPED
from ...slices import channel_axis, concat_ranges, restrict
from .frozen import STANDARD_BATCHNORM
from .graph_state import GraphState, set_parameters
from .patterns import BnSite, describe_node

__all__ = ["check", "apply", "CONCAT_FUNCTIONS"]

CONCAT_FUNCTIONS = (torch.cat, torch.concat, torch.concatenate)
_BN_BY_DIMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@dataclass
class Plan:
    """What folds where: ``folds`` (input position, layer node, channel indices), and at most one ``remainder``
    (input position, input node, channel indices, reason it cannot take its slice)."""

    cat: fx.Node
    folds: list[tuple[int, fx.Node, np.ndarray]] = field(default_factory=list)
    remainder: tuple[int, fx.Node, np.ndarray, str] | None = None
    rank: int | None = None


def concat_parts(node) -> tuple[list, int] | None:
    """``(inputs, dim)`` of a ``torch.cat``/``torch.concat``/``torch.concatenate`` call, or None."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in CONCAT_FUNCTIONS:
        return None
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", node.kwargs.get("axis", 0))
    if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
        return None
    return list(tensors), dim


def _channels(layer) -> int:
    weight = layer.module.weight
    return int(weight.shape[1] * layer.groups if layer.kind == "conv_transpose" else weight.shape[0])


def _rank(layer) -> int:
    return 2 if layer.kind == "linear" else layer.module.weight.dim()


def _input_reason(state: GraphState, cat: fx.Node, inputs: list, i: int) -> tuple[object | None, str]:
    """The layer info of input ``i`` when its slice can fold into it, else None and why not."""
    source = inputs[i]
    if not isinstance(source, fx.Node):
        return None, f"input {i} is a constant"
    layer = state.layer(source)
    if layer is None:
        return None, f"input {i} comes from {describe_node(state.gm, source)}, not a Conv/ConvTranspose/Linear"
    if sum(1 for x in inputs if x is source) > 1:
        return None, f"input {i} ('{source.target}') is concatenated more than once"
    others = [describe_node(state.gm, u) for u in source.users if u is not cat]
    if others:
        return None, f"the output of '{source.target}' (input {i}) is also used by {', '.join(others)}"
    shared = state.shared_reason(source)
    if shared:
        return None, f"input {i}: {shared}"
    if layer.kind == "linear":
        reason = state.shapes.linear_rank_reason(layer.module, str(source.target), "BN")
        if reason:
            return None, f"input {i}: {reason}"
    return layer, ""


def check(state: GraphState, site: BnSite) -> Plan | str:
    """The slice-by-slice plan for ``site``, "" when its input is no concat, or the reason it is declined."""
    cat = site.input_node
    parts = concat_parts(cat)
    if parts is None:
        return ""
    inputs, dim = parts
    layers = [_input_reason(state, cat, inputs, i) for i in range(len(inputs))]
    ranks = {_rank(layer) for layer, _ in layers if layer is not None}
    rank = ranks.pop() if len(ranks) == 1 else None
    on_channels = channel_axis(dim, rank)
    if not on_channels:
        where = f"dim={dim}" + ("" if on_channels is False else " with the rank unknown")
        return f"concat on {where}, not the channel axis 1: the BN's channels are not the inputs' channels"
    others = [describe_node(state.gm, u) for u in cat.users if u is not site.node]
    if others:
        return f"the concat output is also used by {', '.join(others)}: folding into its inputs would change that use"
    bad = [(i, why) for i, (layer, why) in enumerate(layers) if layer is None]
    if len(bad) == len(inputs):
        return "no concat input can take its slice (" + "; ".join(why for _, why in bad) + ")"
    if len(bad) > 1:
        return (f"{len(bad)} of {len(inputs)} concat inputs cannot take their slice ("
                + "; ".join(why for _, why in bad) + "): a smaller BN on each would cost more ops than the one BN")
    known = sum(_channels(layer) for layer, _ in layers if layer is not None)
    total = len(site.scale)
    if known > total or (not bad and known != total):
        return f"the concat inputs' layers produce {known} channels but the BN has {total}"
    sizes = [_channels(layer) if layer is not None else total - known for layer, _ in layers]
    ranges = concat_ranges(sizes)
    plan = Plan(cat, rank=rank)
    for i, (layer, why) in enumerate(layers):
        if layer is None:
            plan.remainder = (i, inputs[i], ranges[i], why)
        else:
            plan.folds.append((i, inputs[i], ranges[i]))
    return plan


def _remainder_module(state: GraphState, site: BnSite, index: np.ndarray, rank: int, like: torch.Tensor) -> nn.Module:
    """The BN restricted to ``index``: the same stock BN class on those channels, else a BN holding the affine
    (in ``like``'s dtype and device: the folded layers')."""
    original = state.gm.get_submodule(site.node.target) if site.node.op == "call_module" else None
    if type(original) in STANDARD_BATCHNORM and original.running_mean is not None and original.affine:
        cls = type(original) if type(original) is not nn.SyncBatchNorm else _BN_BY_DIMS[max(1, rank - 2)]
        bn = cls(len(index), eps=original.eps, momentum=original.momentum)
        picks = torch.as_tensor(index, dtype=torch.long, device=original.running_mean.device)
        with torch.no_grad():
            for name in ("running_mean", "running_var", "weight", "bias"):
                getattr(bn, name).copy_(getattr(original, name).detach()[picks])
        return bn.to(device=original.running_mean.device, dtype=original.running_mean.dtype).eval()
    scale, shift = restrict(site.scale, site.shift, index)
    bn = _BN_BY_DIMS[max(1, rank - 2)](len(index), eps=0.0)
    with torch.no_grad():
        bn.weight.copy_(torch.as_tensor(scale))
        bn.bias.copy_(torch.as_tensor(shift))
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
    return bn.to(device=like.device, dtype=like.dtype).eval()


def apply(state: GraphState, site: BnSite, plan: Plan) -> list[tuple[str, str, str, dict]]:
    """Fold each slice into its layer; move the remainder (if any) before the concat; take the BN out.
    Returns the report entries ``(name, status, reason, details)``: the site, applied, and the remainder BN
    left in the graph, skipped with its reason."""
    into, slices, notes = [], [], []
    for _, node, index in plan.folds:
        module, note = state.own_module(node)
        layer = state.layer(node)
        scale, shift = restrict(site.scale, site.shift, index)
        weight, bias = fold_bn_after(module.weight.detach(), None if module.bias is None else module.bias.detach(),
                                     scale, shift, kind=layer.kind, groups=layer.groups)
        set_parameters(module, weight, bias)
        name = state.part.qualified(str(node.target))
        into.append(name)
        slices.append(f"{name} {_span(index)}")
        if note:
            notes.append(note)
    details: dict = {"into": into, "direction": "backward", "slices": slices}
    reason = f"folded slice by slice into {', '.join(slices)}"
    entries = []
    if plan.remainder is not None:
        position, source, index, why = plan.remainder
        like = state.gm.get_submodule(str(plan.folds[0][1].target)).weight
        module = _remainder_module(state, site, index, plan.rank or 4, like)
        local = state.fresh_name(str(site.node.target if site.node.op == "call_module" else site.node.name)
                                 .replace(".", "_") + "_remainder")
        state.gm.add_submodule(local, module)
        with state.gm.graph.inserting_before(plan.cat):
            moved = state.gm.graph.call_module(local, (source,))
        tensors = list(plan.cat.args[0])
        tensors[position] = moved
        plan.cat.args = (type(plan.cat.args[0])(tensors),) + tuple(plan.cat.args[1:])
        name = state.part.qualified(local)
        details["remainder"] = name
        reason += (f"; remainder: a BN on channels {_span(index)} of concat input {position} only, moved before the "
                   f"concat as '{name}' (that input: {why})")
        entries.append((name, SKIPPED, f"remainder of '{site.name}' on channels {_span(index)}, kept before concat "
                        f"input {position}: {why}; a smaller BN on that input alone is the cheapest exact form", {}))
    if notes:
        details["note"] = "; ".join(notes)
    if site.post:
        details["kept_after"] = list(site.post)
    state.remove_bn(site, plan.cat)
    return [(site.name, APPLIED, reason, details), *entries]


def _span(index: np.ndarray) -> str:
    return f"[{int(index[0])}:{int(index[-1]) + 1}]" if len(index) else "[]"
