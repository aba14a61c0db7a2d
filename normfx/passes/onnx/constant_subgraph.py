"""Constant subgraphs: every node of the main graph computed from constants only becomes an initializer.

Proxy Norm's statistics (``E[φ(γ ỹ + β)]``, ``Var[…]`` over the proxy quantiles) and Weight
Standardization's kernel (``(W − mean) / sqrt(var + eps)``) are functions of the parameters alone;
an eval-mode export computes them on every run (``ReduceMean``, ``Sub``, ``Mul``, ``Sqrt``,
``Reciprocal``/``Div``, the activation on the quantiles, ...). This rule evaluates each such node
once — in graph order, each node on the values of its inputs, with ONNX's reference implementation
(:mod:`onnx.reference`) under the model's own opsets, so every op and dtype follows the ONNX
definition — and replaces what the rest of the graph reads by initializers of the same names. A
Conv whose weight came out of such a subgraph (a StdConv) then has a plain initializer weight, which
the BatchNormalization and affine rules fold into.

Match: a default-domain node whose inputs are all constants (initializers that are not graph inputs,
Constant nodes, outputs of nodes this rule evaluates; ``CastLike``'s target counts by its type), and
a ``Shape`` whose (``start:end``) dims shape inference proved static (``Shape(x)[1:2]``, the channel
count the dynamo exporter reads to build a GroupNorm's default affine, is static under a dynamic batch).
Constant nodes themselves are left alone (they are constants already). Decline (the node is kept, and
reported with the reason): random ops, nodes with subgraphs, custom domains; a value the reference
implementation cannot compute; a value read inside a subgraph, or that is a graph output; a value
larger than 1 MiB *and* more than twice the constants it is computed from (``Expand``,
``ConstantOfShape``, ``Tile``: folding would bloat the file). One report entry per connected group of
evaluated nodes, named after the last one.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.ir.tensor import LazyValues

from .affine_site import entry_name
from .constants import needs_only_dtype
from .io import first_line
from .workspace import Workspace, node_label

__all__ = ["RULE", "Outcome", "run"]

log = logging.getLogger(__name__)

RULE = "constant_subgraph"
RANDOM_OPS = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli", "Dropout"}
)
MAX_GROWTH_BYTES = 1 << 20


@dataclass
class Outcome:
    """One report entry: a group of evaluated nodes (applied) or a node kept (declined)."""

    name: str
    folded: bool
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


def _has_subgraph(node: gs.Node) -> bool:
    return any(isinstance(v, gs.Graph) or (isinstance(v, list) and v and isinstance(v[0], gs.Graph))
               for v in node.attrs.values())


def _evaluate(node: gs.Node, inputs: list[np.ndarray | None], ws: Workspace) -> list[np.ndarray]:
    """The outputs of ``node`` on constant ``inputs``, by ONNX's reference implementation."""
    from onnx.reference import ReferenceEvaluator

    proto = OnnxExporter.export_node(node)
    names = [f"i{i}" if v is not None else "" for i, v in enumerate(inputs)]
    outs = [f"o{i}" for i in range(len(node.outputs))]
    del proto.input[:]
    proto.input.extend(names)
    del proto.output[:]
    proto.output.extend(outs)
    graph_inputs = [
        helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
        for n, v in zip(names, inputs) if v is not None
    ]
    graph_outputs = [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in outs]
    graph = helper.make_graph([proto], "constant", graph_inputs, graph_outputs)
    model = helper.make_model(graph, opset_imports=list(ws.model.opset_import))
    model.ir_version = ws.model.ir_version
    feeds = {n: v for n, v in zip(names, inputs) if v is not None}
    with np.errstate(all="ignore"):
        results = ReferenceEvaluator(model).run(None, feeds)
    return [np.asarray(r) for r in results]


