"""Rule: ProxyNormAct in eval mode → its constant statistics folded into the layers around it.

In eval ``PN(y) = s·(φ(w·y + b) − m)`` per channel, with ``(m, s = 1/sqrt(v + ε))`` constants of the parameters
(:func:`normfx.fold.proxy_norm_moments`, float64). The call becomes ``y → pre → φ' → post → users`` with
``pre(y) = y·α + β`` and ``post(z) = (z + o)·σ`` (:func:`normfx.fold.split_proxy_norm`), and each piece goes
where it costs nothing:

- **post** folds into the following Conv / ConvTranspose / Linear exactly as a BatchNorm before that layer
  would (:mod:`.forward_fold` decides: a Linear and an unpadded conv always, a zero-padded conv when the
  constant's response is uniform or with ``border_correction``), also past ops that commute with a positive
  per-channel affine (pooling, dropout/identity in eval, flatten to ``(N, C)``) — the classifier head.
- Otherwise, for a ReLU whose proxy mean is > 0 in every channel and whose scale reaches conv/linear layers
  (below): ``s·(relu(a) − m) = s·m·(relu(a/m) − 1) = s·m·clamp(a/m − 1, min=−1)``: ``1/m`` joins ``pre``,
  φ' is ``torch.clamp(x, min=-1)`` (one ONNX Clip with a scalar bound, as cheap as Relu) and ``s·m`` goes
  into the layers. Else, for a positively homogeneous φ (ReLU, ReLU6/Hardtanh, LeakyReLU, PReLU; σ > 0
  always) σ moves before φ into ``pre``; for a clamp (ReLU, ReLU6, Hardtanh) the offset joins it as well,
  ``relu(x) + o = max(x + o, o)``: φ' is ``torch.maximum`` / ``torch.clamp`` with per-channel bounds (ONNX
  Max, slower than Relu; Max + Min for a Clip) and nothing is left after it. LeakyReLU / PReLU keep one Add
  (the offset). Any other φ (SiLU, GELU, ...) gives
  σ alone to the conv/linear layers on every path after it (a scale is exact for any padding, and passes
  pooling and the product with a squeeze-excitation gate) and keeps one Add, or keeps ``z·σ + σ·o`` (Mul +
  Add) when a path ends elsewhere (a residual add, the model output).
- Several users: each path takes the whole post-affine on its own when every one of them can.
- **pre** folds into the normalization before it: an ``nn.GroupNorm`` (its affine composed, or created when
  it has none — what the ``proxynorm`` policy makes) or an ``nn.LayerNorm`` over ``(C, *spatial)``; or into
  a Conv / ConvTranspose / Linear before it (as a BatchNorm after a layer, :mod:`.backward_fold`).
  Otherwise (the norm has other users, a norm subclass with its own forward, no norm) it stays as Mul + Add.

Leftover constants are buffers of shape ``(1, C, 1, ...)`` for the input's rank (from ``example_inputs``, or
a conv next to the call); a call that would need one while its rank is unknown is skipped with that reason.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ...errors import RewriteError
from ...fold import (
    fold_affine_into_norm,
    fold_bn_before,
    is_uniform,
    layer_channels,
    proxy_norm_moments,
    split_proxy_norm,
)
from ...layers import ProxyNormAct
from ...layers.proxynorm import _Elementwise
from . import backward_fold, forward_fold
from .graph_state import GraphState, set_parameters
from .patterns import BnSite, describe_node

__all__ = ["PnSite", "find_sites", "fold_site", "finish", "activation_form", "TRAINING_REASON"]

NOUN = "ProxyNormAct"
"""What the BatchNorm fold rules' reasons call the folded affine when they decide for a ProxyNormAct's pieces."""
TRAINING_REASON = ("ProxyNormAct is in training mode: its statistics are trained through "
                   "(call model.eval() to fold them for inference)")


@dataclass
class PnSite:
    """One ProxyNormAct call."""

    node: fx.Node
    name: str
    target: str
    module: ProxyNormAct
    reason: str = ""


def find_sites(gm: fx.GraphModule, qualify) -> list[PnSite]:
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if not isinstance(module, ProxyNormAct):
            continue
        site = PnSite(node, qualify(str(node.target)), str(node.target), module)
        if type(module).forward is not ProxyNormAct.forward:
            site.reason = f"{type(module).__name__} overrides ProxyNormAct.forward: normfx cannot read what it computes"
        elif module.training:
            site.reason = TRAINING_REASON
        elif not isinstance(getattr(module, "activation", None), nn.Module):
            site.reason = "ProxyNormAct without an activation module"
        sites.append(site)
    return sites


# ------------------------------------------------------------------------------------------------ activations


def activation_form(act: nn.Module) -> tuple[str, tuple[float, float] | None]:
    """``("clamp", (lo, hi))`` for ReLU / ReLU6 / Hardtanh (and a relu callable), ``("homogeneous", None)`` for
    LeakyReLU / PReLU (``φ(k x) = k φ(x)`` for ``k > 0``), ``("other", None)`` for anything else."""
    kind = type(act)
    if kind is nn.ReLU:
        return "clamp", (0.0, math.inf)
    if kind in (nn.ReLU6, nn.Hardtanh):
        return "clamp", (float(act.min_val), float(act.max_val))
    if kind in (nn.LeakyReLU, nn.PReLU):
        return "homogeneous", None
    if kind is _Elementwise and act.fn in (torch.relu, F.relu):
        return "clamp", (0.0, math.inf)
    return "other", None


# ------------------------------------------------------------------------------------------- graph helpers


def _input(node: fx.Node) -> Any:
    if node.args:
        return node.args[0]
    return node.kwargs.get("y", node.kwargs.get("input"))


def _pre_probe(x):  # placeholder targets while deciding; never left in a graph
    raise RuntimeError("normfx internal: proxy-norm probe left in the graph")


def _post_probe(x):
    raise RuntimeError("normfx internal: proxy-norm probe left in the graph")


def _layer_in_channels(state: GraphState, node: fx.Node) -> int | None:
    layer = state.layer(node)
    if layer is None:
        return None
    return layer_channels(layer.module.weight.shape, layer.kind, layer.groups)[0]


_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_MAX_POOLS = (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def _commutes(state: GraphState, node: fx.Node, prev: fx.Node) -> bool:
    """Does ``node`` (reading ``prev`` as its only tensor input) commute with ``x·σ + t`` per channel, σ > 0?"""
    if _input(node) is not prev or sum(a is prev for a in node.all_input_nodes) != 1:
        return False
    if node.op == "call_module":
        module = state.gm.get_submodule(node.target)
        kind = type(module)
        if kind in _POOLS or kind is nn.Identity:
            return True
        if kind in _MAX_POOLS:
            return not module.return_indices
        if kind in _AVG_POOLS:  # zero padding counted in the mean, ceil-mode windows, a divisor: not an average
            if getattr(module, "divisor_override", None) is not None or module.ceil_mode:
                return False
            return not module.count_include_pad or not any(int(p) for p in np.atleast_1d(module.padding))
        if kind in _DROPOUTS:
            return not module.training
        if kind is nn.Flatten:
            return module.start_dim == 1 and module.end_dim == -1
        return False
    if node.op == "call_function" and node.target is torch.flatten:
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return start == 1 and end == -1
    if node.op == "call_method" and node.target == "flatten":
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return start == 1 and end == -1
    return False


def _slide(state: GraphState, post: fx.Node, channels: int) -> tuple[fx.Node, fx.Node] | None:
    """Move ``post`` past a chain of commuting ops when the chain ends at one conv/linear taking ``channels``
    inputs (flatten then only collapsed 1×1 positions); returns ``(first, last)`` of the chain, or None."""
    chain, node = [], post
    while len(node.users) == 1:
        user = next(iter(node.users))
        if not _commutes(state, user, node):
            break
        chain.append(user)
        node = user
    if not chain or len(node.users) != 1 or _layer_in_channels(state, next(iter(node.users))) != channels:
        return None
    first, last = chain[0], chain[-1]
    act = post.args[0]
    first.replace_input_with(post, act)
    last.replace_all_uses_with(post)
    post.args = (last,)
    last.append(post)
    return first, last


def _unslide(post: fx.Node, act: fx.Node, slid: tuple[fx.Node, fx.Node]) -> None:
    first, last = slid
    post.replace_all_uses_with(last)
    post.args = (act,)
    first.replace_input_with(act, post)
    act.append(post)


def _norm_before(state: GraphState, pre: fx.Node, channels: int, rank: int | None) -> tuple[fx.Node | None, str]:
    """The GroupNorm / LayerNorm call the pre-affine folds into, or None and why not."""
    source = _input(pre)
    if not isinstance(source, fx.Node) or source.op != "call_module":
        return None, ""
    module = state.gm.get_submodule(source.target)
    if isinstance(module, nn.GroupNorm):
        if type(module).forward is not nn.GroupNorm.forward:
            return None, (f"{type(module).__name__} '{source.target}' has its own forward (modules after the norm): "
                          "its output is not the normalized affine")
        if module.num_channels != channels:
            return None, f"GroupNorm '{source.target}' has {module.num_channels} channels, not {channels}"
    elif isinstance(module, nn.LayerNorm):
        if type(module).forward is not nn.LayerNorm.forward:
            return None, f"{type(module).__name__} '{source.target}' has its own forward"
        shape = tuple(module.normalized_shape)
        if shape[0] != channels:
            return None, f"LayerNorm '{source.target}' normalizes {list(shape)}, whose first axis is not the {channels} channels"
        if rank is None:
            return None, (f"LayerNorm '{source.target}': whether its axes start at the channel axis depends on the "
                          "input rank; pass example_inputs to prove it")
        if len(shape) != rank - 1:
            return None, f"LayerNorm '{source.target}' normalizes the last {len(shape)} axes of a {rank}-D input, not (C, *spatial)"
    else:
        return None, ""
    if len(source.users) > 1:
        others = ", ".join(describe_node(state.gm, u) for u in source.users if u is not pre)
        return None, f"the output of '{source.target}' is also used by {others}"
    shared = state.shared_reason(source)
    if shared:
        return None, shared
    return source, ""


def _rank(state: GraphState, site: PnSite, y: Any) -> int | None:
    """The rank of the ProxyNormAct's input: recorded on example_inputs, else that of a conv next to it."""
    found = state.shapes.ranks(site.module)
    if len(found) == 1:
        return next(iter(found))
    candidates = []
    if isinstance(y, fx.Node) and y.op == "call_module":
        candidates.append(y)
        module = state.gm.get_submodule(y.target)
        if isinstance(module, (nn.GroupNorm, nn.LayerNorm)) and isinstance(_input(y), fx.Node):
            candidates.append(_input(y))
    candidates.extend(site.node.users)
    for node in candidates:
        if node.op == "call_module":
            module = state.gm.get_submodule(node.target)
            if isinstance(module, nn.modules.conv._ConvNd):
                return module.weight.dim()  # a batched ConvNd input/output: (N, C, *N spatial)
    return None


