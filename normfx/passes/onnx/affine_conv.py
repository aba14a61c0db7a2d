"""Per-channel affine → Conv / ConvTranspose / Gemm / MatMul: fold the affine into the layer after it.

Proxy Norm's post-affine ``(φ(·) − m) · s`` sits between the activation and the next layer. It is
read as a :class:`~.affine_site.AffineSite` (``x · scale + shift`` per channel) and offered to the
very rules that fold a BatchNormalization forward — :func:`.bn_conv.find` and :func:`.bn_gemm.find`,
with their checks (data input, channel count, channel axis through shape ops, shared weights,
zero-padded convs: exact only with ``border_correction``) — through :func:`.forward.plan_forward`:
into every consumer or none. Their reasons are reported with "affine" for "BatchNormalization".

When the full fold into a Conv/ConvTranspose is declined only because the shift cannot pass a zero
padding exactly, the *scale* still folds: ``conv(x · s + t) = conv_s(x + t / s)`` with the kernel's
input channels scaled by ``s``; the shift stays as one ``Add`` before the layer (rule ``affine_conv``,
``"partial"`` in the details). A chain ``Sub → Mul`` thus becomes one ``Add``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import onnx_graphsurgeon as gs

from ...affine import shift_before_scale
from ...fold import fold_bn_before
from . import bn_conv, bn_gemm
from .affine_site import LINEAR_OPS, AffineSite
from .chain import Chain, follow, walk_down
from .edits import bypass_forward, conv_params, input_name, pattern, shared_reason, start_dims
from .forward import plan_forward
from .rule import Decline, Fold, FoldOptions
from .workspace import Workspace, node_label

__all__ = ["find", "RULES", "NOUN", "relabel", "reaches_a_layer"]

NOUN = "affine"
RULES = {bn_conv.RULE: "affine_conv", bn_gemm.GEMM_RULE: "affine_gemm", bn_gemm.MATMUL_RULE: "affine_matmul"}
KINDS = {"Conv": "conv", "ConvTranspose": "conv_transpose"}
_BORDER = ("the shift's effect is position-dependent at the borders (zero padding, or a ConvTranspose's border "
           "outputs seeing fewer taps); border_correction=true folds it as a per-position constant after the layer "
           "when the input's spatial shape is static")


def relabel(text: str) -> str:
    """A BatchNormalization rule's message, said of an affine site (the latency claim was measured for BN only)."""
    text = text.replace(" and is slower in onnxruntime than its BatchNormalization", "")
    return text.replace("BatchNormalization", NOUN).replace("BN ", f"{NOUN} ")


@dataclass
class _Shift:
    """The ``Add(x, t / s)`` a partial fold leaves before the layer(s), made once per site."""

    site: AffineSite
    ws: Workspace
    value: np.ndarray  # t / s per channel
    created: Callable[[gs.Node], None] | None = None
    node: gs.Node | None = None

    def ensure(self) -> gs.Tensor:
        if self.node is None:
            site, ws = self.site, self.ws
            const = self.value.reshape((1, -1) + (1,) * (site.rank - 2))
            out = ws.variable_like(f"{site.x.name}_shifted", site.x)
            self.node = gs.Node("Add", name=ws.fresh(f"{site.name}_shift"),
                                inputs=[site.x, ws.constant(f"{site.name}.shift", const.astype(site.dtype))],
                                outputs=[out])
            ws.insert_after(site.nodes[-1], self.node)
            if self.created is not None:
                self.created(self.node)
        return self.node.outputs[0]


@dataclass
class _Rewire:
    """What :func:`.edits.bypass_forward` reads: the tensor the layer reads instead, and the old one."""

    x: gs.Tensor
    y: gs.Tensor


