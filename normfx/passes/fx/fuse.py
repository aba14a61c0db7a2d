"""Policy ``fuse`` on torch models: fold every BatchNorm into an adjacent Conv/ConvTranspose/Linear, and the
eval-mode constants of the batch-independent layers: StdConv → plain conv, ProxyNormAct → its statistics folded.

In each traceable part of the model: every StdConv in eval first becomes the plain conv holding its
standardized kernel (:mod:`.std_conv_fold`), so the folds below see it as a conv. Then for each BN call: the
backward rule (layer → BN) first, then the forward rule (BN → layer, option ``forward``). A BN neither rule
takes is reported with both reasons. Then each ProxyNormAct call in eval (:mod:`.proxy_norm_fold`): its
pre-affine into the GroupNorm before it, its post-affine into the next layer or the activation, what is left
reported with the reason. A layer inside a part torch.fx cannot trace is reported with that reason (a StdConv
there is still swapped: it needs no neighbours). ``explain`` runs this same code on a private copy, so its
report is exactly what ``rewrite`` does.

Before tracing, other libraries' frozen BNs (torchvision, detectron2, timm; matched by behaviour) become normfx
FrozenBatchNorm (:mod:`.foreign_bn`). Before the BN rules, per-channel ``x * w + b`` chains merge into the BN
next to them or fold into the layer next to them like a BN (:mod:`.affine_chain`). Last, calls that are the
identity in eval (Identity, Dropout) are removed (:mod:`.cleanup`; a folded BN+activation module's activation
is called directly, at its own path).
"""

from __future__ import annotations

import logging
from collections import Counter

from torch import fx, nn

from ...layers import ProxyNormAct, StdConv, is_batchnorm
from ...report import APPLIED, SKIPPED
from . import (
    affine_chain,
    backward_fold,
    bn_split,
    branch_merge,
    cleanup,
    concat_bn,
    foreign_bn,
    forward_fold,
    preact,
    proxy_norm_fold,
    std_conv_fold,
)
from .graph_state import GraphState
from .ownership import Ownership
from .patterns import find_bn_sites
from .shapes import ShapeRecorder
from .tracing import TracedPart, rewrite_traceable_parts

__all__ = ["run"]

log = logging.getLogger(__name__)


def _wanted(module: nn.Module) -> bool:
    return is_batchnorm(module) or isinstance(module, (ProxyNormAct, StdConv))


def _single_layer(model: nn.Module, ctx) -> nn.Module:
    """The model is itself one BatchNorm, StdConv or ProxyNormAct."""
    if isinstance(model, StdConv) and ctx.targets(""):
        why = std_conv_fold.check(model)
        if not why:
            conv = std_conv_fold.plain_conv(model)  # new tensors throughout: the caller's model is not touched
            ctx.report.add("", ctx.rule, APPLIED, f"{type(model).__name__} → {type(conv).__name__} holding the "
                           "standardized weight", source=type(model).__name__, result=type(conv).__name__)
            return conv
        ctx.report.add("", ctx.rule, SKIPPED, why)
    elif ctx.targets(""):
        what = "BatchNorm" if is_batchnorm(model) else "ProxyNormAct"
        ctx.report.add("", ctx.rule, SKIPPED, f"the model is a single {what}: there is no layer to fold it into")
    return model if ctx.owns_model else Ownership(model, False).private(model)


def run(model: nn.Module, ctx) -> nn.Module:
    # frozen BNs of other libraries (torchvision, detectron2, timm), matched by behaviour, become FrozenBatchNorm
    model, swapped = foreign_bn.swap(model, ctx, copy_first=not ctx.owns_model)
    result = _run(model, ctx, ctx.owns_model or bool(swapped))
    foreign_bn.annotate(ctx, swapped)
    return result


