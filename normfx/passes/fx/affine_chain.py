"""Rule family: per-channel affine chains ``x * w + b`` in an fx graph, folded as a BatchNorm's affine would be.

A chain is a run of ``mul``/``add``/``sub``/``div`` calls (``operator.*``, ``torch.mul``/``add``/``sub``/``div``,
``Tensor.mul``/``add``/``sub``/``div``; no ``alpha``, nothing in place), each with one constant operand and the
previous call's result (its only use) as the other. A constant is a Python number or a tensor computed from
``get_attr`` parameters/buffers alone (``self.w.view(1, -1, 1, 1)``, ``w * (rv + eps).rsqrt()``: evaluated once).
The chain is ``y = x * scale + shift``; it is per channel when every constant is 1 along every axis but the
channel axis of the layer or BN next to it: ``(C, 1, 1)`` / ``(1, C, 1, 1)`` before/after a Conv2d (the channel is
axis ``-(spatial dims + 1)``), ``(F,)`` / ``(1, F)`` for a Linear (the last axis).

- **merge into a BN** (before the BN rules, :func:`merge_into_bns`): ``BN → chain`` becomes the BN with
  ``γ' = γ s``, ``β' = β s + t``; ``chain → BN`` the BN with ``μ' = (μ − t) / s``, ``γ' = γ s`` (declined where some
  ``s = 0``). For BatchNorm2d/3d and FrozenBatchNorm2d/3d modules without post modules (their input rank is fixed,
  so the channel axis is known), with an affine.
- **fold into a layer** (after the BN rules, :func:`fold_chains`): the chain is offered, as a BN site, to the
  backward rule (Conv/ConvTranspose/Linear → chain) and then, with ``forward=true``, to the forward rule
  (chain → Conv/Linear), with their checks and reasons (:mod:`.backward_fold`, :mod:`.forward_fold`).

A constant of shape ``(1, C, 1, 1)`` grows an unbatched ``(C, H, W)`` tensor by one axis: folded only when the
layer's recorded input is batched or its input shape is unknown (then the details say ``assumes batched input``).
Chains with a tensor constant are reported (``applied``, or ``kept`` with the reasons; never ``skipped``: they are
not the BNs the policy targets); a chain of Python numbers only is folded when a rule takes it and not reported
otherwise.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import fx, nn

from ...affine import affine_before_bn
from ...fold import fold_affine_into_norm
from ...layers import FrozenBatchNorm2d, FrozenBatchNorm3d
from . import backward_fold, forward_fold
from .graph_state import GraphState
from .patterns import BnSite, describe_node, functional_name

__all__ = ["Chain", "read_chains", "merge_into_bns", "fold_chains", "RULE"]

RULE = "affine_chain"
_FUNCTIONS = {operator.mul: "mul", torch.mul: "mul", operator.add: "add", torch.add: "add", operator.sub: "sub",
              torch.sub: "sub", operator.truediv: "div", torch.div: "div"}
_METHODS = {"mul": "mul", "add": "add", "sub": "sub", "div": "div"}
# pure ops a constant may be computed with (from get_attr tensors and numbers only)
_CONST_FUNCTIONS = {operator.mul, operator.add, operator.sub, operator.truediv, operator.neg, operator.getitem,
                    torch.mul, torch.add, torch.sub, torch.div, torch.rsqrt, torch.sqrt, torch.reciprocal, torch.neg,
                    torch.reshape, torch.unsqueeze, torch.squeeze, torch.flatten, torch.exp}
_CONST_METHODS = {"view", "reshape", "unsqueeze", "squeeze", "flatten", "to", "float", "double", "half", "rsqrt", "sqrt",
                  "reciprocal", "neg", "exp", "mul", "add", "sub", "div", "detach", "contiguous", "clone", "type_as",
                  "expand_as", "view_as", "reshape_as"}
_BN_RANK = {nn.BatchNorm2d: 4, nn.BatchNorm3d: 5, FrozenBatchNorm2d: 4, FrozenBatchNorm3d: 5}


@dataclass
class _Step:
    node: fx.Node
    op: str  # mul / add / sub / div
    data_first: bool  # x op c (True) or c op x (False)
    const: torch.Tensor  # float64


@dataclass(eq=False)
class Chain(BnSite):
    """A chain read as a BN site (``node``: its last call; ``input_node``: the data it reads). ``scale_full`` /
    ``shift_full`` are the composed constants (float64, broadcast shapes); ``scale``/``shift`` are filled per
    channel once the neighbour fixing the channel axis is known."""

    nodes: list[fx.Node] = field(default_factory=list)
    source: fx.Node | None = None
    scale_full: torch.Tensor | None = None
    shift_full: torch.Tensor | None = None
    tensor_constant: bool = False
    const_nodes: list[fx.Node] = field(default_factory=list)
    assumed_batched: bool = False

    @property
    def input_node(self) -> fx.Node:
        return self.source

    @property
    def ops(self) -> str:
        return "→".join(_op(n) for n in self.nodes)


def _op(node: fx.Node) -> str:
    return _FUNCTIONS.get(node.target, "") if node.op == "call_function" else _METHODS.get(node.target, "")


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    owner, _, attr = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr)


class _Constants:
    """Values of the nodes computed from get_attr tensors and numbers alone (evaluated once, in float64)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm, self.cache = gm, {}
        self.constant: set[fx.Node] = set()  # nodes computed from get_attr tensors and numbers alone, in one pass
        for node in gm.graph.nodes:  # topological order: no recursion through the (possibly deep) data path
            if node.op == "get_attr" or (_pure(node) and all(a in self.constant for a in node.all_input_nodes)):
                self.constant.add(node)

    def value(self, arg: Any) -> Any:
        """The constant ``arg`` is (a tensor, number, tuple), or None when it depends on run-time data."""
        if isinstance(arg, bool):
            return None
        if isinstance(arg, (int, float)):
            return arg
        if isinstance(arg, (tuple, list)):
            values = [self.value(a) if isinstance(a, fx.Node) else a for a in arg]
            return None if any(v is None for v in values) else type(arg)(values)
        if isinstance(arg, torch.dtype) or arg is None:
            return arg
        if not isinstance(arg, fx.Node) or arg not in self.constant:
            return None
        if arg in self.cache:
            return self.cache[arg]
        self.cache[arg] = None  # no cycles
        self.cache[arg] = self._evaluate(arg)
        return self.cache[arg]

    def _evaluate(self, node: fx.Node) -> Any:
        if node.op == "get_attr":
            value = _fetch(self.gm, node.target)
            return value.detach().double() if isinstance(value, torch.Tensor) and value.is_floating_point() else None
        if any(self.value(a) is None for a in node.all_input_nodes):
            return None
        args = fx.node.map_arg(node.args, self.value)
        kwargs = fx.node.map_arg(node.kwargs, self.value)
        if node.op == "call_method" and node.target in ("to", "float", "half", "type_as"):
            return args[0]  # dtype casts: the float64 value stands for them
        try:
            with torch.no_grad():
                result = (getattr(args[0], node.target)(*args[1:], **kwargs) if node.op == "call_method"
                          else node.target(*args, **kwargs))
        except Exception:  # not evaluable with these values: treat it as run-time data
            return None
        if isinstance(result, torch.Tensor):
            return result.double() if result.is_floating_point() else None
        return result if isinstance(result, (int, float)) and not isinstance(result, bool) else None


