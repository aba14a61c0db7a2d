"""Conv / ConvTranspose → BatchNormalization: fold the BN into the layer before it (always exact).

Also through shape-only ops between them (e.g. ``Conv → Flatten → BN`` on a 1×1 map) when the
channel axis comes through intact (:mod:`.chain`). Any groups, any padding/stride/dilation.
"""

from __future__ import annotations

from ...fold import fold_bn_after
from .bn import BnSite
from .chain import chain_uses, follow, walk_up
from .edits import bypass_backward, conv_params, input_name, pattern, shared_reason, start_dims
from .rule import Decline, Fold, FoldOptions
from .workspace import Workspace, node_label

__all__ = ["find", "RULE"]

RULE = "conv_bn"
KINDS = {"Conv": "conv", "ConvTranspose": "conv_transpose"}


def find(site: BnSite, ws: Workspace, *, options: FoldOptions = FoldOptions()) -> Fold | Decline | None:
    """The fold of ``site`` into the Conv/ConvTranspose producing its input, if there is one."""
    duplicate_shared = options.duplicate_shared
    layer, chain = walk_up(site.x)
    if layer is None or layer.op not in KINDS or layer.domain:
        return None
    label, kind = node_label(layer), KINDS[layer.op]

    def decline(reason: str) -> Decline:
        return Decline(RULE, reason)

    params = conv_params(layer, kind, ws)
    if isinstance(params, str):
        return decline(params)
    weight, bias, groups, cout = params.weight, params.bias, params.groups, params.cout
    if cout != site.channels:
        return decline(f"{label} has {cout} output channels but the BatchNormalization has {site.channels}")
    reason = chain_uses(chain, layer.outputs[0], site.node, ws)
    if reason:
        return decline(f"{label}: {reason}")
    if chain.nodes:
        dims = start_dims(ws, layer.outputs[0], weight.ndim, 1, cout)
        followed = follow(chain, dims, 1, ws)
        if isinstance(followed, str):
            return decline(followed)
        if followed[1] != 1:
            return decline(f"{label}'s channels reach the BatchNormalization on axis {followed[1]}, not axis 1")
    reason = shared_reason(layer, (1, 2), ws, duplicate_shared)
    if reason:
        return decline(reason)

    def apply() -> None:
        new_w, new_b = fold_bn_after(weight, bias, site.scale, site.shift, kind=kind, groups=groups)
        old = list(layer.inputs[1:])
        ws.set_input(layer, 1, ws.constant(input_name(layer, 1, "weight"), new_w))
        ws.set_input(layer, 2, ws.constant(input_name(layer, 2, "bias"), new_b))
        bypass_backward(site, chain.nodes[-1] if chain.nodes else layer, ws)
        for tensor in old:
            ws.drop_if_unused(tensor)

    details = {"direction": "backward", "into": layer.name or label}
    details["pattern"] = pattern(layer.op, *chain.ops, "BatchNormalization")
    return Fold(RULE, label, apply, details)