class _Sweep:
    """The values of every constant-computable tensor, found in one pass in graph order."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.values: dict[int, np.ndarray] = {}  # id(tensor) -> value, for outputs of evaluated nodes
        self.evaluated: list[gs.Node] = []
        self.declined: list[tuple[gs.Node, str]] = []

    def value(self, tensor: gs.Tensor, node: gs.Node, index: int) -> np.ndarray | None | str:
        if tensor.is_empty():
            return None
        if id(tensor) in self.values:
            return self.values[id(tensor)]
        if needs_only_dtype(node.op, index):
            dtype = tensor.dtype if tensor.dtype is not None else self.ws.shapes.dtype(tensor.name)
            return np.empty(0, dtype=dtype) if dtype is not None else "unknown type"
        if isinstance(tensor, gs.Constant) or (tensor.inputs and tensor.inputs[0].op == "Constant"):
            return self.ws.const(tensor)
        return "computed at run time"

    def run(self) -> None:
        ws = self.ws
        for node in list(ws.graph.nodes):
            if node.op == "Constant" or not node.inputs or not node.outputs:
                continue
            static = self._static_shape(node)
            if static is not None:
                self.values[id(node.outputs[0])] = static
                self.evaluated.append(node)
                continue
            inputs: list[np.ndarray | None] = []
            for i, tensor in enumerate(node.inputs):
                value = self.value(tensor, node, i)
                if isinstance(value, str):
                    break
                inputs.append(value)
            else:
                if all(v is None for v in inputs):
                    continue
                reason = self._refuse(node)
                if reason is None:
                    try:
                        outputs = _evaluate(node, inputs, ws)
                    except Exception as exc:  # the reference implementation refuses the node
                        reason = f"the reference implementation cannot evaluate it ({first_line(exc)})"
                    else:
                        for tensor, value in zip(node.outputs, outputs):
                            self.values[id(tensor)] = value
                        self.evaluated.append(node)
                        continue
                self.declined.append((node, reason))

    def _static_shape(self, node: gs.Node) -> np.ndarray | None:
        """``Shape(x)`` (or its ``start:end`` slice) where shape inference proved those dims static."""
        if node.op != "Shape" or node.domain not in (None, "", "ai.onnx") or len(node.outputs) != 1:
            return None
        tensor = node.inputs[0]
        if isinstance(tensor, gs.Constant) or id(tensor) in self.values or tensor.is_empty():
            return None
        raw = self.ws.shapes.raw(tensor.name)
        if raw is None:
            return None
        rank = len(raw)
        start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
        end = rank if end is None else int(end)
        start, end = (start + rank if start < 0 else start), (end + rank if end < 0 else end)
        dims = raw[max(0, min(start, rank)):max(0, min(end, rank))]
        if not all(isinstance(d, int) and d > 0 for d in dims):
            return None
        return np.array(dims, dtype=np.int64)

    @staticmethod
    def _refuse(node: gs.Node) -> str | None:
        if node.domain not in (None, "", "ai.onnx"):
            return f"its domain {node.domain!r} is not the default ONNX domain"
        if node.op in RANDOM_OPS:
            return f"{node.op} is random (or has a training mode); it must run every time"
        if _has_subgraph(node):
            return f"{node.op} has subgraphs"
        return None


def _group_of(nodes: list[gs.Node]) -> dict[int, int]:
    """Connected groups of evaluated nodes (linked through the tensors one computes for another)."""
    parent = {id(n): id(n) for n in nodes}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for node in nodes:
        for tensor in node.inputs:
            if tensor.inputs and id(tensor.inputs[0]) in parent:
                parent[find(id(node))] = find(id(tensor.inputs[0]))
    return {i: find(i) for i in parent}


def _source_bytes(node: gs.Node, sweep: _Sweep, seen: set[int]) -> int:
    """Bytes of the constants (initializers, Constant nodes) that ``node``'s value is computed from."""
    total = 0
    for tensor in node.inputs:
        if tensor.is_empty() or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        producer = tensor.inputs[0] if tensor.inputs else None
        if producer is not None and id(tensor) in sweep.values:
            total += _source_bytes(producer, sweep, seen)
        else:
            value = sweep.ws.const(tensor)
            total += value.nbytes if isinstance(value, np.ndarray) else 0
    return total


def _frontier(node: gs.Node, ws: Workspace, inside: set[int]) -> list[gs.Tensor]:
    """Outputs of evaluated ``node`` that something outside ``inside`` (the nodes folded) reads."""
    out = []
    for tensor in node.outputs:
        if ws.is_graph_output(tensor) or any(id(r) not in inside for r in ws.consumers(tensor)):
            out.append(tensor)
    return out


