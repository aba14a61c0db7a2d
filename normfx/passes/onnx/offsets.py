"""The tensors around pre-activation BatchNormalizations in an ONNX graph, described to
:class:`normfx.preact.OffsetSolver`, and the solved stream representations written back (the ONNX twin of
:mod:`normfx.passes.fx.offsets`): producing Conv/Gemm nodes carry ``(scale, offset)`` in new weight and bias
initializers, Conv/Gemm nodes reading a stream tensor directly are compensated.

Offset-transparent ops: ``Add`` of two run-time tensors, ``Concat`` on axis 1, ``Slice`` of channels,
``MaxPool``/``GlobalMaxPool`` (positive scales only), ``AveragePool`` without counted padding,
``GlobalAveragePool``, ``Identity``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ...fold import fold_bn_after, fold_bn_before
from ...preact import OffsetSolver, Solution, propagate_channels
from .edits import input_name
from .workspace import Workspace, node_label

__all__ = ["Layer", "layer_of", "set_layer", "transparent", "Region", "carried_by"]


@dataclass
class Layer:
    """A Conv or Gemm (``transA = 0``) with constant weight (in fold.py's layout) and bias."""

    node: gs.Node
    kind: str  # conv | linear
    weight: np.ndarray
    bias: np.ndarray | None
    groups: int = 1
    padded: bool = False

    @property
    def cin(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def cout(self) -> int:
        return self.weight.shape[0]


def layer_of(node: gs.Node, ws: Workspace) -> Layer | None:
    """The Conv/Gemm ``node`` reads as a layer normfx can edit, or None."""
    if node.domain or node.op not in ("Conv", "Gemm") or not ws.in_main_graph(node) or len(node.inputs) < 2:
        return None
    weight = ws.const(node.inputs[1])
    bias = ws.const(node.inputs[2]) if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
    if isinstance(weight, str) or isinstance(bias, str) or weight.dtype.kind != "f":
        return None
    if node.op == "Conv":
        pads = [int(p) for p in node.attrs.get("pads", [])]
        padded = any(pads) or node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID", b"NOTSET", b"VALID")
        return Layer(node, "conv", weight, bias, int(node.attrs.get("group", 1)), padded)
    attrs = node.attrs
    if int(attrs.get("transA", 0)) or float(attrs.get("alpha", 1.0)) != 1.0 or float(attrs.get("beta", 1.0)) != 1.0:
        return None
    if weight.ndim != 2 or (bias is not None and bias.ndim != 1):
        return None
    weight = weight if int(attrs.get("transB", 0)) else weight.T
    return Layer(node, "linear", weight, bias)


def set_layer(layer: Layer, weight: np.ndarray, bias: np.ndarray | None, ws: Workspace) -> None:
    """New weight and bias initializers for ``layer`` (weight in fold.py's layout)."""
    node = layer.node
    if layer.kind == "linear" and not int(node.attrs.get("transB", 0)):
        weight = weight.T
    old = list(node.inputs[1:])
    ws.set_input(node, 1, ws.constant(input_name(node, 1, "weight"), np.asarray(weight)))
    if bias is not None:
        ws.set_input(node, 2, ws.constant(input_name(node, 2, "bias"), np.asarray(bias)))
    for tensor in old:
        ws.drop_if_unused(tensor)


def _slice(node: gs.Node, ws: Workspace) -> slice | None:
    values = [ws.const(t) if not t.is_empty() else None for t in node.inputs[1:5]]
    if len(values) < 3 or any(isinstance(v, str) for v in values) or values[2] is None:
        return None
    starts, ends, axes = (np.asarray(v).reshape(-1) for v in values[:3])
    steps = np.asarray(values[3]).reshape(-1) if len(values) > 3 and values[3] is not None else np.ones(1)
    if axes.tolist() != [1] or steps.tolist() != [1] or len(starts) != 1 or len(ends) != 1:
        return None
    return slice(int(starts[0]), int(min(ends[0], 2**62)))


def transparent(node: gs.Node, ws: Workspace) -> tuple[str, list[gs.Tensor]] | None:
    """``("add" | "cat" | "select" | "max" | "avg", data inputs)`` for an op an offset passes through."""
    if node.domain or not ws.in_main_graph(node) or len(node.outputs) != 1:
        return None
    op, inputs = node.op, list(node.inputs)
    if op == "Add" and len(inputs) == 2 and all(isinstance(ws.const(t), str) for t in inputs):
        return "add", inputs
    if op == "Concat" and int(node.attrs.get("axis", 0)) == 1:
        return "cat", inputs
    if op == "Slice" and _slice(node, ws) is not None:
        return "select", inputs[:1]
    if op in ("MaxPool", "GlobalMaxPool"):
        return "max", inputs[:1]
    if op == "GlobalAveragePool" or op == "Identity":
        return "avg", inputs[:1]
    if op == "AveragePool":
        pads = [int(p) for p in node.attrs.get("pads", [])]
        if any(pads) and int(node.attrs.get("count_include_pad", 0)):
            return None
        return "avg", inputs[:1]
    return None


class Region:
    """The stream tensors of a set of pre-activation BNs (by tensor name), their producers and readers."""

    def __init__(self, ws: Workspace, sites: list) -> None:
        self.ws = ws
        self.reason = ""
        self.sites = {id(s.node): s for s in sites}
        self.tensors: dict[str, gs.Tensor] = {}
        self.channels: dict[str, int] = {}
        self.edits: list[tuple[gs.Node, str, str]] = []  # (node, role, key)
        queue = [s.x for s in sites]
        while queue:
            tensor = queue.pop()
            if tensor.name in self.tensors:
                continue
            self.tensors[tensor.name] = tensor
            producer = tensor.inputs[0] if tensor.inputs else None
            op = transparent(producer, ws) if producer is not None else None
            if op is not None:
                queue.extend(op[1])
            for user in ws.consumers(tensor):
                if transparent(user, ws) is not None:
                    queue.append(user.outputs[0])
        self._infer_channels()

    def _infer_channels(self) -> None:
        ws, channels = self.ws, self.channels
        for name, tensor in self.tensors.items():
            dims = ws.shapes.raw(name)
            if dims is not None and len(dims) >= 2 and isinstance(dims[1], int):
                channels[name] = int(dims[1])
            elif tensor.inputs and layer_of(tensor.inputs[0], ws) is not None:
                channels[name] = layer_of(tensor.inputs[0], ws).cout
            for user in ws.consumers(tensor):
                if id(user) in self.sites:
                    channels[name] = self.sites[id(user)].channels
        ops = {}  # through the transparent ops
        for name, tensor in self.tensors.items():
            op = transparent(tensor.inputs[0], ws) if tensor.inputs else None
            if op is not None:
                ops[name] = (op[0], [t.name for t in op[1]])
        propagate_channels(ops, channels, lambda name, n: len(range(n)[_slice(self.tensors[name].inputs[0], ws)]))
        unknown = [n for n in self.tensors if n not in channels]
        if unknown:
            self.reason = f"the channel count of {unknown[0]!r} is unknown (no shape information)"

    def _order(self) -> list[str]:
        names = []
        for name, tensor in self.tensors.items():
            if not tensor.inputs:
                names.append((-1, name))
        index = {id(n): i for i, n in enumerate(self.ws.graph.nodes)}
        for name, tensor in self.tensors.items():
            if tensor.inputs:
                names.append((index.get(id(tensor.inputs[0]), -1), name))
        return [n for _, n in sorted(names)]

    def describe(self, solver: OffsetSolver, kinds: dict[int, str]) -> None:
        ws = self.ws
        order = self._order()
        for name in order:
            tensor = self.tensors[name]
            producer = tensor.inputs[0] if tensor.inputs else None
            op = transparent(producer, ws) if producer is not None else None
            layer = layer_of(producer, ws) if producer is not None else None
            if layer is not None:
                solver.producer(name, self.channels[name])
                self.edits.append((producer, "producer", name))
            elif op is None:
                what = node_label(producer) if producer is not None else f"the graph input {name!r}"
                solver.source(name, self.channels[name], what)
            elif op[0] == "add":
                solver.add(name, [t.name for t in op[1]])
            elif op[0] == "cat":
                solver.cat(name, [t.name for t in op[1]])
            elif op[0] == "select":
                indices = np.arange(self.channels[op[1][0].name])[_slice(producer, ws)]
                solver.select(name, op[1][0].name, indices)
            else:
                solver.pool(name, op[1][0].name, positive=op[0] == "max")
        for name in order:
            tensor = self.tensors[name]
            if ws.is_graph_output(tensor):
                solver.require_zero(name, False, "the graph output")
            for user in ws.consumers(tensor):
                if transparent(user, ws) is not None:
                    continue
                site = self.sites.get(id(user))
                if site is not None and user.inputs[0] is tensor:
                    solver.site(id(site), name, site.scale, site.shift, kinds[id(site)], f"{site.name!r}")
                    continue
                layer = layer_of(user, ws)
                if layer is None or user.inputs[0] is not tensor or any(t is tensor for t in user.inputs[1:]):
                    solver.require_zero(name, False, node_label(user))
                elif layer.padded:
                    solver.require_zero(name, True, node_label(user))
                    self.edits.append((user, "scale", name))
                else:
                    self.edits.append((user, "absorb", name))

    def apply_streams(self, solution: Solution) -> None:
        for node, role, key in self.edits:
            a, o = solution.scale[key], solution.offset[key]
            if np.all(a == 1) and np.all(o == 0):
                continue
            layer = layer_of(node, self.ws)
            if role == "producer":
                weight, bias = fold_bn_after(layer.weight, layer.bias, a, o, kind=layer.kind, groups=layer.groups)
            else:
                repeat = layer.cin // a.size
                shift = -o / a if role == "absorb" else np.zeros_like(o)
                weight, bias = fold_bn_before(layer.weight, layer.bias, np.repeat(1.0 / a, repeat),
                                              np.repeat(shift, repeat), kind=layer.kind, groups=layer.groups)
                if role == "scale" and layer.bias is None:
                    bias = None
            set_layer(layer, weight, bias, self.ws)


def carried_by(ws: Workspace, tensor: gs.Tensor) -> str:
    """The layers whose bias carries the offset ``tensor`` holds."""
    names, seen, queue = [], set(), [tensor]
    while queue:
        t = queue.pop()
        if t.name in seen or not t.inputs:
            continue
        seen.add(t.name)
        op = transparent(t.inputs[0], ws)
        if op is not None:
            queue.extend(op[1])
        elif layer_of(t.inputs[0], ws) is not None:
            names.append(f"{t.inputs[0].op} {t.inputs[0].name!r}")
    return ", ".join(sorted(names)) or "nothing"
