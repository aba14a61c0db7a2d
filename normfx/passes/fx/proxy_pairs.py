"""Policy ``proxynorm``: each BatchNorm → activation pair becomes norm (no affine) → ``ProxyNormAct``.

Proxy Norm (Labatie et al., NeurIPS 2021; ``normfx.layers.proxynorm``) replaces BN by a batch-independent
norm *without* affine (GroupNorm, 4 groups by default, or LayerNorm = GroupNorm with 1 group; see
:mod:`.norm_swap` for the group rule) followed by the proxy-normalized activation, which carries the per-channel
affine: its ``weight``/``bias`` (γ, β) start from the BN's, its ``proxy_weight``/``proxy_bias`` (γ̃, β̃) at 0.

A pair is a BN call whose output's only user is an elementwise activation taking nothing else: a module
(ReLU, ReLU6, SiLU, GELU, LeakyReLU, ELU, Hardswish, Sigmoid, Tanh, Mish, PReLU, ...), a function (``F.relu``,
``torch.relu``, ``F.silu``, ``F.gelu``, ``F.leaky_relu``, ...) or a method (``x.relu()``, ``x.clamp(0, 6)``, ...).
The activation node disappears: ProxyNormAct applies it (a parameter-free activation module is copied, one
with parameters such as PReLU is moved in, still shared with its other uses). A BN subclass that applies its
own activation (timm's ``BatchNormAct2d``, checked numerically) gives norm → ProxyNormAct(its activation).

A BN with no activation after it (the projection before a residual add, a BN feeding two users, the model's
output) becomes the norm *with* its affine, as in the official implementation, and the report says why.

Names (state_dict keys): the module at the BN's path always holds the BN's γ and β as ``weight``/``bias`` —
the ProxyNormAct (``<bn>.weight``, ``<bn>.bias``, ``<bn>.proxy_weight``, ``<bn>.proxy_bias``, ``<bn>.activation``)
with the parameter-free norm beside it at ``<bn>_norm``, or the norm with affine for a BN without activation.
A BN module called several times gets one shared norm and one shared ProxyNormAct (its γ, β stay shared) when
every call has the same activation after it.

Skipped with a reason: functional ``F.batch_norm`` calls (no module to replace), BNs inside a part torch.fx
cannot trace (their users are unknown), BN subclasses with another forward, a shared BN whose calls differ.
The result is a ``torch.fx.GraphModule`` (the activation nodes are gone from the graph).
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ...layers import is_batchnorm
from ...report import APPLIED, SKIPPED
from .graph_state import GraphState
from .norm_swap import (
    FUNCTIONAL_REASON,
    BnUse,
    aliased_modules,
    bn_reference,
    choose_groups,
    class_rank,
    copy_parameter,
    input_ranks,
    layer_rank,
    make_group_norm,
    norm_words,
    post_modules,
    replace_all,
    swap_options,
)
from .patterns import describe_node, functional_name
from .tracing import TracedPart, rewrite_traceable_parts

__all__ = ["run", "ACTIVATION_MODULES", "module_activation", "activation_module", "activation_after"]

_BN_FUNCTIONS = (F.batch_norm, torch.batch_norm)

# functional activations: function -> (module class, names of its arguments after the input, defaults)
_FUNCTIONS: dict[Any, tuple[type, tuple[str, ...], tuple[Any, ...]]] = {
    F.relu: (nn.ReLU, ("inplace",), (False,)),
    torch.relu: (nn.ReLU, (), ()),
    F.relu6: (nn.ReLU6, ("inplace",), (False,)),
    F.silu: (nn.SiLU, ("inplace",), (False,)),
    F.gelu: (nn.GELU, ("approximate",), ("none",)),
    F.leaky_relu: (nn.LeakyReLU, ("negative_slope", "inplace"), (0.01, False)),
    F.elu: (nn.ELU, ("alpha", "inplace"), (1.0, False)),
    F.celu: (nn.CELU, ("alpha", "inplace"), (1.0, False)),
    F.selu: (nn.SELU, ("inplace",), (False,)),
    F.hardswish: (nn.Hardswish, ("inplace",), (False,)),
    F.hardsigmoid: (nn.Hardsigmoid, ("inplace",), (False,)),
    F.mish: (nn.Mish, ("inplace",), (False,)),
    F.softplus: (nn.Softplus, ("beta", "threshold"), (1.0, 20.0)),
    F.hardtanh: (nn.Hardtanh, ("min_val", "max_val", "inplace"), (-1.0, 1.0, False)),
    torch.sigmoid: (nn.Sigmoid, (), ()),
    torch.tanh: (nn.Tanh, (), ()),
}
_KEEP_ARGS = {nn.GELU: ("approximate",), nn.LeakyReLU: ("negative_slope",), nn.ELU: ("alpha",),
              nn.CELU: ("alpha",), nn.Softplus: ("beta", "threshold"), nn.Hardtanh: ("min_val", "max_val")}
_METHODS = {"relu": nn.ReLU, "relu_": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


def _constant_args(node: fx.Node, names: tuple[str, ...], defaults: tuple[Any, ...]) -> dict[str, Any] | None:
    bound = dict(zip(names, node.args[1:]))
    bound.update({k: v for k, v in node.kwargs.items() if k != "input"})
    if set(bound) - set(names) or any(isinstance(v, fx.Node) for v in bound.values()):
        return None
    return {**dict(zip(names, defaults)), **bound}


def _no_inplace(module: nn.Module) -> nn.Module:
    if getattr(module, "inplace", False):
        module.inplace = False  # ProxyNormAct also applies it to its proxy samples
    return module


# elementwise activation modules ProxyNormAct takes (parameter-free ones are copied; PReLU is moved in)
ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU,
                      nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Mish, nn.Softplus, nn.PReLU, nn.Threshold,
                      nn.LogSigmoid, nn.Softsign)


def module_activation(module: nn.Module, channels: int) -> tuple[nn.Module | None, str]:
    """``module`` as ProxyNormAct's activation (a copy, or PReLU itself), or None and the reason it cannot be."""
    what = type(module).__name__
    if not isinstance(module, ACTIVATION_MODULES):
        return None, f"{what} is not an elementwise activation ProxyNormAct knows"
    if isinstance(module, nn.PReLU):
        if module.num_parameters not in (1, channels):
            return None, f"{what} has {module.num_parameters} parameters, not 1 or {channels}"
        return module, ""  # moved in as it is: its parameters stay shared with its other uses
    if any(True for _ in module.parameters()):
        return None, f"{what} has parameters"
    return _no_inplace(copy.deepcopy(module)), ""


