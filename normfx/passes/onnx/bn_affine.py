"""BatchNormalization next to a per-channel affine chain (``Mul``/``Add``/``Sub``/``Div`` by constants): one BN.

Caffe's ``Scale`` layer after a BN (the ONNX model zoo's Caffe2-converted DenseNet-121: ``BN → Mul → Add →
Relu → Conv``) and any ``Mul``/``Add`` written next to a BN are merged into it *before* the BN rules run, so they
see one BatchNormalization (which then folds into a layer, or stays as the single cheapest op):

- BN → affine: ``(γ x̂ + β) · s + t = (γ s) x̂ + (β s + t)`` — the BN's scale and B (:func:`normfx.fold.
  fold_affine_into_norm`);
- affine → BN: ``BN(x · s + t)`` is the BN with mean ``(μ − t) / s`` and scale ``γ s``
  (:func:`normfx.affine.affine_before_bn`; declined where some ``s = 0``).

Exact. The chain must be per channel (axis 1), read nothing but the BN's output (or feed nothing but the BN),
and the BN must be foldable at all (inference mode, constant parameters). The BN gets new initializers (shared
ones are never edited). Rounds repeat, so ``Mul → BN → Add`` merges both sides.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from ...affine import affine_before_bn
from ...fold import fold_affine_into_norm
from .affine_site import AffineSite, read_sites
from .bn import read_bn
from .edits import input_name
from .norm_affine import take_over
from .rule import Fold
from .workspace import Workspace, node_label

__all__ = ["find", "merge_all", "RULE"]

RULE = "bn_affine"

log = logging.getLogger(__name__)


def _is_bn(node: gs.Node | None) -> bool:
    return node is not None and node.op == "BatchNormalization" and not node.domain


def _params(bn: gs.Node, ws: Workspace) -> list[np.ndarray] | None:
    values = [ws.const(t) for t in bn.inputs[1:5]]
    return None if any(isinstance(v, str) for v in values) else values


def find(site: AffineSite, ws: Workspace, targets: Callable[[str], bool]) -> Fold | str | None:
    """The merge of ``site`` into the BN right before or right after it; a reason when a BN is there but the merge
    is declined; None when no BN is adjacent."""
    before = site.x.inputs[0] if site.x.inputs else None
    if before is not None and before.op == "MatMul" and site.identity[0]:
        return None  # MatMul → Add is a layer with its bias: the MatMul → BN rule takes the pair as it is
    readers = ws.data_consumers(site.y)
    after = readers[0] if len(readers) == 1 and readers[0].inputs and readers[0].inputs[0] is site.y else None
    for bn, side in ((before, "after"), (after, "before")):
        if not _is_bn(bn) or not ws.in_main_graph(bn) or not targets(bn.name):
            continue
        found = _merge(site, bn, side, ws)
        if found is not None:
            return found
    return None


def _merge(site: AffineSite, bn: gs.Node, side: str, ws: Workspace) -> Fold | str:
    label = node_label(bn)
    read = read_bn(bn, bn.name, ws)
    if isinstance(read, str):
        return f"{label} cannot be folded at all: {read}"
    if site.scale is None:
        return f"the affine next to {label} varies along more than the channel axis 1"
    if site.channels != read.channels:
        return f"the affine has {site.channels} channels but {label} has {read.channels}"
    params = _params(bn, ws)
    if params is None:
        return f"{label} has non-constant parameters"
    gamma, beta, mean, _ = params
    dtype = gamma.dtype
    if side == "after":
        reason = ws.other_uses(bn.outputs[0], site.node, "BatchNormalization output")
        if reason:
            return reason
        new_gamma, new_beta = fold_affine_into_norm(gamma, beta, site.scale, site.shift, shape=gamma.shape)
        changes = {1: ("scale", new_gamma), 2: ("B", new_beta)}
    else:
        reason = ws.other_uses(site.y, bn, "affine output")
        if reason:
            return reason
        merged = affine_before_bn(mean, gamma, site.scale, site.shift)
        if merged is None:
            return f"the affine before {label} multiplies some channel by 0 (the BN would see a constant there)"
        new_mean, new_gamma = merged
        changes = {1: ("scale", new_gamma), 3: ("input_mean", new_mean)}

    def apply() -> None:
        old = [bn.inputs[i] for i in changes]
        for index, (key, value) in changes.items():
            ws.set_input(bn, index, ws.constant(input_name(bn, index, key), value.astype(dtype)))
        if side == "after":
            take_over(site, bn, ws)  # the BN now writes the chain's output tensor; the chain goes
        else:
            ws.set_input(bn, 0, site.x)
            for tensor in site.intermediates() + [site.y]:
                ws.move_metadata_readers(tensor, site.x)
            for node in site.nodes:
                ws.remove(node)
        for tensor in old:
            ws.drop_if_unused(tensor)

    pattern = "→".join(["BatchNormalization", *site.ops] if side == "after" else [*site.ops, "BatchNormalization"])
    return Fold(RULE, label, apply, {"into": bn.name, "side": side, "pattern": pattern})


def merge_all(ws: Workspace, targets: Callable[[str], bool]) -> dict[str, tuple[str, dict]]:
    """Merge every affine chain next to a targeted BN, in rounds; returns ``{chain name: (reason, details)}`` of
    the merged chains. A declined chain is left to the affine rules (which report it) and logged here."""
    outcomes: dict[str, tuple[str, dict]] = {}
    progress = True
    while progress:
        progress = False
        for site in read_sites(ws):
            if not targets(site.name) or any(not n.outputs for n in site.nodes):
                continue
            found = find(site, ws, targets)
            if isinstance(found, Fold):
                found.apply()
                what = "→".join(site.ops)
                where = "into the preceding" if found.details["side"] == "after" else "into the following"
                outcomes[site.name] = (f"{what} merged {where} {found.into} (one BatchNormalization left for "
                                       "the BN rules)", {"fold": RULE, **found.details})
                progress = True
            elif isinstance(found, str):
                log.debug("%s: not merged into the adjacent BatchNormalization: %s", site.name, found)
    return outcomes
