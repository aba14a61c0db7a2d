"""Elementwise affine chains (``Mul``/``Add``/``Sub``/``Div`` by constants) read as one ``x * scale + shift``.

A chain is a maximal run of such nodes in the main graph, each reading the previous one's output as
its data operand and the next being that output's only reader (tensors that only Shape/CastLike read
do not break it). :func:`read_sites` returns each chain as an :class:`AffineSite`, the affine twin of
:class:`~.bn.BnSite`: where its constants vary along the channel axis 1 only, it has the per-channel
``scale``/``shift`` vectors the BatchNormalization rules read, so the forward folds
(:mod:`.bn_conv`, :mod:`.bn_gemm`) serve both. The math is :mod:`normfx.affine`.

A chain whose constants would *grow* the data (broadcast it to a larger shape), or whose data shape
is not known well enough to prove they do not, is no site.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from ...affine import AFFINE_OPS, align, along_axis, compose, grows, is_identity
from .shapes import Dim, static_value
from .workspace import Workspace

__all__ = ["Step", "AffineSite", "affine_step", "read_sites", "entry_name", "LINEAR_OPS"]

LINEAR_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
_SAME_SHAPE = frozenset({"GroupNormalization", "LayerNormalization", "InstanceNormalization"})


@dataclass
class Step:
    """One affine node: its data operand index and its constant."""

    node: gs.Node
    data_index: int
    const: np.ndarray

    @property
    def op(self) -> str:
        return self.node.op


def _leaf_constant(tensor: gs.Tensor) -> bool:
    """An initializer or a Constant node's output (computed constants are initializers by the time the affine
    rules run: :mod:`.constant_subgraph` goes first)."""
    if isinstance(tensor, gs.Constant):
        return True
    return bool(tensor.inputs) and tensor.inputs[0].op == "Constant" and not tensor.inputs[0].domain


def affine_step(node: gs.Node, ws: Workspace) -> Step | None:
    """``node`` as an affine step (one floating-point constant operand, one run-time operand), or None."""
    if node.domain or node.op not in AFFINE_OPS or len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    if not ws.in_main_graph(node) or node.inputs[0] is node.inputs[1]:
        return None
    consts = [i for i, t in enumerate(node.inputs) if _leaf_constant(t)]
    if len(consts) != 1:
        return None
    ci = consts[0]
    const = ws.const(node.inputs[ci])
    if isinstance(const, str):  # a graph input (overridable), unreadable external data
        return None
    if const.dtype.kind != "f" or const.size == 0 or not np.all(np.isfinite(const.astype(np.float64))):
        return None
    if node.op == "Div" and (ci == 0 or np.any(const == 0)):
        return None
    return Step(node, 1 - ci, const)


@dataclass(eq=False)
class AffineSite:
    """A chain ``y = x * scale + shift``; ``scale_full``/``shift_full`` broadcast against the data
    (aligned to its rank), ``scale``/``shift`` are the per-channel (axis 1) vectors when there are."""

    steps: list[Step]
    name: str
    dims: list[Dim]
    scale_full: np.ndarray
    shift_full: np.ndarray
    dtype: np.dtype
    scale: np.ndarray | None = None  # (C,) float64 along axis 1, or None
    shift: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def nodes(self) -> list[gs.Node]:
        return [s.node for s in self.steps]

    @property
    def node(self) -> gs.Node:
        return self.steps[0].node

    @property
    def x(self) -> gs.Tensor:
        first = self.steps[0]
        return first.node.inputs[first.data_index]

    @property
    def y(self) -> gs.Tensor:
        return self.steps[-1].node.outputs[0]

    @property
    def rank(self) -> int:
        return len(self.dims)

    @property
    def channels(self) -> int:
        return int(self.scale.shape[0]) if self.scale is not None else 0

    @property
    def per_channel(self) -> bool:
        return self.scale is not None

    @property
    def ops(self) -> list[str]:
        return [s.op for s in self.steps]

    @property
    def identity(self) -> tuple[bool, bool]:
        return is_identity(self.scale_full, self.shift_full)

    @property
    def needed(self) -> int:
        """Nodes the chain needs at least: a Mul unless the scale is 1, an Add unless the shift is 0."""
        ones, zeros = self.identity
        return int(not ones) + int(not zeros)

    @property
    def scalar(self) -> bool:
        """True when every constant of the chain is a single number."""
        return all(s.const.size == 1 for s in self.steps)

    def label(self) -> str:
        return "→".join(f"{n.op} {n.name!r}" for n in self.nodes)

    def intermediates(self) -> list[gs.Tensor]:
        """The data tensors inside the chain (the input of every node but the first)."""
        return [s.node.inputs[s.data_index] for s in self.steps[1:]]


def entry_name(node: gs.Node) -> str:
    """The report name of a node: its name, or (unnamed) its op and output tensor, which is unique."""
    if node.name:
        return node.name
    out = node.outputs[0].name if node.outputs else "?"
    return f"{node.op} → {out}"


def _chain_next(step: Step, steps: dict[int, Step], ws: Workspace) -> Step | None:
    out = step.node.outputs[0]
    if ws.is_graph_output(out):
        return None
    readers = ws.data_consumers(out)
    if len(readers) != 1:
        return None
    nxt = steps.get(id(readers[0]))
    if nxt is None or nxt.node.inputs[nxt.data_index] is not out:
        return None
    return nxt


def _read(chain: list[Step], ws: Workspace, name: str) -> AffineSite | None:
    x = chain[0].node.inputs[chain[0].data_index]
    dims = ws.shapes.dims(x.name)
    producer = x.inputs[0] if x.inputs else None
    if dims is None and producer is not None and producer.op in _SAME_SHAPE and not producer.domain:
        dims = ws.shapes.dims(producer.inputs[0].name)  # shape inference skips some function ops (GroupNormalization)
    if dims is None:
        return None
    static = [static_value(d) for d in dims]
    for step in chain:
        if grows(step.const.shape, static) is not None:
            return None
    try:
        scale, shift = compose((s.op, s.const, s.data_index == 1) for s in chain)
        scale, shift = align(scale, len(dims)), align(shift, len(dims))
    except ValueError:
        return None
    dtype = np.result_type(*[s.const.dtype for s in chain])
    site = AffineSite(chain, name, dims, scale, shift, dtype)
    if len(dims) >= 2:
        c = static[1]
        s_vec = along_axis(scale, len(dims), 1, c)
        t_vec = along_axis(shift, len(dims), 1, c)
        if s_vec is not None and t_vec is not None and s_vec.size == t_vec.size and (c is not None or s_vec.size > 1):
            site.scale, site.shift = s_vec, t_vec
    return site


def read_sites(ws: Workspace, names: dict[int, str] | None = None) -> list[AffineSite]:
    """Every affine chain of the main graph, in node order. ``names`` maps ``id(node)`` to the report
    name a rule gave the nodes it created (so a rewritten chain keeps its entry); other chains are named
    after their first node."""
    nodes = list(ws.graph.nodes)
    steps: dict[int, Step] = {}
    for node in nodes:
        step = affine_step(node, ws)
        if step is not None:
            steps[id(node)] = step
    continued: set[int] = set()
    for step in steps.values():
        nxt = _chain_next(step, steps, ws)
        if nxt is not None:
            continued.add(id(nxt.node))
    sites: list[AffineSite] = []
    for node in nodes:
        step = steps.get(id(node))
        if step is None or id(node) in continued:
            continue
        chain = [step]
        while True:
            nxt = _chain_next(chain[-1], steps, ws)
            if nxt is None or any(nxt is s for s in chain):
                break
            chain.append(nxt)
        name = (names or {}).get(id(node)) or entry_name(node)
        site = _read(chain, ws, name)
        if site is not None:
            sites.append(site)
    return sites