def activation_module(gm: fx.GraphModule, node: fx.Node, channels: int) -> tuple[nn.Module | None, str]:
    """The activation ``node`` computes as a module for ProxyNormAct, or None and the reason it cannot be one."""
    what = describe_node(gm, node)
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), ACTIVATION_MODULES):
        module, why = module_activation(gm.get_submodule(node.target), channels)
        return module, why and f"its output feeds {what}: {why}"
    if node.op == "call_function" and node.target in _FUNCTIONS:
        cls, names, defaults = _FUNCTIONS[node.target]
        values = _constant_args(node, names, defaults)
        if values is None:
            return None, f"its output feeds {what}, whose arguments are computed at run time"
        return cls(**{k: values[k] for k in _KEEP_ARGS.get(cls, ())}), ""
    if node.op == "call_method":
        if node.target in _METHODS and len(node.args) == 1 and not node.kwargs:
            return _METHODS[node.target](), ""
        if node.target in ("clamp", "clamp_min"):
            values = _constant_args(node, ("min", "max") if node.target == "clamp" else ("min",), (None, None))
            if values is None or values.get("min") is None:
                return None, f"its output feeds {what}, not a constant lower clamp"
            low, high = float(values["min"]), values.get("max")
            if high is None:
                return nn.Threshold(low, low), ""  # max(x, low)
            return nn.Hardtanh(low, float(high)), ""
    if user_is_addition(node):
        return None, "its output feeds an addition (a residual branch), not an activation"
    return None, f"its output feeds {what}, not an activation"


