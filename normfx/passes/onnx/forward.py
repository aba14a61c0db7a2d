"""Forward folds of a per-channel affine site (a BatchNormalization, or an :class:`~.affine_site.AffineSite`)
into *every* layer its output feeds, or into none.

Shared by the BatchNormalization rules and the affine rules of ``fuse``: the consumers are walked down
through shape ops (:func:`.chain.walk_down`), each is offered to the rule functions in turn, and the fold
goes ahead only when every consumer accepts one. The rule functions (:mod:`.bn_conv`, :mod:`.bn_gemm`) are
told by a :class:`SiteKind` how to name the site in their rule names, reasons and patterns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import onnx_graphsurgeon as gs

from .chain import Chain, walk_down
from .edits import pattern
from .rule import Decline, Fold, FoldOptions
from .workspace import Workspace, node_label

__all__ = ["plan_forward", "offer", "applied_details", "ForwardFind", "SiteKind", "BN_SITE"]

ForwardFind = Callable[..., "Fold | Decline | None"]


@dataclass(frozen=True)
class SiteKind:
    """How a forward-fold rule speaks of the site it folds: in its rule names, reasons and patterns."""

    noun: str  # "the {noun} output …", "… but the {noun} has 4 channels"
    short: str  # "the {short} channels", "the {short} shift"
    prefix: str  # rule names "{prefix}_conv", "{prefix}_gemm", "{prefix}_matmul"
    by_ops: bool = False  # patterns start with the site's own ops (Sub→Mul→Conv), not with the noun
    cost: str = ""  # what an added border constant costs beyond tying the model to one input shape

    def rule(self, layer: str) -> str:
        return f"{self.prefix}_{layer}"

    def pattern(self, site: Any, *rest: str) -> str:
        head = tuple(site.ops) if self.by_ops else (self.noun,)
        return pattern(*head, *rest)


BN_SITE = SiteKind("BatchNormalization", "BN", "bn", cost=" and is slower in onnxruntime than its BatchNormalization")


def plan_forward(
    site: Any,
    ws: Workspace,
    finds: Sequence[ForwardFind],
    options: FoldOptions,
    *,
    noun: str,
    remove: Callable[[], None],
) -> Fold | list[Decline]:
    """One :class:`Fold` into every consumer of ``site.y``, or the reasons it is declined.

    ``finds`` are rule functions ``find(site, ws, target, tin, chain, options=...)``; ``noun`` names the
    site in messages (``"BatchNormalization"``); ``remove()`` takes the site out once every plan applied.
    An empty list means there is no forward pattern at all (a single consumer no rule knows).
    """
    y = site.y
    consumers = ws.data_consumers(y)
    if not consumers:
        return []
    if ws.is_graph_output(y):
        return [Decline("forward", f"the {noun} output {y.name!r} is a graph output; not folded forward")]
    inside = [c for c in consumers if not ws.in_main_graph(c)]
    if inside:
        where = node_label(inside[0])
        return [Decline("forward", f"the {noun} output {y.name!r} is read inside a subgraph ({where}); not folded forward")]
    plans: list[Fold] = []
    for consumer in consumers:
        walked = walk_down(y, consumer, ws)
        if isinstance(walked, str):
            return [Decline("forward", walked)]
        target, tin, chain = walked
        result = offer(site, ws, finds, target, tin, chain, options)
        if result is None:
            if len(consumers) == 1:
                return []
            reason = f"the {noun} output also feeds {node_label(target)}, which it cannot be folded into"
            return [Decline("forward", reason)]
        if isinstance(result, Decline):
            return [result]
        plans.append(result)

    def apply() -> None:
        for plan in plans:
            plan.apply()
        remove()

    first = plans[0]
    details = dict(first.details)
    if len(plans) > 1:
        details["into"] = [p.details.get("into") for p in plans]
        details["pattern"] = [p.details.get("pattern") for p in plans]
    return Fold(first.rule, ", ".join(p.into for p in plans), apply, details, parts=plans)


def offer(
    site: Any, ws: Workspace, finds: Sequence[ForwardFind], target: gs.Node, tin: gs.Tensor, chain: Chain,
    options: FoldOptions,
) -> Fold | Decline | None:
    """The first answer of ``finds`` for one consumer (None when none knows the pattern)."""
    for find in finds:
        result = find(site, ws, target, tin, chain, options=options)
        if result is not None:
            return result
    return None


def applied_details(fold: Fold) -> dict[str, Any]:
    """The report details of an applied fold: its own, plus what its parts filled in while applying."""
    details = dict(fold.details)
    plans = fold.parts
    if len(plans) == 1:
        details.update({k: v for k, v in plans[0].details.items() if k not in details})
    elif plans:
        added = [p.details["added"] for p in plans if "added" in p.details]
        if added:
            details["added"] = added
    return details
