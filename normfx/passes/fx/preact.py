"""Rule: pre-activation BN → ReLU/ReLU6/LeakyReLU/PReLU → conv/linear (ResNet v2, DenseNet, DPN).

The BN's input comes from a residual add or a concat, so neither fold takes it. Its scale moves through the
activation into the layers reading the activation (through average pools and a flatten too); its shift
stays as a per-channel offset the tensor it reads must carry, solved over the whole graph by
:class:`normfx.preact.OffsetSolver` (:mod:`.offsets` describes the graph to it): the convs producing that
tensor get the offset in their bias, residual additions pass sums on, concatenations slices, and every other
reader is compensated. A BN whose offset contradicts another reader's is kept, re-parameterized for what the
stream now carries (one op, the fewest: a kept BN is ORT's cheapest standalone form), with the reason.

match (:func:`match`, a reason when a BN is not a candidate) → solve → apply (:func:`run`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ...errors import RewriteError
from ...fold import fold_bn_before
from ...preact import ActivationSplit, OffsetSolver, activation_reference, reparameterize_bn, split_activation
from ...report import APPLIED, SKIPPED
from .frozen import STANDARD_BATCHNORM
from .graph_state import GraphState, set_parameters
from .offsets import Region, describe_region
from .patterns import BnSite, describe_node

__all__ = ["Candidate", "match", "run"]

_RELU_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.leaky_relu: "leaky_relu",
                   F.hardtanh: "relu6"}
_ACT_MODULES = ((nn.ReLU, "relu"), (nn.ReLU6, "relu6"), (nn.LeakyReLU, "leaky_relu"), (nn.PReLU, "prelu"))
_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADAPTIVE_FUNCTIONS = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)
_RANKS = {nn.BatchNorm1d: None, nn.BatchNorm2d: 4, nn.BatchNorm3d: 5}


@dataclass
class Consumer:
    """A conv/linear reading the activation (``repeat``: features per channel after a flatten)."""

    node: fx.Node
    repeat: int = 1
    padded: bool = False  # zero padding between the activation and the layer (a constant is not a bias there)


@dataclass
class Candidate:
    site: BnSite
    act: fx.Node
    kind: str  # relu, relu6, leaky_relu, prelu
    slope: np.ndarray | None
    consumers: list[Consumer] = field(default_factory=list)
    rank: int | None = None


def _activation(gm: fx.GraphModule, node: fx.Node) -> tuple[str | None, np.ndarray | None, str]:
    """(kind, slope, why-not) of an activation node."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        for cls, kind in _ACT_MODULES:
            if type(module) is cls:
                if kind == "leaky_relu":
                    return kind, np.array([module.negative_slope]), ""
                if kind == "prelu":
                    return kind, module.weight.detach().double().cpu().numpy().reshape(-1), ""
                return kind, None, ""
        return None, None, f"{type(module).__name__} is not positively homogeneous"
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        kind = _RELU_FUNCTIONS[node.target]
        if node.target is F.hardtanh:
            lo = node.kwargs.get("min_val", node.args[1] if len(node.args) > 1 else -1.0)
            hi = node.kwargs.get("max_val", node.args[2] if len(node.args) > 2 else 1.0)
            if (lo, hi) != (0.0, 6.0):
                return None, None, "hardtanh with bounds other than (0, 6)"
        if kind == "leaky_relu":
            slope = node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else 0.01)
            if isinstance(slope, fx.Node):
                return None, None, "leaky_relu with a computed slope"
            return kind, np.array([float(slope)]), ""
        return kind, None, ""
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return "relu", None, ""
    return None, None, f"{describe_node(gm, node)} is not ReLU/ReLU6/LeakyReLU/PReLU"


