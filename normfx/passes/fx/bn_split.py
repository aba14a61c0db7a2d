"""Rule: BatchNorm → channel split → Conv / ConvTranspose / Linear per piece folds forward, slice by slice.

``torch.split`` / ``torch.chunk`` / ``x.split`` / ``x.chunk`` on dim 1 (pieces taken with ``[i]``) and channel
slicing ``x[:, a:b]`` hand each piece the BN's channels ``index``; the affine restricted to them folds into the
layer reading that piece (``fold_bn_before``), with the forward fold's own decision per piece
(:func:`.forward_fold.check`: padded convs need ``border_correction``, a Linear a proven 2-D input, …). Every
piece that is read must fold, else the BN is kept with the reasons.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
from torch import fx, nn

from ...errors import RewriteError
from ...slices import channel_axis, chunk_sizes, concat_ranges, restrict, slice_channels, split_sizes
from . import forward_fold
from .graph_state import GraphState
from .patterns import BnSite, describe_node

__all__ = ["check", "apply"]

_SPLIT_FUNCTIONS = {torch.split: "split", torch.chunk: "chunk", torch.functional.split: "split"}
_SPLIT_METHODS = {"split": "split", "chunk": "chunk"}
_ARG_NAMES = {"split": ("split_size_or_sections", "split_size"), "chunk": ("chunks",)}


def _split_call(node: fx.Node, bn: fx.Node) -> tuple[str, object, object] | None:
    """``(kind, size argument, dim)`` when ``node`` splits ``bn``'s output, else None."""
    if node.op == "call_function" and node.target in _SPLIT_FUNCTIONS:
        kind = _SPLIT_FUNCTIONS[node.target]
    elif node.op == "call_method" and node.target in _SPLIT_METHODS:
        kind = _SPLIT_METHODS[node.target]
    else:
        return None
    args = list(node.args)
    if not args or args[0] is not bn:
        return None
    size = args[1] if len(args) > 1 else next((node.kwargs[k] for k in _ARG_NAMES[kind] if k in node.kwargs), None)
    dim = args[2] if len(args) > 2 else node.kwargs.get("dim", 0)
    return kind, size, dim


def _slice_index(node: fx.Node, bn: fx.Node, channels: int) -> np.ndarray | str | None:
    """The channels ``bn_output[:, a:b:c]`` reads, why such an indexing is no channel slice, or None."""
    if node.op != "call_function" or node.target is not operator.getitem or node.args[0] is not bn:
        return None
    key = node.args[1]
    key = key if isinstance(key, tuple) else (key,)
    full = slice(None, None, None)
    if len(key) < 2 or key[0] != full or not isinstance(key[1], slice):
        return f"{node.name} indexes the BN output with {key!r}, not a channel slice [:, a:b]"
    if any(k is not Ellipsis and k != full for k in key[2:]):
        return f"{node.name} also slices the spatial axes ({key!r}), which the next layer's fold does not follow"
    s = key[1]
    if any(isinstance(v, fx.Node) for v in (s.start, s.stop, s.step)):
        return f"{node.name} slices channels with bounds computed at run time"
    return slice_channels(channels, s.start, s.stop, s.step)


def _pieces(state: GraphState, site: BnSite) -> list[tuple[fx.Node, np.ndarray]] | str:
    """Every piece of the BN output (node, channel indices), "" when no user splits it, or why not."""
    bn, channels = site.node, len(site.scale)
    pieces: list[tuple[fx.Node, np.ndarray]] = []
    found, others = False, []
    for user in site.node.users:
        index = _slice_index(user, bn, channels)
        if isinstance(index, str):
            return index
        if index is not None:
            found = True
            pieces.append((user, index))
            continue
        call = _split_call(user, bn)
        if call is None:
            others.append(describe_node(state.gm, user))
            continue
        found = True
        kind, size, dim = call
        if not isinstance(dim, int) or not isinstance(size, (int, list, tuple)) or (
                isinstance(size, (list, tuple)) and not all(isinstance(v, int) for v in size)):
            return f"{describe_node(state.gm, user)} on the BN output has arguments computed at run time"
        rank = _bn_rank(state, site) or _consumer_rank(state, user)
        on_channels = channel_axis(dim, rank)
        if not on_channels:
            where = f"dim={dim}" + ("" if on_channels is False else " with the rank unknown")
            return f"the BN output is split on {where}, not the channel axis 1"
        try:
            sizes = chunk_sizes(channels, size) if kind == "chunk" else split_sizes(channels, size)
        except RewriteError as exc:
            return f"{describe_node(state.gm, user)}: {exc}"
        ranges = concat_ranges(sizes)
        for piece in user.users:
            if piece.op != "call_function" or piece.target is not operator.getitem or not isinstance(piece.args[1], int):
                return (f"the pieces of {describe_node(state.gm, user)} are used as a whole by "
                        f"{describe_node(state.gm, piece)}, not one by one")
            pieces.append((piece, ranges[piece.args[1]]))
    if not found:
        return ""
    if others:
        return f"the BN output also goes to {', '.join(others)}, not only to a channel split"
    return pieces


