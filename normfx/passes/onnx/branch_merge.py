"""Rule: ``Add`` of convs reading one tensor → one ``Conv`` (structural reparameterization: RepVGG, MobileOne),
an identity branch (the tensor itself, or a ``BatchNormalization`` reading it) merged as an identity kernel.

Match: each maximal tree of ``Add`` nodes whose inner Adds feed only the next Add; its summands grouped by the
tensor they read — a ``Conv`` (constant weight/bias, explicit or VALID padding) whose output only the tree
reads, a foldable ``BatchNormalization`` the BN rules left (its output read only by the tree), or the tensor
itself. Check: :func:`normfx.merge.plan_merge` (the same decision as the torch.fx route). Apply: the anchor
Conv (the most taps) gets the merged kernel and padding; the merged-away Convs and BNs go; the summands left
are added to it. Runs inside ``fuse``'s rounds after the BN folds (a merge can open more folds). Each merge is
an ``applied`` entry naming the branches; a declined one is ``kept`` with the reason; a merged BN is
``applied`` under its own name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from ...merge import Geometry, identity_kernel, kernel_text, merge_kernels, plan_merge
from ...report import APPLIED, KEPT
from .bn import BnSite
from .edits import conv_params, input_name
from .workspace import Workspace, node_label

__all__ = ["BranchMerges", "RULE"]

RULE = "branch_merge"


@dataclass
class _Branch:
    tensor: gs.Tensor  # the summand
    label: str
    geometry: Geometry | None = None
    conv: gs.Node | None = None
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    bn: BnSite | None = None
    why: str = ""


@dataclass
class _Group:
    source: gs.Tensor
    branches: list[_Branch] = field(default_factory=list)


def _ints(node: gs.Node, key: str, default: list[int]) -> list[int]:
    return [int(v) for v in node.attrs.get(key, default)]


def _conv_branch(node: gs.Node, ws: Workspace) -> _Branch:
    label = node_label(node)
    branch = _Branch(node.outputs[0], label, conv=node)
    params = conv_params(node, "conv", ws)
    if isinstance(params, str):
        branch.why = params
        return branch
    rank = params.weight.ndim - 2
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad not in ("NOTSET", "VALID"):
        branch.why = f"{label} has auto_pad={auto_pad} (padding depends on the input size)"
        return branch
    pads = _ints(node, "pads", [0] * 2 * rank) if auto_pad == "NOTSET" else [0] * 2 * rank
    kernel = tuple(int(k) for k in params.weight.shape[2:])
    branch.geometry = Geometry(label, kernel, tuple(_ints(node, "strides", [1] * rank)),
                               tuple(_ints(node, "dilations", [1] * rank)),
                               tuple((pads[a], pads[a + rank]) for a in range(rank)), params.groups, params.cin,
                               params.cout)
    branch.weight, branch.bias = params.weight, params.bias
    return branch


class BranchMerges:
    """Runs the branch merge on a workspace, round after round, and keeps its report entries."""

    def __init__(self, ws: Workspace, targets=None) -> None:
        self.ws = ws
        self.targets = targets or (lambda name: True)  # convs the policy does not target are left alone
        self.applied: list[tuple[str, str, dict[str, Any]]] = []
        self.kept: dict[str, tuple[str, dict[str, Any]]] = {}

    # -- matching ------------------------------------------------------------------------------------

    def _is_add(self, node: gs.Node) -> bool:
        return (node.op == "Add" and not node.domain and len(node.inputs) == 2 and len(node.outputs) == 1
                and self.ws.in_main_graph(node) and not any(isinstance(t, gs.Constant) for t in node.inputs))

    def _inner(self, tensor: gs.Tensor) -> bool:
        """``tensor`` is an Add's output read only by one other Add (inside the tree)."""
        if len(tensor.inputs) != 1 or not self._is_add(tensor.inputs[0]) or self.ws.is_graph_output(tensor):
            return False
        users = self.ws.consumers(tensor)
        return len(users) == 1 and self._is_add(users[0]) and len(tensor.outputs) == 1

    def _tree(self, root: gs.Node) -> tuple[list[gs.Node], list[gs.Tensor]]:
        adds, leaves, stack = [root], [], list(reversed(root.inputs))
        while stack:
            tensor = stack.pop()
            if self._inner(tensor):
                adds.append(tensor.inputs[0])
                stack.extend(reversed(tensor.inputs[0].inputs))
            else:
                leaves.append(tensor)
        return adds, leaves

    def _summand(self, tensor: gs.Tensor, sites: dict[int, BnSite]) -> tuple[gs.Tensor, _Branch]:
        ws = self.ws
        producer = tensor.inputs[0] if len(tensor.inputs) == 1 else None
        single = producer is not None and len(tensor.outputs) == 1 and not ws.is_graph_output(tensor)
        if (producer is not None and producer.op == "Conv" and not producer.domain and ws.in_main_graph(producer)
                and self.targets(producer.name)):
            branch = _conv_branch(producer, ws) if single else _Branch(tensor, node_label(producer))
            if not single:
                branch.why = f"the output of {node_label(producer)} is also used elsewhere"
            return producer.inputs[0], branch
        site = sites.get(id(producer)) if producer is not None else None
        if site is not None and single:
            branch = _Branch(tensor, f"identity BatchNormalization {site.name!r}", bn=site)
            branch.geometry = Geometry.of_identity(branch.label, site.channels, 0)
            return site.x, branch
        label = f"identity {tensor.name!r}"
        return tensor, _Branch(tensor, label, geometry=Geometry.of_identity(label, 0, 0))

    # -- the rounds ----------------------------------------------------------------------------------

    def run(self, pending: list[BnSite], decisions: dict[str, tuple[str, str, dict[str, Any]]]) -> bool:
        """One pass over the graph; merged BNs leave ``pending`` with an ``applied`` decision. True when
        something merged."""
        sites = {id(s.node): s for s in pending}
        roots = [n for n in list(self.ws.graph.nodes) if self._is_add(n) and not self._inner(n.outputs[0])]
        changed = False
        for root in roots:
            if not root.outputs:  # removed by an earlier merge this pass
                continue
            adds, leaves = self._tree(root)
            groups: dict[int, _Group] = {}
            for leaf in leaves:
                source, branch = self._summand(leaf, sites)
                groups.setdefault(id(source), _Group(source)).branches.append(branch)
            for group in groups.values():
                if len(group.branches) < 2 or not any(b.conv is not None and not b.why for b in group.branches):
                    continue
                merged = self._merge(group, pending, decisions)
                if merged:
                    self._rebuild(root, adds, leaves, merged)
                    changed = True
                    break  # the tree changed: the next pass looks at it again
        return changed

    def _merge(self, group: _Group, pending: list[BnSite], decisions) -> list[_Branch] | None:
        usable = [b for b in group.branches if not b.why]
        anchor0 = next(b for b in usable if b.conv is not None)
        rank, cin = len(anchor0.geometry.kernel), anchor0.geometry.in_channels
        geoms = []
        for b in usable:
            if b.geometry.identity:
                b.geometry = Geometry.of_identity(b.label, b.geometry.in_channels or cin, rank)
            geoms.append(b.geometry)
        plan = plan_merge(geoms)
        declined = [(usable[i], why) for i, why in plan.declined] + [(b, b.why) for b in group.branches if b.why]
        source = f"{group.source.name!r}"
        labels_all = [b.label for b in group.branches]
        if not plan.ok:
            key = anchor0.conv.name or anchor0.label
            reason = f"branches reading {source} not merged: {'; '.join(w for _, w in declined) or plan.reason}"
            self.kept[key] = (reason, {"fold": RULE, "branches": labels_all})
            return None
        merged = [usable[i] for i in plan.merged]
        anchor = max((b for b in merged if b.conv is not None), key=lambda b: int(np.prod(b.geometry.kernel)))
        weights, biases = [], []
        for b in merged:
            if b.conv is not None:
                weights.append(b.weight)
                biases.append(b.bias)
            else:
                weights.append(identity_kernel(b.geometry.in_channels, plan.groups, rank,
                                               None if b.bn is None else b.bn.scale))
                biases.append(None if b.bn is None else b.bn.shift)
        weight, bias = merge_kernels(weights, biases, [plan.offsets[i] for i in plan.merged], plan.kernel)
        dtype = anchor.weight.dtype
        ws, node = self.ws, anchor.conv
        old = list(node.inputs[1:])
        ws.set_input(node, 1, ws.constant(input_name(node, 1, "weight"), weight.astype(dtype)))
        ws.set_input(node, 2, ws.constant(input_name(node, 2, "bias"), bias.astype(dtype)))
        ws.set_attr(node, "kernel_shape", list(plan.kernel))
        ws.set_attr(node, "pads", [b for b, _ in plan.pads] + [e for _, e in plan.pads])
        ws.set_attr(node, "strides", list(plan.stride))
        ws.set_attr(node, "dilations", list(plan.dilation))
        ws.set_attr(node, "group", int(plan.groups))
        node.attrs.pop("auto_pad", None)
        for tensor in old:
            ws.drop_if_unused(tensor)
        labels = [b.label for b in merged]
        kept = "".join(f"; kept apart: {why}" for _, why in declined)
        reason = (f"merged {len(merged)} branches reading {source} into one {kernel_text(plan.kernel)} Conv: "
                  f"{', '.join(labels)}{kept}")
        into = node.name or node_label(node)
        self.applied.append((into, reason, {"fold": RULE, "into": into, "branches": labels,
                                            "kernel": list(plan.kernel)}))
        self.kept.pop(into, None)
        for b in merged:
            if b.bn is not None:
                others = ", ".join(label for label in labels if label != b.label)
                decisions[b.bn.name] = (APPLIED, f"merged as an identity branch into the {kernel_text(plan.kernel)} "
                                                 f"{node_label(node)} (with {others})", {"fold": RULE, "into": into})
                pending.remove(b.bn)
        return [anchor] + [b for b in merged if b is not anchor]

    def _rebuild(self, root: gs.Node, adds: list[gs.Node], leaves: list[gs.Tensor], merged: list[_Branch]) -> None:
        """The anchor's output replaces the merged summands; the Adds are rebuilt over what is left."""
        ws = self.ws
        gone = {id(b.tensor) for b in merged[1:]}
        summands = [leaf for leaf in leaves if id(leaf) not in gone]
        out = root.outputs[0]
        ws.set_output(root, 0, ws.variable_like(f"{out.name}_unmerged", out))
        if len(summands) > 1:  # the new Adds go right before the old root (every summand is defined by then)
            before = ws.graph.nodes[next(i for i, n in enumerate(ws.graph.nodes) if n is root) - 1]
        acc = summands[0]
        for i, other in enumerate(summands[1:]):
            last = i == len(summands) - 2
            result = out if last else ws.variable_like(f"{out.name}_partial", out)
            add = gs.Node("Add", name=ws.fresh(f"{root.name or 'Add'}_merged"), inputs=[acc, other], outputs=[result])
            ws.insert_after(before, add)
            before, acc = add, result
        if len(summands) == 1:  # everything merged: the anchor Conv produces the sum itself
            ws.set_output(merged[0].conv, 0, out)
        for add in adds:
            ws.remove(add)
        for b in merged[1:]:
            producer = b.conv if b.conv is not None else (b.bn.node if b.bn is not None else None)
            if producer is not None and producer.outputs and not ws.consumers(producer.outputs[0]):
                ws.remove(producer)

    # -- reporting -----------------------------------------------------------------------------------

    def report(self, ctx) -> None:
        for name, reason, details in self.applied:
            ctx.report.add(name, ctx.rule, APPLIED, reason, **details)
        for name, (reason, details) in self.kept.items():
            ctx.report.add(name, ctx.rule, KEPT, reason, **details)
