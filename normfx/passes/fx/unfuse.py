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
model's output through single-input, parameter-free operations only (flatten, pooling, activations,
softmax: the classifier / prediction head; a residual addition or a concatenation is no such path).
A rewrite that would unfuse nothing although layers were targeted (all already normalized, the classifier,
...) is a :class:`ModelError` (``explain`` says so in a note): it is not the fused model the user meant.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from ...errors import ModelError
from ...fold import unfold_bn_params
from ...layers import is_batchnorm
from ...report import APPLIED, SKIPPED
from ..unfuse_options import (
    ALREADY_NORMALIZED,
    CLASSIFIER_REASON,
    NO_DATA_NOTE,
    UnfuseOptions,
    refuse_or_note,
    unfuse_options,
)
from .frozen import freeze_module
from .graph_state import GraphState, set_parameters
from .patterns import LayerInfo, describe_node, layer_info
from .shapes import ShapeRecorder
from .tracing import TracedPart, rewrite_traceable_parts

__all__ = ["run"]

log = logging.getLogger(__name__)

_NORM_MODULES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm,
                 nn.LocalResponseNorm)
_NORM_FUNCTIONS = {F.batch_norm, torch.batch_norm, F.layer_norm, F.group_norm, F.instance_norm, F.local_response_norm}
_BN_CLASSES = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


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


def _tensor_inputs(node: fx.Node) -> int:
    return len([a for a in node.all_input_nodes if a.op != "get_attr"])


def _reaches_output(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Does ``node``'s value reach the graph output through single-input, parameter-free operations only
    (flatten, pooling, activations, softmax, dropout)? A node merging two computed tensors (a residual add,
    a concatenation) or a module with parameters of its own ends the path."""
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
        if _tensor_inputs(user) != 1:
            continue  # a merge of several computed tensors: the layer is not the head
        stack.extend(user.users)
    return False


def _spatial_dims(layer: LayerInfo) -> int:
    return 1 if layer.kind == "linear" else layer.module.weight.dim() - 2


def _out_channels(layer: LayerInfo) -> int:
    weight = layer.module.weight
    return weight.shape[1] * layer.groups if layer.kind == "conv_transpose" else weight.shape[0]


def _skip_reason(state: GraphState, node: fx.Node, layer: LayerInfo, classifier: bool, unpeeked: bool) -> str:
    gm = state.gm
    norm = _normalization_user(gm, node)
    if norm is not None:
        return f"{ALREADY_NORMALIZED} {describe_node(gm, norm)}: nothing to unfuse"
    sharing = state.sharing(node)
    if sharing:
        return f"{sharing}: each call would need its own BatchNorm while the layer's bias is shared"
    if not classifier and state.part.prefix == "" and _reaches_output(gm, node):
        return CLASSIFIER_REASON
    if layer.kind == "linear":
        reason = state.shapes.linear_rank_reason(layer.module, str(node.target), relation="can follow it",
                                                 proof="example_inputs or data")
        if reason:
            if unpeeked:
                reason += " (explain takes no batch from a one-shot iterator: pass example_inputs or a list)"
            return reason
    return ""


def _insert(state: GraphState, node: fx.Node, layer: LayerInfo, options: UnfuseOptions) -> tuple[str, torch.Tensor | None]:
    """``layer(x) + b`` → ``BN(layer_nobias(x))`` with identity statistics; returns the BN's graph name and ``b``."""
    module = layer.module
    weight = module.weight.detach()
    bias = None if module.bias is None else module.bias.detach().clone()
    channels = _out_channels(layer)
    bn = _BN_CLASSES[_spatial_dims(layer)](channels, eps=options.eps, momentum=options.momentum, device=weight.device,
                                           dtype=weight.dtype)
    _, params = unfold_bn_params(weight, bias, kind=layer.kind, groups=layer.groups, eps=options.eps)
    load_bn(bn, params)
    bn.train(module.training)
    bn.requires_grad_(module.weight.requires_grad)  # a frozen layer gets a frozen BN
    set_parameters(module, module.weight, None)
    name = state.fresh_name(f"{node.target}_bn")
    state.gm.add_submodule(name, bn)
    with state.gm.graph.inserting_after(node):
        bn_node = state.gm.graph.call_module(name, (node,))
    node.replace_all_uses_with(bn_node, delete_user_cb=lambda user: user is not bn_node)
    return name, bias


def load_bn(bn: nn.Module, params: dict[str, torch.Tensor]) -> None:
    """Copy ``unfold_bn_params``'s weight/bias/running_mean/running_var into ``bn``'s tensors."""
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
    options = unfuse_options(ctx)
    from ...stats.feed import Replayable
    from ...stats.unfuse import calibrate, shape_runner

    data = Replayable(ctx.data) if ctx.data is not None else None
    # shapes from the first batch; not in explain for a one-shot iterator (explain must not eat the caller's data)
    peek = data is not None and ctx.example_inputs is None and not (ctx.dry_run and data.one_shot)
    runner = shape_runner(data, ctx.feed) if peek else None
    shapes = ShapeRecorder(model, ctx.example_inputs, runner=runner)
    inserted: list[Inserted] = []
    untraceable: list[str] = []
    layer_names = [n for n, m in model.named_modules() if layer_info(m) is not None]
    handled: set[str] = set()
    skipped: list[str] = []
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
            reason = _skip_reason(state, node, layer, options.classifier, unpeeked=data is not None and not peek)
            if reason:
                ctx.report.add(name, ctx.rule, SKIPPED, reason)
                skipped.append(reason)
                continue
            bn_name, bias = _insert(state, node, layer, options)
            inserted.append(Inserted(name, part.qualified(bn_name), layer, bias))
        state.gm.graph.lint()
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
        refuse_or_note(ctx, type(model).__name__, skipped)
        return result
    sources = calibrate(result, inserted, data, ctx, options)
    for item in inserted:
        kind = _convert(result, item.bn_name, options.norm)
        source, words = sources[item.bn_name]
        ctx.report.add(item.layer_name, ctx.rule, APPLIED, f"{kind} '{item.bn_name}' inserted after it ({words})",
                       bn=item.bn_name, norm=kind, statistics=source)
    if ctx.data is None:
        log.warning(NO_DATA_NOTE)
        ctx.report.note(NO_DATA_NOTE)
    return result