def _buffer(state: GraphState, values: np.ndarray, rank: int, like: torch.Tensor, base: str) -> fx.Node:
    name = state.fresh_name(base)
    shape = (1, -1) + (1,) * (rank - 2)
    tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)).reshape(shape)
    state.gm.register_buffer(name, tensor.to(dtype=like.dtype, device=like.device))
    return state.gm.graph.get_attr(name)


def _affine_nodes(state: GraphState, x: fx.Node, scale: np.ndarray | None, shift: np.ndarray | None, rank: int,
                  like: torch.Tensor, base: str) -> fx.Node:
    """``x·scale + shift`` (either may be None) as call_function nodes, inserted where the graph's cursor is."""
    out = x
    if scale is not None:
        out = state.gm.graph.call_function(torch.mul, (out, _buffer(state, scale, rank, like, base + "_scale")))
    if shift is not None:
        out = state.gm.graph.call_function(torch.add, (out, _buffer(state, shift, rank, like, base + "_shift")))
    return out


def _replace(node: fx.Node, new: fx.Node) -> None:
    node.replace_all_uses_with(new)
    node.graph.erase_node(node)



# ------------------------------------------------------------------------------ the post-affine's users


_MULS = (operator.mul, torch.mul)


def _scale_step(state: GraphState, node: fx.Node, prev: fx.Node) -> str | None:
    """How ``node`` passes a positive per-channel scale of its input ``prev`` on to its output: ``"op"`` (pooling,
    dropout/identity in eval, flatten to (N, C)), ``"mul"`` (a product with another tensor), or None."""
    if _commutes(state, node, prev):
        return "op"
    if node.op == "call_module" and _input(node) is prev:
        kind = type(state.gm.get_submodule(node.target))
        if kind in _AVG_POOLS or kind in _MAX_POOLS:  # zero padding, divisors: any linear or max pool keeps a scale
            return "op" if not getattr(state.gm.get_submodule(node.target), "return_indices", False) else None
    is_mul = (node.op == "call_function" and node.target in _MULS) or (node.op == "call_method" and node.target == "mul")
    if is_mul and len(node.args) == 2 and not node.kwargs and sum(a is prev for a in node.args) == 1:
        return "mul"
    return None