def _consumers(state: GraphState, node: fx.Node, channels: int, padded: bool = False,
               flat: bool = False) -> tuple[list[Consumer], str]:
    """Every conv/linear that reads ``node`` linearly per channel (through average pools and a flatten; after
    ``flatten(x, 1)`` a Linear's input is 2-D by construction)."""
    found: list[Consumer] = []
    for user in node.users:
        layer = state.layer(user)
        if layer is not None:
            if user.args[0] is not node or layer.kind == "conv_transpose":
                return [], f"the activation output reaches {describe_node(state.gm, user)} other than as its input"
            cin = layer.module.weight.shape[1] * layer.groups if layer.kind == "conv" else layer.module.weight.shape[1]
            if cin % channels or (layer.kind == "conv" and cin != channels):
                return [], f"'{user.target}' reads {cin} features, not the BN's {channels} channels"
            if state.shared_reason(user):
                return [], state.shared_reason(user)
            if layer.kind == "linear" and not flat:
                reason = state.shapes.linear_rank_reason(layer.module, str(user.target), "pre-activation BN",
                                                         relation="moves into it")
                if reason:
                    return [], reason
            found.append(Consumer(user, cin // channels, padded or layer.zero_padded))
            continue
        nested = _pool(state, user)
        if nested is None:
            return [], f"the activation output goes to {describe_node(state.gm, user)}, not only to convs/linears"
        flattens = (user.target is torch.flatten) or (user.op == "call_method" and user.target == "flatten")
        more, why = _consumers(state, user, channels, padded or nested, flat or flattens)
        if why:
            return [], why
        found.extend(more)
    if not found:
        return [], "the activation output reaches no conv/linear"
    return found, ""


def _pool(state: GraphState, node: fx.Node) -> bool | None:
    """None when ``node`` is not a per-channel linear map; else whether it zero-pads."""
    if node.op == "call_module":
        module = state.gm.get_submodule(str(node.target))
        if isinstance(module, _POOLS) and getattr(module, "divisor_override", None) is None:
            pad = getattr(module, "padding", 0)
            return any(int(p) for p in (pad if isinstance(pad, (tuple, list)) else (pad,)))
        return None
    if node.op == "call_function" and node.target in _ADAPTIVE_FUNCTIONS:
        return False
    if node.op == "call_function" and node.target is torch.flatten:
        start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
        return False if start == 1 else None
    if node.op == "call_method" and node.target == "flatten":
        return False if (node.args[1:] or (node.kwargs.get("start_dim"),))[0] == 1 else None
    return None


def match(state: GraphState, site: BnSite) -> Candidate | str:
    """The pre-activation candidate, or why this BN is not one."""
    module = state.gm.get_submodule(str(site.node.target)) if site.node.op == "call_module" else None
    if module is None or type(module) not in STANDARD_BATCHNORM or module.running_mean is None or not module.affine:
        return "pre-activation fold needs a stock affine BatchNorm module with running statistics"
    if site.post:
        return "the BN applies its own activation module"
    if state.calls(str(site.node.target)) > 1 or state.sharing(site.node):
        return "the BN module is used more than once"
    users = list(site.node.users)
    if len(users) != 1:
        return f"the BN output goes to {len(users)} places, not to one activation"
    kind, slope, why = _activation(state.gm, users[0])
    if kind is None:
        return why
    if len(users[0].users) == 0:
        return "the activation's result is unused"
    channels = len(site.scale)
    consumers, why = _consumers(state, users[0], channels)
    if why:
        return why
    candidate = Candidate(site, users[0], kind, slope, consumers, _RANKS.get(type(module)))
    if candidate.rank is None:
        layer = state.layer(consumers[0].node)
        candidate.rank = 2 if layer.kind == "linear" else layer.module.weight.dim()
    constant = np.where(site.scale == 0, activation_reference(kind, site.shift, slope), 0.0)
    if np.any(constant != 0) and any(c.padded for c in consumers):
        return "a channel with BN scale 0 is the constant act(shift) ≠ 0, which is not a bias through zero padding"
    return candidate


def run(state: GraphState, declined: list[tuple[BnSite, str]], qualify) -> list[tuple[BnSite, str, str, dict]]:
    """Fold every pre-activation BN among the sites both folds declined; returns (site, status, reason,
    details) for each of them."""
    results: list[tuple[BnSite, str, str, dict]] = []
    candidates: list[Candidate] = []
    for site, why in declined:
        found = match(state, site)
        if isinstance(found, str):
            results.append((site, SKIPPED, f"{why}; not a pre-activation fold: {found}", {}))
        else:
            candidates.append(found)
    if not candidates:
        return results
    region = Region(state, [c.site for c in candidates])
    if region.reason:
        for c in candidates:
            results.append((c.site, SKIPPED, f"pre-activation fold: {region.reason}", {}))
        return results
    solver = OffsetSolver()
    region.describe(solver, {id(c.site): c for c in candidates})
    solution = solver.solve()
    region.apply_streams(solution)
    for c in candidates:
        key = c.site.input_node
        a, o = solution.scale[key], solution.offset[key]
        if id(c.site) in solution.kept:
            _keep(state, c.site, a, o)
            results.append((c.site, SKIPPED, f"pre-activation BN kept: {solution.kept[id(c.site)]}",
                            {"stream": describe_region(state, key)}))
            continue
        try:
            split = split_activation(c.site.scale, c.site.shift, c.kind, slope=c.slope, stream_scale=a)
        except RewriteError as exc:  # a PReLU slope 0 with a negative k: kept, re-parameterized
            _keep(state, c.site, a, o)
            results.append((c.site, SKIPPED, f"pre-activation BN kept: {exc}", {}))
            continue
        details = _fold(state, c, split, qualify)
        producers = describe_region(state, key)
        into = ", ".join(details["into"])
        results.append((c.site, APPLIED, f"pre-activation: scale into {into}, shift carried by {producers}", details))
    return results


def _keep(state: GraphState, site: BnSite, a: np.ndarray, o: np.ndarray) -> None:
    if np.all(a == 1) and np.all(o == 0):
        return
    module, _ = state.own_module(site.node)
    mean, weight = reparameterize_bn(module.running_mean, module.weight, a, o)
    dtype, device = module.running_mean.dtype, module.running_mean.device
    module.running_mean = torch.as_tensor(mean).to(dtype=dtype, device=device)
    module.weight = nn.Parameter(torch.as_tensor(weight).to(dtype=module.weight.dtype, device=device),
                                 requires_grad=module.weight.requires_grad)


def _fold(state: GraphState, c: Candidate, split: ActivationSplit, qualify) -> dict:
    state.remove_bn(c.site, c.site.input_node)
    _rewrite_activation(state, c, split)
    into = []
    for consumer in c.consumers:
        module, _ = state.own_module(consumer.node)
        layer = state.layer(consumer.node)
        gain = np.repeat(split.gain, consumer.repeat)
        constant = np.repeat(split.constant, consumer.repeat)
        bias = None if module.bias is None else module.bias.detach()
        weight, bias = fold_bn_before(module.weight.detach(), bias, gain, constant, kind=layer.kind, groups=layer.groups)
        set_parameters(module, weight, bias)
        into.append(qualify(str(consumer.node.target)))
    details = {"into": into, "direction": "pre-activation"}
    if np.any(split.gain < 0):
        details["negative_channels"] = int(np.sum(split.gain < 0))
    return details


def _unused_name(state: GraphState, base: str) -> str:
    """A top-level attribute name of the graph module nothing uses (base names are per activation node, so
    this is O(1), unlike a scan of every module and buffer)."""
    name, i = base, 1
    while hasattr(state.gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def _buffer(state: GraphState, anchor: fx.Node, values: np.ndarray, rank: int, base: str,
            like: torch.Tensor) -> fx.Node:
    name = _unused_name(state, base)
    shape = (-1,) + (1,) * (rank - 2)
    state.gm.register_buffer(name, torch.as_tensor(values).to(dtype=like.dtype, device=like.device).reshape(shape))
    with state.gm.graph.inserting_before(anchor):
        return state.gm.graph.get_attr(name)


def _rewrite_activation(state: GraphState, c: Candidate, split: ActivationSplit) -> None:
    """Replace the activation by its per-channel form (or an out-of-place copy of itself: it now reads the
    stream tensor, which an in-place activation would overwrite)."""
    graph, node = state.gm.graph, c.act
    source = node.args[0]
    base = (str(node.target) if node.op == "call_module" else node.name).replace(".", "_") + "_preact"
    like = state.gm.get_submodule(str(c.consumers[0].node.target)).weight
    if split.clamp:
        top = np.inf if c.kind == "relu" else 6.0
        if np.all(split.lower == 0) and np.all(split.upper == top):
            fn, args, kwargs = (torch.relu, (source,), {}) if c.kind == "relu" else (F.relu6, (source,), {})
        else:
            low = _buffer(state, node, split.lower, c.rank, base + "_min", like)
            high = _buffer(state, node, split.upper, c.rank, base + "_max", like)
            fn, args, kwargs = torch.clamp, (source,), {"min": low, "max": high}
        with graph.inserting_before(node):
            new = graph.call_function(fn, args, kwargs)
    else:
        original = c.slope if c.slope.size == split.slope.size else np.full(split.slope.size, c.slope[0])
        if np.array_equal(split.slope, original) and c.kind == "prelu":
            return  # a PReLU module is never in place
        if np.array_equal(split.slope, original):
            with graph.inserting_before(node):
                new = graph.call_function(F.leaky_relu, (source, float(c.slope[0])))
        else:
            prelu = nn.PReLU(len(split.slope))
            prelu.weight = nn.Parameter(torch.as_tensor(split.slope).to(like.dtype), requires_grad=False)
            name = _unused_name(state, base)
            state.gm.add_submodule(name, prelu)
            with graph.inserting_before(node):
                new = graph.call_module(name, (source,))
    node.replace_all_uses_with(new)
    graph.erase_node(node)

