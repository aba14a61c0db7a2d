"""Names in an ONNX model: every name it uses, and fresh ones that collide with none of them.

Shared by the graph surgery (:class:`~.workspace.Workspace`) and the private graphs the statistics
route builds in onnxruntime (:mod:`normfx.stats.onnx_train_graph`, :mod:`normfx.stats.onnx_collect`).
"""

from __future__ import annotations

import onnx

__all__ = ["names_in", "fresh_name", "FreshNames"]


def fresh_name(taken: set[str], base: str) -> str:
    """``base``, or ``base_1``, ``base_2``, ... : the first not in ``taken``, which then reserves it."""
    name, bump = base, 0
    while name in taken:
        bump += 1
        name = f"{base}_{bump}"
    taken.add(name)
    return name


def names_in(model: onnx.ModelProto) -> set[str]:
    """Every tensor, node and graph name of ``model``: main graph, subgraph bodies and local functions."""
    names: set[str] = set()

    def walk(graph: onnx.GraphProto) -> None:
        names.add(graph.name)
        for coll in (graph.input, graph.output, graph.value_info):
            names.update(vi.name for vi in coll)
        names.update(t.name for t in graph.initializer)
        names.update(t.values.name for t in graph.sparse_initializer)
        for node in graph.node:
            names.add(node.name)
            names.update(node.input)
            names.update(node.output)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        walk(g)

    walk(model.graph)
    for func in model.functions:
        names.update(func.input)
        names.update(func.output)
        for node in func.node:
            names.add(node.name)
            names.update(node.input)
            names.update(node.output)
    names.discard("")
    return names


class FreshNames:
    """``fresh(base)``: a name used by nothing in ``model`` nor given out before, reserved from then on."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.taken = names_in(model)

    def __call__(self, base: str) -> str:
        return fresh_name(self.taken, base or "normfx")