def user_is_addition(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in (operator.add, torch.add, operator.iadd)) or (
        node.op == "call_method" and node.target in ("add", "add_"))


def activation_after(state: GraphState, bn_node: fx.Node, channels: int) -> tuple[fx.Node | None, nn.Module | None,
                                                                                    str]:
    """The activation node that is the only user of ``bn_node`` and its module, or (None, None, reason)."""
    gm = state.gm
    users = list(bn_node.users)
    if not users:
        return None, None, "its output is unused"
    if len(users) > 1:
        listed = ", ".join(describe_node(gm, u) for u in users[:3])
        return None, None, f"its output feeds {len(users)} nodes ({listed}), not one activation"
    user = users[0]
    if user.op == "output":
        return None, None, "its output is the model output"
    module, why = activation_module(gm, user, channels)
    if module is not None and user.all_input_nodes != [bn_node]:
        return None, None, f"{describe_node(gm, user)} also takes other inputs"
    if module is None:
        return None, None, why
    return user, module, ""


@dataclass
class _Plan:
    """What one BN module becomes: ``act`` set → norm (no affine) → ProxyNormAct(act); else the norm with affine."""

    act: nn.Module | None
    act_nodes: list[fx.Node | None]  # per call: the activation node to remove (None: the BN's own activation)
    own: bool = False  # the activation is the BN subclass's own
    why: str = ""  # why there is no ProxyNormAct


def _plan(state: GraphState, nodes: list[fx.Node], channels: int, post: dict[str, nn.Module]) -> _Plan:
    post = {k: m for k, m in post.items() if not isinstance(m, nn.Identity)}
    if post:
        modules = list(post.values())
        if len(modules) == 1:
            act, _ = module_activation(modules[0], channels)
            if act is not None:
                return _Plan(act, [None] * len(nodes), own=True)
        names = ", ".join(f"{type(m).__name__} '{k}'" for k, m in post.items())
        return _Plan(None, [], why=f"its own modules ({names}) are not one activation ProxyNormAct can take: "
                                    "they follow the norm")
    found = [activation_after(state, node, channels) for node in nodes]
    acts = [m for _, m, _ in found]
    if all(m is None for m in acts):
        return _Plan(None, [], why="; ".join(dict.fromkeys(why for _, _, why in found)))
    if any(m is None for m in acts) or len({repr(m) for m in acts}) > 1:
        kinds = ", ".join(type(m).__name__ if m is not None else "none" for m in acts)
        return _Plan(None, [], why=f"called {len(nodes)} times with different activations after it ({kinds}), and one "
                                   "shared module serves all calls: activations kept")
    return _Plan(acts[0], [n for n, _, _ in found])


def _input(node: fx.Node) -> Any:
    return node.args[0] if node.args else node.kwargs.get("input")


def _proxy_act(bn: nn.Module, act: nn.Module) -> nn.Module:
    from ...layers.proxynorm import ProxyNormAct

    dtype, device = bn_reference(bn)
    layer = ProxyNormAct(bn.num_features, act, device=device, dtype=dtype)
    if bn.weight is not None:
        layer.weight = copy_parameter(bn.weight)
        layer.bias = copy_parameter(bn.bias)
    layer.train(bn.training)
    return layer


