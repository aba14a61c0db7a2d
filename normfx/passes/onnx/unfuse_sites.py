"""Where ``unfuse`` can put a BatchNormalization back on an ONNX graph: the layers (Conv / ConvTranspose / Gemm /
MatMul(+Add)), their stable names, and the match → check of each (a :class:`Site`, or the reason it is
skipped: a normalization already after it, the classifier head, a weight that is not constant, a MatMul
input not proven 2-D, a Gemm ``C`` that varies along rows). :mod:`.unfuse` applies the sites.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..unfuse_options import ALREADY_NORMALIZED, CLASSIFIER_REASON
from .chain import CHAIN_OPS
from .edits import conv_params, optional_const, per_feature
from .io import NodeLocation, find_nodes, name_nodes
from .workspace import Workspace, node_label

__all__ = ["LAYER_OPS", "NORM_OPS", "Site", "layer_nodes", "name_layer_nodes", "computed_tensors", "check", "MIN_OPSET"]

LAYER_OPS = {"Conv": "conv", "ConvTranspose": "conv_transpose", "Gemm": "linear", "MatMul": "linear"}
NORM_OPS = frozenset({"BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization"})
# Ops with parameters of their own: a path from a layer to the graph output through one of them is no
# "classifier" path (the same test as the torch route's: a module with parameters takes over).
_PARAMETRIC = frozenset(LAYER_OPS) | NORM_OPS | {"PRelu"}
MIN_OPSET = 7  # BatchNormalization-7 onward (is_test / consumed_inputs gone); onnxruntime's floor as well


# ----------------------------------------------------------------------------------------------
# finding and naming the layers (main graph, subgraph bodies, local functions)


def _is_layer(node: onnx.NodeProto) -> bool:
    return node.op_type in LAYER_OPS and node.domain in ("", "ai.onnx")


def layer_nodes(model: onnx.ModelProto) -> list[NodeLocation]:
    """Every default-domain Conv/ConvTranspose/Gemm/MatMul node, in :func:`.io.find_nodes` order."""
    return find_nodes(model, _is_layer)


def name_layer_nodes(model: onnx.ModelProto) -> list[NodeLocation]:
    """Give unnamed / duplicate-named layer nodes a stable name (``{op}_{i}``), in place, as
    :func:`.io.name_batchnorm_nodes` does for BNs; idempotent."""
    return name_nodes(model, _is_layer)


# ----------------------------------------------------------------------------------------------
# match → check


@dataclass(eq=False)
class Site:
    """A layer that passed its checks: what ``apply`` needs, and what the report says."""

    node: gs.Node
    name: str
    kind: str  # fold.py's layer kind: conv, conv_transpose, linear
    weight: np.ndarray  # fold.py's layout: conv (Cout, Cin/g, k...), conv_transpose (Cin, Cout/g, k...), linear (out, in)
    bias: np.ndarray | None  # the (C,) bias the BN's B takes over
    groups: int
    channels: int
    bias_add: gs.Node | None = None  # MatMul → Add(constant): the Add that goes
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def out(self) -> gs.Tensor:
        """The tensor the new BN produces (the layer's output, or its bias Add's)."""
        return (self.bias_add or self.node).outputs[0]


def _main_consumers(tensor: gs.Tensor, ws: Workspace) -> list[gs.Node]:
    return [n for n in ws.data_consumers(tensor) if ws.in_main_graph(n)]


def _normalization_after(out: gs.Tensor, ws: Workspace) -> gs.Node | None:
    """A normalization reading ``out`` directly or through shape-only ops (Reshape, Flatten, ...)."""
    stack, seen = [out], set()
    while stack:
        tensor = stack.pop()
        for node in _main_consumers(tensor, ws):
            if id(node) in seen or node.domain:
                continue
            seen.add(id(node))
            if node.op in NORM_OPS and node.inputs and node.inputs[0] is tensor:
                return node
            if node.op in CHAIN_OPS and node.inputs and node.inputs[0] is tensor:
                stack.extend(node.outputs[:1])
    return None


def _has_subgraph(node: gs.Node) -> bool:
    return any(isinstance(v, gs.Graph) or (isinstance(v, list) and any(isinstance(g, gs.Graph) for g in v))
               for v in node.attrs.values())


def computed_tensors(ws: Workspace) -> set[int]:
    """ids of the main-graph tensors whose values depend on the values fed at run time (activations):
    not constants, nor tensors computed from shapes only (``Shape(x)``, ``ConstantOfShape(Shape(x))``)."""
    computed = {id(t) for t in ws.graph.inputs if not isinstance(t, gs.Constant) and t.name not in ws.overridable}
    for node in ws.graph.nodes:  # ONNX nodes are in topological order
        reads = any(id(t) in computed and not ws.reads_only_metadata(node, t) for t in node.inputs)
        if reads or _has_subgraph(node):
            computed.update(id(t) for t in node.outputs)
    return computed


def _single_data_input(node: gs.Node, tensor: gs.Tensor, ws: Workspace, computed: set[int]) -> bool:
    """Does ``node`` (reading ``tensor``) take exactly one computed data input, and no parameters?"""
    if node.domain or node.op in _PARAMETRIC or _has_subgraph(node):
        return False  # a layer with parameters of its own takes over; other domains / subgraphs: unknown
    data = {id(t) for t in node.inputs
            if (t is tensor or id(t) in computed) and not ws.reads_only_metadata(node, t)}
    return len(data) == 1


def _is_classifier(out: gs.Tensor, ws: Workspace, computed: set[int]) -> bool:
    """Does ``out`` reach a graph output through single-data-input, parameter-free nodes only (the
    classifier)? A node merging two computed tensors (a residual Add, a Concat) ends the path."""
    stack, seen = [out], set()
    while stack:
        tensor = stack.pop()
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if ws.is_graph_output(tensor):
            return True
        for node in _main_consumers(tensor, ws):
            if _single_data_input(node, tensor, ws, computed):
                stack.extend(t for t in node.outputs if not t.is_empty())
    return False


def _bias_add(matmul: gs.Node, n: int, ws: Workspace) -> tuple[gs.Node, np.ndarray] | None:
    """The ``Add(MatMul output, constant per-feature bias)`` after ``matmul``, when it can be absorbed."""
    out = matmul.outputs[0]
    consumers = ws.data_consumers(out)
    if len(consumers) != 1 or ws.is_graph_output(out):
        return None
    add = consumers[0]
    if add.op != "Add" or add.domain or not ws.in_main_graph(add) or len(add.inputs) != 2:
        return None
    if add.inputs[0] is out and add.inputs[1] is not out:
        index = 1
    elif add.inputs[1] is out and add.inputs[0] is not out:
        index = 0
    else:
        return None
    value = optional_const(add, index, "bias", ws)
    if value is None or isinstance(value, str):
        return None
    bias = per_feature(value, n, 2, f"{node_label(add)}'s constant")
    if bias is None or isinstance(bias, str):
        return None
    return add, bias


def _conv_site(node: gs.Node, name: str, ws: Workspace) -> Site | str:
    kind = LAYER_OPS[node.op]
    params = conv_params(node, kind, ws)
    if isinstance(params, str):
        return params
    return Site(node, name, kind, params.weight, params.bias, params.groups, params.cout)


def _gemm_site(node: gs.Node, name: str, ws: Workspace) -> Site | str:
    label = node_label(node)
    b = optional_const(node, 1, "B", ws)
    if b is None or isinstance(b, str):
        return b or f"{label} has no B input"
    if b.ndim != 2:
        return f"{label} has a B of rank {b.ndim}"
    weight = b if int(node.attrs.get("transB", 0)) else b.T  # linear layout (out, in)
    n = int(weight.shape[0])
    c = optional_const(node, 2, "C", ws)
    if isinstance(c, str):
        return c
    c_vec = per_feature(c, n, 2, f"{label}'s C")
    if isinstance(c_vec, str):
        return f"{c_vec}: a C that varies along rows is no per-feature bias a BatchNormalization can take over"
    beta = float(node.attrs.get("beta", 1.0))
    bias = None if c_vec is None else beta * c_vec
    site = Site(node, name, "linear", np.ascontiguousarray(weight), bias, 1, n)
    site.details["alpha"] = float(node.attrs.get("alpha", 1.0))
    return site


def _matmul_site(node: gs.Node, name: str, ws: Workspace) -> Site | str:
    label = node_label(node)
    w = optional_const(node, 1, "weight", ws)
    if w is None or isinstance(w, str):
        first = ws.const(node.inputs[0]) if node.inputs else "missing"
        if isinstance(first, np.ndarray):
            return f"{label}'s constant is its first operand (W @ x); only x @ W with a constant W is a linear layer"
        return w or f"{label} has no second input"
    if w.ndim != 2:
        return f"{label}'s weight has rank {w.ndim}; only a 2-D (in, out) weight is a linear layer"
    n = int(w.shape[1])
    site = Site(node, name, "linear", np.ascontiguousarray(w.T), None, 1, n)
    found = _bias_add(node, n, ws)
    if found is not None:
        site.bias_add, site.bias = found
        site.details["bias_from"] = found[0].name or node_label(found[0])
    return site


def _rank_reason(site: Site, ws: Workspace) -> str | None:
    """A MatMul's input must be proven 2-D: BN normalizes axis 1, the MatMul's features are its last."""
    if site.node.op != "MatMul":
        return None
    x = site.node.inputs[0]
    raw = ws.shapes.raw(x.name)
    if raw is not None and len(raw) == 2:
        return None
    what = "of unknown rank" if raw is None else f"of rank {len(raw)} ({list(raw)})"
    return (
        f"its input {x.name!r} is {what}: BatchNormalization normalizes axis 1 but a MatMul's features are its "
        "last axis; only a MatMul on a 2-D (batch, features) input is unfused"
    )


def check(node: gs.Node, name: str, ws: Workspace, classifier: bool, computed: set[int]) -> Site | str:
    """The site of layer ``node``, or why it is not unfused (``computed``: :func:`computed_tensors`)."""
    if node.op in ("Conv", "ConvTranspose"):
        site = _conv_site(node, name, ws)
    elif node.op == "Gemm":
        site = _gemm_site(node, name, ws)
    else:
        site = _matmul_site(node, name, ws)
    if isinstance(site, str):
        return site
    norm = _normalization_after(site.out, ws)
    if norm is not None:
        return f"{ALREADY_NORMALIZED} {node_label(norm)}: nothing to unfuse"
    if not classifier and _is_classifier(site.out, ws, computed):
        return CLASSIFIER_REASON
    return _rank_reason(site, ws) or site
