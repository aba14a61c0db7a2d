"""Rule: a sum of convs reading one tensor becomes one conv (structural reparameterization: RepVGG, MobileOne,
ACNet) — and an identity branch (``x`` itself, or an eval BN reading ``x``) merges too, as an identity kernel.

Runs after the BN folds, so ``conv → BN`` branches are already convs with a bias. Match: each maximal tree of
additions (``+``, ``torch.add``, ``Tensor.add`` without ``alpha``) whose inner additions have no other user;
its summands grouped by the tensor they read — a conv call whose output only the addition reads, a BN call
(module, eval, no activation of its own) whose output only the addition reads, or the tensor itself. Check:
:func:`normfx.merge.plan_merge` (same stride/dilation/groups/channels, consistent zero padding; the reason
when it declines). Apply: one new conv (the anchor conv's path, so its state_dict key stays) called before
the addition, the unmerged summands added to it. ``explain`` gets one ``applied`` entry per merge naming the
branches (``kept`` with the reason when a merge is declined); a merged identity BN's entry turns ``applied``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ...merge import Geometry, identity_kernel, kernel_text, merge_kernels, plan_merge
from ...report import APPLIED, KEPT, SKIPPED
from .graph_state import GraphState
from .patterns import BnSite, describe_node, find_bn_sites, layer_info

__all__ = ["run", "RULE"]

RULE = "branch_merge"
_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _is_add(node: fx.Node) -> bool:
    """``a + b`` of two tensors computed in the graph (``+``, ``torch.add``, ``Tensor.add``; alpha 1 at most)."""
    function = node.op == "call_function" and node.target in (operator.add, torch.add)
    if not (function or (node.op == "call_method" and node.target == "add")):
        return False
    extra = {k: v for k, v in node.kwargs.items() if not (k == "alpha" and v == 1)}
    return len(node.args) == 2 and not extra and all(isinstance(a, fx.Node) for a in node.args)


def _inner(node: fx.Node) -> bool:
    return _is_add(node) and len(node.users) == 1 and _is_add(next(iter(node.users)))


def _tree(root: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """The inner additions (root first) and the summands of the addition tree under ``root``."""
    adds, leaves, stack = [root], [], list(reversed(root.args))
    while stack:  # depth first, left to right: the summands keep their order
        node = stack.pop()
        if _inner(node):
            adds.append(node)
            stack.extend(reversed(node.args))
        else:
            leaves.append(node)
    return adds, leaves


@dataclass
class _Branch:
    node: fx.Node
    label: str
    geometry: Geometry | None = None
    module: nn.Module | None = None  # a conv branch's module
    bn: BnSite | None = None  # an identity BN branch
    why: str = ""  # set when the summand reads the tensor but cannot take part


@dataclass
class _Group:
    source: fx.Node
    branches: list[_Branch] = field(default_factory=list)


def _pads(module: nn.Module) -> tuple[tuple[int, int], ...]:
    k, d = module.kernel_size, module.dilation
    if module.padding == "valid":
        return ((0, 0),) * len(k)
    if module.padding == "same":
        return tuple((d[a] * (k[a] - 1) // 2, d[a] * (k[a] - 1) - d[a] * (k[a] - 1) // 2) for a in range(len(k)))
    return tuple((int(p), int(p)) for p in module.padding)


def _conv_geometry(label: str, module: nn.Module) -> Geometry:
    return Geometry(label, tuple(module.kernel_size), tuple(module.stride), tuple(module.dilation), _pads(module),
                    module.groups, module.in_channels, module.out_channels, module.padding_mode)


def _summand(state: GraphState, node: fx.Node, sites: dict[fx.Node, BnSite], qualify,
             targets) -> tuple[fx.Node, _Branch]:
    """The tensor a summand reads and what it is (a conv the policy does not target is a plain tensor)."""
    gm = state.gm
    if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
        info = layer_info(gm.get_submodule(node.target))
        source = node.args[0]
        if info is not None and info.kind == "conv" and isinstance(source, fx.Node) and targets(qualify(node.target)):
            branch = _Branch(node, f"conv '{qualify(node.target)}'", module=info.module)
            if len(node.users) > 1:
                others = ", ".join(describe_node(gm, u) for u in node.users if not _is_add(u))
                branch.why = f"{branch.label}'s output is also used by {others or 'another addition'}"
            else:
                branch.geometry = _conv_geometry(branch.label, info.module)
            return source, branch
        site = sites.get(node)
        if site is not None and isinstance(site.input_node, fx.Node) and len(node.users) == 1:
            branch = _Branch(node, f"identity BN '{site.name}'", bn=site)
            branch.geometry = Geometry.of_identity(branch.label, len(site.scale), 0)
            return site.input_node, branch
    return node, _Branch(node, f"identity '{node.name}'", geometry=Geometry.of_identity(f"identity '{node.name}'", 0, 0))


def _groups(state: GraphState, leaves: list[fx.Node], sites, qualify, targets) -> list[_Group]:
    groups: dict[fx.Node, _Group] = {}
    for leaf in leaves:
        source, branch = _summand(state, leaf, sites, qualify, targets)
        groups.setdefault(source, _Group(source)).branches.append(branch)
    return [g for g in groups.values()
            if len(g.branches) >= 2 and any(b.module is not None and not b.why for b in g.branches)]


def _complete(group: _Group) -> list[Geometry]:
    """Geometries with the identities' channel count and rank taken from the group's convs."""
    conv = next(b.module for b in group.branches if b.module is not None and not b.why)
    rank = len(conv.kernel_size)
    out = []
    for b in group.branches:
        if b.geometry is not None and b.geometry.identity:
            channels = b.geometry.in_channels or conv.in_channels
            b.geometry = Geometry.of_identity(b.label, channels, rank)
        out.append(b.geometry)
    return out


def _torch_padding(kernel, dilation, stride, pads) -> tuple | str | None:
    if all(b == e for b, e in pads):
        return tuple(b for b, _ in pads)
    same = tuple((d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(kernel, dilation))
    return "same" if tuple(pads) == same and all(s == 1 for s in stride) else None


def _merged_module(group: _Group, indices: list[int], plan) -> nn.Module:
    branches = [group.branches[i] for i in indices]
    anchor = next(b.module for b in branches if b.module is not None)
    rank = len(plan.kernel)
    weights, biases = [], []
    for b in branches:
        if b.module is not None:
            weights.append(b.module.weight.detach())
            biases.append(None if b.module.bias is None else b.module.bias.detach())
        else:
            channels = b.geometry.in_channels
            weights.append(identity_kernel(channels, plan.groups, rank, None if b.bn is None else b.bn.scale))
            biases.append(None if b.bn is None else b.bn.shift)
    to_numpy = [w.double().cpu().numpy() if isinstance(w, torch.Tensor) else w for w in weights]
    bias_np = [b.double().cpu().numpy() if isinstance(b, torch.Tensor) else b for b in biases]
    weight, bias = merge_kernels(to_numpy, bias_np, [plan.offsets[i] for i in indices], plan.kernel)
    padding = _torch_padding(plan.kernel, plan.dilation, plan.stride, plan.pads)
    dtype, device = anchor.weight.dtype, anchor.weight.device
    conv = _CONVS[rank](anchor.in_channels, anchor.out_channels, plan.kernel, plan.stride, padding, plan.dilation,
                        plan.groups, bias=True, device=device, dtype=dtype)
    grad = anchor.weight.requires_grad
    conv.weight = nn.Parameter(torch.from_numpy(weight).to(device=device, dtype=dtype), requires_grad=grad)
    conv.bias = nn.Parameter(torch.from_numpy(bias).to(device=device, dtype=dtype), requires_grad=grad)
    return conv


def _find_entry(report, name: str):
    return next((e for e in reversed(report.entries) if e.name == name and e.status == SKIPPED), None)


def run(state: GraphState, ctx, qualify) -> int:
    """Merge every mergeable sum of branches in ``state``'s graph; returns the number of merges."""
    gm, graph = state.gm, state.gm.graph
    sites = {s.node: s for s in find_bn_sites(gm, qualify)
             if s.node.op == "call_module" and not s.reason and not s.post and ctx.targets(s.name)}
    roots = [n for n in graph.nodes if _is_add(n) and not _inner(n)]
    merges = 0
    for root in roots:
        adds, leaves = _tree(root)
        replaced: dict[int, fx.Node] = {}  # id(leaf) merged -> merged call (first leaf of a group only)
        dropped: set[int] = set()
        for group in _groups(state, leaves, sites, qualify, ctx.targets):
            merged = _merge_group(state, ctx, group, root, qualify)
            if merged is None:
                continue
            node, indices = merged
            replaced[id(group.branches[indices[0]].node)] = node
            dropped.update(id(group.branches[i].node) for i in indices[1:])
            merges += 1
        if not replaced:
            continue
        _rebuild(state, root, adds, leaves, replaced, dropped)
    return merges