def _pure(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _CONST_FUNCTIONS) or (
        node.op == "call_method" and node.target in _CONST_METHODS)


def _step(node: fx.Node, constants: _Constants) -> _Step | None:
    op = _op(node) if node.op in ("call_function", "call_method") else ""
    if not op or node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    va = constants.value(a) if isinstance(a, fx.Node) else (a if isinstance(a, (int, float)) else None)
    vb = constants.value(b) if isinstance(b, fx.Node) else (b if isinstance(b, (int, float)) else None)
    if (va is None) == (vb is None) or isinstance(va, bool) or isinstance(vb, bool):
        return None  # two run-time operands, or none
    data_first = va is None
    data, const = (a, vb) if data_first else (b, va)
    if not isinstance(data, fx.Node):  # (a constant's method with the data as argument is c op x: fine)
        return None
    const = torch.as_tensor(const, dtype=torch.float64)
    if not torch.isfinite(const).all() or (op == "div" and (not data_first or (const == 0).any())):
        return None
    return _Step(node, op, data_first, const)


def _compose(steps: list[_Step]) -> tuple[torch.Tensor, torch.Tensor]:
    scale, shift = torch.ones((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for s in steps:
        if s.op == "mul":
            scale, shift = scale * s.const, shift * s.const
        elif s.op == "div":
            scale, shift = scale / s.const, shift / s.const
        elif s.op == "add":
            shift = shift + s.const
        elif s.data_first:  # x - c
            shift = shift - s.const
        else:  # c - x
            scale, shift = -scale, s.const - shift
    scale, shift = torch.broadcast_tensors(scale, shift)
    return scale, shift


def _const_inputs(node: fx.Node, data: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if a is not data]


def read_chains(gm: fx.GraphModule, qualify: Callable[[str], str]) -> list[Chain]:
    """Every affine chain of ``gm``, in node order (see the module doc)."""
    constants = _Constants(gm)
    steps = {}
    for node in gm.graph.nodes:
        step = _step(node, constants)
        if step is not None:
            steps[node] = step

    def data_of(step: _Step) -> fx.Node:
        return step.node.args[0] if step.data_first else step.node.args[1]

    def following(step: _Step) -> _Step | None:
        users = list(step.node.users)
        nxt = steps.get(users[0]) if len(users) == 1 else None
        return nxt if nxt is not None and data_of(nxt) is step.node else None

    continued = {nxt.node for s in steps.values() if (nxt := following(s)) is not None}
    chains = []
    for node, step in steps.items():
        if node in continued:
            continue
        run = [step]
        while (nxt := following(run[-1])) is not None:
            run.append(nxt)
        scale, shift = _compose(run)
        const_nodes = [c for s in run for c in _const_inputs(s.node, data_of(s))]
        tensor_constant = any(c.numel() > 1 for c in (s.const for s in run))
        chains.append(Chain(node=run[-1].node, name=qualify(functional_name(node)), nodes=[s.node for s in run],
                            source=data_of(step), scale_full=scale, shift_full=shift, tensor_constant=tensor_constant,
                            const_nodes=const_nodes))
    return chains


def _per_channel(chain: Chain, axis_from_right: int, channels: int, min_rank: int, known_rank: int | None,
                 max_rank: int | None) -> str:
    """Fill ``chain.scale``/``shift`` (C,) along the data axis ``-axis_from_right``, or say why not. The data has
    rank ``known_rank`` (when recorded), else between ``min_rank`` and ``max_rank`` (None: no bound)."""
    scale, shift = torch.broadcast_tensors(chain.scale_full, chain.shift_full)
    shape = tuple(scale.shape)
    limit = known_rank if known_rank is not None else max_rank
    if limit is not None and len(shape) > limit:
        return f"its constants {list(shape)} have more axes than the data (rank {limit}): they would grow it"
    chain.assumed_batched = known_rank is None and len(shape) > min_rank
    padded = (1,) * max(0, axis_from_right - len(shape)) + shape
    at = len(padded) - axis_from_right
    if any(d != 1 for i, d in enumerate(padded) if i != at):
        return f"its constants {list(shape)} vary along more than the channel axis"
    if padded[at] not in (1, channels):
        return f"its constants {list(shape)} have {padded[at]} channels, the data has {channels}"

    def vector(t: torch.Tensor) -> np.ndarray:
        return np.broadcast_to(t.reshape(-1).numpy(), (channels,)).astype(np.float64).copy()

    chain.scale, chain.shift = vector(scale), vector(shift)
    return ""


def _geometry(state: GraphState, node: fx.Node, side: str) -> tuple | None:
    """``_per_channel``'s data arguments for the output (``side="output"``) or input of a layer node."""
    layer = state.layer(node)
    if layer is None:
        return None
    weight = layer.module.weight
    shape = state.input_shape(layer.module)
    rank = None if shape is None else len(shape)
    if layer.kind == "linear":
        return 1, weight.shape[0 if side == "output" else 1], 1, rank, None
    spatial = weight.dim() - 2
    grouped = weight.shape[1] * layer.groups
    if side == "output":
        channels = weight.shape[0] if layer.kind == "conv" else grouped
    else:
        channels = grouped if layer.kind == "conv" else weight.shape[0]
    return spatial + 1, channels, spatial + 1, rank, spatial + 2


def _bn_module(state: GraphState, node: Any) -> nn.Module | None:
    if not isinstance(node, fx.Node) or node.op != "call_module":
        return None
    module = state.gm.get_submodule(node.target)
    return module if type(module) in _BN_RANK else None


def _bn_reason(module: nn.Module) -> str:
    if getattr(module, "post_names", ()):
        return f"{type(module).__name__} applies {', '.join(module.post_names)} after normalizing"
    if module.weight is None or module.running_mean is None:
        return f"{type(module).__name__} has no affine or no running statistics to merge into"
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
        return f"{type(module).__name__} is in training mode"
    return ""


def _erased(node: fx.Node) -> bool:
    return bool(getattr(node, "_erased", False))


def erase(state: GraphState, chain: Chain) -> None:
    """Erase the chain's remaining calls and the constants only they read (and the attributes behind them)."""
    graph = state.gm.graph
    for node in reversed(chain.nodes):
        if not _erased(node) and not node.users:
            graph.erase_node(node)
    pending = list(chain.const_nodes)
    attrs = set()
    while pending:
        node = pending.pop()
        if _erased(node) or node.users:
            continue
        if node.op == "get_attr":
            attrs.add(node.target)
        inputs = list(node.all_input_nodes)
        graph.erase_node(node)
        pending.extend(inputs)
    if not attrs:
        return
    called = {n.target for n in graph.nodes if n.op == "call_module"}
    read = {n.target for n in graph.nodes if n.op == "get_attr"}
    for target in attrs - read:
        owner, _, attr = target.rpartition(".")
        if owner and (owner in called or any(owner.startswith(c + ".") for c in called)):
            continue  # the attribute belongs to a module still called (possibly the caller's): leave it
        holder = state.gm.get_submodule(owner) if owner else state.gm
        if hasattr(holder, attr):
            delattr(holder, attr)


def _set(module: nn.Module, name: str, value: np.ndarray) -> None:
    old = getattr(module, name)
    tensor = torch.as_tensor(value, dtype=old.dtype, device=old.device)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(tensor, requires_grad=old.requires_grad))
    else:
        setattr(module, name, tensor)  # a buffer: replaced, never written into (it may be the caller's)


def _merge_one(state: GraphState, chain: Chain) -> tuple[dict | None, str]:
    """Merge ``chain`` into the BN right before or after it: (details, "") or (None, reason) or (None, "") when no
    BN module is adjacent."""
    users = list(chain.node.users)
    before = _bn_module(state, chain.source)
    after = _bn_module(state, users[0]) if len(users) == 1 and users[0].args and users[0].args[0] is chain.node else None
    reasons = []
    for bn_node, module, side in ((chain.source, before, "after"), (users[0] if users else None, after, "before")):
        if module is None:
            continue
        why = _bn_reason(module) or state.shared_reason(bn_node)
        if side == "after" and len(bn_node.users) != 1:
            why = why or "the BN output has other users"
        channels, rank = module.running_mean.numel(), _BN_RANK[type(module)]
        why = why or _per_channel(chain, rank - 1, channels, rank, rank, rank)
        if why:
            reasons.append(f"not merged into {describe_node(state.gm, bn_node)}: {why}")
            continue
        if side == "before":
            merged = affine_before_bn(module.running_mean.detach(), module.weight.detach(), chain.scale, chain.shift)
            if merged is None:
                reasons.append(f"not merged into {describe_node(state.gm, bn_node)}: the affine multiplies some "
                               "channel by 0")
                continue
        owned, note = state.own_module(bn_node)
        if side == "after":
            weight, bias = fold_affine_into_norm(owned.weight.detach(), owned.bias.detach(), chain.scale, chain.shift,
                                                 shape=(channels,))
            _set(owned, "weight", weight)
            _set(owned, "bias", bias)
            chain.node.replace_all_uses_with(bn_node)
        else:
            _set(owned, "running_mean", merged[0])
            _set(owned, "weight", merged[1])
            bn_node.args = (chain.source, *bn_node.args[1:])
        erase(state, chain)
        details = {"fold": RULE, "into": state.part.qualified(str(bn_node.target)), "side": side,
                   "pattern": chain.ops}
        if note:
            details["note"] = note
        return details, ""
    return None, "; ".join(reasons)


def merge_into_bns(state: GraphState, targets: Callable[[str], bool]) -> dict[str, tuple[str, str, dict]]:
    """Merge every chain next to a BatchNorm2d/3d or FrozenBatchNorm2d/3d module into it (before the BN rules run).
    Returns ``{chain name: (status, reason, details)}``: merged chains ``applied``; declines are remembered for
    :func:`fold_chains` (``kept`` unless a layer takes the chain then)."""
    outcomes: dict[str, tuple[str, str, dict]] = {}
    for chain in read_chains(state.gm, state.part.qualified):  # chains are disjoint: one pass (Mul → BN → Add too)
        if not targets(chain.name):
            continue
        details, why = _merge_one(state, chain)
        if details is not None:
            side = "after" if details["side"] == "after" else "before"
            outcomes[chain.name] = ("applied", f"{chain.ops} merged into the BN {details['into']} ({side} it)",
                                    details)
        elif why:
            outcomes[chain.name] = ("kept", why, {"fold": RULE, "pattern": chain.ops})
    return outcomes


def fold_chains(state: GraphState, targets: Callable[[str], bool], *, forward: bool,
                earlier: dict[str, tuple[str, str, dict]]) -> dict[str, tuple[str, str, dict]]:
    """Fold every remaining chain into the layer before it, else (``forward``) the layer after it. Returns
    ``{chain name: (status, reason, details)}`` for the chains reported (see the module doc)."""
    outcomes: dict[str, tuple[str, str, dict]] = {}
    for chain in read_chains(state.gm, state.part.qualified):
        if not targets(chain.name) or _erased(chain.node):
            continue
        reasons = [earlier[chain.name][1]] if chain.name in earlier and earlier[chain.name][0] == "kept" else []
        details = _fold_one(state, chain, forward, reasons)
        if details is not None:
            outcomes[chain.name] = ("applied", f"{chain.ops} folded into {details['into']} as a BN's affine "
                                               f"({details['direction']})", {"fold": RULE, "pattern": chain.ops,
                                                                             **details})
        elif chain.tensor_constant:
            outcomes[chain.name] = ("kept", "; ".join(dict.fromkeys(reasons)), {"fold": RULE, "pattern": chain.ops})
    return outcomes


def _try_fold(state: GraphState, chain: Chain, fold, geometry: tuple, reasons: list[str]) -> dict | None:
    """Fold ``chain`` with ``fold`` (:mod:`.backward_fold` or :mod:`.forward_fold`) into the layer ``geometry``
    describes, when the chain is per-channel there and the fold's checks pass; else add the reason."""
    why = _per_channel(chain, *geometry)
    layer_node, why = (None, why) if why else fold.check(state, chain, noun="affine")
    if layer_node is None:
        reasons.append(why)
        return None
    details = fold.apply(state, chain, layer_node)
    erase(state, chain)
    return _with_assumption(details, chain)


def _fold_one(state: GraphState, chain: Chain, forward: bool, reasons: list[str]) -> dict | None:
    geometry = _geometry(state, chain.source, "output")
    if geometry is None:
        reasons.append(f"input comes from {describe_node(state.gm, chain.source)}, not a Conv/ConvTranspose/Linear")
    elif (details := _try_fold(state, chain, backward_fold, geometry, reasons)) is not None:
        return details
    users = list(chain.node.users)
    if not forward:
        reasons.append("forward folding into the next layer is off (forward=false)")
        return None
    if len(users) == 1 and (geometry := _geometry(state, users[0], "input")) is not None:
        return _try_fold(state, chain, forward_fold, geometry, reasons)
    names = ", ".join(describe_node(state.gm, u) for u in users) or "nothing"
    reasons.append(f"its output goes to {names}, not to a single Conv/ConvTranspose/Linear")
    return None


def _with_assumption(details: dict, chain: Chain) -> dict:
    if chain.assumed_batched:
        details["assumes"] = "batched input (a (1, C, ...) constant would add an axis to an unbatched one)"
    return details
