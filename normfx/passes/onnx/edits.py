"""Surgery shared by the fold rules: read a layer's constants, check sharing, take the BN out.

No algebra here (that is :mod:`normfx.fold`); only reading, checking and rewiring.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ...errors import RewriteError
from ...fold import layer_channels
from .bn import BnSite
from .chain import Chain
from .shapes import Dim, dim
from .workspace import Workspace, node_label

__all__ = [
    "optional_const",
    "bias_reason",
    "per_feature",
    "shared_reason",
    "start_dims",
    "bypass_backward",
    "bypass_forward",
    "add_bias_after",
    "pattern",
    "input_name",
]


def optional_const(node: gs.Node, index: int, what: str, ws: Workspace) -> np.ndarray | None | str:
    """Input ``index`` of ``node`` as a floating-point constant, ``None`` when omitted, or why it is
    not one (not constant, or an integer/quantized tensor that a fold cannot rescale)."""
    if len(node.inputs) <= index or node.inputs[index].is_empty():
        return None
    value = ws.const(node.inputs[index], what)
    if isinstance(value, str):
        return f"{node_label(node)}: {value}"
    if value.dtype.kind != "f" and "float" not in value.dtype.name:
        return f"{node_label(node)}: {what} {node.inputs[index].name!r} has dtype {value.dtype}, not floating point"
    return value


@dataclass
class ConvParams:
    """The constant weight and bias of a Conv/ConvTranspose node, its groups and channel counts."""

    weight: np.ndarray
    bias: np.ndarray | None
    groups: int
    cin: int
    cout: int


def conv_params(node: gs.Node, kind: str, ws: Workspace) -> ConvParams | str:
    """Read a Conv/ConvTranspose's constant weight and bias, or the reason they cannot be folded into."""
    label = node_label(node)
    weight = optional_const(node, 1, "weight", ws)
    if weight is None or isinstance(weight, str):
        return weight or f"{label} has no weight input"
    bias = optional_const(node, 2, "bias", ws)
    if isinstance(bias, str):
        return bias
    groups = int(node.attrs.get("group", 1))
    try:
        cin, cout = layer_channels(weight.shape, kind, groups)
    except RewriteError as exc:
        return f"{label}: {exc}"
    return bias_reason(node, bias, cout) or ConvParams(weight, bias, groups, cin, cout)


def bias_reason(node: gs.Node, bias: np.ndarray | None, channels: int) -> str | None:
    """Why a Conv/ConvTranspose bias is not the ``(channels,)`` vector ONNX requires (None when it is)."""
    if bias is None or tuple(bias.shape) == (channels,):
        return None
    return f"{node_label(node)} has a bias of shape {tuple(bias.shape)}, not ({channels},) (an invalid model)"


def per_feature(value: np.ndarray | None, n: int, out_rank: int | None, what: str) -> np.ndarray | None | str:
    """A bias that only varies along the last axis, as an ``(n,)`` float64 vector (None stays None).

    Refuses biases that vary along other axes (rows, positions) — those are no per-feature bias.
    """
    if value is None:
        return None
    shape = tuple(value.shape)
    if out_rank is not None and len(shape) > out_rank:
        return f"{what} has shape {shape}, of higher rank than the output it is added to"
    if out_rank is None and len(shape) > 1:
        return f"{what} has shape {shape} and the output's rank is unknown"
    if any(d != 1 for d in shape[:-1]) or (shape and shape[-1] not in (1, n)):
        return f"{what} has shape {shape}; only a bias of shape (), (1,) or ({n},) along the last axis folds"
    return np.broadcast_to(np.asarray(value, dtype=np.float64).reshape(-1), (n,)).copy()


def shared_reason(node: gs.Node, indices: tuple[int, ...], ws: Workspace, duplicate_shared: bool) -> str | None:
    """With ``duplicate_shared=false``, why a fold into ``node`` is refused (its constants are shared)."""
    if duplicate_shared:
        return None
    for i in indices:
        if len(node.inputs) > i and ws.sharing(node.inputs[i], node):
            others = ws.sharing(node.inputs[i], node)
            return (
                f"{node_label(node)} reads {node.inputs[i].name!r}, which {others} other node(s) share, and "
                "duplicate_shared=false; set duplicate_shared=true to fold into a private copy"
            )
    return None


def start_dims(ws: Workspace, tensor: gs.Tensor, rank: int | None, axis: int | None, channels: int) -> list[Dim] | None:
    """Symbolic shape of ``tensor`` (inferred; else ``rank`` unknown dims), channel dim filled in."""
    dims = ws.shapes.dims(tensor.name)
    if dims is None:
        if rank is None:
            return None
        dims = [dim(None) for _ in range(rank)]
    if axis is not None and 0 <= axis < len(dims) and dims[axis][1]:
        dims[axis] = dim(channels)
    return dims


def bypass_backward(site: BnSite, last: gs.Node, ws: Workspace) -> None:
    """``last`` (the folded layer, or the end of the shape chain after it) now produces the BN's
    output tensor — same name, so graph outputs and consumers are unchanged — and the BN goes."""
    y = site.y
    ws.move_metadata_readers(site.x, y)
    ws.set_output(last, 0, y)
    ws.remove(site.node)


def bypass_forward(site: BnSite, chain: Chain, target: gs.Node, ws: Workspace) -> None:
    """The first op after the BN (chain start or the folded layer) reads the BN's input instead."""
    first = chain.nodes[0] if chain.nodes else target
    ws.set_input(first, 0, site.x)
    ws.move_metadata_readers(site.y, site.x)


def add_bias_after(node: gs.Node, bias: np.ndarray, ws: Workspace, base: str) -> gs.Node:
    """Insert ``Add(node_output, bias)`` right after ``node``; the Add takes over the output tensor."""
    out = node.outputs[0]
    tmp = ws.variable_like(f"{out.name}_prebias", out)
    ws.set_output(node, 0, tmp)
    add = gs.Node("Add", name=ws.fresh(f"{base}_add"), inputs=[tmp, ws.constant(base, bias)], outputs=[out])
    ws.insert_after(node, add)
    return add


def input_name(node: gs.Node, index: int, what: str) -> str:
    """The name of input ``index`` of ``node`` (base for the folded replacement), or ``<node>.<what>``."""
    if len(node.inputs) > index and not node.inputs[index].is_empty():
        return node.inputs[index].name
    return f"{node.name or node.op}.{what}"


def pattern(*parts: str) -> str:
    return "→".join(parts)
