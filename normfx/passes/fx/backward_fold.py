"""Rule: Conv / ConvTranspose / Linear → BatchNorm folds into the layer (``W' = W·scale``, ``b' = b·scale + shift``).

Exact for any padding, stride, dilation and groups. Declines when the layer's output has other
users, when a shared layer may not be duplicated, or when a Linear's input is not 2-D.
"""

from __future__ import annotations

from torch import fx

from ...fold import fold_bn_after
from .graph_state import GraphState, set_parameters
from .patterns import BnSite, describe_node

__all__ = ["check", "apply"]


def check(state: GraphState, site: BnSite, noun: str = "BN") -> tuple[fx.Node | None, str]:
    """The layer node the BN folds into, or None and the reason it does not (``noun`` names the folded affine in
    the reason: a ProxyNormAct's pre-affine takes this same decision)."""
    source = site.input_node
    if not isinstance(source, fx.Node):
        return None, f"the {noun} input is a constant"
    layer = state.layer(source)
    if layer is None:
        return None, f"input comes from {describe_node(state.gm, source)}, not a Conv/ConvTranspose/Linear"
    if len(source.users) > 1:
        others = [describe_node(state.gm, u) for u in source.users if u is not site.node]
        return None, f"the output of '{source.target}' is also used by {', '.join(others)}: folding would change that use"
    shared = state.shared_reason(source)
    if shared:
        return None, shared
    channels = layer.module.weight.shape[0] if layer.kind != "conv_transpose" else layer.module.weight.shape[1] * layer.groups
    if len(site.scale) != channels:
        return None, f"{noun} has {len(site.scale)} channels but '{source.target}' produces {channels}"
    if layer.kind == "linear":
        reason = state.shapes.linear_rank_reason(layer.module, str(source.target), noun)
        if reason:
            return None, reason
    return source, ""


def apply(state: GraphState, site: BnSite, layer_node: fx.Node) -> dict:
    module, note = state.own_module(layer_node)
    layer = state.layer(layer_node)
    weight, bias = fold_bn_after(module.weight.detach(), None if module.bias is None else module.bias.detach(),
                                 site.scale, site.shift, kind=layer.kind, groups=layer.groups)
    set_parameters(module, weight, bias)
    state.remove_bn(site, layer_node)
    details = {"into": state.part.qualified(str(layer_node.target)), "direction": "backward"}
    if note:
        details["note"] = note
    if site.post:
        details["kept_after"] = list(site.post)
    return details
