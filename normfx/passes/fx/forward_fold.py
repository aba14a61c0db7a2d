"""Rule: BatchNorm → Conv / ConvTranspose / Linear folds into the following layer.

The scale goes into the layer's input channels; the shift becomes a bias where every output sees
the same taps (Linear, unpadded conv, non-zero padding modes). For a zero-padded conv (or a
ConvTranspose) border outputs see fewer taps: with the input shape known (``example_inputs``) the
exact per-position constant is added after the layer ("border correction", exact for that spatial
size only) when the policy option ``border_correction`` is true; otherwise the BN is skipped with that
reason (the constant ties the model to one input shape).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from ...fold import fold_bn_before, is_uniform, shift_response
from .graph_state import GraphState, set_parameters
from .patterns import BnSite, activation_name, describe_node

__all__ = ["apply", "check", "fold_into"]


def _first_arg(node: fx.Node):
    return node.args[0] if node.args else node.kwargs.get("input")


def check(state: GraphState, site: BnSite, noun: str = "BN") -> tuple[fx.Node | None, str]:
    """The layer node the BN folds into, or None and the reason it does not (``noun`` names the folded affine in
    the reason: a ProxyNormAct's post-affine takes this same decision)."""
    users = list(site.node.users)
    if len(users) != 1:
        names = ", ".join(describe_node(state.gm, u) for u in users) or "nothing"
        return None, f"the {noun} output goes to {names}, not to a single Conv/Linear"
    user = users[0]
    act = activation_name(state.gm, user)
    if act is not None:
        return None, (f"pre-activation pattern: {noun} → {act} → ...; the activation sits between {noun} and the "
                      "next layer")
    layer = state.layer(user)
    if layer is None:
        return None, f"the {noun} output goes to {describe_node(state.gm, user)}, not a Conv/ConvTranspose/Linear"
    if site.post:
        return None, (f"the {noun} applies {', '.join(site.post)} after normalizing, which cannot move into the "
                      "next layer")
    if _first_arg(user) is not site.node:
        return None, f"the {noun} output is not the input of '{user.target}'"
    shared = state.shared_reason(user)
    if shared:
        return None, shared
    shape = state.input_shape(layer.module)
    if layer.kind == "linear":
        reason = state.shapes.linear_rank_reason(layer.module, str(user.target), noun)
        if reason:
            return None, reason
    elif layer.zero_padded or layer.kind == "conv_transpose":
        what = "zero-padded conv" if layer.kind == "conv" else "ConvTranspose"
        if shape is None:
            return None, (f"{noun} before a {what} '{user.target}': its shift is not a plain bias at the borders; "
                          "pass example_inputs and border_correction=true to fold it exactly with a border correction")
        response = _shift_response(layer, site, shape)
        if not is_uniform(response) and not state.border_correction:
            return None, (f"{noun} before a {what} '{user.target}': its shift is not a plain bias at the borders; "
                          f"set border_correction=true to fold it exactly for input shape {list(shape)} only")
        state.responses[user] = response
    return user, ""


def _shift_response(layer, site: BnSite, shape) -> torch.Tensor:
    return torch.as_tensor(shift_response(
        layer.module.weight.detach(), site.shift, kind=layer.kind, input_shape=shape, stride=layer.stride,
        padding=layer.padding, dilation=layer.dilation, groups=layer.groups, output_padding=layer.output_padding,
        padding_mode=layer.padding_mode,
    ))


def fold_into(state: GraphState, scale: Any, shift: Any, layer_node: fx.Node) -> dict:
    """Fold the per-channel affine ``x·scale + shift`` before ``layer_node`` into that layer (with the border
    correction :func:`check` measured, if any); the BN node stays in the graph. Returns ``into`` (the layer's
    qualified name) and, when they apply, ``border_correction`` and ``note``."""
    shape = state.input_shape(state.gm.get_submodule(layer_node.target))  # before the module is made private
    module, note = state.own_module(layer_node)
    layer = state.layer(layer_node)
    old_weight = module.weight.detach()
    old_bias = None if module.bias is None else module.bias.detach()
    weight, bias = fold_bn_before(old_weight, old_bias, scale, shift, kind=layer.kind, groups=layer.groups)
    details = {"into": state.part.qualified(str(layer_node.target))}
    response = state.responses.pop(layer_node, None)
    if response is not None and not is_uniform(response):  # else fold_bn_before's bias is exact (as in ONNX)
        if old_bias is not None:
            response = response + old_bias.double().reshape((-1,) + (1,) * (response.dim() - 1))
        set_parameters(module, weight, None)
        border = response.to(old_weight.dtype).unsqueeze(0)
        state.add_constant_after(layer_node, border, str(layer_node.target).replace(".", "_") + "_bn_shift")
        details["border_correction"] = f"exact for input shape {list(shape)} only"
    else:
        set_parameters(module, weight, bias)
    if note:
        details["note"] = note
    return details


def apply(state: GraphState, site: BnSite, layer_node: fx.Node) -> dict:
    folded = fold_into(state, site.scale, site.shift, layer_node)
    state.remove_bn(site, site.input_node)
    return {"into": folded.pop("into"), "direction": "forward", **folded}
