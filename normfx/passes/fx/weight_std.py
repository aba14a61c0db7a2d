"""Weight Standardization before a batch-independent norm (Conv → GroupNorm, as in BiT): the conv becomes
``StdConv{1,2,3}d`` (``normfx.layers.stdconv``: same path, same ``weight``/``bias`` keys, same geometry).

Used two ways: the option ``ws=true`` of ``groupnorm`` / ``layernorm`` / ``instancenorm`` / ``proxynorm``
(the conv feeding each replaced BN), and the policy ``weight_standardization``, which converts every targeted
Conv whose output feeds a GroupNorm (``nn.GroupNorm`` or a subclass, ``F.group_norm``; the layers the norm
policies create included). A conv before a BatchNorm is not converted by the policy: BN rescales each channel
by its batch statistics anyway; convert the BN first (``groupnorm:ws=true`` does both).

A conv is converted only when it is a stock ``Conv1d/2d/3d`` called once whose output feeds nothing but the
norm; otherwise (called twice, output used elsewhere, a ConvTranspose or Linear, already standardized, inside
a part torch.fx cannot trace) it is left as it is and the reason reported.
"""

from __future__ import annotations

import copy

import torch.nn.functional as F
from torch import fx, nn

from ...layers.stdconv import WS_EPS, StdConv, std_conv_class
from ...report import APPLIED, SKIPPED
from .graph_state import GraphState
from .norm_swap import aliased_modules
from .patterns import describe_node, layer_info
from .tracing import TracedPart, rewrite_traceable_parts

__all__ = ["NO_CONV", "conv_before", "standardize", "run"]

NO_CONV = "no conv directly before it"


def _input(node: fx.Node):
    return node.args[0] if node.args else node.kwargs.get("input")


def conv_before(state: GraphState, norm_node: fx.Node) -> tuple[fx.Node | None, str, int | None]:
    """The conv call feeding ``norm_node`` that may be standardized, or None and the reason; and the input rank
    of the norm that this producer proves (a ConvNd output has rank N + 2), None when it proves none."""
    gm = state.gm
    x = _input(norm_node)
    if not isinstance(x, fx.Node):
        return None, NO_CONV, None
    if x.op != "call_module":
        return None, f"its input comes from {describe_node(gm, x)}, not a conv", None
    module = gm.get_submodule(x.target)
    path = state.part.qualified(str(x.target))
    info = layer_info(module)
    rank = module.weight.dim() if isinstance(module, (nn.modules.conv._ConvNd,)) else None
    if isinstance(module, StdConv):
        return None, f"'{path}' is already a {type(module).__name__}", rank
    if info is None:
        return None, f"its input comes from {describe_node(gm, x)}, not a Conv1d/2d/3d", rank
    if info.kind != "conv":
        return None, f"'{path}' is a {type(module).__name__}: Weight Standardization applies to Conv1d/2d/3d", rank
    others = [u for u in x.users if u is not norm_node]
    if others:
        return None, f"the output of conv '{path}' also feeds {describe_node(gm, others[0])}", rank
    sharing = state.sharing(x)
    if sharing:
        return None, f"conv {sharing}: standardizing it would change its other uses", rank
    return x, "", rank


def standardize(owner: nn.Module, path: str, eps: float | None) -> str:
    """Replace the conv at ``path`` of ``owner`` by its StdConv; returns the new class name."""
    conv = owner.get_submodule(path)
    new = std_conv_class(conv).from_conv(conv, ws_eps=WS_EPS if eps is None else eps)
    owner.set_submodule(path, new)
    return type(new).__name__


def _caller(node: fx.Node) -> str:
    """The module whose forward made a functional call (a GroupNormPost traced through), else the node's name."""
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else node.name


def _is_group_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.GroupNorm)


def run(model: nn.Module, ctx) -> nn.Module:
    """Policy ``weight_standardization``: every targeted Conv feeding a GroupNorm becomes a StdConv."""
    eps = float(ctx.option("eps"))
    if not eps > 0:
        from ...errors import PolicyError

        raise PolicyError(f"policy {ctx.rule!r}: eps must be > 0, got {eps}")
    plan: list[tuple[str, str, str, str]] = []  # (conv path, norm name, status, reason)
    norms_seen: set[str] = set()
    untraceable: list[tuple[str, str]] = []
    aliased = aliased_modules(model)

    def look(part: TracedPart) -> fx.GraphModule:
        state = GraphState(part, aliased=aliased)
        for node in state.gm.graph.nodes:
            if node.op == "call_module" and _is_group_norm(state.gm.get_submodule(node.target)):
                norm = part.qualified(str(node.target))
            elif node.op == "call_function" and node.target is F.group_norm:
                norm = part.qualified(_caller(node))
            else:
                continue
            norms_seen.add(norm)
            conv, reason, _ = conv_before(state, node)
            x = _input(node)
            if conv is not None:
                plan.append((part.qualified(str(conv.target)), norm, APPLIED, ""))
            elif isinstance(x, fx.Node) and x.op == "call_module" and isinstance(
                    state.gm.get_submodule(x.target), nn.modules.conv._ConvNd):
                plan.append((part.qualified(str(x.target)), norm, SKIPPED, reason))
        return part.graph_module

    rewrite_traceable_parts(model, look, lambda path, why: untraceable.append((path, why)),
                            make_private=copy.deepcopy, wanted=_is_group_norm)
    done = 0
    for conv_path, norm, status, reason in plan:
        if not ctx.targets(conv_path):
            continue
        if status == SKIPPED:
            ctx.report.add(conv_path, ctx.rule, SKIPPED, reason, norm=norm)
            continue
        source = type(model.get_submodule(conv_path)).__name__
        new = standardize(model, conv_path, eps)
        done += 1
        ctx.report.add(conv_path, ctx.rule, APPLIED, f"{source} → {new} (feeds GroupNorm '{norm}')", norm=norm,
                       source=source, result=new)
    for name, module in model.named_modules():
        if _is_group_norm(module) and name not in norms_seen:
            owner = max((p for p, _ in untraceable if p == "" or name.startswith(p + ".")), key=len, default=None)
            if owner is not None and ctx.targets(name):
                where = f"'{owner}'" if owner else "the model"
                ctx.report.add(name, ctx.rule, SKIPPED,
                               f"{where} cannot be traced by torch.fx, so the conv feeding this GroupNorm is unknown")
    if not done and not plan:
        ctx.report.note("weight_standardization found no Conv → GroupNorm pair: it converts the convs feeding "
                        "GroupNorm layers; replace the BatchNorms first (groupnorm, layernorm, proxynorm) or give "
                        "them ws=true")
    return model
