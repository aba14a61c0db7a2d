"""Normalization → per-channel affine: fold the affine into the normalization's own scale and bias.

``(γ x̂ + β) · s + t = (γ s) x̂ + (β s + t)``, exact wherever ``s``/``t`` vary only along the axes the
normalization's scale varies along:

- ``InstanceNormalization`` on ``(N, C, ...)``: scale and B per channel — any per-channel affine folds.
- The GroupNorm pattern of the torch exporters, ``Reshape(x, [N, G, -1]) → InstanceNormalization →
  Reshape back to (N, C, ...)``: the InstanceNormalization's scale/B are per *group*, so the affine after
  the Reshape back folds only when it is constant within each group of ``C / G`` channels
  (e.g. GroupNorm(affine=False)'s own ``Mul 1``/``Add 0``); otherwise declined.
- ``GroupNormalization``: scale/bias per channel from opset 21 (folds), per group in opsets 18–20
  (folds when constant within each group).
- ``LayerNormalization(axis=a)``: scale/B over the normalized axes ``a..``; an affine that varies only
  along those axes folds when the existing scale/B already have those dims (else the fold would
  enlarge them: declined).

The chain of shape ops between the norm and the affine must read nothing else, and the norm's scale and
bias must be constants. A fold gives the norm new initializers (shared ones are never edited).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ...affine import per_group
from ...fold import fold_affine_into_norm
from .affine_site import AffineSite
from .chain import Chain, chain_uses, walk_up
from .edits import input_name, optional_const, pattern, shared_reason
from .rule import Decline, Fold, FoldOptions
from .shapes import dims_text, static_value
from .workspace import Workspace, node_label

__all__ = ["find", "RULE", "NORMS"]

RULE = "norm_affine"
NORMS = frozenset({"InstanceNormalization", "GroupNormalization", "LayerNormalization"})
_RESHAPES = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})


def find(site: AffineSite, ws: Workspace, *, options: FoldOptions = FoldOptions()) -> Fold | Decline | None:
    """The fold of ``site`` into the normalization whose output it reads, if there is one."""
    norm, chain = walk_up(site.x)
    if norm is None or norm.op not in NORMS or norm.domain:
        return None
    label = node_label(norm)

    def decline(reason: str) -> Decline:
        return Decline(RULE, reason)

    reason = chain_uses(chain, norm.outputs[0], site.node, ws)
    if reason:
        return decline(f"{label}: {reason}")
    extra = [t for t in norm.outputs[1:] if not t.is_empty() and (t.outputs or ws.is_graph_output(t))]
    if extra:
        return decline(f"{label}'s optional output {extra[0].name!r} is read (a training pattern)")
    scale = optional_const(norm, 1, "scale", ws)
    bias = optional_const(norm, 2, "bias", ws)
    if scale is None or isinstance(scale, str):
        return decline(scale or f"{label} has no scale input")
    if isinstance(bias, str):
        return decline(bias)
    if norm.op == "LayerNormalization":
        planned = _layer_norm(site, norm, chain, scale, bias, label)
    else:
        planned = _per_channel_or_group(site, norm, chain, scale, bias, label, ws)
    if isinstance(planned, str):
        return decline(planned)
    s, t, how = planned
    reason = shared_reason(norm, (1, 2), ws, options.duplicate_shared)
    if reason:
        return decline(reason)
    new_scale, new_bias = fold_affine_into_norm(scale, bias, s, t, shape=scale.shape)
    dtype = scale.dtype
    details = {"direction": "backward", "into": norm.name or label, "how": how,
               "pattern": pattern(norm.op, *chain.ops, *site.ops)}

    def apply() -> None:
        old = list(norm.inputs[1:3])
        ws.set_input(norm, 1, ws.constant(input_name(norm, 1, "scale"), new_scale.astype(dtype)))
        ws.set_input(norm, 2, ws.constant(input_name(norm, 2, "bias"), new_bias.astype(dtype)))
        take_over(site, chain.nodes[-1] if chain.nodes else norm, ws)
        for tensor in old:
            ws.drop_if_unused(tensor)

    return Fold(RULE, label, apply, details)


def take_over(site: AffineSite, last: gs.Node, ws: Workspace) -> None:
    """``last`` (whose output the chain reads) now produces the chain's output tensor, and the chain goes."""
    y = site.y
    for tensor in [site.x] + site.intermediates():
        ws.move_metadata_readers(tensor, y)
    ws.set_output(last, 0, y)
    for node in site.nodes:
        ws.remove(node)


