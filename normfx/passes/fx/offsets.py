"""The tensors around pre-activation BNs in an fx graph, described to :class:`normfx.preact.OffsetSolver`, and the
solved stream representations written back: each producing conv/linear carries its ``(scale, offset)`` in its
weight and bias, each conv/linear reading a stream tensor directly is compensated.

A *region* is every tensor connected to a pre-activation BN's input through offset-transparent ops: residual
additions, channel concatenations, max/average pools (a max pool commutes with a positive scale only). Its
tensors are produced by convs/linears (free: their bias carries the offset) or by anything else (a *source*:
it carries nothing). Readers: the pre-activation BNs, convs/linears (unpadded ones absorb the offset in their
bias, zero-padded ones need offset 0, all absorb the scale), and anything else, which needs the true values.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ...fold import fold_bn_after, fold_bn_before
from ...preact import OffsetSolver, Solution, propagate_channels
from .graph_state import GraphState, set_parameters
from .patterns import BnSite, describe_node

__all__ = ["Region", "describe_region"]

_ADDS = (operator.add, torch.add)
_CATS = (torch.cat, torch.concat)
_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_MAX_FUNCTIONS = (F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                  F.adaptive_max_pool3d)
_AVG_FUNCTIONS = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)


def transparent(state: GraphState, node: fx.Node) -> tuple[str, list[fx.Node]] | None:
    """``("add" | "cat" | "max" | "avg", inputs)`` for an op an offset passes through, else None."""
    if node.op == "call_function" and node.target in _ADDS and len(node.args) == 2 and not node.kwargs:
        if all(isinstance(a, fx.Node) and a.op != "get_attr" for a in node.args):
            return "add", list(node.args)
        return None
    if node.op == "call_function" and node.target in _CATS:
        items = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        if dim == 1 and isinstance(items, (list, tuple)) and all(isinstance(i, fx.Node) for i in items):
            return "cat", list(items)
        return None
    if node.op == "call_module":
        module = state.gm.get_submodule(str(node.target))
        if isinstance(module, _MAX_POOLS) and not getattr(module, "return_indices", False):
            return "max", [node.args[0]]
        if isinstance(module, _AVG_POOLS) and getattr(module, "divisor_override", None) is None:
            padding = getattr(module, "padding", 0)
            pads = padding if isinstance(padding, (tuple, list)) else (padding,)
            if any(int(p) for p in pads) and getattr(module, "count_include_pad", True):
                return None  # zero padding counted in the average: an offset is not uniform at the borders
            return "avg", [node.args[0]]
        if type(module) is nn.Identity:
            return "avg", [node.args[0]]
        return None
    if node.op == "call_function" and node.target is operator.getitem and channel_slice(node) is not None:
        return "select", [node.args[0]]
    if node.op == "call_function" and node.target in _MAX_FUNCTIONS and not node.kwargs.get("return_indices"):
        return "max", [node.args[0]]
    if node.op == "call_function" and node.target in _AVG_FUNCTIONS:
        return "avg", [node.args[0]]
    return None


def channel_slice(node: fx.Node) -> slice | None:
    """The channel slice of ``x[:, a:b]`` (any trailing ``:`` or ``...``), else None."""
    index = node.args[1] if len(node.args) > 1 else None
    if not isinstance(node.args[0], fx.Node) or not isinstance(index, tuple) or len(index) < 2:
        return None
    everything = slice(None, None, None)
    if index[0] != everything or not isinstance(index[1], slice):
        return None
    if any(i is not Ellipsis and i != everything for i in index[2:]):
        return None
    bounds = (index[1].start, index[1].stop, index[1].step)
    return index[1] if all(b is None or isinstance(b, int) for b in bounds) else None


class Region:
    """The stream tensors of a set of pre-activation BN sites, their producers and readers."""

    def __init__(self, state: GraphState, sites: list[BnSite]) -> None:
        self.state = state
        self.reason = ""
        self.nodes: set[fx.Node] = set()
        self.channels: dict[fx.Node, int] = {}
        self.sites = {s.node: s for s in sites}
        self.edits: list[tuple[fx.Node, str]] = []  # (reader or producer node, "producer" | "absorb" | "scale")
        queue = []
        for site in sites:
            if not isinstance(site.input_node, fx.Node):
                self.reason = f"'{site.name}' reads a constant"
                return
            queue.append(site.input_node)
        while queue:
            node = queue.pop()
            if node in self.nodes:
                continue
            self.nodes.add(node)
            op = transparent(state, node)
            if op is not None:
                queue.extend(op[1])
            for user in node.users:
                if transparent(state, user) is not None:
                    queue.append(user)
        self._infer_channels()

    def _producer(self, node: fx.Node):
        layer = self.state.layer(node)
        if layer is None or self.state.shared_reason(node):
            return None
        return layer

    def _infer_channels(self) -> None:
        state, channels = self.state, self.channels
        for node in self.nodes:
            layer = self._producer(node)
            if layer is not None:
                w = layer.module.weight
                channels[node] = w.shape[1] * layer.groups if layer.kind == "conv_transpose" else w.shape[0]
            for user in node.users:
                if user in self.sites and self.sites[user].input_node is node:
                    channels[node] = len(self.sites[user].scale)
                reader = state.layer(user)
                if reader is not None and reader.kind == "conv" and user.args[0] is node:
                    channels[node] = reader.module.weight.shape[1] * reader.groups
        ops = {node: op for node in self.nodes if (op := transparent(state, node)) is not None}
        propagate_channels(ops, channels, lambda node, n: len(range(n)[channel_slice(node)]))
        unknown = [n for n in self.nodes if n not in channels]
        if unknown:
            self.reason = f"the channel count of {describe_node(state.gm, unknown[0])} is unknown"

    def describe(self, solver: OffsetSolver, candidates: dict) -> None:
        state = self.state
        order = [n for n in state.gm.graph.nodes if n in self.nodes]
        for node in order:
            op = transparent(state, node)
            if self._producer(node) is not None:
                solver.producer(node, self.channels[node])
                self.edits.append((node, "producer"))
            elif op is None:
                solver.source(node, self.channels[node], describe_node(state.gm, node))
            elif op[0] == "add":
                solver.add(node, op[1])
            elif op[0] == "cat":
                solver.cat(node, op[1])
            elif op[0] == "select":
                solver.select(node, op[1][0], np.arange(self.channels[op[1][0]])[channel_slice(node)])
            else:
                solver.pool(node, op[1][0], positive=op[0] == "max")
        for node in order:
            for user in node.users:
                if user in self.nodes and transparent(state, user) is not None:
                    continue
                site = self.sites.get(user)
                if site is not None and site.input_node is node and id(site) in candidates:
                    solver.site(id(site), node, site.scale, site.shift, candidates[id(site)].kind, f"'{site.name}'")
                    continue
                if user.op == "output":
                    solver.require_zero(node, False, "the model output")
                    continue
                layer = state.layer(user)
                if layer is None or user.args[0] is not node or any(a is node for a in user.args[1:]) or \
                        state.shared_reason(user):
                    solver.require_zero(node, False, describe_node(state.gm, user))
                    continue
                if layer.kind == "linear" and state.shapes.linear_rank_reason(layer.module, str(user.target)):
                    solver.require_zero(node, False, describe_node(state.gm, user))
                elif layer.kind == "conv_transpose" or layer.zero_padded:
                    solver.require_zero(node, True, describe_node(state.gm, user))
                    self.edits.append((user, "scale"))
                else:
                    self.edits.append((user, "absorb"))

    def apply_streams(self, solution: Solution) -> None:
        """Write the solved representations into the producers and the compensating readers."""
        for node, role in self.edits:
            key = node if role == "producer" else node.args[0]
            a, o = solution.scale[key], solution.offset[key]
            if np.all(a == 1) and np.all(o == 0):
                continue
            module, _ = self.state.own_module(node)
            layer = self.state.layer(node)
            bias = None if module.bias is None else module.bias.detach()
            if role == "producer":
                weight, bias = fold_bn_after(module.weight.detach(), bias, a, o, kind=layer.kind, groups=layer.groups)
            else:
                inner = a.size
                cin = module.weight.shape[1] * layer.groups if layer.kind == "conv" else module.weight.shape[
                    0 if layer.kind == "conv_transpose" else 1]
                repeat = cin // inner
                shift = -o / a if role == "absorb" else np.zeros_like(o)
                weight, bias = fold_bn_before(module.weight.detach(), bias, np.repeat(1.0 / a, repeat),
                                              np.repeat(shift, repeat), kind=layer.kind, groups=layer.groups)
                if role == "scale" and module.bias is None:
                    bias = None
            set_parameters(module, weight, bias)


def describe_region(state: GraphState, node: fx.Node) -> str:
    """The layers whose bias carries the offset ``node`` holds (through additions, concats and pools)."""
    names, seen, queue = [], set(), [node]
    while queue:
        n = queue.pop()
        if n in seen:
            continue
        seen.add(n)
        op = transparent(state, n)
        if op is not None:
            queue.extend(op[1])
        elif state.layer(n) is not None:
            names.append(f"'{state.part.qualified(str(n.target))}'")
    return ", ".join(sorted(names)) or "nothing"
