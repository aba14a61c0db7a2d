"""Policy ``unfuse`` on torch models: put a BatchNorm back after every Conv/ConvTranspose/Linear that no
normalization follows, so that a fused checkpoint fine-tunes with BN's parameterization again.

Each eligible layer call ``y = layer(x) + b`` becomes ``BN(layer_nobias(x))`` (a new ``BatchNorm{1,2,3}d``
named ``<layer>_bn`` beside the layer). The BNs are inserted with identity statistics (exact in eval);
with ``data`` the per-channel mean and variance of each new BN's input are then measured over the data
with the model computing its eval function (:func:`normfx.stats.collect.collect_stats` with
``batch_statistics=False``) and written by :func:`normfx.fold.unfold_bn_params`
(``gamma = sqrt(var + eps)``, ``beta = mean + b``): still exact in eval, and close to the fused function
in train mode on batches of the same data (measured on the first batch and put in the report's notes).
Finally the BNs become the class ``norm`` asks for (``frozen``: FrozenBatchNorm, ``sync``: SyncBatchNorm).

Skipped with a reason: a layer whose output already feeds a normalization, a layer called more than
once (each call would need its own BN while the bias is shared), a Linear whose input is not proven
2-D (BN normalizes axis 1), and — unless ``classifier=true`` — the layers whose output reaches the
model's output through parameter-free operations only (the classifier / prediction head).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from ...errors import ModelError, PolicyError
from ...fold import unfold_bn_params
from ...layers import is_batchnorm
from ...report import APPLIED, SKIPPED
from .frozen import freeze_module
from .graph_state import GraphState, set_parameters
from .patterns import LayerInfo, describe_node, layer_info
from .shapes import ShapeRecorder
from .tracing import TracedPart, rewrite_traceable_parts

__all__ = ["run", "NORMS"]

log = logging.getLogger(__name__)

NORMS = ("batchnorm", "frozen", "sync")

_NORM_MODULES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm,
                 nn.LocalResponseNorm)
_NORM_FUNCTIONS = {F.batch_norm, torch.batch_norm, F.layer_norm, F.group_norm, F.instance_norm, F.local_response_norm}
_BN_CLASSES = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_NO_DATA_NOTE = ("unfuse without data: the inserted BatchNorms have identity statistics (exact in eval mode), but in "
                 "train mode they normalize with batch statistics, a different function; pass data= to measure them")


@dataclass
class Inserted:
    """One BN put back after one layer: where it lives and what it needs to get its statistics."""

    layer_name: str
    bn_name: str
    layer: LayerInfo
    bias: torch.Tensor | None


def _normalization_user(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    for user in node.users:
        if user.op == "call_module" and (is_batchnorm(gm.get_submodule(user.target))
                                         or isinstance(gm.get_submodule(user.target), _NORM_MODULES)):
            return user
        if user.op == "call_function" and user.target in _NORM_FUNCTIONS:
            return user
    return None


def _reaches_output(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Does ``node``'s value reach the graph output through parameter-free operations only?"""
    stack, seen = list(node.users), set()
    while stack:
        user = stack.pop()
        if user in seen:
            continue
        seen.add(user)
        if user.op == "output":
            return True
        if user.op == "call_module" and any(True for _ in gm.get_submodule(user.target).parameters()):
            continue  # a layer with parameters of its own takes over
        stack.extend(user.users)
    return False


def _spatial_dims(layer: LayerInfo) -> int:
    return 1 if layer.kind == "linear" else layer.module.weight.dim() - 2


def _out_channels(layer: LayerInfo) -> int:
    weight = layer.module.weight
    return weight.shape[1] * layer.groups if layer.kind == "conv_transpose" else weight.shape[0]


def _skip_reason(state: GraphState, node: fx.Node, layer: LayerInfo, classifier: bool) -> str:
    gm = state.gm
    norm = _normalization_user(gm, node)
    if norm is not None:
        return f"already followed by {describe_node(gm, norm)}: nothing to unfuse"
    sharing = state._sharing(node)
    if sharing:
        return f"{sharing}: each call would need its own BatchNorm while the layer's bias is shared"
    if not classifier and state.part.prefix == "" and _reaches_output(gm, node):
        return "produces the model output (the classifier): left as it is; unfuse:classifier=true unfuses it too"
    if layer.kind == "linear":
        reason = state.linear_rank_reason(layer.module, str(node.target))
        if reason:
            return reason.replace("a BN folds into it", "a BN can follow it").replace("example_inputs", "example_inputs or data")
    return ""


