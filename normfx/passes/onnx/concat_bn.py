"""Conv / ConvTranspose outputs → Concat (channel axis) → BatchNormalization: fold slice by slice.

A per-channel affine after a channel concatenation is the concatenation of its restrictions to each input's
channels, so each slice folds backward into the Conv/ConvTranspose producing that input (``fold_bn_after``),
exactly (Inception, dual-path and MixNet's mixed-kernel concatenations). Every input must be such a layer's
output read by nothing else. When exactly one input is not, the others still fold and the exact remainder is a
smaller BatchNormalization — the same statistics on that input's channels only — moved before the Concat (one
op, as before, on fewer channels). With two or more such inputs the BN is kept: one BN op is cheaper than one
per input. Gemm/MatMul inputs are not folded slice by slice (declined with that reason).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from ...fold import fold_bn_after
from ...slices import channel_axis, concat_ranges, restrict
from .bn import BnSite
from .edits import ConvParams, bypass_backward, conv_params, input_name, pattern, shared_reason
from .rule import Decline, Fold, FoldOptions
from .workspace import Workspace, node_label

__all__ = ["find", "RULE"]

RULE = "concat_bn"
KINDS = {"Conv": "conv", "ConvTranspose": "conv_transpose"}


@dataclass
class _Plan:
    folds: list[tuple[gs.Node, ConvParams, np.ndarray]] = field(default_factory=list)
    remainder: tuple[int, gs.Tensor, np.ndarray, str] | None = None


def _input(cat: gs.Node, i: int, ws: Workspace, options: FoldOptions) -> tuple[gs.Node, ConvParams] | str:
    """The Conv/ConvTranspose that input ``i`` of ``cat`` comes from and its constants, or why its slice cannot
    fold into it."""
    tensor = cat.inputs[i]
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is None or producer.op not in KINDS or producer.domain:
        source = node_label(producer) if producer is not None else f"{tensor.name!r} (no layer)"
        return f"input {i} comes from {source}, not a Conv/ConvTranspose"
    if sum(1 for t in cat.inputs if t is tensor) > 1:
        return f"input {i} ({tensor.name!r}) is concatenated more than once"
    reason = ws.other_uses(tensor, cat, f"input {i}")
    if reason:
        return reason
    params = conv_params(producer, KINDS[producer.op], ws)
    if isinstance(params, str):
        return f"input {i}: {params}"
    reason = shared_reason(producer, (1, 2), ws, options.duplicate_shared)
    if reason:
        return f"input {i}: {reason}"
    return producer, params


def _plan(site: BnSite, cat: gs.Node, ws: Workspace, options: FoldOptions) -> _Plan | str:
    inputs = [_input(cat, i, ws, options) for i in range(len(cat.inputs))]
    bad = [(i, why) for i, why in enumerate(inputs) if isinstance(why, str)]
    if len(bad) == len(inputs):
        return "no Concat input can take its slice (" + "; ".join(why for _, why in bad) + ")"
    if len(bad) > 1:
        return (f"{len(bad)} of {len(inputs)} Concat inputs cannot take their slice ("
                + "; ".join(why for _, why in bad) + "): a smaller BN on each would cost more ops than the one BN")
    known = sum(found[1].cout for found in inputs if not isinstance(found, str))
    if known > site.channels or (not bad and known != site.channels):
        return f"the Concat inputs' layers produce {known} channels but the BatchNormalization has {site.channels}"
    sizes = [found[1].cout if not isinstance(found, str) else site.channels - known for found in inputs]
    plan = _Plan()
    for i, (found, index) in enumerate(zip(inputs, concat_ranges(sizes))):
        if isinstance(found, str):
            plan.remainder = (i, cat.inputs[i], index, found)
        else:
            plan.folds.append((found[0], found[1], index))
    return plan


def _span(index: np.ndarray) -> str:
    return f"[{int(index[0])}:{int(index[-1]) + 1}]" if len(index) else "[]"


def find(site: BnSite, ws: Workspace, *, options: FoldOptions = FoldOptions()) -> Fold | Decline | None:
    """The slice-by-slice fold of ``site`` into the layers feeding the Concat before it, if there is one."""
    cat = site.x.inputs[0] if site.x.inputs else None
    if cat is None or cat.op != "Concat" or cat.domain:
        return None
    dims = ws.shapes.dims(site.x.name)
    weights = [t.inputs[0].inputs[1] for t in cat.inputs if t.inputs and t.inputs[0].op in KINDS
               and len(t.inputs[0].inputs) > 1]
    rank = len(dims) if dims is not None else (len(weights[0].shape) if weights and weights[0].shape else None)
    axis = int(cat.attrs.get("axis", 0))
    on_channels = channel_axis(axis, rank)
    if not on_channels:
        where = f"axis {axis}" + ("" if on_channels is False else " with the rank unknown")
        return Decline(RULE, f"{node_label(cat)} concatenates on {where}, not the channel axis 1: "
                             "the BN's channels are not its inputs' channels")
    reason = ws.other_uses(site.x, site.node, "the Concat output")
    if reason:
        return Decline(RULE, reason)
    plan = _plan(site, cat, ws, options)
    if isinstance(plan, str):
        return Decline(RULE, plan)
    slices = [f"{node_label(layer)} {_span(index)}" for layer, _, index in plan.folds]
    details = {"direction": "backward", "into": [layer.name or node_label(layer) for layer, _, _ in plan.folds],
               "pattern": pattern("Conv", "Concat", "BatchNormalization"), "slices": slices}
    if plan.remainder is not None:
        position, _, index, why = plan.remainder
        details["remainder"] = (f"a BatchNormalization on channels {_span(index)} of Concat input {position} only, "
                                f"moved before the Concat (that input: {why})")

    def apply() -> None:
        for layer, params, index in plan.folds:
            scale, shift = restrict(site.scale, site.shift, index)
            new_w, new_b = fold_bn_after(params.weight, params.bias, scale, shift, kind=KINDS[layer.op],
                                         groups=params.groups)
            old = list(layer.inputs[1:])
            ws.set_input(layer, 1, ws.constant(input_name(layer, 1, "weight"), new_w))
            ws.set_input(layer, 2, ws.constant(input_name(layer, 2, "bias"), new_b))
            for tensor in old:
                ws.drop_if_unused(tensor)
        if plan.remainder is not None:
            position, _, index, why = plan.remainder
            node = _insert_remainder(site, cat, plan.remainder, ws)
            details["added"] = details["remainder_node"] = node.name
            details["remainder_reason"] = (
                f"remainder of '{site.name}' on channels {_span(index)}, kept before Concat input {position}: {why}; "
                "a smaller BatchNormalization on that input alone is the cheapest exact form")
        bypass_backward(site, cat, ws)

    return Fold(RULE, ", ".join(slices), apply, details)


def _insert_remainder(site: BnSite, cat: gs.Node, remainder: tuple, ws: Workspace) -> gs.Node:
    """A BatchNormalization with the site's statistics on ``index`` only, between input ``position`` and ``cat``."""
    position, tensor, index, _ = remainder
    base = site.node.name or "BatchNormalization"
    params = []
    for i, key in enumerate(("scale", "B", "mean", "var")):
        value = np.asarray(ws.const(site.node.inputs[1 + i], key))  # constant: read_bn checked it
        params.append(ws.constant(f"{base}.{key}_remainder", value[index]))
    out = ws.variable_like(f"{tensor.name}_bn_remainder", tensor)
    node = gs.Node("BatchNormalization", name=ws.fresh(f"{base}_remainder"), inputs=[tensor, *params], outputs=[out],
                   attrs=dict(site.node.attrs))  # epsilon, and is_test / spatial in old opsets
    ws.set_input(cat, position, out)
    previous = next(i for i, n in enumerate(ws.graph.nodes) if n is cat) - 1
    ws.insert_after(ws.graph.nodes[previous], node)
    return node
