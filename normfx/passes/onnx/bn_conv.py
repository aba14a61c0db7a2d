"""BatchNormalization → Conv / ConvTranspose: fold the BN into the layer after it (forward fold).

The scale always folds into the layer's input channels. A site whose shift is zero everywhere (scale
only) is then folded whole, whatever the padding and the input shape: nothing reaches the borders.
Otherwise the shift becomes a plain bias when every output position sees every kernel tap over real
input: an unpadded Conv. A zero-padded Conv (or a ConvTranspose, whose border outputs see fewer taps)
gets the *exact* position-dependent constant from :func:`normfx.fold.shift_response` — which needs the
input's spatial shape to be static — added by an ``Add`` node after the layer (or as a bias when it
turns out uniform) when the policy option ``border_correction`` is true. Otherwise: declined (the Add
would tie the model to one input shape and, measured, runs slower in onnxruntime than the
BatchNormalization it replaces).

The same rule folds the per-channel affine chains ``fuse`` reads (:mod:`.affine_conv`): ``kind``
(:class:`.forward.SiteKind`) names the site in the rule name, the reasons and the pattern.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from ...fold import fold_bn_before, is_uniform, per_channel, shift_response
from .chain import Chain, follow
from .edits import (
    ConvParams,
    add_bias_after,
    bypass_forward,
    conv_params,
    input_name,
    shared_reason,
    start_dims,
)
from .forward import BN_SITE, SiteKind
from .rule import Decline, Fold, FoldOptions
from .shapes import Dim, dims_text, static_value
from .workspace import Workspace, node_label

__all__ = ["find", "RULE"]

RULE = BN_SITE.rule("conv")
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


@dataclass
class _Geometry:
    """The layer's borders: ``unpadded`` (every output sees every tap over real input: the shift is a plain
    bias), else the static input shape and pads :func:`normfx.fold.shift_response` reads."""

    unpadded: bool
    spatial: list[int] | None
    strides: list[int]
    dilations: list[int]
    pads: list[int]
    output_padding: list[int]

    def why(self, layer: str) -> str:
        return "is zero-padded" if layer == "conv" else "is a ConvTranspose (border outputs see fewer taps)"


def _input_dims(site: Any, ws: Workspace, target: gs.Node, chain: Chain, rank: int, kind: SiteKind
                ) -> list[Dim] | None | str:
    """The shape the layer reads (None: unknown, with no shape chain to follow), or why the site's channels
    do not reach its channel axis."""
    label = node_label(target)
    dims = start_dims(ws, site.y, rank if not chain.nodes else None, 1, site.channels)
    if not chain.nodes:
        return dims
    if dims is None:
        return (f"the shape of the {kind.noun} output {site.y.name!r} is unknown; "
                f"cannot follow it through {'→'.join(chain.ops)}")
    followed = follow(chain, dims, 1, ws)
    if isinstance(followed, str):
        return followed
    dims, axis = followed
    if axis != 1:
        return f"the {kind.short} channels reach {label} on axis {axis} of {dims_text(dims)}, not its channel axis 1"
    return dims


def _geometry(target: gs.Node, layer: str, weight: np.ndarray, dims: list[Dim] | None, kind: SiteKind
              ) -> _Geometry | str:
    """Where the shift's effect depends on the position, or why it cannot be computed."""
    label, n, attrs = node_label(target), weight.ndim - 2, target.attrs
    strides, dilations = _ints(attrs, "strides", n, 1), _ints(attrs, "dilations", n, 1)
    pads = _ints(attrs, "pads", 2 * n, 0)
    auto_pad = str(attrs.get("auto_pad", "NOTSET"))
    spatial = [static_value(d) for d in dims[2:]] if dims is not None and len(dims) == n + 2 else None
    static = spatial is not None and all(s is not None for s in spatial)
    if layer == "conv":
        unpadded = auto_pad == "VALID" or (auto_pad == "NOTSET" and not any(pads))
        if auto_pad in ("SAME_UPPER", "SAME_LOWER") and static:
            pads = _same_pads(spatial, list(weight.shape[2:]), strides, dilations, auto_pad == "SAME_UPPER")
        elif auto_pad == "VALID":
            pads = [0] * (2 * n)
    else:
        if "output_shape" in attrs or auto_pad not in ("NOTSET", ""):
            return f"{label} sets output_shape/auto_pad; only explicit pads are folded through a ConvTranspose"
        unpadded = False  # border outputs of a transposed conv see fewer taps: always use the response
    geometry = _Geometry(unpadded, spatial if static else None, strides, dilations, pads,
                         _ints(attrs, "output_padding", n, 0))
    if not unpadded and not static:
        shape = dims_text(dims) if dims is not None else "unknown"
        return (f"{label} {geometry.why(layer)} and its input's spatial shape ({shape}) is not static, so the "
                f"{kind.short} shift's position-dependent effect cannot be computed; export with static spatial dims")
    return geometry


