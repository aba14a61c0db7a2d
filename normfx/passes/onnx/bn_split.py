"""BatchNormalization → Split / Slice on the channel axis → Conv / ConvTranspose / Gemm per piece: fold forward,
slice by slice.

Each piece of the BN output (an output of a ``Split`` on axis 1, or a ``Slice`` of axis 1 only) carries the BN
restricted to its channels; that restriction folds into every layer reading the piece with the forward rules
themselves (:func:`.forward.plan_forward` with :mod:`.bn_conv` / :mod:`.bn_gemm`: padded convs need
``border_correction``, …). The Split/Slice then reads the BN's input. Every piece that is read must fold, else
the whole fold is declined with the reason (the BN is kept).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from ...errors import RewriteError
from ...slices import channel_axis, concat_ranges, onnx_split_sizes, restrict, slice_channels
from . import bn_conv, bn_gemm
from .chain import Chain
from .edits import bypass_forward, pattern
from .forward import BN_SITE, SiteKind, applied_details, plan_forward
from .rule import Decline, Fold, FoldOptions
from .workspace import Workspace, node_label

__all__ = ["find", "RULE"]

RULE = "bn_split"
_LAYER_FINDS = (bn_conv.find, bn_gemm.find)


@dataclass(eq=False)
class _Piece:
    """One piece of the BN output as a site of its own: the BN's affine on ``index``, read from ``tensor``."""

    tensor: gs.Tensor
    index: np.ndarray
    scale: np.ndarray
    shift: np.ndarray
    name: str

    @property
    def channels(self) -> int:
        return int(self.scale.shape[0])

    @property
    def x(self) -> gs.Tensor:  # the piece stays where it is: the layers keep reading it
        return self.tensor

    @property
    def y(self) -> gs.Tensor:
        return self.tensor


def _ints(node: gs.Node, index: int, attr: str, ws: Workspace) -> list[int] | None | str:
    """An int-vector argument given as input ``index`` (newer opsets) or attribute ``attr`` (older ones)."""
    if attr in node.attrs:
        return [int(v) for v in node.attrs[attr]]
    if len(node.inputs) > index and not node.inputs[index].is_empty():
        value = ws.const(node.inputs[index], attr)
        if isinstance(value, str):
            return f"{node_label(node)}: {value}"
        return [int(v) for v in np.asarray(value).reshape(-1)]
    return None


def _split_pieces(target: gs.Node, channels: int, rank: int | None, ws: Workspace) -> list | str:
    axis = int(target.attrs.get("axis", 0))
    on_channels = channel_axis(axis, rank)
    if not on_channels:
        return f"{node_label(target)} splits axis {axis}{'' if on_channels is False else ' (rank unknown)'}, not the channel axis 1"
    split = _ints(target, 1, "split", ws)
    if isinstance(split, str):
        return split
    try:
        sizes = onnx_split_sizes(channels, len(target.outputs), split)
    except RewriteError as exc:
        return f"{node_label(target)}: {exc}"
    return list(zip(target.outputs, concat_ranges(sizes)))


def _slice_pieces(target: gs.Node, channels: int, rank: int | None, ws: Workspace) -> list | str:
    label = node_label(target)
    starts, ends = _ints(target, 1, "starts", ws), _ints(target, 2, "ends", ws)
    axes, steps = _ints(target, 3, "axes", ws), _ints(target, 4, "steps", ws)
    for value in (starts, ends, axes, steps):
        if isinstance(value, str):
            return value
    if starts is None or ends is None:
        return f"{label} has no constant starts/ends"
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    index = np.arange(channels)
    for a, start, end, step in zip(axes, starts, ends, steps):
        on_channels = channel_axis(a, rank)
        if on_channels is None:
            return f"{label} slices axis {a} of a tensor of unknown rank"
        if on_channels:
            index = slice_channels(channels, start, end, step)
        elif not (start == 0 and step == 1 and end >= 2**31 - 1):
            return f"{label} also slices axis {a}, which the next layer's fold does not follow"
    return [(target.outputs[0], index)]


def _span(index: np.ndarray) -> str:
    if len(index) and np.array_equal(index, np.arange(index[0], index[-1] + 1)):
        return f"[{int(index[0])}:{int(index[-1]) + 1}]"
    return str([int(i) for i in index])


def find(
    site: Any, ws: Workspace, target: gs.Node, tin: gs.Tensor, chain: Chain, *,
    options: FoldOptions = FoldOptions(), kind: SiteKind = BN_SITE,
) -> Fold | Decline | None:
    """The slice-by-slice forward fold of ``site`` through Split/Slice ``target`` (reading ``tin``)."""
    if target.op not in ("Split", "Slice") or target.domain:
        return None
    label = node_label(target)
    if chain.nodes:
        return Decline(RULE, f"the {kind.short} output reaches {label} through {'→'.join(chain.ops)}; "
                             "only a Split/Slice reading it directly is folded slice by slice")
    if not target.inputs or target.inputs[0] is not tin or any(t is tin for t in target.inputs[1:]):
        return Decline(RULE, f"the {kind.noun} feeds a parameter of {label}, not its data input")
    dims = ws.shapes.dims(tin.name)
    rank = len(dims) if dims is not None else None
    read = _split_pieces if target.op == "Split" else _slice_pieces
    pieces = read(target, site.channels, rank, ws)
    if isinstance(pieces, str):
        return Decline(RULE, pieces)
    plans: list[tuple[Fold, np.ndarray]] = []
    for tensor, index in pieces:
        if tensor.is_empty() or not (ws.data_consumers(tensor) or ws.is_graph_output(tensor)):
            continue  # nothing reads this piece
        scale, shift = restrict(site.scale, site.shift, index)
        piece = _Piece(tensor, index, scale, shift, site.name)
        noun = f"{kind.noun} slice {_span(index)}"
        result = plan_forward(piece, ws, _LAYER_FINDS, options, noun=noun, remove=lambda: None)
        if isinstance(result, Fold):
            plans.append((result, index))
            continue
        reasons = "; ".join(d.reason for d in result) or (
            f"the {noun} goes to {', '.join(node_label(n) for n in ws.data_consumers(tensor))}, "
            "not a Conv/ConvTranspose/Gemm/MatMul")
        return Decline(RULE, f"{label} piece {tensor.name!r}: {reasons}")
    if not plans:
        return Decline(RULE, f"no piece of {label} is read")
    slices = [f"{plan.into} {_span(index)}" for plan, index in plans]
    details: dict[str, Any] = {
        "direction": "forward", "into": [plan.details.get("into") for plan, _ in plans],
        "pattern": pattern(kind.noun, target.op, "|".join(_layer_ops(plan for plan, _ in plans))), "slices": slices,
    }

    def apply() -> None:
        added = []
        for plan, _ in plans:
            plan.apply()
            added += [a for a in np.atleast_1d(applied_details(plan).get("added", [])).tolist() if a]
        bypass_forward(site, chain, target, ws)
        if added:
            details["added"] = added

    return Fold(RULE, ", ".join(slices), apply, details)


def _layer_ops(plans) -> list[str]:
    """The layer ops the pieces fold into (the last step of each plan's pattern)."""
    ops: list[str] = []
    for plan in plans:
        found = plan.details.get("pattern", [])
        for text in [found] if isinstance(found, str) else found:
            op = str(text).split("→")[-1]
            if op and op not in ops:
                ops.append(op)
    return ops
