"""``Relu → Add(c)``, c a per-channel constant: ``relu(a) + c = max(a + c, c)`` exactly, so ``c`` moves into what
produces ``a`` (a per-channel Add by a constant, or a Conv/Gemm bias) and the Relu becomes ``Max(·, c)``.

This is what the affine rules leave before a zero-padded conv when a Proxy Norm post-affine follows a ReLU (the
shift cannot be a bias there: the padding would see it). After the rewrite the padded conv reads the true values
and the Add is gone; the torch route does the same in its Proxy Norm fold (``torch.maximum`` with per-channel
bounds). Only when ``a`` has no other reader (it changes) and the Relu output only feeds the Add.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from .offsets import layer_of, set_layer
from .sign_clamp import per_channel
from .workspace import Workspace, node_label

__all__ = ["Rewrite", "RULE", "run"]

RULE = "relu_offset"


@dataclass
class Rewrite:
    name: str  # the Add taken out
    into: str  # what absorbed its constant
    relu: str


def _constant_operand(node: gs.Node, ws: Workspace) -> tuple[int, np.ndarray] | None:
    """(index, value) of the one constant input of a two-input node, else None."""
    found = [(i, ws.const(t)) for i, t in enumerate(node.inputs)]
    constants = [(i, v) for i, v in found if not isinstance(v, str)]
    return constants[0] if len(node.inputs) == 2 and len(constants) == 1 else None


def _absorber(producer: gs.Node, ws: Workspace, rank: int, channels: int) -> Callable[[np.ndarray], str] | None:
    """A function adding a per-channel vector to ``producer``'s output (returns what it edited), or None."""
    if producer.op == "Add" and not producer.domain and ws.in_main_graph(producer):
        operand = _constant_operand(producer, ws)
        if operand is None:
            return None
        index, value = operand
        value = np.asarray(value)
        if value.dtype.kind != "f" or per_channel(value, rank) is None or per_channel(value, rank).size != channels:
            return None

        def add_to_constant(c: np.ndarray) -> str:
            shape = value.shape if value.ndim == rank else (1,) * (rank - value.ndim) + value.shape
            new = (value.astype(np.float64).reshape(shape) + c.reshape((1, -1) + (1,) * (rank - 2))).astype(value.dtype)
            old = producer.inputs[index]
            ws.set_input(producer, index, ws.constant(old.name, new))
            ws.drop_if_unused(old)
            return producer.name or node_label(producer)

        return add_to_constant
    layer = layer_of(producer, ws)
    if layer is None or layer.weight.shape[0] != channels:
        return None

    def add_to_bias(c: np.ndarray) -> str:
        bias = np.zeros(channels) if layer.bias is None else layer.bias.astype(np.float64)
        set_layer(layer, layer.weight, (bias + c).astype(layer.weight.dtype), ws)  # weight in fold.py's layout
        return producer.name or node_label(producer)

    return add_to_bias


def _match(relu: gs.Node, ws: Workspace):
    if relu.op != "Relu" or relu.domain or len(relu.inputs) != 1 or not ws.in_main_graph(relu):
        return None
    out, source = relu.outputs[0], relu.inputs[0]
    users = ws.consumers(out)
    if len(users) != 1 or ws.is_graph_output(out):
        return None
    add = users[0]
    if add.op != "Add" or add.domain or len(add.inputs) != 2 or sum(t is out for t in add.inputs) != 1:
        return None
    rank = len(ws.shapes.raw(source.name) or ())
    operand = _constant_operand(add, ws)
    if rank < 2 or operand is None or np.asarray(operand[1]).dtype.kind != "f":
        return None
    c = per_channel(np.asarray(operand[1]), rank)
    if c is None or len(source.inputs) != 1 or len(ws.consumers(source)) != 1 or ws.is_graph_output(source):
        return None
    absorb = _absorber(source.inputs[0], ws, rank, c.size)
    return None if absorb is None else (add, operand[1], c, absorb)


def run(ws: Workspace) -> list[Rewrite]:
    """Rewrite every match; returns what was rewritten (for the report)."""
    done = []
    for relu in list(ws.graph.nodes):
        found = _match(relu, ws)
        if found is None:
            continue
        add, value, c, absorb = found
        into = absorb(c)  # a + c
        name = add.name or node_label(add)
        result = add.outputs[0]
        ws.remove(add)
        relu.op = "Max"
        ws.set_input(relu, 1, ws.constant(f"{relu.name or 'relu'}_floor", np.asarray(value)))
        ws.set_output(relu, 0, result)
        done.append(Rewrite(name, into, relu.name or node_label(relu)))
    return done