def _terminal(state: GraphState, node: fx.Node, prev: fx.Node, channels: int, rank: int | None) -> tuple[bool, str]:
    """Is ``node`` a conv/linear that takes ``prev`` as its ``channels``-channel input, so that a per-channel scale
    of ``prev`` folds into its input channels (exact for any padding)? ``(False, "")``: not a layer at all."""
    layer = state.layer(node)
    if layer is None:
        return False, ""
    if _input(node) is not prev:
        return False, f"it is not the input of '{node.target}'"
    if _layer_in_channels(state, node) != channels:
        return False, f"'{node.target}' does not take its {channels} channels as input channels"
    shared = state.shared_reason(node)
    if shared:
        return False, shared
    if layer.kind == "linear":
        reason = state.shapes.linear_rank_reason(layer.module, str(node.target), NOUN)
        return (False, reason) if reason else (True, "")
    if rank is None or layer.module.weight.dim() != rank:  # the channel axis reaches the conv as its axis 1
        return False, f"the input rank of '{node.target}' is not proven to be the ProxyNormAct's"
    return True, ""


def _scale_terminals(state: GraphState, post: fx.Node, channels: int, rank: int | None) -> tuple[list[fx.Node], str]:
    """The conv/linear layers a per-channel scale of ``post`` folds into, one per path through ops that keep it
    (pooling, a product with a gate — a squeeze-excitation block — flatten), or ``[]`` and why not."""
    scaled, terminals, products = {post}, [], []
    for user in list(post.users):
        prev, node = post, user
        while True:
            ok, why = _terminal(state, node, prev, channels, rank)
            if ok:
                terminals.append(node)
                break
            if why:
                return [], why
            step = _scale_step(state, node, prev)
            if step is None:
                return [], f"its output reaches {describe_node(state.gm, node)}, which a per-channel scale cannot pass"
            if step == "mul":
                products.append((node, prev))
            scaled.add(node)
            if len(node.users) != 1:
                users = ", ".join(describe_node(state.gm, u) for u in node.users) or "the model output"
                return [], f"its output reaches {describe_node(state.gm, node)}, which goes to {users}"
            prev, node = node, next(iter(node.users))
    for node, prev in products:
        if any(a in scaled for a in node.all_input_nodes if a is not prev):
            return [], f"{describe_node(state.gm, node)} multiplies two tensors that both carry the scale"
    if not terminals:
        return [], "its output goes to the model output"
    return terminals, ""