def run(model: nn.Module, ctx) -> nn.Module:
    from .weight_std import conv_before, standardize

    opts = swap_options(ctx)
    targets = {name: m for name, m in model.named_modules() if is_batchnorm(m) and ctx.targets(name)}
    measured = input_ranks(model, ctx.example_inputs, {n: m for n, m in targets.items() if class_rank(m) is None})
    handled: set[str] = set()
    untraceable: list[str] = []
    aliased = aliased_modules(model)

    def norm_for(name: str, bn: nn.Module, uses: list[BnUse]):
        post, why = post_modules(bn)
        if post is None:
            return None, None, why
        groups = choose_groups(name, bn.num_features, opts, layer_rank(name, bn, measured, uses))
        return post, groups, groups.reason

    if is_batchnorm(model):  # the model is one BN: nothing follows it
        if "" in targets:
            post, groups, why = norm_for("", model, [])
            if post is None or not groups.count:
                ctx.report.add("", ctx.rule, SKIPPED, why, source=type(model).__name__)
                return model
            norm = make_group_norm(model, groups.count, affine=True, post=post)
            own = f", then its own {', '.join(type(m).__name__ for m in post.values())}" if post else ""
            ctx.report.add("", ctx.rule, APPLIED, f"{type(model).__name__} → {norm_words(groups.count, norm.num_channels)}"
                           f" with affine{own}: the model is a single BatchNorm, there is no graph to put a "
                           "ProxyNormAct in",
                           source=type(model).__name__, result=[type(norm).__name__], groups=groups.count,
                           group_rule=groups.rule, activation=None, modules={"norm": ""})
            return norm
        return model

    def rewrite_graph(part: TracedPart) -> fx.GraphModule:
        state = GraphState(part, aliased=aliased)
        gm = state.gm
        calls: dict[str, list[fx.Node]] = {}
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and is_batchnorm(gm.get_submodule(node.target)):
                calls.setdefault(str(node.target), []).append(node)
            elif node.op == "call_function" and node.target in _BN_FUNCTIONS:
                name = part.qualified(functional_name(node))
                if ctx.targets(name):
                    ctx.report.add(name, ctx.rule, SKIPPED, FUNCTIONAL_REASON, source="F.batch_norm")
        for target, nodes in calls.items():
            name = part.qualified(target)
            if not ctx.targets(name):
                continue
            handled.add(name)
            _convert(state, target, nodes, name)
        return state.finish()

    def _convert(state: GraphState, target: str, nodes: list[fx.Node], name: str) -> None:
        gm = state.gm
        bn = gm.get_submodule(target)
        source = type(bn).__name__
        convs = [conv_before(state, node) for node in nodes]
        post, groups, why = norm_for(name, bn, [BnUse(rank=rank) for _, _, rank in convs])
        if post is None or not groups.count:
            ctx.report.add(name, ctx.rule, SKIPPED, why, source=source)
            return
        plan = _plan(state, nodes, bn.num_features, post)
        words = norm_words(groups.count, bn.num_features)
        details: dict[str, Any] = {"source": source, "groups": groups.count, "group_rule": groups.rule,
                                   "calls": len(nodes)}
        if plan.act is None:
            norm = make_group_norm(bn, groups.count, affine=True, post=post)
            gm.set_submodule(target, norm)
            reason = f"{source} → {words} with affine (no ProxyNormAct): no activation after it: {plan.why}"
            if bn.weight is None:
                reason += " (affine=False BN: no affine)"
            details.update(result=[type(norm).__name__], activation=None, modules={"norm": name})
        else:
            norm = make_group_norm(bn, groups.count, affine=False)
            layer = _proxy_act(bn, plan.act)
            norm_target = state.fresh_name(f"{target}_norm")
            gm.add_submodule(norm_target, norm)
            gm.set_submodule(target, layer)
            for node, act_node in zip(nodes, plan.act_nodes):
                with gm.graph.inserting_before(node):
                    normed = gm.graph.call_module(norm_target, (_input(node),))
                    activated = gm.graph.call_module(target, (normed,))
                if act_node is not None:
                    act_node.replace_all_uses_with(activated)
                    gm.graph.erase_node(act_node)
                node.replace_all_uses_with(activated)
                gm.graph.erase_node(node)
            act_name = type(plan.act).__name__
            reason = f"{source} → {words} → ProxyNormAct({'its own ' if plan.own else ''}{act_name})"
            details.update(result=["GroupNorm", "ProxyNormAct"], activation=act_name,
                           modules={"norm": part_name(state, norm_target), "proxy_act": name})
        if "2-D" in groups.rule or "not proven" in groups.rule:
            reason += f" ({groups.rule})"
        if opts.ws:
            standardized, kept = [], []
            for conv, conv_reason, _ in convs:
                if conv is None:
                    kept.append(conv_reason)
                    continue
                path = state.part.qualified(str(conv.target))
                reason += f"; conv '{path}' → {standardize(gm, str(conv.target), None)}"
                standardized.append(path)
            for text in dict.fromkeys(kept):
                reason += f"; no Weight Standardization: {text}"
            details["ws_convs"] = standardized
            if kept:
                details["ws_skipped"] = list(dict.fromkeys(kept))
        ctx.report.add(name, ctx.rule, APPLIED, reason, **details)

    result = rewrite_traceable_parts(model, rewrite_graph, lambda path, why: untraceable.append(path))
    for name in targets:
        if name in handled:
            continue
        owner = max((p for p in untraceable if p == "" or name.startswith(p + ".")), key=len, default=None)
        if owner is not None:
            result = _swap_untraced(result, name, owner, ctx, norm_for, opts)
            continue
        reason = "never called by the model's forward (torch.fx found no call of it)"
        ctx.report.add(name, ctx.rule, SKIPPED, reason, source=type(targets[name]).__name__)
    return result