def _per_channel_or_group(
    site: AffineSite, norm: gs.Node, chain: Chain, scale: np.ndarray, bias: np.ndarray | None, label: str,
    ws: Workspace,
) -> tuple[np.ndarray, np.ndarray, str] | str:
    if site.scale is None:
        return (f"the affine after {label} varies along more than the channel axis 1 "
                f"(constants of shape {tuple(site.scale_full.shape)})")
    channels = site.channels
    if norm.op == "GroupNormalization":
        if chain.nodes:
            return f"shape ops ({'→'.join(chain.ops)}) sit between {label} and the affine"
        groups = int(norm.attrs.get("num_groups", 0))
        if ws.opset >= 21:
            return _vectors(site, scale, bias, channels, label, "per channel")
        return _grouped(site, scale, bias, groups, channels, label, "GroupNormalization-18 scale/bias are per group")
    # InstanceNormalization: per channel on its own output; the GroupNorm pattern maps groups to channels
    if not chain.nodes:
        return _vectors(site, scale, bias, channels, label, "per channel")
    if any(op not in _RESHAPES for op in chain.ops):
        return f"shape ops ({'→'.join(chain.ops)}) between {label} and the affine are not the GroupNorm reshape"
    dout = site.dims
    groups, c = int(scale.shape[0]) if scale.ndim == 1 else None, static_value(dout[1])
    if groups is None or c is None or c % groups or not _batch_kept(norm, dout, ws):
        din = ws.shapes.dims(norm.inputs[0].name)
        return (f"{label} normalizes {dims_text(din) if din else 'a tensor of unknown shape'} and the affine sees "
                f"{dims_text(dout)}: not the GroupNorm pattern (same leading dim, channels a multiple of the groups)")
    why = f"in the GroupNorm pattern {label}'s scale/B are per group ({groups} groups of {c // groups} channels)"
    return _grouped(site, scale, bias, groups, channels, label, why)


def _batch_kept(norm: gs.Node, dout: list, ws: Workspace) -> bool:
    """True when the InstanceNormalization's input keeps the leading (batch) dim of the tensor the affine sees,
    so that group ``g`` of each sample is channels ``g·C/G … (g+1)·C/G − 1`` of the same sample."""
    din = ws.shapes.dims(norm.inputs[0].name)
    if din is not None and len(din) >= 3 and din[0] == dout[0]:
        return True
    reshape = norm.inputs[0].inputs[0] if norm.inputs[0].inputs else None
    if reshape is None or reshape.op != "Reshape" or reshape.domain or len(reshape.inputs) < 2:
        return False
    target = ws.const(reshape.inputs[1])
    if isinstance(target, str) or target.size < 3:
        return False
    first = int(np.asarray(target).reshape(-1)[0])
    source = ws.shapes.dims(reshape.inputs[0].name)
    if first == 0 and not int(reshape.attrs.get("allowzero", 0)):
        return source is not None and len(source) >= 1 and source[0] == dout[0]
    return first > 0 and static_value(dout[0]) == first


def _vectors(
    site: AffineSite, scale: np.ndarray, bias: np.ndarray | None, channels: int, label: str, how: str
) -> tuple[np.ndarray, np.ndarray, str] | str:
    if scale.shape != (channels,) or (bias is not None and bias.shape != (channels,)):
        return f"{label} has scale/bias of shapes {scale.shape}/{None if bias is None else bias.shape}, not ({channels},)"
    return site.scale, site.shift, how


def _grouped(
    site: AffineSite, scale: np.ndarray, bias: np.ndarray | None, groups: int, channels: int, label: str, why: str
) -> tuple[np.ndarray, np.ndarray, str] | str:
    if groups < 1 or scale.shape != (groups,) or (bias is not None and bias.shape != (groups,)):
        return f"{label} has scale/bias of shapes {scale.shape}/{None if bias is None else bias.shape}, not ({groups},)"
    s, t = per_group(site.scale, groups), per_group(site.shift, groups)
    if s is None or t is None:
        return (f"{why}, and the affine varies within a group; kept (one Mul/Add per channel is the "
                "cheapest exact form here)")
    return s, t, "per group"


def _layer_norm(
    site: AffineSite, norm: gs.Node, chain: Chain, scale: np.ndarray, bias: np.ndarray | None, label: str
) -> tuple[np.ndarray, np.ndarray, str] | str:
    if chain.nodes:
        return f"shape ops ({'→'.join(chain.ops)}) sit between {label} and the affine"
    rank = site.rank
    axis = int(norm.attrs.get("axis", -1))
    axis = axis + rank if axis < 0 else axis
    if not 0 <= axis < rank:
        return f"{label} has axis {norm.attrs.get('axis')} for a rank-{rank} input"
    full_s, full_t = site.scale_full, site.shift_full
    outside = [i for i in range(axis) if full_s.shape[i] != 1]
    if outside:
        return (f"the affine varies along axis {outside[0]}, outside the axes {label} normalizes "
                f"({axis}..{rank - 1}); its scale cannot hold that")
    s, t = full_s.reshape(full_s.shape[axis:]), full_t.reshape(full_t.shape[axis:])
    target = scale.shape
    try:
        grown = np.broadcast_shapes(target, s.shape)
        if bias is not None:
            grown = np.broadcast_shapes(grown, bias.shape)
    except ValueError:
        return f"the affine's constants {s.shape} do not broadcast with {label}'s scale {target}"
    if grown != target:
        return (f"{label}'s scale has shape {target}; the affine varies along dims it does not have "
                f"({s.shape}), so folding would enlarge it")
    return np.broadcast_to(s, target), np.broadcast_to(t, target), "over the normalized axes"
