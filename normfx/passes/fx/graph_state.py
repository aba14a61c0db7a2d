"""Graph surgery shared by the fx fold rules: which layer a node calls, how often a module is called,
private copies of shared modules, constants, and replacing a BatchNorm node by what remains of it."""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .cleanup import call_post
from .ownership import Ownership
from .patterns import BnSite, LayerInfo, layer_info
from .shapes import ShapeRecorder
from .tracing import TracedPart

__all__ = ["GraphState"]


@dataclass
class GraphState:
    """One traced graph being rewritten, and what the rules need to know about it."""

    part: TracedPart
    shapes: ShapeRecorder = field(default_factory=lambda: ShapeRecorder(nn.Module(), None))
    duplicate_shared: bool = True
    ownership: Ownership | None = None  # set when the graph still holds the caller's modules
    border_correction: bool = False
    aliased: set = field(default_factory=set)  # ids of modules registered under several paths
    responses: dict = field(default_factory=dict)  # layer node -> shift response, from check to apply
    _calls: Counter | None = field(default=None, repr=False)  # call_module count per target

    @property
    def gm(self) -> fx.GraphModule:
        return self.part.graph_module

    def layer(self, node: fx.Node) -> LayerInfo | None:
        if node.op != "call_module":
            return None
        return layer_info(self.gm.get_submodule(node.target))

    def calls(self, target: str) -> int:
        if self._calls is None:
            self._calls = Counter(n.target for n in self.gm.graph.nodes if n.op == "call_module")
        return self._calls[target]

    def sharing(self, node: fx.Node) -> str:
        """How ``node``'s module is used elsewhere ("" when this call is its only use)."""
        count = self.calls(node.target)
        module = self.gm.get_submodule(node.target)
        if count > 1:
            return f"'{node.target}' is called {count} times"
        if id(module) in self.aliased:
            return f"'{node.target}' is also registered elsewhere in the model (it may be called there)"
        if self.shapes.recorded_calls(module) > 1:
            return f"'{node.target}' is called more than once, partly inside an untraced part of the model"
        return ""

    def shared_reason(self, node: fx.Node) -> str:
        """Why ``node``'s module cannot be edited for this call ("" when it can, possibly as a copy)."""
        sharing = self.sharing(node)
        if sharing and not self.duplicate_shared:
            return f"{sharing}; folding into it would change its other uses (duplicate_shared=false)"
        return ""

    def own_module(self, node: fx.Node) -> tuple[nn.Module, str]:
        """The module ``node`` calls, made private to this call when it is used elsewhere (a copy under a
        new name). Returns the module and a note for the report ("" when nothing was duplicated)."""
        sharing = self.sharing(node)
        module = self.gm.get_submodule(node.target)
        if not sharing:
            editable = self.ownership.editable(module) if self.ownership else module
            if editable is not module:
                self.gm.set_submodule(node.target, editable)
                self.shapes.alias(editable, module)
            return editable, ""
        private = copy.deepcopy(module)
        self.shapes.alias(private, module)
        name = self.fresh_name(str(node.target).replace(".", "_") + "_private")
        self.gm.add_submodule(name, private)
        note = f"{sharing}: folded into a private copy '{self.part.qualified(name)}'"
        self.calls(node.target)
        self._calls[node.target] -= 1
        self._calls[name] += 1
        node.target = name
        return private, note

    def fresh_name(self, base: str) -> str:
        existing = {n for n, _ in self.gm.named_modules()} | {n for n, _ in self.gm.named_buffers()} | set(dir(self.gm))
        name, i = base, 1
        while name in existing:
            name, i = f"{base}_{i}", i + 1
        return name

    def input_shape(self, module: nn.Module) -> tuple[int, ...] | None:
        """The input shape ``module`` was called with (when example inputs were given and it was called once)."""
        return self.shapes.input_shape(module)

    def add_constant_after(self, node: fx.Node, value: torch.Tensor, base: str) -> fx.Node:
        """Insert ``node + constant`` (a new buffer) after ``node``; returns the add node."""
        name = self.fresh_name(base)
        self.gm.register_buffer(name, value)
        with self.gm.graph.inserting_after(node):
            constant = self.gm.graph.get_attr(name)
        with self.gm.graph.inserting_after(constant):
            added = self.gm.graph.call_function(torch.add, (node, constant))
        node.replace_all_uses_with(added, delete_user_cb=lambda user: user is not added)
        return added

    def remove_bn(self, site: BnSite, replacement: fx.Node) -> None:
        """Make the BN's users read ``replacement`` (through the BN's post modules, if any) and erase
        the BN node and the constants only it read."""
        graph = self.gm.graph
        # post modules that do something are called directly, at their own paths where possible (cleanup.py)
        result = call_post(self.gm, site.node, site.post, replacement, self.fresh_name) if site.post else replacement
        site.node.replace_all_uses_with(result)
        graph.erase_node(site.node)
        for target in site.attrs:
            if not any(n.op == "get_attr" and n.target == target and n.users for n in graph.nodes):
                for n in [n for n in graph.nodes if n.op == "get_attr" and n.target == target]:
                    graph.erase_node(n)
                _delete_attr(self.gm, target)

    def finish(self) -> fx.GraphModule:
        self.gm.graph.eliminate_dead_code(is_impure_node=lambda node: keeps_effect(self.gm, node))
        self.gm.graph.lint()
        self.gm.delete_all_unused_submodules()
        return self.gm  # its code is generated once, by rewrite_traceable_parts


def keeps_effect(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether dead-code elimination must keep ``node`` although nothing reads its result: torch.fx's own impure
    nodes, and in-place operations (``nn.ReLU(inplace=True)``, ``F.relu_``, ``x.relu_()``, ``inplace=True``),
    whose effect is on their input (``self.relu(y)`` with the result unused still changes ``y``)."""
    if node.is_impure():
        return True
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    if node.op in ("call_function", "call_method"):
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        return bool(node.kwargs.get("inplace")) or (name.endswith("_") and not name.endswith("__"))
    return False


def set_parameters(module: nn.Module, weight: Any, bias: Any) -> None:
    """Give a conv/linear new weight and bias Parameters (never writing into shared storage)."""
    requires_grad = module.weight.requires_grad
    module.weight = nn.Parameter(torch.as_tensor(weight), requires_grad=requires_grad)
    module.bias = nn.Parameter(torch.as_tensor(bias), requires_grad=requires_grad) if bias is not None else None


def _delete_attr(gm: fx.GraphModule, target: str) -> None:
    owner_name, _, attr = target.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    if hasattr(owner, attr):
        delattr(owner, attr)