def _full(site: AffineSite, ws: Workspace, target: gs.Node, tin: gs.Tensor, chain: Chain, *,
          options: FoldOptions) -> Fold | Decline | None:
    for rule in (bn_conv.find, bn_gemm.find):
        result = rule(site, ws, target, tin, chain, options=options)
        if result is None:
            continue
        if isinstance(result, Decline):
            return Decline(RULES.get(result.rule, result.rule), relabel(result.reason))
        result.rule = RULES.get(result.rule, result.rule)
        result.details["pattern"] = pattern(*site.ops, *chain.ops, target.op)
        return result
    return None


def _scale_only(site: AffineSite, ws: Workspace, target: gs.Node, tin: gs.Tensor, chain: Chain,
                shift: _Shift | None, options: FoldOptions, why: str) -> Fold | None:
    """Fold only the scale into Conv/ConvTranspose ``target``; the shift stays as ``shift``'s Add (``None``: the
    site has no shift, and this is the whole fold — exact with any padding and any input shape)."""
    if target.op not in KINDS or target.domain or target.inputs[0] is not tin:
        return None
    params = conv_params(target, KINDS[target.op], ws)
    if isinstance(params, str) or params.cin != site.channels:
        return None
    if chain.nodes:
        dims = start_dims(ws, site.y, None, 1, site.channels)
        followed = follow(chain, dims, 1, ws) if dims is not None else "unknown shape"
        if isinstance(followed, str) or followed[1] != 1:
            return None
    if shared_reason(target, (1,), ws, options.duplicate_shared):
        return None
    label = node_label(target)
    details: dict[str, Any] = {
        "direction": "forward", "into": target.name or label, "pattern": pattern(*site.ops, *chain.ops, target.op),
    }
    if shift is not None:
        details["partial"] = f"scale folded into {label}; shift kept as an Add before it ({why})"

    def apply() -> None:
        new_w, _ = fold_bn_before(params.weight, None, site.scale, np.zeros(site.channels),
                                  kind=KINDS[target.op], groups=params.groups)
        old = target.inputs[1]
        ws.set_input(target, 1, ws.constant(input_name(target, 1, "weight"), new_w))
        bypass_forward(_Rewire(shift.ensure() if shift is not None else site.x, site.y), chain, target, ws)
        if shift is not None and shift.node is not None:
            details["added"] = shift.node.name
        ws.drop_if_unused(old)

    return Fold("affine_conv", label, apply, details)


def reaches_a_layer(site: AffineSite, ws: Workspace) -> bool:
    """True when some reader of the site's output (through shape ops) is a layer a forward rule knows."""
    for reader in ws.data_consumers(site.y):
        walked = walk_down(site.y, reader, ws)
        target = reader if isinstance(walked, str) else walked[0]
        if target.op in LINEAR_OPS and not target.domain:
            return True
    return False


def find(site: AffineSite, ws: Workspace, *, options: FoldOptions = FoldOptions(),
         created: Callable[[gs.Node], None] | None = None) -> Fold | list[Decline]:
    """The forward fold of ``site`` into every layer its output feeds (or the reasons it is declined);
    ``created`` is told of the Add a partial fold inserts."""
    if site.scale is None or not reaches_a_layer(site, ws):
        return []
    ones, zeros = site.identity
    pre = None if ones or zeros else shift_before_scale(site.scale, site.shift)
    shift = _Shift(site, ws, pre, created) if pre is not None else None
    split = not ones and (zeros or shift is not None)  # the scale can fold alone (s = 0 needs t = 0 there)

    def one(s: AffineSite, w: Workspace, target: gs.Node, tin: gs.Tensor, chain: Chain, *,
            options: FoldOptions) -> Fold | Decline | None:
        full = _full(s, w, target, tin, chain, options=options)
        if isinstance(full, Decline) and split:
            why = _BORDER if "position-dependent" in full.reason else f"the full fold is declined: {full.reason}"
            partial = _scale_only(s, w, target, tin, chain, shift, options, why)
            if partial is not None:
                return partial
        return full

    def remove() -> None:
        for tensor in site.intermediates():
            ws.move_metadata_readers(tensor, site.x)
        for node in site.nodes:
            ws.remove(node)

    return plan_forward(site, ws, [one], options, noun=NOUN, remove=remove)