def _insert(state: GraphState, node: fx.Node, layer: LayerInfo, eps: float, momentum: float) -> tuple[str, torch.Tensor | None]:
    """``layer(x) + b`` → ``BN(layer_nobias(x))`` with identity statistics; returns the BN's graph name and ``b``."""
    module = layer.module
    weight = module.weight.detach()
    bias = None if module.bias is None else module.bias.detach().clone()
    channels = _out_channels(layer)
    bn = _BN_CLASSES[_spatial_dims(layer)](channels, eps=eps, momentum=momentum, device=weight.device, dtype=weight.dtype)
    _, params = unfold_bn_params(weight, bias, kind=layer.kind, groups=layer.groups, eps=eps)
    _load_bn(bn, params)
    bn.train(module.training)
    set_parameters(module, module.weight, None)
    name = state.fresh_name(f"{node.target}_bn")
    state.gm.add_submodule(name, bn)
    with state.gm.graph.inserting_after(node):
        bn_node = state.gm.graph.call_module(name, (node,))
    node.replace_all_uses_with(bn_node, delete_user_cb=lambda user: user is not bn_node)
    return name, bias


def _load_bn(bn: nn.Module, params: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for key, value in params.items():
            getattr(bn, key).copy_(value)


def _convert(model: nn.Module, name: str, norm: str) -> str:
    """Turn the inserted BatchNorm at ``name`` into the class ``norm`` asks for; returns that class's name."""
    bn = model.get_submodule(name)
    if norm == "frozen":
        new, why = freeze_module(bn)
        if new is None:  # pragma: no cover - a stock BN with statistics always freezes
            raise ModelError(f"{name}: {why}")
    elif norm == "sync":
        new = nn.SyncBatchNorm(bn.num_features, bn.eps, bn.momentum, device=bn.weight.device, dtype=bn.weight.dtype)
        new.load_state_dict(bn.state_dict())
        new.train(bn.training)
    else:
        return type(bn).__name__
    model.set_submodule(name, new)
    return type(new).__name__


def run(model: nn.Module, ctx) -> nn.Module:
    norm = str(ctx.option("norm")).lower()
    if norm not in NORMS:
        raise PolicyError(f"policy 'unfuse': norm={ctx.option('norm')!r} is not one of {', '.join(NORMS)}")
    eps, momentum, classifier = float(ctx.option("eps")), float(ctx.option("momentum")), bool(ctx.option("classifier"))
    if not eps > 0:
        raise PolicyError(f"policy 'unfuse': eps must be > 0, got {eps}")
    from ...stats.unfuse import Replayable, calibrate

    data = Replayable(ctx.data) if ctx.data is not None else None
    runner = data.runner(ctx.feed) if data is not None and ctx.example_inputs is None else None
    shapes = ShapeRecorder(model, ctx.example_inputs, runner=runner)
    inserted: list[Inserted] = []
    untraceable: list[str] = []
    layer_names = [n for n, m in model.named_modules() if layer_info(m) is not None]
    handled: set[str] = set()
    found = 0

    def rewrite_graph(part: TracedPart) -> fx.GraphModule:
        nonlocal found
        state = GraphState(part, shapes)
        for node in list(state.gm.graph.nodes):
            layer = state.layer(node)
            if layer is None:
                continue
            found += 1
            name = part.qualified(str(node.target))
            handled.add(name)
            if not ctx.targets(name):
                continue
            reason = _skip_reason(state, node, layer, classifier)
            if reason:
                ctx.report.add(name, ctx.rule, SKIPPED, reason)
                continue
            bn_name, bias = _insert(state, node, layer, eps, momentum)
            inserted.append(Inserted(name, part.qualified(bn_name), layer, bias))
        state.gm.graph.lint()
        state.gm.recompile()
        return state.gm

    result = rewrite_traceable_parts(model, rewrite_graph, lambda path, why: untraceable.append(path),
                                     wanted=lambda m: layer_info(m) is not None)
    for name in layer_names:
        if name not in handled and ctx.targets(name):
            owner = max((p for p in untraceable if name.startswith(p + ".") or p == ""), key=len, default=None)
            where = f"'{owner}'" if owner else "its parent"
            ctx.report.add(name, ctx.rule, SKIPPED, f"{where} cannot be traced by torch.fx, so the layer's users are unknown")
    if not found:
        where = f" (torch.fx could not trace {', '.join(repr(p) or 'the model' for p in untraceable)})" if untraceable else ""
        raise ModelError(
            f"{type(model).__name__} has no Conv/ConvTranspose/Linear layer that unfuse could put a BatchNorm after{where}; "
            "check that this is the fused model you meant"
        )
    if not inserted:
        return result
    sources = calibrate(result, inserted, data, ctx)
    for item in inserted:
        kind = _convert(result, item.bn_name, norm)
        ctx.report.add(item.layer_name, ctx.rule, APPLIED, f"{kind} '{item.bn_name}' inserted after it "
                       f"({sources[item.bn_name]} statistics)", bn=item.bn_name, norm=kind,
                       statistics=sources[item.bn_name])
    if ctx.data is None:
        log.warning(_NO_DATA_NOTE)
        ctx.report.note(_NO_DATA_NOTE)
    return result
