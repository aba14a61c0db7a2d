"""A ReLU clamped per channel to ``[0, ∞)`` or ``(-∞, 0]`` — ``Max(z, L) → Min(·, U)``, what a pre-activation fold
leaves where a BN channel's scale is negative (the fx route's per-channel ``torch.clamp`` exports to this pair) —
rewritten ``s·relu(s·z)``: a ``Mul`` by ±1 and a ``Relu``, the outer sign folded into the Conv/Gemm nodes reading
it. Exact (a sign flip is exact in floating point). onnxruntime keeps a Max + Min pair out of its blocked NCHWc
layout, with reorder ops around it: measured on ``preact_resnet`` (batch 1 and 8, one thread) the deployed model
ran at 1.06× the original's latency with the pairs, 0.98× with Mul + Relu.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ...fold import fold_bn_before
from ...preact import sign_flip
from .offsets import layer_of, set_layer
from .preact import reader_layers
from .workspace import Workspace, node_label

__all__ = ["Rewrite", "per_channel", "run"]

RULE = "sign_clamp"


@dataclass
class Rewrite:
    name: str
    into: list[str]
    negative_channels: int


def per_channel(value: np.ndarray, rank: int) -> np.ndarray | None:
    """``value`` as one number per channel, when it broadcasts per channel over a rank-``rank`` tensor."""
    if value.ndim == rank and value.shape[0] == 1:
        value = value[0]
    if value.ndim != rank - 1 or any(d != 1 for d in value.shape[1:]):
        return None
    return value.reshape(-1).astype(np.float64)


def _match(node: gs.Node, ws: Workspace) -> tuple[gs.Node, np.ndarray, list] | None:
    if node.op != "Max" or node.domain or len(node.inputs) != 2 or not ws.in_main_graph(node):
        return None
    rank = len(ws.shapes.raw(node.inputs[0].name) or ())
    users = ws.consumers(node.outputs[0])
    if rank < 3 or len(users) != 1 or ws.is_graph_output(node.outputs[0]):
        return None
    upper_node = users[0]
    if upper_node.op != "Min" or upper_node.domain or len(upper_node.inputs) != 2 or \
            upper_node.inputs[0] is not node.outputs[0]:
        return None
    lower, upper = ws.const(node.inputs[1]), ws.const(upper_node.inputs[1])
    if isinstance(lower, str) or isinstance(upper, str):
        return None
    lower, upper = per_channel(np.asarray(lower), rank), per_channel(np.asarray(upper), rank)
    if lower is None or upper is None:
        return None
    signs = sign_flip(lower, upper)
    if signs is None or not np.any(signs < 0):  # other bounds, or a plain ReLU already
        return None
    readers, why = reader_layers(upper_node.outputs[0], ws, signs.size)
    return None if why else (upper_node, signs, readers)


def run(ws: Workspace) -> list[Rewrite]:
    """Rewrite every matching pair; returns what was rewritten (for the report)."""
    done = []
    for node in list(ws.graph.nodes):
        found = _match(node, ws)
        if found is None:
            continue
        upper_node, signs, readers = found
        rank = len(ws.shapes.raw(node.inputs[0].name))
        dtype = np.asarray(ws.const(node.inputs[1])).dtype
        ws.set_input(node, 1, ws.constant(f"{node.name or 'clamp'}_sign",
                                          signs.reshape((-1,) + (1,) * (rank - 2)).astype(dtype)))
        node.op = "Mul"
        ws.touch(node)
        upper_node.op = "Relu"
        ws.truncate_inputs(upper_node, 1)
        into = []
        for reader, repeat, _ in readers:
            layer = layer_of(reader, ws)
            gain = np.repeat(signs, repeat)
            weight, bias = fold_bn_before(layer.weight, layer.bias, gain, np.zeros_like(gain), kind=layer.kind,
                                          groups=layer.groups)
            set_layer(layer, weight, bias, ws)
            into.append(reader.name or node_label(reader))
        done.append(Rewrite(node.name or node_label(node), into, int(np.sum(signs < 0))))
    return done