def _split_probes(graph: fx.Graph, post: fx.Node, act: fx.Node) -> list[fx.Node]:
    """One probe per user of ``post`` (each path may fold on its own); ``[post]`` for a single user."""
    users = list(post.users)
    if len(users) <= 1:
        return [post]
    probes = []
    for user in users:
        with graph.inserting_before(user):
            probe = graph.call_function(_post_probe, (act,))
        user.replace_input_with(post, probe)
        probes.append(probe)
    return probes


def _full_fold(state: GraphState, post: fx.Node, act: fx.Node, name: str, scale: np.ndarray, shift: np.ndarray,
               channels: int, *, avoid_border: bool = False) -> tuple[list[tuple[BnSite, fx.Node, Any]], str]:
    """The whole post-affine into the layer on every path after it (forward_fold's decision, past pooling /
    flatten): ``[(site, layer, slid)]``, or ``[]`` (graph unchanged) and why not. ``avoid_border``: a path that
    would need a border correction (an Add after the conv) counts as declined — a clamp activation takes the
    offset for free instead."""
    graph = state.gm.graph
    probes = _split_probes(graph, post, act)
    paths, reasons = [], []
    for probe in probes:
        site = BnSite(probe, name, scale=scale, shift=shift)
        slid = _slide(state, probe, channels)
        layer, why = forward_fold.check(state, site, NOUN)
        if layer is None and slid:
            _unslide(probe, act, slid)
            slid = None
            layer, why = forward_fold.check(state, site, NOUN)  # the reason at the call's own position
        if layer is not None and avoid_border and layer in state.responses and not is_uniform(state.responses[layer]):
            state.responses.pop(layer)
            layer, why = None, (f"the affine before a zero-padded conv '{layer.target}' would need a border "
                                "correction (an Add), and the activation takes the offset for free")
        paths.append((site, layer, slid))
        if layer is None:
            reasons.append(why)
    if not reasons:
        return paths, ""
    for site, layer, slid in paths:
        if layer is not None:
            state.responses.pop(layer, None)
        if slid:
            _unslide(site.node, act, slid)
    for probe in probes:
        if probe is not post:
            probe.replace_all_uses_with(post)
            graph.erase_node(probe)
    reasons = list(dict.fromkeys(reasons))
    if len(probes) == 1:
        return [], reasons[0]
    return [], f"its output has {len(probes)} users: " + "; ".join(reasons)


