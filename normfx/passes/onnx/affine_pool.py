"""Per-channel affine → pooling: move the affine after the pooling, where it can fold further.

Averaging within a channel commutes with a per-channel affine: ``mean(x · s + t) = mean(x) · s + t``
whenever each output is a weighted mean of inputs of its own channel with weights summing to one. True
for ``GlobalAveragePool``, for ``ReduceMean`` over axes that leave the batch and channel axes alone, and
for ``AveragePool`` without padding or with ``count_include_pad=0`` (padding zeros would otherwise enter
the mean). The max commutes with an *increasing* affine: ``max(x · s + t) = max(x) · s + t`` when every
``s > 0`` (Proxy Norm's ``s = 1 / sqrt(var + ε)`` always is), for ``MaxPool`` (its padding never wins),
``GlobalMaxPool`` and ``ReduceMax``. The affine then runs on the pooled tensor — cheaper — and
``… → ProxyNormAct → MaxPool → Conv`` or a head ``… → GlobalAveragePool → Flatten → Gemm`` folds it into
the layer next round.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from .affine_merge import emit
from .affine_site import AffineSite
from .rule import Decline, Fold
from .workspace import Workspace, node_label

__all__ = ["find", "RULE", "POOLS"]

RULE = "affine_pool"
POOLS = frozenset({"GlobalAveragePool", "ReduceMean", "AveragePool", "GlobalMaxPool", "ReduceMax", "MaxPool"})
_MAX = frozenset({"GlobalMaxPool", "ReduceMax", "MaxPool"})


def _reduce_axes(pool: gs.Node, rank: int, ws: Workspace) -> list[int] | str:
    if "axes" in pool.attrs:
        axes = [int(a) for a in pool.attrs["axes"]]
    elif len(pool.inputs) > 1 and not pool.inputs[1].is_empty():
        value = ws.const(pool.inputs[1], "axes")
        if isinstance(value, str):
            return value
        axes = [int(a) for a in np.asarray(value).reshape(-1)]
    else:
        axes = []
    if not axes:
        if int(pool.attrs.get("noop_with_empty_axes", 0)):
            return []
        return list(range(rank))
    return sorted(a + rank if a < 0 else a for a in axes)


def _why_not(pool: gs.Node, site: AffineSite, ws: Workspace) -> str | None:
    label = node_label(pool)
    if pool.op in _MAX and not np.all(site.scale > 0):
        return f"the affine's scale is not positive in every channel, so it does not commute with {label}'s max"
    if pool.op == "MaxPool" and any(not t.is_empty() and (t.outputs or ws.is_graph_output(t)) for t in pool.outputs[1:]):
        return f"{label}'s Indices output is read"
    if pool.op in ("ReduceMean", "ReduceMax"):
        axes = _reduce_axes(pool, site.rank, ws)
        if isinstance(axes, str):
            return f"{label}: {axes}"
        if 0 in axes or 1 in axes:
            return f"{label} reduces over axes {axes}, across channels or the batch"
    elif pool.op == "AveragePool":
        padded = any(int(p) for p in pool.attrs.get("pads", [])) or str(pool.attrs.get("auto_pad", "NOTSET")) not in (
            "NOTSET", "VALID")
        if int(pool.attrs.get("count_include_pad", 0)) and (padded or int(pool.attrs.get("ceil_mode", 0))):
            return f"{label} counts its zero padding in the mean (count_include_pad=1)"
    return None


def find(site: AffineSite, ws: Workspace, created: Callable[[gs.Node], None] | None = None) -> Fold | Decline | None:
    """Move ``site`` past the average pooling that is its only reader."""
    y = site.y
    readers = ws.data_consumers(y)
    if len(readers) != 1 or ws.is_graph_output(y):
        return None
    pool = readers[0]
    if pool.op not in POOLS or pool.domain or not pool.inputs or pool.inputs[0] is not y or not ws.in_main_graph(pool):
        return None
    if site.scale is None:
        return None  # not a per-channel affine: averaging does not commute with it
    reason = _why_not(pool, site, ws)
    if reason:
        return Decline(RULE, reason)
    out = pool.outputs[0]
    out_dims = ws.shapes.dims(out.name)
    if out_dims is None or len(out_dims) < 2:
        return Decline(RULE, f"the output shape of {node_label(pool)} is unknown")
    rank = len(out_dims)
    shape = (1, site.channels) + (1,) * (rank - 2)
    details = {"pattern": "→".join(site.ops + [pool.op]), "moved past": pool.name or node_label(pool)}

    def apply() -> None:
        x = site.x
        for tensor in [y] + site.intermediates():
            ws.move_metadata_readers(tensor, x)
        ws.set_input(pool, 0, x)
        pooled = ws.variable_like(f"{out.name}_pooled", out)
        ws.set_output(pool, 0, pooled)
        emit(ws, pool, pooled, out, site.scale.reshape(shape), site.shift.reshape(shape), site.dtype, site.name,
             created)
        for node in site.nodes:
            ws.remove(node)

    return Fold(RULE, node_label(pool), apply, details)
