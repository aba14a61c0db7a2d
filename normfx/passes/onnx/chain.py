"""Shape-only ops between a layer and a BN (Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Identity).

A per-channel affine commutes with such a chain exactly when the channel axis survives it *intact*:
every element of channel ``c`` on one side is an element of channel ``c`` on the other. :func:`track`
follows the channel axis through one op on symbolic shapes (:mod:`.shapes`): a Transpose moves it;
a reshape-like op keeps it when the dims before it multiply to the same thing on both sides and
the channel dim itself is unchanged (row-major order then maps channel ``c`` to channel ``c``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from .shapes import Dim, dim, dims_text, divide, prod
from .workspace import Workspace, node_label

__all__ = ["CHAIN_OPS", "Chain", "track", "walk_up", "walk_down", "follow"]

CHAIN_OPS = frozenset({"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity"})


def _is_chain(node: gs.Node) -> bool:
    return node.op in CHAIN_OPS and not node.domain


@dataclass
class Chain:
    """Shape ops in data order, from the layer's output to the BN's input (or BN output to a layer)."""

    nodes: list[gs.Node]

    @property
    def ops(self) -> list[str]:
        return [n.op for n in self.nodes]


def _axes(node: gs.Node, ws: Workspace) -> list[int] | None | str:
    """Squeeze/Unsqueeze axes from the attribute (opset < 13) or the second input (opset >= 13)."""
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    if len(node.inputs) > 1 and not node.inputs[1].is_empty():
        value = ws.const(node.inputs[1], "axes")
        if isinstance(value, str):
            return value
        return [int(a) for a in np.asarray(value).reshape(-1)]
    return None


def _reshape_out(node: gs.Node, dims: list[Dim], ws: Workspace) -> list[Dim] | str:
    target = ws.const(node.inputs[1], "Reshape shape") if len(node.inputs) > 1 else "Reshape has no shape input"
    if isinstance(target, str):
        inferred = ws.shapes.dims(node.outputs[0].name)
        if inferred is None:
            return f"{target} and its output shape is unknown"
        return inferred
    allowzero = int(node.attrs.get("allowzero", 0))
    out: list[Dim | None] = []
    for i, v in enumerate(int(x) for x in np.asarray(target).reshape(-1)):
        if v == 0 and not allowzero:
            if i >= len(dims):
                return "Reshape copies a dimension the input does not have"
            out.append(dims[i])
        elif v == -1:
            out.append(None)
        else:
            out.append(dim(v))
    if out.count(None) > 1:
        return "Reshape shape has more than one -1"
    if None in out:
        known = prod(d for d in out if d is not None)
        rest = divide(prod(dims), known)
        out[out.index(None)] = rest if rest is not None else dim(None)
    return [d for d in out if d is not None]


def _reshape_like_out(node: gs.Node, dims: list[Dim], ws: Workspace) -> list[Dim] | str:
    rank = len(dims)
    if node.op == "Identity":
        return list(dims)
    if node.op == "Flatten":
        f = int(node.attrs.get("axis", 1))
        f = f + rank if f < 0 else f
        return [prod(dims[:f]), prod(dims[f:])]
    if node.op == "Reshape":
        return _reshape_out(node, dims, ws)
    axes = _axes(node, ws)
    if isinstance(axes, str):
        return axes
    if node.op == "Squeeze":
        if axes is None:
            if any(d[1] for d in dims):
                return "Squeeze without axes on a tensor whose shape is not static"
            return [d for d in dims if d != (1, ())]
        drop = {a + rank if a < 0 else a for a in axes}
        return [d for i, d in enumerate(dims) if i not in drop]
    # Unsqueeze
    if axes is None:
        return "Unsqueeze without axes"
    out_rank = rank + len(axes)
    ins = sorted(a + out_rank if a < 0 else a for a in axes)
    out: list[Dim] = []
    it = iter(dims)
    for i in range(out_rank):
        out.append((1, ()) if i in ins else next(it))
    return out


def track(node: gs.Node, dims: list[Dim], axis: int, ws: Workspace) -> tuple[list[Dim], int] | str:
    """Follow channel ``axis`` of a tensor of shape ``dims`` through shape op ``node``.

    Returns the output's ``(dims, axis)``, or why the channels do not come through intact.
    """
    if node.op == "Transpose":
        perm = [int(p) for p in node.attrs.get("perm", list(reversed(range(len(dims)))))]
        if sorted(perm) != list(range(len(dims))):
            return f"{node_label(node)} has perm {perm} for a rank-{len(dims)} tensor"
        return [dims[p] for p in perm], perm.index(axis)
    out = _reshape_like_out(node, dims, ws)
    if isinstance(out, str):
        return f"{node_label(node)}: {out}"
    before, channel = prod(dims[:axis]), dims[axis]
    for b in range(len(out)):
        if prod(out[:b]) == before and out[b] == channel:
            return out, b
    return (
        f"{node_label(node)} turns shape {dims_text(dims)} into {dims_text(out)}, "
        f"mixing channel axis {axis} with other dims (not a per-channel map on the other side)"
    )


def follow(chain: Chain, dims: list[Dim], axis: int, ws: Workspace) -> tuple[list[Dim], int] | str:
    """:func:`track` through every op of ``chain``."""
    for node in chain.nodes:
        result = track(node, dims, axis, ws)
        if isinstance(result, str):
            return result
        dims, axis = result
    return dims, axis


def walk_up(tensor: gs.Tensor) -> tuple[gs.Node | None, Chain]:
    """From ``tensor`` up through shape ops: the first other producer (or None) and the chain between."""
    nodes: list[gs.Node] = []
    while tensor.inputs:
        producer = tensor.inputs[0]
        if not _is_chain(producer) or not producer.inputs:
            return producer, Chain(list(reversed(nodes)))
        nodes.append(producer)
        tensor = producer.inputs[0]
    return None, Chain(list(reversed(nodes)))


def walk_down(tensor: gs.Tensor, first: gs.Node, ws: Workspace) -> tuple[gs.Node, gs.Tensor, Chain] | str:
    """From consumer ``first`` of ``tensor`` down through shape ops with a single consumer each.

    Returns the first other node, the tensor it reads, and the chain; or why the walk stops.
    """
    nodes: list[gs.Node] = []
    node = first
    while _is_chain(node) and node.inputs and node.inputs[0] is tensor:
        out = node.outputs[0]
        if ws.is_graph_output(out):
            return f"{node_label(node)} output {out.name!r} is a graph output"
        readers = ws.data_consumers(out)
        if len(readers) != 1:
            return f"{node_label(node)} output {out.name!r} has {len(readers)} consumers"
        if not ws.in_main_graph(readers[0]):
            return f"{node_label(node)} output {out.name!r} is read inside a subgraph"
        nodes.append(node)
        tensor, node = out, readers[0]
    return node, tensor, Chain(nodes)


def chain_uses(chain: Chain, start: gs.Tensor, end_consumer: gs.Node, ws: Workspace) -> str | None:
    """Why the tensors from ``start`` through ``chain`` are not private to it (None when they are)."""
    tensors = [start] + [n.outputs[0] for n in chain.nodes]
    consumers = chain.nodes + [end_consumer]
    for tensor, consumer in zip(tensors, consumers):
        reason = ws.other_uses(tensor, consumer, "tensor")
        if reason:
            return reason
    return None