def _bn_rank(state: GraphState, site: BnSite) -> int | None:
    """The rank a BatchNorm2d/3d module call implies (None for BatchNorm1d and functional calls)."""
    if site.node.op != "call_module":
        return None
    module = state.gm.get_submodule(site.node.target)
    return next((rank for cls, rank in ((nn.BatchNorm2d, 4), (nn.BatchNorm3d, 5)) if isinstance(module, cls)), None)


def _consumer_rank(state: GraphState, split: fx.Node) -> int | None:
    """The rank the split's pieces have, read off the conv layers that consume them (None if unknown)."""
    for piece in split.users:
        for user in piece.users:
            layer = state.layer(user)
            if layer is not None and layer.kind != "linear":
                return layer.module.weight.dim()
    return None


def check(state: GraphState, site: BnSite) -> list[tuple[BnSite, fx.Node, np.ndarray]] | str:
    """One (piece site, layer node, channels) per read piece, "" when the BN output is not split, or why it is declined."""
    pieces = _pieces(state, site)
    if isinstance(pieces, str):
        return pieces
    if site.post:
        return f"the BN applies {', '.join(site.post)} after normalizing, which cannot move into the split's layers"
    plans, reasons = [], []
    for piece, index in pieces:
        if not piece.users:
            continue  # a piece nobody reads: nothing to fold
        scale, shift = restrict(site.scale, site.shift, index)
        sub = BnSite(piece, site.name, scale, shift)
        layer_node, why = forward_fold.check(state, sub, noun=f"BN slice {_span(index)}")
        if layer_node is None:
            reasons.append(why)
        else:
            plans.append((sub, layer_node, index))
    if reasons:
        for _, layer_node, _ in plans:  # no fold: forget the border responses the checks computed
            state.responses.pop(layer_node, None)
        return "split pieces do not all fold: " + "; ".join(reasons)
    if not plans:
        return "no piece of the split BN output is read"
    return plans


def _span(index: np.ndarray) -> str:
    if len(index) and np.array_equal(index, np.arange(index[0], index[-1] + 1)):
        return f"[{int(index[0])}:{int(index[-1]) + 1}]"
    return str([int(i) for i in index])


def _fold_piece(state: GraphState, sub: BnSite, layer_node: fx.Node) -> str:
    """:func:`forward_fold.fold_into` for one piece, without taking any node out (the BN goes once all pieces
    folded); returns how the piece is named in the reason."""
    folded = forward_fold.fold_into(state, sub.scale, sub.shift, layer_node)
    name = folded["into"]
    if "border_correction" in folded:
        name += f" (border correction, {folded['border_correction']})"
    return name + (f" ({folded['note']})" if "note" in folded else "")


def apply(state: GraphState, site: BnSite, plans: list[tuple[BnSite, fx.Node, np.ndarray]]) -> tuple[str, dict]:
    """Fold every piece into its layer, then make the split read the BN's input. Returns reason and details."""
    slices = [f"{_fold_piece(state, sub, node)} {_span(index)}" for sub, node, index in plans]
    into = [state.part.qualified(str(node.target)) for _, node, _ in plans]
    state.remove_bn(site, site.input_node)
    return (f"folded slice by slice into {', '.join(slices)}",
            {"into": into, "direction": "forward", "slices": slices})

