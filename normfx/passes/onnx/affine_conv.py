"""Per-channel affine → Conv / ConvTranspose / Gemm / MatMul: fold the affine into the layer after it.

Proxy Norm's post-affine ``(φ(·) − m) · s`` sits between the activation and the next layer. It is
read as an :class:`~.affine_site.AffineSite` (``x · scale + shift`` per channel) and offered to the
very rules that fold a BatchNormalization forward — :func:`.bn_conv.find` and :func:`.bn_gemm.find`,
told by :data:`AFFINE` to speak of an affine (rules ``affine_conv``, ``affine_gemm``, ``affine_matmul``)
— with their checks (data input, channel count, channel axis through shape ops, shared weights,
zero-padded convs: exact only with ``border_correction``, or when the shift is zero), through
:func:`.forward.plan_forward`: into every consumer or none.

When the full fold into a Conv/ConvTranspose is declined only because the shift cannot pass the
layer's borders exactly, the *scale* still folds: ``conv(x · s + t) = conv_s(x + t / s)``. The site is
offered to :func:`.bn_conv.find` once more as the scale-only site ``(x + t / s) · s``, whose input is
one ``Add`` made before the layer(s) (rule ``affine_conv``; the details say ``"partial"``, and why the
full fold was ``"declined"``). A chain ``Sub → Mul`` thus becomes one ``Add``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from ...affine import shift_before_scale
from . import bn_conv, bn_gemm
from .affine_site import LINEAR_OPS, AffineSite
from .chain import Chain, walk_down
from .forward import ForwardFind, SiteKind, offer, plan_forward
from .rule import Decline, Fold, FoldOptions
from .workspace import Workspace

__all__ = ["find", "AFFINE", "reaches_a_layer"]

AFFINE = SiteKind("affine", "affine", "affine", by_ops=True)
_FULL: tuple[ForwardFind, ...] = (partial(bn_conv.find, kind=AFFINE), partial(bn_gemm.find, kind=AFFINE))


@dataclass(eq=False)
class _ScaleOnly:
    """The site read as ``(x + t / s) · s``: a scale-only site whose input is the ``Add(x, t / s)`` that keeps
    the shift before the layer(s) — made when a fold first rewires to it, once per site."""

    site: AffineSite
    ws: Workspace
    pre: np.ndarray  # t / s per channel
    created: Callable[[gs.Node], None] | None = None
    node: gs.Node | None = None

    @property
    def scale(self) -> np.ndarray:
        return self.site.scale

    @property
    def shift(self) -> np.ndarray:
        return np.zeros(self.site.channels)

    @property
    def channels(self) -> int:
        return self.site.channels

    @property
    def ops(self) -> list[str]:
        return self.site.ops

    @property
    def y(self) -> gs.Tensor:
        return self.site.y

    @property
    def x(self) -> gs.Tensor:
        if self.node is None:
            site, ws = self.site, self.ws
            const = self.pre.reshape((1, -1) + (1,) * (site.rank - 2)).astype(site.dtype)
            out = ws.variable_like(f"{site.x.name}_shifted", site.x)
            self.node = gs.Node("Add", name=ws.fresh(f"{site.name}_shift"),
                                inputs=[site.x, ws.constant(f"{site.name}.shift", const)], outputs=[out])
            ws.insert_after(site.nodes[-1], self.node)
            if self.created is not None:
                self.created(self.node)
        return self.node.outputs[0]


def _or_scale_only(view: _ScaleOnly) -> ForwardFind:
    """The full fold into a layer, or — where it is declined and the scale alone folds — the scale alone."""

    def find(site: AffineSite, ws: Workspace, target: gs.Node, tin: gs.Tensor, chain: Chain, *,
             options: FoldOptions) -> Fold | Decline | None:
        full = offer(site, ws, _FULL, target, tin, chain, options)
        if not isinstance(full, Decline):
            return full
        part = bn_conv.find(view, ws, target, tin, chain, options=options, kind=AFFINE)
        if not isinstance(part, Fold):
            return full
        details = {**part.details, "partial": f"scale folded into {part.into}; shift kept as an Add before it",
                   "declined": full.reason}  # the Add's own entry says it again: what is left is kept, and why

        def apply() -> None:
            part.apply()
            details.update(part.details)
            details["added"] = view.node.name

        return Fold(part.rule, part.into, apply, details)

    return find


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
    pre = None if ones or zeros else shift_before_scale(site.scale, site.shift)  # None: no split (s = 0 where t ≠ 0)
    finds = list(_FULL) if pre is None else [_or_scale_only(_ScaleOnly(site, ws, pre, created))]

    def remove() -> None:
        for tensor in site.intermediates():
            ws.move_metadata_readers(tensor, site.x)
        for node in site.nodes:
            ws.remove(node)

    return plan_forward(site, ws, finds, options, noun=AFFINE.noun, remove=remove)