# ------------------------------------------------------------------------------------------------- the rule


def fold_site(state: GraphState, site: PnSite, *, forward: bool = True) -> tuple[bool, str, dict]:
    """Fold one ProxyNormAct call; returns ``(applied, reason, details)`` (the graph is unchanged when not applied)."""
    pn = site.module
    try:
        mean, inv_std = proxy_norm_moments(pn)
    except RewriteError as exc:
        return False, str(exc), {}
    y = _input(site.node)
    if not isinstance(y, fx.Node):
        return False, "the ProxyNormAct input is a constant", {}
    channels, like, base = pn.num_channels, pn.weight.detach(), site.target.replace(".", "_")
    rank = _rank(state, site, y)
    graph = state.gm.graph
    # y → pre → activation → post → users (probes while deciding)
    with graph.inserting_before(site.node):
        pre = graph.call_function(_pre_probe, (y,))
        act = graph.call_module(f"{site.target}.activation", (pre,))
        post = graph.call_function(_post_probe, (act,))
    original = (site.node.args, site.node.kwargs)
    site.node.replace_all_uses_with(post)
    graph.erase_node(site.node)

    # decide: post-affine first (it fixes where the scale goes), then the pre-affine
    form, bounds = activation_form(pn.activation)
    full_paths, scale_layers, scale_why = [], [], ""
    if forward:
        full_paths, post_why = _full_fold(state, post, act, site.name, inv_std, -mean * inv_std, channels,
                                          avoid_border=form == "clamp")
    else:
        post_why = "forward folds disabled (forward=false)"
    unit = None  # a clamp made one scalar bound by a 1/mean rescale, its scale for the layers after it
    if full_paths:
        split = split_proxy_norm(pn.weight, pn.bias, mean, inv_std)
    elif form == "clamp":
        if forward and np.all(mean > 0):
            unit = split_proxy_norm(pn.weight, pn.bias, mean, inv_std, unit_offset=True, bounds=bounds,
                                    absorb_offset=True)
            if _scalar(unit.lower) is not None and (np.all(np.isposinf(unit.upper)) or _scalar(unit.upper) is not None):
                scale_layers, scale_why = _scale_terminals(state, post, channels, rank)
            if not scale_layers:
                unit = None
            elif not _split_fits(unit, like.dtype, headroom=_UNIT_HEADROOM, mean=mean):
                # the 1/mean rescale of a nearly dead channel (mean ~ 1e-5 → 1e5) overflows a half-precision
                # model: take the next exact option, the per-channel clamp (its scale is inv_std, not 1/mean)
                unit, scale_layers = None, []
        split = unit if unit is not None else split_proxy_norm(pn.weight, pn.bias, mean, inv_std, move_scale=True,
                                                               bounds=bounds, absorb_offset=True)
    elif form == "homogeneous":
        split = split_proxy_norm(pn.weight, pn.bias, mean, inv_std, move_scale=True)
    else:
        split = split_proxy_norm(pn.weight, pn.bias, mean, inv_std)
        if forward:
            scale_layers, scale_why = _scale_terminals(state, post, channels, rank)
    if not _split_fits(split, like.dtype):
        _undo_probes(state, site, pre, act, post, full_paths, original)
        return False, (f"a folded value is out of range for {like.dtype} (proxy mean {np.min(np.abs(mean)):.3g}, "
                       f"inv_std {np.max(inv_std):.3g}): folding would make inf/NaN"), {}
    norm_node, norm_why = _norm_before(state, pre, channels, rank)
    pre_site, pre_layer, pre_why = None, None, norm_why
    if norm_node is None:
        pre_site = BnSite(pre, site.name, scale=split.pre_scale, shift=split.pre_shift)
        pre_layer, layer_why = backward_fold.check(state, pre_site, NOUN)
        pre_why = norm_why or layer_why
    clamp = not full_paths and form == "clamp" and unit is None  # per-channel bounds: buffers
    post_left = not full_paths and form != "clamp" and not split.post_is_identity
    if (norm_node is None and pre_layer is None or clamp or post_left) and rank is None:
        _undo_probes(state, site, pre, act, post, full_paths, original)
        return False, ("its input rank is unknown, and part of its affine would stay in the graph as per-channel "
                       f"constants (pre-affine: {pre_why or 'folds'}; post-affine: {post_why}); pass example_inputs "
                       "to prove the rank"), {}

    # apply: pre-affine
    finite_before = _finite_tensors(state.gm)
    details: dict[str, Any] = {"activation": type(pn.activation).__name__}
    left = 0
    if norm_node is not None:
        details["pre"] = _fold_into_norm(state, norm_node, pre, split, like)
    elif pre_layer is not None:
        applied = backward_fold.apply(state, pre_site, pre_layer)
        details["pre"] = f"{_kind(state, pre_layer)} '{applied['into']}'"
    else:
        with graph.inserting_before(pre):
            new = _affine_nodes(state, y, split.pre_scale, split.pre_shift, rank, like, base + "_pre")
        _replace(pre, new)
        why = pre_why or f"no GroupNorm, LayerNorm or Conv/Linear before it (its input comes from {describe_node(state.gm, y)})"
        details["pre"] = f"kept: Mul + Add ({why})"
        left += 2
    # apply: activation and post-affine
    if full_paths:
        places = []
        for path_site, layer, slid in full_paths:
            chain = ", ".join(describe_node(state.gm, n) for n in _chain(slid)) if slid else ""
            applied = forward_fold.apply(state, path_site, layer)
            where = f"{_kind(state, layer)} '{applied['into']}'" + (f" (past {chain})" if chain else "")
            if "border_correction" in applied:
                where += f" with a border correction (an Add after it) {applied['border_correction']}"
                left += 1
            places.append(where)
        if post in graph.nodes:  # split into one probe per path: the original has no users left
            graph.erase_node(post)
        details["post"] = ", ".join(places)
        details["into"] = places
    elif unit is not None:
        bounds_kw = {"min": _scalar(unit.lower)}
        if not np.all(np.isposinf(unit.upper)):
            bounds_kw["max"] = _scalar(unit.upper)
        with graph.inserting_before(act):
            new = graph.call_function(torch.clamp, (act.args[0],), bounds_kw)
        _replace(act, new)
        places = _scale_into(state, scale_layers, unit.scale, channels)
        _replace(post, new)
        words = ", ".join(f"{k}={v:g}" for k, v in bounds_kw.items())
        details["activation"] = (f"{type(pn.activation).__name__} → torch.clamp(x, {words}) on the input rescaled by "
                                 "1/mean (ONNX: one Clip with scalar bounds)")
        details["post"] = f"scale into {', '.join(places)}; offset absorbed by the activation ({post_why})"
    elif clamp:
        with graph.inserting_before(act):
            lower = _buffer(state, split.lower, rank, like, base + "_lower")
            if np.all(np.isposinf(split.upper)):
                new = graph.call_function(torch.maximum, (act.args[0], lower))
                what = "torch.maximum(x, per-channel lower bound)"
            else:
                upper = _buffer(state, split.upper, rank, like, base + "_upper")
                new = graph.call_function(torch.clamp, (act.args[0],), {"min": lower, "max": upper})
                what = "torch.clamp(x, per-channel bounds) (ONNX: Max + Min instead of one Clip)"
                left += 1
        _replace(act, new)
        _replace(post, new)
        details["activation"] = f"{type(pn.activation).__name__} → {what}"
        details["post"] = f"absorbed: scale into the pre-affine, offset into the activation's bounds ({post_why})"
    elif scale_layers:
        places = _scale_into(state, scale_layers, split.scale, channels)
        with graph.inserting_before(post):
            new = _affine_nodes(state, act, None, split.offset, rank, like, base + "_post")
        _replace(post, new)
        details["post"] = f"scale into {', '.join(places)}; offset kept: Add ({post_why})"
        left += 1
    elif split.post_is_identity:
        _replace(post, act)
        details["post"] = "none"
    else:
        scale = split.scale if split.post_has_scale else None
        with graph.inserting_before(post):
            new = _affine_nodes(state, act, scale, split.shift, rank, like, base + "_post")
        _replace(post, new)
        if scale is None:
            details["post"] = f"kept: Add of the offset, the scale moved into the pre-affine ({post_why})"
            left += 1
        else:
            details["post"] = f"kept: Mul + Add ({post_why}; {scale_why})" if scale_why else f"kept: Mul + Add ({post_why})"
            left += 2
    details["leftover_ops"] = left
    broken = sorted(n for n, ok in _finite_tensors(state.gm).items() if not ok and finite_before.get(n, True))
    if broken:
        raise RewriteError(f"folding ProxyNormAct '{site.name}' made non-finite {like.dtype} values in "
                           f"{', '.join(broken)}; refusing to return a broken model")
    reason = f"statistics folded; pre-affine → {details['pre']}; post-affine → {details['post']}"
    if details["activation"] != type(pn.activation).__name__:
        reason += f"; {details['activation']}"
    return True, reason, details


