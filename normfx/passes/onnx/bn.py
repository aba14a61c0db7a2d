"""A BatchNormalization node read as the per-channel affine it computes in inference mode.

:func:`read_bn` checks the node is foldable at all — inference mode, constant parameters and
statistics, per-channel (``spatial``) statistics — and returns its ``(scale, shift)`` from
:func:`normfx.fold.bn_affine`, or the reason it cannot be folded anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ...errors import RewriteError
from ...fold import bn_affine
from .workspace import Workspace

__all__ = ["BnSite", "read_bn"]

_PARAMS = ("scale", "B", "input_mean", "input_var")


@dataclass(eq=False)
class BnSite:
    """A foldable BatchNormalization: ``y = x * scale + shift`` along axis 1 (float64 vectors)."""

    node: gs.Node
    name: str
    scale: np.ndarray
    shift: np.ndarray

    @property
    def channels(self) -> int:
        return int(self.scale.shape[0])

    @property
    def x(self) -> gs.Tensor:
        return self.node.inputs[0]

    @property
    def y(self) -> gs.Tensor:
        return self.node.outputs[0]


def _training_reason(node: gs.Node, ws: Workspace) -> str | None:
    """Why ``node`` is (or acts as) a training-mode BN, if it is.

    opset < 7: ``is_test=0`` (the default) is training. opset 7–13: declaring the optional outputs
    (running/saved statistics) selects training mode. opset >= 14: ``training_mode=1`` does; the
    optional outputs are then only meaningful in training, and a graph that reads them is refused.
    """
    attrs, opset = node.attrs, ws.opset
    if opset < 7 and int(attrs.get("is_test", 0)) == 0:
        return "BatchNormalization is in training mode (is_test=0): it normalizes with batch statistics"
    if opset >= 14 and int(attrs.get("training_mode", 0)) != 0:
        return "BatchNormalization is in training mode (training_mode=1): it normalizes with batch statistics"
    extra = [t for t in node.outputs[1:] if not t.is_empty()]
    if opset < 14 and extra:
        return (
            f"BatchNormalization declares {len(extra)} extra output(s) ({', '.join(repr(t.name) for t in extra)}): "
            f"in opset {opset} that is training mode (batch statistics); export the model in eval mode"
        )
    used = [t for t in extra if t.outputs or ws.is_graph_output(t)]
    if used:
        return (
            f"the BatchNormalization's running-statistics output(s) {', '.join(repr(t.name) for t in used)} are read "
            "by the graph (a training-mode pattern); folding would remove them"
        )
    return None


def read_bn(node: gs.Node, name: str, ws: Workspace) -> BnSite | str:
    """The affine of BN ``node`` (named ``name`` in the report), or why it cannot be folded."""
    reason = _training_reason(node, ws)
    if reason:
        return reason
    if ws.opset < 9 and int(node.attrs.get("spatial", 1)) == 0:
        return "BatchNormalization has spatial=0 (statistics per element, not per channel); not folded"
    if len(node.inputs) < 5 or not node.outputs or node.outputs[0].is_empty():
        return "BatchNormalization node is malformed (needs X, scale, B, mean, var and an output Y)"
    values = []
    for key, tensor in zip(_PARAMS, node.inputs[1:5]):
        value = ws.const(tensor, key)
        if isinstance(value, str):
            return f"parameter {value}; only constant parameters and statistics can be folded"
        values.append(value)
    scale, bias, mean, var = values
    shapes = {v.shape for v in values}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        return f"BatchNormalization parameters have shapes {sorted(map(tuple, shapes))}; expected one (C,) vector each"
    eps = float(node.attrs.get("epsilon", 1e-5))
    try:
        s, t = bn_affine(mean, var, scale, bias, eps=eps)
    except RewriteError as exc:
        return str(exc)
    return BnSite(node=node, name=name, scale=s, shift=t)