def _live(nodes: list[gs.Node], ws: Workspace) -> list[gs.Node]:
    """The evaluated nodes whose values reach the rest of the graph (dead code is left alone)."""
    evaluated = {id(n) for n in nodes}
    live: set[int] = set()
    for node in reversed(nodes):
        for tensor in node.outputs:
            readers = ws.consumers(tensor)
            if ws.is_graph_output(tensor) or any(id(r) not in evaluated or id(r) in live for r in readers):
                live.add(id(node))
                break
    return [n for n in nodes if id(n) in live]


def _name(node: gs.Node) -> str:
    return entry_name(node)


def run(ws: Workspace, targets: Any = None) -> list[Outcome]:
    """Fold the constant subgraphs of ``ws`` (those ``targets(name)`` allows); returns the report outcomes."""
    sweep = _Sweep(ws)
    sweep.run()
    allowed = [n for n in _live(sweep.evaluated, ws) if targets is None or targets(_name(n))]
    outcomes = [
        Outcome(_name(node), False, reason, {"op": node.op})
        for node, reason in sweep.declined
        if targets is None or targets(_name(node))
    ]
    # Values that must stay computed (graph outputs, read in subgraphs, too large): their nodes are
    # kept, which puts their inputs on the frontier; repeat until stable.
    inside = {id(n) for n in allowed}
    while True:
        newly = []
        for node in allowed:
            if id(node) not in inside:
                continue
            for tensor in _frontier(node, ws, inside):
                reason = _keep_reason(tensor, node, sweep)
                if reason:
                    newly.append((node, reason))
                    break
        if not newly:
            break
        for node, reason in newly:
            inside.discard(id(node))
            outcomes.append(Outcome(_name(node), False, reason, {"op": node.op}))
    folded = [n for n in allowed if id(n) in inside]
    if not folded:
        return outcomes
    groups = _group_of(folded)
    members: dict[int, list[gs.Node]] = {}
    for node in folded:
        members.setdefault(groups[id(node)], []).append(node)
    produced: dict[int, list[tuple[str, list[int], str]]] = {}
    for node in folded:
        for tensor in _frontier(node, ws, inside):
            value = sweep.values[id(tensor)]
            proto = numpy_helper.from_array(np.ascontiguousarray(value), tensor.name)
            const = gs.Constant(tensor.name, LazyValues(proto))
            for reader in list(ws.consumers(tensor)):
                for i, t in enumerate(reader.inputs):
                    if t is tensor:
                        ws.set_input(reader, i, const)
            produced.setdefault(groups[id(node)], []).append((tensor.name, list(value.shape), str(value.dtype)))
    for node in reversed(folded):  # nothing reads them any more
        ws.remove(node)
    for root, nodes in members.items():
        ops = Counter(n.op for n in nodes)
        op_text = ", ".join(f"{op}×{k}" if k > 1 else op for op, k in ops.items())
        made = produced.get(root, [])
        made_text = ", ".join(f"{name!r} {tuple(shape)}" for name, shape, _ in made)
        reason = (f"evaluated once: {len(nodes)} node(s) computed from constants only ({op_text}) "
                  f"replaced by initializer(s) {made_text}")
        details = {"nodes": [_name(n) for n in nodes], "ops": dict(ops),
                   "initializers": [{"name": n, "shape": s, "dtype": d} for n, s, d in made]}
        outcomes.append(Outcome(_name(nodes[-1]), True, reason, details))
    log.debug("constant subgraphs: %d node(s) folded into %d group(s)", len(folded), len(members))
    return outcomes


def _keep_reason(tensor: gs.Tensor, node: gs.Node, sweep: _Sweep) -> str | None:
    ws = sweep.ws
    if ws.is_graph_output(tensor):
        return f"its output {tensor.name!r} is a graph output"
    inside = [r for r in ws.consumers(tensor) if not ws.in_main_graph(r)]
    if inside:
        return f"its output {tensor.name!r} is read inside a subgraph ({node_label(inside[0])})"
    value = sweep.values[id(tensor)]
    if value.nbytes > MAX_GROWTH_BYTES:
        source = _source_bytes(node, sweep, set())
        if value.nbytes > 2 * source:
            return (f"its output {tensor.name!r} would be a {value.nbytes / 2**20:.1f} MiB initializer, "
                    f"{value.nbytes / max(source, 1):.0f}× the constants it is computed from")
    return None