# the 1/mean rescale multiplies the normalized input (|x̂| up to a few units, times the weight) before the
# activation: keep its folded values this far below the dtype's largest finite value
_UNIT_HEADROOM = 2.0 ** 8


def _split_fits(split, dtype: torch.dtype, *, headroom: float = 1.0, mean: np.ndarray | None = None) -> bool:
    """Whether every value of a :class:`ProxyNormSplit` (and ``1 / mean`` when given) is finite and within
    ``finfo(dtype).max / headroom`` (a clamp's bounds may be ±inf where the activation has none)."""
    if not dtype.is_floating_point:
        return True
    limit = float(torch.finfo(dtype).max) / headroom
    values = [split.pre_scale, split.pre_shift, split.offset, split.scale, split.shift]
    if mean is not None:
        with np.errstate(divide="ignore"):
            values.append(1.0 / np.asarray(mean, dtype=np.float64))
    for v in values:
        v = np.asarray(v, dtype=np.float64)
        if not np.all(np.isfinite(v)) or np.any(np.abs(v) > limit):
            return False
    for bound in (split.lower, split.upper):
        if bound is None:
            continue
        v = np.asarray(bound, dtype=np.float64)
        finite = v[np.isfinite(v)]
        if np.any(np.isnan(v)) or np.any(np.abs(finite) > limit):
            return False
    return True


