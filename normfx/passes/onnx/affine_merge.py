"""An affine chain no layer absorbs: rewrite it as at most one ``Mul`` and one ``Add``.

A GroupNorm(affine=False) export multiplies by ones and adds zeros; Proxy Norm then applies its own
``Mul γ``/``Add β``. Four nodes compute ``x · (1·γ) + (0·γ + β)``: the chain becomes ``Mul γ → Add β``,
and a part that is the identity (scale all ones, shift all zeros) is dropped — a chain that is the
identity altogether disappears, its readers reading its input. Applied only when it removes nodes.
:func:`emit` writes such a ``Mul``/``Add`` pair for the other affine rules too.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from .affine_site import AffineSite
from .rule import Fold
from .workspace import Workspace

__all__ = ["find", "emit", "RULE"]

RULE = "affine_merge"


def emit(
    ws: Workspace, anchor: gs.Node, x: gs.Tensor, y: gs.Tensor, scale: np.ndarray, shift: np.ndarray,
    dtype: np.dtype, base: str, created: Callable[[gs.Node], None] | None = None,
) -> list[gs.Node]:
    """Insert ``y = x · scale + shift`` after ``anchor`` (a Mul unless the scale is all ones, an Add unless the
    shift is all zeros; at least one node). ``y`` must have no producer yet. Returns the new nodes."""
    parts: list[tuple[str, np.ndarray]] = []
    if not np.all(scale == 1.0):
        parts.append(("Mul", scale))
    if not np.all(shift == 0.0):
        parts.append(("Add", shift))
    parts = parts or [("Mul", scale)]  # the identity, where a node must still produce y
    nodes: list[gs.Node] = []
    current = x
    for i, (op, value) in enumerate(parts):
        last = i == len(parts) - 1
        out = y if last else ws.variable_like(f"{y.name}_{op.lower()}", y)
        const = ws.constant(f"{base}.{'scale' if op == 'Mul' else 'shift'}", value.astype(dtype))
        node = gs.Node(op, name=ws.fresh(f"{base}_{op.lower()}"), inputs=[current, const], outputs=[out])
        ws.insert_after(nodes[-1] if nodes else anchor, node)
        nodes.append(node)
        if created is not None:
            created(node)
        current = out
    return nodes


def find(site: AffineSite, ws: Workspace, created: Callable[[gs.Node], None] | None = None) -> Fold | None:
    """The merge of ``site`` into fewer nodes, or None when it is already as short as it can be."""
    needed = site.needed
    if len(site.nodes) <= max(needed, 1 if ws.is_graph_output(site.y) else 0):
        return None
    ones, zeros = site.identity
    what = "the identity" if ones and zeros else "→".join(
        op for op, keep in (("Mul", not ones), ("Add", not zeros)) if keep)
    details = {"pattern": "→".join(site.ops), "merged": len(site.nodes), "into": what}

    def apply() -> None:
        y, x = site.y, site.x
        last = site.nodes[-1]
        if needed == 0 and not ws.is_graph_output(y):
            for tensor in [y] + site.intermediates():
                for reader in list(ws.consumers(tensor)):
                    for i, t in enumerate(reader.inputs):
                        if t is tensor:
                            ws.set_input(reader, i, x)
        else:
            ws.set_output(last, 0, ws.variable_like(f"{y.name}_unmerged", y))
            emit(ws, last, x, y, site.scale_full, site.shift_full, site.dtype, site.name, created)
            for tensor in site.intermediates():
                ws.move_metadata_readers(tensor, y)
        for node in site.nodes:
            ws.remove(node)

    return Fold(RULE, what, apply, details)