def _merge_group(state: GraphState, ctx, group: _Group, root: fx.Node, qualify) -> tuple[fx.Node, list[int]] | None:
    report = ctx.report
    usable = [i for i, b in enumerate(group.branches) if not b.why]
    geoms = _complete(group)
    plan = plan_merge([geoms[i] for i in usable])
    declined = [(group.branches[i], why) for i, why in
                [(usable[j], w) for j, w in plan.declined]] + [(b, b.why) for b in group.branches if b.why]
    anchor = next(b for b in group.branches if b.module is not None and not b.why)
    anchor_name = qualify(anchor.node.target)
    source = describe_node(state.gm, group.source)
    padding = None
    if plan.ok:
        padding = _torch_padding(plan.kernel, plan.dilation, plan.stride, plan.pads)
        if padding is None:
            plan.reason = (f"the merged {kernel_text(plan.kernel)} kernel needs asymmetric padding "
                           f"{plan.pads}, which a torch Conv cannot express")
    if not plan.ok or padding is None:
        reason = f"branches reading {source} not merged: {'; '.join(w for _, w in declined) or plan.reason}"
        report.add(anchor_name, ctx.rule, KEPT, reason, fold=RULE, branches=[b.label for b in group.branches])
        _amend_bns(report, [b for b in group.branches if b.bn is not None], f"branch merge declined: {reason}")
        return None
    indices = [usable[j] for j in plan.merged]
    merged = [group.branches[i] for i in indices]
    plan.offsets = {usable[j]: o for j, o in plan.offsets.items()}
    conv = _merged_module(group, indices, plan)
    target = str(anchor.node.target)
    if state.calls(target) > 1:  # the path is called elsewhere too: the merged conv gets its own
        target = state.fresh_name(target.replace(".", "_") + "_merged")
    state.gm.add_submodule(target, conv)
    state.shapes.alias(conv, anchor.module)
    with state.gm.graph.inserting_before(root):
        node = state.gm.graph.call_module(target, (group.source,))
    kept = "".join(f"; kept apart: {why}" for _, why in declined)
    labels = [b.label for b in merged]
    reason = (f"merged {len(merged)} branches reading {source} into one {kernel_text(plan.kernel)} conv: "
              f"{', '.join(labels)}{kept}")
    report.add(anchor_name, ctx.rule, APPLIED, reason, fold=RULE, into=qualify(target), branches=labels,
               kernel=list(plan.kernel))
    for b in merged:
        if b.bn is not None:
            entry = _find_entry(report, b.bn.name)
            others = ", ".join(label for label in labels if label != b.label)
            text = (f"merged as an identity branch into the {kernel_text(plan.kernel)} conv '{qualify(target)}' "
                    f"(with {others})")
            if entry is not None:
                entry.status, entry.reason = APPLIED, text
                entry.details.update(fold=RULE, into=qualify(target))
            else:
                report.add(b.bn.name, ctx.rule, APPLIED, text, fold=RULE, into=qualify(target))
    _amend_bns(report, [b for b, _ in declined if b.bn is not None], f"branch merge: kept apart ({reason})")
    return node, indices


def _amend_bns(report, branches: list[_Branch], note: str) -> None:
    for b in branches:
        entry = _find_entry(report, b.bn.name)
        if entry is not None and note not in entry.reason:
            entry.reason = f"{entry.reason}; {note}"


def _rebuild(state: GraphState, root: fx.Node, adds: list[fx.Node], leaves: list[fx.Node],
             replaced: dict[int, fx.Node], dropped: set[int]) -> None:
    """Replace the addition tree by merged calls plus the summands left, and erase what it no longer needs."""
    graph = state.gm.graph
    summands, seen = [], set()
    for leaf in leaves:
        if id(leaf) in replaced:
            if id(leaf) not in seen:
                summands.append(replaced[id(leaf)])
                seen.add(id(leaf))
        elif id(leaf) not in dropped:
            summands.append(leaf)
    result = summands[0]
    with graph.inserting_before(root):
        for other in summands[1:]:
            result = graph.call_function(operator.add, (result, other))
    root.replace_all_uses_with(result)
    for add in adds:
        if not add.users:
            graph.erase_node(add)
    for leaf in dict.fromkeys(leaves):
        if (id(leaf) in replaced or id(leaf) in dropped) and not leaf.users and leaf.op != "placeholder":
            graph.erase_node(leaf)
