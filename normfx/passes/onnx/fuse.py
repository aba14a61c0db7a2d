"""Policy ``fuse`` on ONNX: fold every targeted BatchNormalization into an adjacent layer.

For each BN (main graph, node order): read it (:mod:`.bn`; training mode, non-constant statistics →
skipped with the reason), then try the rules — backward first (:mod:`.conv_bn`, :mod:`.gemm_bn`:
the layer before it), then, with ``forward=true``, forward (:mod:`.bn_conv`, :mod:`.bn_gemm`: every
layer its output feeds). Each rule is match → check (a reason when it declines) → apply. Folds can
open new folds (``BN → BN → Conv``), so rounds repeat until nothing changes. A BN no rule folds is
kept (:mod:`.standalone_bn`) and reported with every rule's reason. BNs inside subgraphs (If/Loop/Scan
bodies) and local functions are reported skipped.

Options: ``forward`` (default true) enables the forward rules. ``duplicate_shared`` (default true):
a folded layer always gets new initializers, so a weight other nodes also read is never edited;
with ``duplicate_shared=false`` such a fold is refused instead (reported with the reason).

``ctx.dry_run`` (explain) runs the same rounds on the private graph but returns the model untouched,
so ``explain`` reports exactly what ``rewrite`` does.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import onnx

from ...errors import RewriteError
from ...report import APPLIED, SKIPPED
from . import bn_conv, bn_gemm, conv_bn, gemm_bn, standalone_bn
from .bn import BnSite, read_bn
from .chain import walk_down
from .io import batchnorm_nodes, name_batchnorm_nodes
from .rule import Decline, Fold, FoldOptions
from .workspace import Workspace, node_label

__all__ = ["run"]

log = logging.getLogger(__name__)

_BACKWARD = (conv_bn.find, gemm_bn.find)
_FORWARD = (bn_conv.find, bn_gemm.find)


def _backward(site: BnSite, ws: Workspace, options: FoldOptions) -> Fold | list[Decline]:
    declines: list[Decline] = []
    for find in _BACKWARD:
        result = find(site, ws, options=options)
        if isinstance(result, Fold):
            return result
        if isinstance(result, Decline):
            declines.append(result)
    return declines


def _forward(site: BnSite, ws: Workspace, options: FoldOptions) -> Fold | list[Decline]:
    """Fold into *every* consumer of the BN output, or into none."""
    y = site.y
    consumers = ws.data_consumers(y)
    if not consumers:
        return []
    if ws.is_graph_output(y):
        return [Decline("forward", f"the BatchNormalization output {y.name!r} is a graph output; not folded forward")]
    inside = [c for c in consumers if not ws.in_main_graph(c)]
    if inside:
        where = node_label(inside[0])
        reason = f"the BatchNormalization output {y.name!r} is read inside a subgraph ({where}); not folded forward"
        return [Decline("forward", reason)]
    plans: list[Fold] = []
    for consumer in consumers:
        walked = walk_down(y, consumer, ws)
        if isinstance(walked, str):
            return [Decline("forward", walked)]
        target, tin, chain = walked
        result: Fold | Decline | None = None
        for find in _FORWARD:
            result = find(site, ws, target, tin, chain, options=options)
            if result is not None:
                break
        if result is None:
            if len(consumers) == 1:
                return []
            reason = f"the BatchNormalization output also feeds {node_label(target)}, which it cannot be folded into"
            return [Decline("forward", reason)]
        if isinstance(result, Decline):
            return [result]
        plans.append(result)

    def apply() -> None:
        for plan in plans:
            plan.apply()
        ws.remove(site.node)

    first = plans[0]
    details = dict(first.details)
    if len(plans) > 1:
        details["into"] = [p.details.get("into") for p in plans]
        details["pattern"] = [p.details.get("pattern") for p in plans]
    return Fold(first.rule, ", ".join(p.into for p in plans), apply, details, parts=plans)


def _applied_reason(fold: Fold) -> str:
    direction = fold.details.get("direction", "")
    where = "into the preceding" if direction == "backward" else "into the following"
    return f"folded {where} {fold.into}"


def _finish_details(fold: Fold) -> dict[str, Any]:
    """The report details of an applied fold (its parts fill in theirs while applying)."""
    details = dict(fold.details)
    plans = fold.parts
    if len(plans) == 1:
        details.update({k: v for k, v in plans[0].details.items() if k not in details})
    elif plans:
        added = [p.details["added"] for p in plans if "added" in p.details]
        if added:
            details["added"] = added
    details["fold"] = fold.rule
    return details


def run(model: onnx.ModelProto, ctx: Any) -> onnx.ModelProto:
    """Fold the BatchNormalization nodes ``ctx`` targets; returns a new ModelProto (or ``model`` when
    nothing changed or ``ctx.dry_run``). Options: ``forward``, ``duplicate_shared``, ``border_correction``
    (see the policy)."""
    forward = bool(ctx.option("forward"))
    options = FoldOptions(bool(ctx.option("duplicate_shared")), bool(ctx.option("border_correction")))
    name_batchnorm_nodes(model)
    locations = batchnorm_nodes(model)
    decisions: dict[str, tuple[str, str, dict[str, Any]]] = {}
    main: list[str] = []
    for loc in locations:
        name = loc.node.name
        if not ctx.targets(name):
            continue
        if loc.where:
            reason = f"inside {loc.where}: BatchNormalization in subgraphs and local functions is not folded"
            decisions[name] = (SKIPPED, reason, {})
        else:
            main.append(name)

    ws: Workspace | None = None
    if main:
        ws = Workspace(model)
        by_name = {
            n.name: n for n in ws.graph.nodes if n.op == "BatchNormalization" and n.domain in (None, "", "ai.onnx")
        }
        pending: list[BnSite] = []
        for name in main:
            site = read_bn(by_name[name], name, ws)
            if isinstance(site, str):
                decisions[name] = (SKIPPED, site, {})
            else:
                pending.append(site)
        declines = _rounds(pending, ws, forward, options, decisions)
        for site in pending:
            reason = standalone_bn.reason(site, declines.get(site.name, []), ws, forward=forward)
            decisions[site.name] = (SKIPPED, reason, {})

    for loc in locations:
        name = loc.node.name
        if name in decisions:
            status, reason, details = decisions[name]
            ctx.report.add(name, ctx.rule, status, reason, **details)
    if ws is None or not ws.changed:  # explain too returns the rewritten (private) copy: later steps see it
        return model
    return ws.export()


def _rounds(
    pending: list[BnSite],
    ws: Workspace,
    forward: bool,
    options: FoldOptions,
    decisions: dict[str, tuple[str, str, dict[str, Any]]],
) -> dict[str, list[Decline]]:
    """Apply folds until a round changes nothing; ``pending`` keeps the BNs left. Returns the last
    reasons each left BN's rules gave."""
    phases: list[Callable[[BnSite, Workspace, FoldOptions], Fold | list[Decline]]] = [_backward]
    if forward:
        phases.append(_forward)
    declines: dict[str, list[Decline]] = {}
    progress = True
    while pending and progress:
        progress = False
        declines = {site.name: [] for site in pending}
        for phase in phases:
            for site in list(pending):
                result = phase(site, ws, options)
                if isinstance(result, Fold):
                    try:
                        result.apply()
                    except RewriteError as exc:  # the checks passed but the math refused (e.g. var + eps <= 0)
                        raise RewriteError(f"{site.name}: folding into {result.into} failed: {exc}") from None
                    log.debug("%s: %s (%s)", site.name, result.rule, result.into)
                    decisions[site.name] = (APPLIED, _applied_reason(result), _finish_details(result))
                    pending.remove(site)
                    declines.pop(site.name, None)
                    progress = True
                else:
                    declines[site.name].extend(result)
    return declines
