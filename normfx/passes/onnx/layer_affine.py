"""Conv / ConvTranspose / Gemm / MatMul → per-channel affine chain (no BN): fold the chain into the layer before it.

A ``Mul``+``Add`` chain by per-channel constants after a layer (Caffe's ``Scale`` layer without its BN, a
hand-written ``x * w + b``) is a BatchNorm's affine without the statistics. It is offered, read as a BN site,
to the very rules that fold a BatchNormalization into the layer before it — :func:`.conv_bn.find` and
:func:`.gemm_bn.find` — with their checks (the layer's output read by the chain alone, channel count, shape ops
between them, shared weights), and the whole chain goes when the fold applies. Exact for any padding, stride,
dilation and groups, like the Conv → BN fold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from . import conv_bn, gemm_bn
from .affine_site import AffineSite
from .chain import walk_up
from .rule import Decline, Fold, FoldOptions
from .workspace import Workspace

__all__ = ["find", "RULE"]

RULE = "layer_affine"


@dataclass(eq=False)
class _AsBn:
    """The chain seen as a BN site by the backward rules: its first node reads the layer's output, and the
    chain's output tensor is what the layer writes after the fold."""

    site: AffineSite

    @property
    def node(self) -> gs.Node:
        return self.site.node

    @property
    def x(self) -> gs.Tensor:
        return self.site.x

    @property
    def y(self) -> gs.Tensor:
        return self.site.y

    @property
    def scale(self) -> np.ndarray:
        return self.site.scale

    @property
    def shift(self) -> np.ndarray:
        return self.site.shift

    @property
    def channels(self) -> int:
        return self.site.channels


def find(site: AffineSite, ws: Workspace, *, options: FoldOptions = FoldOptions()) -> Fold | Decline | None:
    """The fold of ``site`` into the Conv/ConvTranspose/Gemm/MatMul producing its input, if there is one."""
    if site.scale is None or site.scalar:
        return None  # a chain along more than the channel axis; a scalar chain is left to the other rules
    producer, _ = walk_up(site.x)
    if producer is not None and producer.op == "MatMul" and site.identity[0]:
        return None  # an Add after a MatMul is its bias already (a fold would write it again: MatMul + Add)
    view = _AsBn(site)
    for rule in (conv_bn.find, gemm_bn.find):
        found = rule(view, ws, options=options)
        if isinstance(found, Decline):
            return Decline(RULE, found.reason)
        if isinstance(found, Fold):
            return _whole_chain(site, found, ws)
    return None


def _whole_chain(site: AffineSite, fold: Fold, ws: Workspace) -> Fold:
    rest = site.nodes[1:]  # the rule removes the first node (its "BN"); the rest of the chain goes here
    intermediates = site.intermediates()

    def apply() -> None:
        fold.apply()
        for tensor in intermediates:
            ws.move_metadata_readers(tensor, site.y)
        for node in rest:
            ws.remove(node)

    pattern = "→".join([fold.details.get("pattern", "").split("→")[0], *site.ops])
    details = {**fold.details, "pattern": pattern, "rule": fold.rule}
    return Fold(RULE, fold.into, apply, details)
