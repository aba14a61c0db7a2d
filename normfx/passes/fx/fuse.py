"""Policy ``fuse`` on torch models: fold every BatchNorm into an adjacent Conv/ConvTranspose/Linear.

For each BN call in each traceable part of the model: the backward rule (layer → BN) first, then
the forward rule (BN → layer, option ``forward``). A BN neither rule takes is reported with both
reasons; a BN inside a part torch.fx cannot trace is reported with that reason. ``explain`` runs
this same code on a private copy, so its report is exactly what ``rewrite`` does.
"""

from __future__ import annotations

import logging
from collections import Counter

from torch import fx, nn

from ...layers import is_batchnorm
from ...report import APPLIED, SKIPPED
from . import backward_fold, forward_fold
from .graph_state import GraphState
from .ownership import Ownership
from .patterns import find_bn_sites
from .shapes import ShapeRecorder
from .tracing import TracedPart, rewrite_traceable_parts

__all__ = ["run"]

log = logging.getLogger(__name__)


def run(model: nn.Module, ctx) -> nn.Module:
    if is_batchnorm(model):
        if ctx.targets(""):
            ctx.report.add("", ctx.rule, SKIPPED, "the model is a single BatchNorm: there is no layer to fold it into")
        return model if ctx.owns_model else Ownership(model, False).private(model)
    shapes = ShapeRecorder(model, ctx.example_inputs)  # runs the example inputs only if a rule asks
    ownership = Ownership(model, ctx.owns_model)
    paths = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    aliased = {key for key, count in paths.items() if count > 1}
    untraceable: list[tuple[str, str]] = []
    handled: set[str] = set()
    targeted_modules = [n for n, m in model.named_modules() if is_batchnorm(m) and ctx.targets(n)]

    def report(name: str, status: str, reason: str = "", **details) -> None:
        handled.add(name)
        ctx.report.add(name, ctx.rule, status, reason, **details)

    def rewrite_graph(part: TracedPart) -> fx.GraphModule:
        state = GraphState(part, shapes, ctx.option("duplicate_shared"), ownership, ctx.option("border_correction"),
                           aliased)
        pending = []
        for site in find_bn_sites(state.gm, part.qualified):
            if not ctx.targets(site.name):
                continue
            if site.reason:
                report(site.name, SKIPPED, site.reason)
                continue
            layer_node, why = backward_fold.check(state, site)
            if layer_node is not None:
                report(site.name, APPLIED, **backward_fold.apply(state, site, layer_node))
            else:
                pending.append((site, why))
        for site, why_backward in pending:
            if not ctx.option("forward"):
                report(site.name, SKIPPED, f"{why_backward} (forward fold disabled)")
                continue
            layer_node, why_forward = forward_fold.check(state, site)
            if layer_node is not None:
                report(site.name, APPLIED, **forward_fold.apply(state, site, layer_node))
            else:
                report(site.name, SKIPPED, f"{why_backward}; {why_forward}")
        return state.finish()

    result = rewrite_traceable_parts(model, rewrite_graph, lambda path, why: untraceable.append((path, why)),
                                     make_private=ownership.private)
    result = ownership.finish(result)
    for name in targeted_modules:
        if name not in handled:
            owner = max((p for p, _ in untraceable if name.startswith(p + ".") or p == ""), key=len, default=None)
            where = f"'{owner}'" if owner else "its parent"
            report(name, SKIPPED, f"{where} cannot be traced by torch.fx, so the BN's neighbours are unknown")
    return result