def _run(model: nn.Module, ctx, owns_model: bool) -> nn.Module:
    if _wanted(model):
        return _single_layer(model, ctx)
    # runs the example inputs only if a rule asks; ProxyNormAct calls for the rank of their leftover constants,
    # StdConv calls since a StdConv becomes a plain conv whose input shape a forward fold may need
    shapes = ShapeRecorder(model, ctx.example_inputs, kinds=(ProxyNormAct, StdConv))
    ownership = Ownership(model, owns_model)
    paths = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    aliased = {key for key, count in paths.items() if count > 1}
    untraceable: list[tuple[str, str]] = []
    handled: set[str] = set()
    targeted_modules = [n for n, m in model.named_modules() if _wanted(m) and ctx.targets(n)]
    kinds = {n: type(m) for n, m in model.named_modules() if _wanted(m)}

    def report(name: str, status: str, reason: str = "", **details) -> None:
        handled.add(name)
        ctx.report.add(name, ctx.rule, status, reason, **details)

    def rewrite_graph(part: TracedPart) -> fx.GraphModule:
        state = GraphState(part, shapes, ctx.option("duplicate_shared"), ownership, ctx.option("border_correction"),
                           aliased)
        for target in std_conv_fold.find_sites(state.gm):
            name = part.qualified(target)
            if not ctx.targets(name):
                continue
            why = std_conv_fold.check(state.gm.get_submodule(target))
            if why:
                report(name, SKIPPED, why)
                continue
            details = std_conv_fold.apply(state, target)
            report(name, APPLIED, f"{details['source']} → {details['result']} holding the standardized weight", **details)
        chains = affine_chain.merge_into_bns(state, ctx.targets)  # x * w + b next to a BN: one BN for the rules
        for name, (status, reason, details) in chains.items():
            if status == APPLIED:
                report(name, status, reason, **details)
        for name, (status, reason, details) in affine_chain.fold_chains(  # x * w + b next to a layer, as a BN
                state, ctx.targets, forward=ctx.option("forward"), earlier=chains).items():
            report(name, status, reason, **details)
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
        declined = []  # sites no fold above takes: the pre-activation rule solves them together
        for site, why_backward in pending:
            sliced = concat_bn.check(state, site)  # layers → concat → BN: slice by slice (backward)
            if not isinstance(sliced, str):
                for name, status, reason, details in concat_bn.apply(state, site, sliced):  # + a kept remainder
                    report(name, status, reason, **details)
                continue
            why_backward = f"{why_backward}; {sliced}" if sliced else why_backward
            if not ctx.option("forward"):
                report(site.name, SKIPPED, f"{why_backward} (forward fold disabled)")
                continue
            layer_node, why_forward = forward_fold.check(state, site)
            if layer_node is not None:
                report(site.name, APPLIED, **forward_fold.apply(state, site, layer_node))
                continue
            pieces = bn_split.check(state, site)  # BN → split → layers: slice by slice (forward)
            if not isinstance(pieces, str):
                reason, details = bn_split.apply(state, site, pieces)
                report(site.name, APPLIED, reason, **details)
            else:
                declined.append((site, f"{why_backward}; {why_forward}" + (f"; {pieces}" if pieces else "")))
        for site, status, reason, details in preact.run(state, declined, part.qualified):  # BN → act → layer
            report(site.name, status, reason, **details)
        folded: set[str] = set()
        for pn in proxy_norm_fold.find_sites(state.gm, part.qualified):
            if not ctx.targets(pn.name):
                continue
            if pn.reason:
                report(pn.name, SKIPPED, pn.reason)
                continue
            applied, reason, details = proxy_norm_fold.fold_site(state, pn, forward=ctx.option("forward"))
            report(pn.name, APPLIED if applied else SKIPPED, reason, **details)
            if applied:
                folded.add(pn.target)
        proxy_norm_fold.finish(state, folded)
        removed = cleanup.remove_noop_calls(state.gm)  # Identity / Dropout in eval: nothing left behind
        if removed:
            ctx.report.note(f"removed {len(removed)} call(s) that are the identity in eval"
                            f"{' in ' + repr(part.prefix) if part.prefix else ''}: {', '.join(removed)}")
        if ctx.option("merge_branches"):  # sums of convs (and identity BNs) reading one tensor → one conv
            branch_merge.run(state, ctx, part.qualified)
        return state.finish()

    result = rewrite_traceable_parts(model, rewrite_graph, lambda path, why: untraceable.append((path, why)),
                                     make_private=ownership.private, wanted=_wanted)
    result = ownership.finish(result)
    for name in targeted_modules:
        if name in handled:
            continue
        owner = max((p for p, _ in untraceable if name.startswith(p + ".") or p == ""), key=len, default=None)
        where = f"'{owner}'" if owner else "its parent"
        if issubclass(kinds[name], StdConv):
            _swap_untraced_std_conv(result, name, where, report)
        elif issubclass(kinds[name], ProxyNormAct):
            report(name, SKIPPED, f"{where} cannot be traced by torch.fx, so the ProxyNormAct's neighbours are unknown"
                   if owner is not None else "never called by the model's forward (torch.fx found no call of it)")
        else:
            report(name, SKIPPED, f"{where} cannot be traced by torch.fx, so the BN's neighbours are unknown")
    return result


def _swap_untraced_std_conv(result: nn.Module, name: str, where: str, report) -> None:
    """A StdConv torch.fx did not see: swapped as a module (the result is private by now)."""
    try:
        module = result.get_submodule(name)
    except AttributeError:
        report(name, SKIPPED, "never called by the model's forward (torch.fx found no call of it)")
        return
    if not isinstance(module, StdConv):
        report(name, SKIPPED, f"{type(module).__name__} at this path is not a StdConv any more")
        return
    why = std_conv_fold.check(module)
    if why:
        report(name, SKIPPED, why)
        return
    conv = std_conv_fold.plain_conv(module)
    result.set_submodule(name, conv)
    report(name, APPLIED, f"{type(module).__name__} → {type(conv).__name__} holding the standardized weight "
                          f"(swapped as a module: {where} cannot be traced by torch.fx, so no fold uses its neighbours)",
           source=type(module).__name__, result=type(conv).__name__, ws_eps=module.ws_eps)