def _response(site: Any, target: gs.Node, layer: str, params: ConvParams, geometry: _Geometry,
              options: FoldOptions, kind: SiteKind) -> np.ndarray | str:
    """The exact per-position constant the shift adds after a padded layer, or why it is declined."""
    g = geometry
    response = shift_response(
        params.weight, site.shift, kind=layer, input_shape=g.spatial, stride=g.strides, padding=g.pads,
        dilation=g.dilations, groups=params.groups, output_padding=g.output_padding,
    )
    if is_uniform(response) or options.border_correction:
        return response
    return (f"{node_label(target)} {g.why(layer)}: the {kind.short} shift is position-dependent at the borders; "
            f"folding it needs an added constant map that ties the model to input shape {g.spatial}{kind.cost} "
            "(set border_correction=true to fold anyway)")


def find(
    site: Any, ws: Workspace, target: gs.Node, tin: gs.Tensor, chain: Chain, *,
    options: FoldOptions = FoldOptions(), kind: SiteKind = BN_SITE,
) -> Fold | Decline | None:
    """The forward fold of ``site`` (``x · site.scale + site.shift`` along axis 1) into ``target`` (reading
    ``tin``, reached through ``chain``); ``kind`` names the site in the rule name and the reasons."""
    if target.op not in KINDS or target.domain:
        return None
    label, layer, rule = node_label(target), KINDS[target.op], kind.rule("conv")
    if not target.inputs or target.inputs[0] is not tin or any(t is tin for t in target.inputs[1:]):
        return Decline(rule, f"the {kind.noun} feeds the weight or bias of {label}, not its data input")
    params = conv_params(target, layer, ws)
    if isinstance(params, str):
        return Decline(rule, params)
    if params.cin != site.channels:
        return Decline(rule, f"{label} has {params.cin} input channels but the {kind.noun} has {site.channels}")
    dims = _input_dims(site, ws, target, chain, params.weight.ndim, kind)
    if isinstance(dims, str):
        return Decline(rule, dims)
    scale_only = not np.any(site.shift)  # exact with any padding and any input shape: nothing reaches the borders
    geometry = None if scale_only else _geometry(target, layer, params.weight, dims, kind)
    if isinstance(geometry, str):
        return Decline(rule, geometry)
    reason = shared_reason(target, (1, 2), ws, options.duplicate_shared)
    if reason:
        return Decline(rule, reason)
    response = None
    if geometry is not None and not geometry.unpadded:
        response = _response(site, target, layer, params, geometry, options, kind)
        if isinstance(response, str):
            return Decline(rule, response)
    details: dict[str, Any] = {
        "direction": "forward", "into": target.name or label, "pattern": kind.pattern(site, *chain.ops, target.op),
    }

    def apply() -> None:
        weight, bias, cout = params.weight, params.bias, params.cout
        old = list(target.inputs[1:])
        new_w, new_b = fold_bn_before(weight, bias, site.scale, site.shift, kind=layer, groups=params.groups)
        ws.set_input(target, 1, ws.constant(input_name(target, 1, "weight"), new_w))
        if response is None and not scale_only:  # unpadded: the shift is a plain bias
            ws.set_input(target, 2, ws.constant(input_name(target, 2, "bias"), new_b))
        elif response is not None:
            layer_bias = np.zeros(cout) if bias is None else np.asarray(bias, dtype=np.float64)
            if is_uniform(response):
                uniform = response.reshape(cout, -1)[:, 0] + layer_bias
                ws.set_input(target, 2, ws.constant(input_name(target, 2, "bias"), uniform.astype(weight.dtype)))
                details["shift"] = "uniform bias"
            else:
                constant = (response + per_channel(layer_bias, response.ndim, 0)).astype(weight.dtype)
                ws.truncate_inputs(target, 2)
                add = add_bias_after(target, constant, ws, f"{target.name or target.op}.{kind.prefix}_shift")
                details["shift"] = f"position-dependent constant {list(constant.shape)} added by Add {add.name!r}"
                details["added"] = add.name
        bypass_forward(site, chain, target, ws)
        for tensor in old:
            ws.drop_if_unused(tensor)

    return Fold(rule, label, apply, details)