def _swap_untraced(model: nn.Module, name: str, owner: str, ctx, norm_for, opts) -> nn.Module:
    """A BN inside a part torch.fx cannot trace: the plain module swap of ``groupnorm`` (the norm with affine, the
    activation kept), so that no batch statistics are left behind; its activation is unknown, so no ProxyNormAct."""
    bn = model.get_submodule(name) if name else model
    source = type(bn).__name__
    part = f"'{owner}'" if owner else "the model"
    if not is_batchnorm(bn):
        ctx.report.add(name, ctx.rule, SKIPPED, f"{source} at this path is not a BN any more", source=source)
        return model
    post, groups, why = norm_for(name, bn, [])
    if post is None or not groups.count:
        ctx.report.add(name, ctx.rule, SKIPPED, f"torch.fx cannot trace {part}, and no module swap either: {why}",
                       source=source)
        return model
    norm = make_group_norm(bn, groups.count, affine=True, post=post)
    model = replace_all(model, bn, norm)
    reason = (f"{source} → {norm_words(groups.count, bn.num_features)} with affine: torch.fx cannot trace {part}: "
              "its activation is unknown, so GroupNorm with affine, no ProxyNormAct")
    if post:
        reason += f"; then its own {', '.join(type(m).__name__ for m in post.values())}"
    if bn.weight is None:
        reason += " (affine=False BN: no affine)"
    if "2-D" in groups.rule or "not proven" in groups.rule:
        reason += f" ({groups.rule})"
    details: dict[str, Any] = {"source": source, "result": [type(norm).__name__], "groups": groups.count,
                               "group_rule": groups.rule, "calls": 0, "activation": None, "modules": {"norm": name}}
    if opts.ws:
        reason += f"; no Weight Standardization: torch.fx cannot trace {part}, so the conv feeding it is unknown"
        details["ws_convs"] = []
        details["ws_skipped"] = [f"torch.fx cannot trace {part}"]
    ctx.report.add(name, ctx.rule, APPLIED, reason, **details)
    return model


def part_name(state: GraphState, target: str) -> str:
    return state.part.qualified(target)
