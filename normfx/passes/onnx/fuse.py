"""Policy ``fuse`` on ONNX: fold every targeted BatchNormalization into an adjacent layer, evaluate the
constant subgraphs, and fold the per-channel affines Proxy Norm / GroupNorm exports leave.

For each BN (main graph, node order): read it (:mod:`.bn`; training mode, non-constant statistics →
skipped with the reason), then try the rules — backward first (:mod:`.conv_bn`, :mod:`.gemm_bn`:
the layer before it), then, with ``forward=true``, forward (:mod:`.bn_conv`, :mod:`.bn_gemm`: every
layer its output feeds). Each rule is match → check (a reason when it declines) → apply. Folds can
open new folds (``BN → BN → Conv``), so rounds repeat until nothing changes. A BN no rule folds is
kept (:mod:`.standalone_bn`) and reported with every rule's reason. BNs inside subgraphs (If/Loop/Scan
bodies) and local functions are reported skipped.

Then :mod:`.constant_subgraph` replaces every node computed from constants only (Proxy Norm's proxy
statistics, a StdConv's standardized kernel) by initializers, and :mod:`.affine_fold` runs the affine
rules on each ``Mul``/``Add``/``Sub``/``Div``-by-constant chain: into the normalization before it
(:mod:`.norm_affine`), into the layers after it (:mod:`.affine_conv`, the BN forward rules reused),
past an average pooling (:mod:`.affine_pool`), or merged into one Mul + Add (:mod:`.affine_merge`).
The three families repeat until none changes the graph (a kernel evaluated lets a BN fold into it). Then
pre-activation BNs (:mod:`.preact`), per-channel ReLU clamps (:mod:`.sign_clamp`) and per-channel Adds left after
a Relu (:mod:`.relu_offset`: ``relu(a) + c = max(a + c, c)``, ``c`` moved upstream).
Their entries come after the BN entries: ``applied`` with what was done, ``kept`` with the reasons
(never ``skipped``: they are not the BatchNorms the policy targets, so ``strict`` ignores them).

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
from ...report import APPLIED, KEPT, SKIPPED
from . import (
    bn_affine,
    bn_conv,
    bn_gemm,
    bn_split,
    concat_bn,
    constant_subgraph,
    conv_bn,
    gemm_bn,
    preact,
    relu_offset,
    sign_clamp,
    standalone_bn,
)
from .affine_fold import AffineRules
from .bn import BnSite, read_bn
from .branch_merge import BranchMerges
from .forward import applied_details, plan_forward
from .io import batchnorm_nodes, name_batchnorm_nodes
from .rule import Decline, Fold, FoldOptions
from .workspace import Workspace

__all__ = ["run"]

log = logging.getLogger(__name__)

_BACKWARD = (conv_bn.find, gemm_bn.find, concat_bn.find)
_FORWARD = (bn_conv.find, bn_gemm.find, bn_split.find)


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
    """Fold into *every* consumer of the BN output, or into none (:func:`.forward.plan_forward`)."""
    return plan_forward(site, ws, _FORWARD, options, noun="BatchNormalization", remove=lambda: ws.remove(site.node))


def _applied_reason(fold: Fold) -> str:
    parts = fold.parts or [fold]
    if any(p.details.get("slices") for p in parts):  # concat / split folds (concat_bn, bn_split)
        into = [s for p in parts for s in (p.details.get("slices") or [p.into])]
        rest = "".join(f"; remainder: {p.details['remainder']}" for p in parts if p.details.get("remainder"))
        return f"folded slice by slice into {', '.join(into)}{rest}"
    direction = fold.details.get("direction", "")
    where = "into the preceding" if direction == "backward" else "into the following"
    return f"folded {where} {fold.into}"


def _finish_details(fold: Fold) -> dict[str, Any]:
    """The report details of an applied fold (its parts fill in theirs while applying)."""
    details = applied_details(fold)
    details["fold"] = fold.rule
    return details


def run(model: onnx.ModelProto, ctx: Any) -> onnx.ModelProto:
    """Fold the BatchNormalization nodes ``ctx`` targets, the constant subgraphs and the per-channel affine
    chains; returns a new ModelProto (or ``model`` when nothing changed). Options: ``forward``,
    ``duplicate_shared``, ``border_correction`` (see the policy)."""
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

    ws = Workspace(model)
    merged = bn_affine.merge_all(ws, ctx.targets)  # Mul/Add chains next to a BN (Caffe's Scale) merge into it first
    by_name = {n.name: n for n in ws.graph.nodes if n.op == "BatchNormalization" and n.domain in (None, "", "ai.onnx")}
    pending: list[BnSite] = []
    for name in main:
        site = read_bn(by_name[name], name, ws)
        if isinstance(site, str):
            decisions[name] = (SKIPPED, site, {})
        else:
            pending.append(site)
    constants: dict[str, constant_subgraph.Outcome] = {}
    affine = AffineRules(ws, options, forward=forward, targets=ctx.targets)
    merges = BranchMerges(ws, ctx.targets) if ctx.option("merge_branches") else None  # sums of convs → one Conv
    while True:  # each family can open folds for the others (a StdConv weight evaluated, then a BN folds)
        declines = _rounds(pending, ws, forward, options, decisions)
        changed = False
        for outcome in constant_subgraph.run(ws, ctx.targets):
            changed |= outcome.folded
            if not (outcome.name in constants and constants[outcome.name].folded):
                constants[outcome.name] = outcome
        changed |= affine.run()
        changed |= bool(merges and merges.run(pending, decisions))
        if not changed:
            break
    if forward:  # BN → Relu → Conv/Gemm with the BN input from an Add/Concat: pre-activation, solved together
        preact.run(pending, ws, decisions)
    sign_clamps = sign_clamp.run(ws)  # per-channel ReLU clamps (negative BN scales) → Mul by ±1 + Relu
    relu_offsets = relu_offset.run(ws)  # Relu → Add(c) left before a padded conv → Max(a + c, c), c upstream
    for site in pending:
        reason = standalone_bn.reason(site, declines.get(site.name, []), ws, forward=forward)
        decisions[site.name] = (SKIPPED, reason, {})

    for loc in locations:
        name = loc.node.name
        if name in decisions:
            status, reason, details = decisions[name]
            ctx.report.add(name, ctx.rule, status, reason, **details)
            if details.get("remainder_node"):  # a partial concat fold keeps a smaller BN: listed as skipped
                ctx.report.add(details["remainder_node"], ctx.rule, SKIPPED, details["remainder_reason"])
    for chain, (reason, details) in merged.items():
        ctx.report.add(chain, ctx.rule, APPLIED, reason, **details)
    for outcome in constants.values():
        status = APPLIED if outcome.folded else KEPT
        ctx.report.add(outcome.name, ctx.rule, status, outcome.reason, fold=constant_subgraph.RULE, **outcome.details)
    absorbed = {rewrite.name for rewrite in relu_offsets}
    for entry in affine.entries.values():
        status = APPLIED if entry.folded else KEPT
        fold = entry.rules[-1] if entry.rules else "affine"
        reason = entry.reason
        later = [step["added"] for step in entry.details.get("steps", []) if step.get("added") in absorbed]
        if later:  # the Add this chain left was taken out afterwards (relu_offset)
            reason += f"; the Add {later[0]!r} it kept was then absorbed by the Relu before it ({relu_offset.RULE})"
        ctx.report.add(entry.name, ctx.rule, status, reason, fold=fold, **entry.details)
    if merges:
        merges.report(ctx)
    for clamp in sign_clamps:
        ctx.report.add(clamp.name, ctx.rule, APPLIED, f"per-channel ReLU clamp ({clamp.negative_channels} channel(s) "
                       f"clamped to (-inf, 0]) → Mul by ±1 + Relu, the sign folded into {', '.join(clamp.into)}",
                       fold=sign_clamp.RULE, into=clamp.into)
    for absorbed in relu_offsets:
        ctx.report.add(absorbed.name, ctx.rule, APPLIED, f"per-channel offset after Relu '{absorbed.relu}' absorbed: "
                       f"relu(a) + c = max(a + c, c), c added into {absorbed.into!r}, the Relu now a Max by c",
                       fold=relu_offset.RULE, into=absorbed.into)
    if not ws.changed:  # explain too returns the rewritten (private) copy: later steps see it
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
