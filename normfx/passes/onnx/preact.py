"""Pre-activation BatchNormalization → Relu/Clip(0, 6)/LeakyRelu/PRelu → Conv/Gemm on ONNX (the twin of
:mod:`normfx.passes.fx.preact`, same math from :mod:`normfx.preact`).

Runs on the BNs every other rule left: the scale moves through the activation into the Conv/Gemm nodes reading
it (through GlobalAveragePool/AveragePool and Flatten too), the shift becomes an offset the tensor the BN reads
carries, solved over the graph (:mod:`.offsets`). A BN whose offset contradicts another reader's is kept,
re-parameterized for what its input now carries. Where a BN channel's scale is negative, ReLU becomes a
per-channel clamp to ``[0, ∞)`` or ``(-∞, 0]``: ONNX ``Clip`` takes scalar bounds only, so it is written
``s·relu(s·z)`` — a ``Mul`` by ±1 before the ``Relu``, the outer sign folded into the consumers (measured in
onnxruntime on ``preact_resnet``: 0.98× the original's latency, where a ``Max`` + ``Min`` pair cost 1.06×;
the fx route keeps it one ``torch.clamp``). ReLU6 with moved clips stays a ``Max`` + ``Min`` pair.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from ...errors import RewriteError
from ...fold import fold_bn_before
from ...preact import (
    ActivationSplit,
    OffsetSolver,
    activation_reference,
    reparameterize_bn,
    sign_flip,
    split_activation,
)
from ...report import APPLIED, SKIPPED
from .bn import BnSite
from .offsets import Region, carried_by, layer_of, set_layer
from .standalone_bn import KEPT_NOTE
from .workspace import Workspace, node_label

__all__ = ["Candidate", "match", "reader_layers", "run"]

_LINEAR_STEPS = ("GlobalAveragePool", "AveragePool", "Flatten")


@dataclass
class Candidate:
    site: BnSite
    act: gs.Node
    kind: str
    slope: np.ndarray | None
    consumers: list[tuple[gs.Node, int, bool]] = field(default_factory=list)  # (layer node, repeat, padded path)
    rank: int = 4


def _activation(node: gs.Node, ws: Workspace) -> tuple[str | None, np.ndarray | None, str]:
    op = node.op if not node.domain else ""
    if op == "Relu":
        return "relu", None, ""
    if op == "LeakyRelu":
        return "leaky_relu", np.array([float(node.attrs.get("alpha", 0.01))]), ""
    if op == "PRelu":
        slope = ws.const(node.inputs[1])
        if isinstance(slope, str) or slope.size == 0:
            return None, None, "PRelu slope is not a constant"
        return "prelu", np.asarray(slope, dtype=np.float64).reshape(-1), ""
    if op == "Clip":
        bounds = [ws.const(t) if len(node.inputs) > i and not t.is_empty() else None
                  for i, t in enumerate(node.inputs[1:3], start=1)]
        if len(bounds) == 2 and not any(isinstance(b, str) or b is None for b in bounds) and \
                (float(bounds[0]), float(bounds[1])) == (0.0, 6.0):
            return "relu6", None, ""
        return None, None, "Clip with bounds other than (0, 6)"
    return None, None, f"{node_label(node)} is not Relu/Clip(0, 6)/LeakyRelu/PRelu"


def reader_layers(tensor: gs.Tensor, ws: Workspace, channels: int, padded: bool = False) -> tuple[list, str]:
    found = []
    if ws.is_graph_output(tensor):
        return [], "the activation output is a graph output"
    for user in ws.consumers(tensor):
        layer = layer_of(user, ws)
        if layer is not None:
            if user.inputs[0] is not tensor or layer.cin % channels or (layer.kind == "conv" and layer.cin != channels):
                return [], f"the activation output reaches {node_label(user)} other than as its {channels}-channel input"
            found.append((user, layer.cin // channels, padded or layer.padded))
            continue
        if user.domain or user.op not in _LINEAR_STEPS or (user.op == "Flatten" and int(user.attrs.get("axis", 1)) != 1):
            return [], f"the activation output goes to {node_label(user)}, not only to Conv/Gemm"
        pads = any(int(p) for p in user.attrs.get("pads", [])) if user.op == "AveragePool" else False
        more, why = reader_layers(user.outputs[0], ws, channels, padded or pads)
        if why:
            return [], why
        found.extend(more)
    return (found, "") if found else ([], "the activation output reaches no Conv/Gemm")


def match(site: BnSite, ws: Workspace) -> Candidate | str:
    users = ws.consumers(site.y)
    if len(users) != 1 or ws.is_graph_output(site.y):
        return f"the BatchNormalization output goes to {len(users)} places, not to one activation"
    act = users[0]
    kind, slope, why = _activation(act, ws)
    if kind is None:
        return why
    consumers, why = reader_layers(act.outputs[0], ws, site.channels)
    if why:
        return why
    dims = ws.shapes.raw(site.x.name)
    rank = len(dims) if dims is not None else (layer_of(consumers[0][0], ws).weight.ndim)
    constant = np.where(site.scale == 0, activation_reference(kind, site.shift, slope), 0.0)
    if np.any(constant != 0) and any(padded for _, _, padded in consumers):
        return "a channel with BN scale 0 is the constant act(shift) ≠ 0, which is not a bias through zero padding"
    return Candidate(site, act, kind, slope, consumers, rank)


def run(pending: list[BnSite], ws: Workspace, decisions: dict[str, tuple[str, str, dict[str, Any]]]) -> None:
    """Fold the pre-activation BNs among ``pending`` (removed from it, with their decisions); the others stay."""
    candidates = [c for c in (match(site, ws) for site in pending) if not isinstance(c, str)]
    if not candidates:
        return
    region = Region(ws, [c.site for c in candidates])
    if region.reason:
        for c in candidates:
            decisions[c.site.name] = (SKIPPED, f"pre-activation fold: {region.reason}; {KEPT_NOTE}", {})
            pending.remove(c.site)
        return
    solver = OffsetSolver()
    region.describe(solver, {id(c.site): c.kind for c in candidates})
    solution = solver.solve()
    region.apply_streams(solution)
    for c in candidates:
        a, o = solution.scale[c.site.x.name], solution.offset[c.site.x.name]
        why = solution.kept.get(id(c.site), "")
        split = None
        if not why:
            try:
                split = split_activation(c.site.scale, c.site.shift, c.kind, slope=c.slope, stream_scale=a)
            except RewriteError as exc:
                why = str(exc)
        if split is None:
            _keep(c.site, a, o, ws)
            decisions[c.site.name] = (SKIPPED, f"pre-activation BN kept: {why}; {KEPT_NOTE}", {})
        else:
            carriers = carried_by(ws, c.site.x)
            into = _fold(c, split, ws)
            details = {"direction": "pre-activation", "into": into}
            decisions[c.site.name] = (APPLIED, f"pre-activation: scale into {', '.join(into)}, shift carried by "
                                      f"{carriers}", details)
        pending.remove(c.site)


def _keep(site: BnSite, a: np.ndarray, o: np.ndarray, ws: Workspace) -> None:
    if np.all(a == 1) and np.all(o == 0):
        return
    node = site.node
    scale, mean = ws.const(node.inputs[1]), ws.const(node.inputs[3])
    new_mean, new_scale = reparameterize_bn(mean, scale, a, o)
    ws.set_input(node, 1, ws.constant(node.inputs[1].name, new_scale.astype(scale.dtype)))
    ws.set_input(node, 3, ws.constant(node.inputs[3].name, new_mean.astype(mean.dtype)))


def _const(ws: Workspace, base: str, values: np.ndarray, rank: int, dtype) -> gs.Constant:
    return ws.constant(base, values.reshape((-1,) + (1,) * (rank - 2)).astype(dtype))


def _fold(c: Candidate, split: ActivationSplit, ws: Workspace) -> list[str]:
    site, act = c.site, c.act
    dtype = layer_of(c.consumers[0][0], ws).weight.dtype
    ws.set_input(act, 0, site.x)
    ws.remove(site.node)
    base = act.name or "preact"
    gain = split.gain
    if split.clamp:
        top = np.inf if c.kind == "relu" else 6.0
        sign = sign_flip(split.lower, split.upper, split.gain) if c.kind == "relu" else None
        if not (np.all(split.lower == 0) and np.all(split.upper == top)):
            out = act.outputs[0]
            if sign is not None:  # s·relu(s·z): a Mul by ±1, the Relu, the outer s into the consumers
                act.op, act.attrs = "Mul", {}
                ws.truncate_inputs(act, 1)
                ws.set_input(act, 1, _const(ws, f"{base}_sign", sign, c.rank, dtype))
                mid = ws.variable_like(f"{out.name}_signed", out)
                ws.set_output(act, 0, mid)
                ws.insert_after(act, gs.Node("Relu", name=ws.fresh(f"{base}_relu"), inputs=[mid], outputs=[out]))
                gain = split.gain * sign
            elif np.all(split.lower == 0):  # ReLU, then the per-channel upper bound
                act.op, act.attrs = "Relu", {}
                ws.truncate_inputs(act, 1)
            else:
                act.op, act.attrs = "Max", {}
                ws.truncate_inputs(act, 1)
                ws.set_input(act, 1, _const(ws, f"{base}_min", split.lower, c.rank, dtype))
            if sign is None and np.any(np.isfinite(split.upper)):
                mid = ws.variable_like(f"{out.name}_lower", out)
                ws.set_output(act, 0, mid)
                upper = gs.Node("Min", name=ws.fresh(f"{base}_max"),
                                inputs=[mid, _const(ws, f"{base}_max", split.upper, c.rank, dtype)], outputs=[out])
                ws.insert_after(act, upper)
    else:
        original = c.slope if c.slope.size == split.slope.size else np.full(split.slope.size, c.slope[0])
        if not np.array_equal(split.slope, original):
            act.op, act.attrs = "PRelu", {}
            ws.truncate_inputs(act, 1)
            ws.set_input(act, 1, _const(ws, f"{base}_slope", split.slope, c.rank, dtype))
    into = []
    for node, repeat, _ in c.consumers:
        layer = layer_of(node, ws)
        weight, bias = fold_bn_before(layer.weight, layer.bias, np.repeat(gain, repeat),
                                      np.repeat(split.constant, repeat), kind=layer.kind, groups=layer.groups)
        set_layer(layer, weight, bias, ws)
        into.append(node.name or node_label(node))
    return into