def _finite_tensors(gm: nn.Module) -> dict[str, bool]:
    """Each floating parameter and buffer of ``gm`` by name: all finite?"""
    named = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    return {name: bool(torch.isfinite(t).all()) for name, t in named if t.is_floating_point()}


def _undo_probes(state: GraphState, site: PnSite, pre: fx.Node, act: fx.Node, post: fx.Node, full_paths: list,
                 original: tuple) -> None:
    """Put the ProxyNormAct call back in place of the deciding probes (nothing applied yet)."""
    graph = state.gm.graph
    for path_site, layer, slid in full_paths:
        state.responses.pop(layer, None)
        if slid:
            _unslide(path_site.node, act, slid)
    with graph.inserting_before(pre):
        restored = graph.call_module(site.target, *original)
    for probe in [n for n in act.users if n is not post] + [post]:  # a full fold split the probes
        probe.replace_all_uses_with(restored)
        graph.erase_node(probe)
    graph.erase_node(act)
    graph.erase_node(pre)
    site.node = restored


def _scalar(values: np.ndarray | None) -> float | None:
    """The one value of an all-equal finite vector, else None."""
    if values is None or not np.all(np.isfinite(values)) or np.any(values != values[0]):
        return None
    return float(values[0])


def _scale_into(state: GraphState, layers: list[fx.Node], scale: np.ndarray, channels: int) -> list[str]:
    """Fold a per-channel scale into the input channels of each layer (exact for any padding); their names."""
    places = []
    for layer_node in layers:
        module, note = state.own_module(layer_node)
        layer = state.layer(layer_node)
        bias = None if module.bias is None else module.bias.detach().clone()
        weight, _ = fold_bn_before(module.weight.detach(), None, scale, np.zeros(channels), kind=layer.kind,
                                   groups=layer.groups)
        set_parameters(module, weight, bias)
        places.append(f"{type(module).__name__} '{state.part.qualified(str(layer_node.target))}'"
                      + (f" ({note})" if note else ""))
    return places


