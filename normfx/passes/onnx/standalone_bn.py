"""A BatchNormalization that folds into no neighbour: keep it, and say why.

Measured on onnxruntime CPU (DESIGN.md §4): ORT's own BatchNormalization kernel is cheaper than the
equivalent per-channel ``Mul`` + ``Add`` (1.01–1.23× slower) and no slower than deleting the op, so
the cheapest standalone form *is* the BatchNormalization node. Gains come only from folding it away.
"""

from __future__ import annotations

from .bn import BnSite
from .rule import Decline
from .workspace import Workspace, node_label

__all__ = ["KEPT_NOTE", "reason"]

KEPT_NOTE = "BatchNormalization kept (cheapest standalone form in ORT)"


def _neighbours(site: BnSite, ws: Workspace) -> str:
    x, y = site.x, site.y
    if x.inputs:
        source = f"input from {node_label(x.inputs[0])}"
    else:
        source = f"input {x.name!r} is a graph input" if not ws.is_graph_output(x) else f"input {x.name!r}"
    sinks = [node_label(n) for n in y.outputs[:3]] + (["…"] if len(y.outputs) > 3 else [])
    if ws.is_graph_output(y):
        sinks.append("the graph output")
    return f"{source}; output to {', '.join(sinks) or 'nothing'}"


def reason(site: BnSite, declines: list[Decline], ws: Workspace, *, forward: bool) -> str:
    """The report reason for a BN left standalone: the rules' own reasons, else its neighbourhood."""
    seen: list[str] = []
    for d in declines:
        if d.reason not in seen:
            seen.append(d.reason)
    if seen:
        text = "; ".join(seen)
    else:
        text = f"no adjacent Conv/ConvTranspose/Gemm/MatMul to fold into ({_neighbours(site, ws)})"
    if not forward:
        text += "; forward folding into the next layer is off (forward=false)"
    return f"{text}; {KEPT_NOTE}"
