"""BatchNormalization → Conv / ConvTranspose: fold the BN into the layer after it (forward fold).

The scale always folds into the layer's input channels. The shift becomes a plain bias when every
output position sees every kernel tap over real input: an unpadded Conv. A zero-padded Conv (or a
ConvTranspose, whose border outputs see fewer taps) gets the *exact* position-dependent constant
from :func:`normfx.fold.shift_response` — which needs the input's spatial shape to be static — added
by an ``Add`` node after the layer (or as a bias when it turns out uniform) when the policy option
``border_correction`` is true. Otherwise: declined (the Add would tie the model to one input shape and,
measured, runs slower in onnxruntime than the BatchNormalization it replaces).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from ...fold import fold_bn_before, is_uniform, per_channel, shift_response
from .bn import BnSite
from .chain import Chain, follow
from .edits import (
    add_bias_after,
    bypass_forward,
    conv_params,
    input_name,
    pattern,
    shared_reason,
    start_dims,
)
from .rule import Decline, Fold, FoldOptions
from .shapes import dims_text, static_value
from .workspace import Workspace, node_label

__all__ = ["find", "RULE"]

RULE = "bn_conv"
KINDS = {"Conv": "conv", "ConvTranspose": "conv_transpose"}


def _ints(attrs: dict, key: str, n: int, default: int) -> list[int]:
    value = attrs.get(key)
    return [int(v) for v in value] if value else [default] * n


def _same_pads(
    spatial: list[int], kernel: list[int], strides: list[int], dilations: list[int], upper: bool
) -> list[int]:
    """ONNX ``auto_pad=SAME_UPPER/LOWER`` pads for a static input (begins then ends)."""
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        out = math.ceil(size / s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, big = total // 2, total - total // 2
        begins.append(small if upper else big)
        ends.append(big if upper else small)
    return begins + ends


def find(
    site: BnSite, ws: Workspace, target: gs.Node, tin: gs.Tensor, chain: Chain, *,
    options: FoldOptions = FoldOptions(),
) -> Fold | Decline | None:
    """The forward fold of ``site`` into ``target`` (reading ``tin``, reached through ``chain``)."""
    duplicate_shared = options.duplicate_shared
    if target.op not in KINDS or target.domain:
        return None
    label, kind = node_label(target), KINDS[target.op]

    def decline(reason: str) -> Decline:
        return Decline(RULE, reason)

    if not target.inputs or target.inputs[0] is not tin or any(t is tin for t in target.inputs[1:]):
        return decline(f"the BatchNormalization feeds the weight or bias of {label}, not its data input")
    params = conv_params(target, kind, ws)
    if isinstance(params, str):
        return decline(params)
    weight, bias, groups, cin, cout = params.weight, params.bias, params.groups, params.cin, params.cout
    if cin != site.channels:
        return decline(f"{label} has {cin} input channels but the BatchNormalization has {site.channels}")
    dims = start_dims(ws, site.y, weight.ndim if not chain.nodes else None, 1, site.channels)
    if chain.nodes:
        if dims is None:
            return decline(
                f"the shape of the BatchNormalization output {site.y.name!r} is unknown; "
                f"cannot follow it through {'→'.join(chain.ops)}"
            )
        followed = follow(chain, dims, 1, ws)
        if isinstance(followed, str):
            return decline(followed)
        dims, axis = followed
        if axis != 1:
            return decline(f"the BN channels reach {label} on axis {axis} of {dims_text(dims)}, not its channel axis 1")
    n = weight.ndim - 2
    attrs = target.attrs
    strides, dilations = _ints(attrs, "strides", n, 1), _ints(attrs, "dilations", n, 1)
    pads = _ints(attrs, "pads", 2 * n, 0)
    auto_pad = str(attrs.get("auto_pad", "NOTSET"))
    spatial = [static_value(d) for d in dims[2:]] if dims is not None and len(dims) == n + 2 else None
    static = spatial is not None and all(s is not None for s in spatial)
    output_padding = _ints(attrs, "output_padding", n, 0)
    if kind == "conv":
        unpadded = auto_pad == "VALID" or (auto_pad == "NOTSET" and not any(pads))
        if auto_pad in ("SAME_UPPER", "SAME_LOWER") and static:
            pads = _same_pads(spatial, list(weight.shape[2:]), strides, dilations, auto_pad == "SAME_UPPER")
        elif auto_pad == "VALID":
            pads = [0] * (2 * n)
    else:
        if "output_shape" in attrs or auto_pad not in ("NOTSET", ""):
            return decline(f"{label} sets output_shape/auto_pad; only explicit pads are folded through a ConvTranspose")
        unpadded = False  # border outputs of a transposed conv see fewer taps: always use the response
    if not unpadded and not static:
        why = "is zero-padded" if kind == "conv" else "is a ConvTranspose (border outputs see fewer taps)"
        shape = dims_text(dims) if dims is not None else "unknown"
        return decline(
            f"{label} {why} and its input's spatial shape ({shape}) is not static, so the BN shift's "
            "position-dependent effect cannot be computed; export with static spatial dims"
        )
    reason = shared_reason(target, (1, 2), ws, duplicate_shared)
    if reason:
        return decline(reason)
    response = None
    if not unpadded:
        response = shift_response(
            weight, site.shift, kind=kind, input_shape=spatial, stride=strides, padding=pads,
            dilation=dilations, groups=groups, output_padding=output_padding,
        )
        if not is_uniform(response) and not options.border_correction:
            why = "is zero-padded" if kind == "conv" else "is a ConvTranspose (border outputs see fewer taps)"
            return decline(
                f"{label} {why}: the BN shift is position-dependent at the borders; folding it needs an added "
                f"constant map that ties the model to input shape {spatial} and is slower in onnxruntime than "
                "its BatchNormalization (set border_correction=true to fold anyway)"
            )
    details = {
        "direction": "forward",
        "into": target.name or label,
        "pattern": pattern("BatchNormalization", *chain.ops, target.op),
    }

    def apply() -> None:
        old = list(target.inputs[1:])
        if unpadded:
            new_w, new_b = fold_bn_before(weight, bias, site.scale, site.shift, kind=kind, groups=groups)
            ws.set_input(target, 1, ws.constant(input_name(target, 1, "weight"), new_w))
            ws.set_input(target, 2, ws.constant(input_name(target, 2, "bias"), new_b))
        else:
            new_w, _ = fold_bn_before(weight, None, site.scale, site.shift, kind=kind, groups=groups)
            layer_bias = np.zeros(cout) if bias is None else np.asarray(bias, dtype=np.float64)
            ws.set_input(target, 1, ws.constant(input_name(target, 1, "weight"), new_w))
            if is_uniform(response):
                uniform = response.reshape(cout, -1)[:, 0] + layer_bias
                ws.set_input(target, 2, ws.constant(input_name(target, 2, "bias"), uniform.astype(weight.dtype)))
                details["shift"] = "uniform bias"
            else:
                constant = (response + per_channel(layer_bias, response.ndim, 0)).astype(weight.dtype)
                ws.truncate_inputs(target, 2)
                add = add_bias_after(target, constant, ws, f"{target.name or target.op}.bn_shift")
                details["shift"] = f"position-dependent constant {list(constant.shape)} added by Add {add.name!r}"
                details["added"] = add.name
        bypass_forward(site, chain, target, ws)
        for tensor in old:
            ws.drop_if_unused(tensor)

    return Fold(RULE, label, apply, details)