def _chain(slid: tuple[fx.Node, fx.Node]) -> list[fx.Node]:
    first, last = slid
    nodes, node = [first], first
    while node is not last:
        node = next(iter(node.users))
        nodes.append(node)
    return nodes


def _kind(state: GraphState, node: fx.Node) -> str:
    return type(state.gm.get_submodule(node.target)).__name__


def _fold_into_norm(state: GraphState, norm_node: fx.Node, pre: fx.Node, split, like: torch.Tensor) -> str:
    module, note = state.own_module(norm_node)
    had_affine = module.weight is not None
    shape = (module.num_channels,) if isinstance(module, nn.GroupNorm) else tuple(module.normalized_shape)
    reference = module.weight if had_affine else like
    requires_grad = reference.requires_grad
    weight, bias = fold_affine_into_norm(None if module.weight is None else module.weight.detach(),
                                         None if module.bias is None else module.bias.detach(),
                                         split.pre_scale, split.pre_shift, shape=shape, like=reference.detach())
    module.weight = nn.Parameter(weight, requires_grad=requires_grad)
    module.bias = nn.Parameter(bias, requires_grad=requires_grad)
    if isinstance(module, nn.GroupNorm):
        module.affine = True
    else:
        module.elementwise_affine = True
    _replace(pre, norm_node)
    what = "composed with its affine" if had_affine else "as its new affine"
    text = f"{type(module).__name__} '{state.part.qualified(str(norm_node.target))}' ({what})"
    return text + (f"; {note}" if note else "")


def finish(state: GraphState, targets: set[str]) -> None:
    """Replace each folded ProxyNormAct no call uses any more by a plain holder of its activation, so that
    its parameters and statistics leave the model while ``<path>.activation`` (still called) keeps its key."""
    called = {n.target for n in state.gm.graph.nodes if n.op == "call_module"}
    for target in targets:
        if target in called:
            continue
        module = state.gm.get_submodule(target)
        if not isinstance(module, ProxyNormAct):
            continue
        holder = nn.Module()
        holder.add_module("activation", module.activation)
        state.gm.set_submodule(target, holder)
