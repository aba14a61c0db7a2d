"""The graph a pass edits: an onnx-graphsurgeon import of the model, with the helpers every rule
needs (constant values, consumers, fresh names, edits) and an export that keeps what gs drops.

onnx-graphsurgeon 0.6.1's export keeps ir_version, opset_import and producer, but drops the model's
domain, model_version, doc_string and metadata_props and every node's doc_string/metadata_props,
rewrites value_info from its own tensor types, and drops initializers from the graph inputs (IR < 4
needs them there; from IR 4 on, an initializer listed as an input is a default the caller may
override). :meth:`Workspace.export` therefore starts from gs's export and puts back, from the source
model: every model- and graph-level field, the exact ``NodeProto`` of every node no rule touched
(If/Loop bodies included, with the outer initializers they read), the graph inputs/outputs, the
value_info entries of tensors that still exist (stale ones of removed tensors are dropped) and the
initializer order. New initializers get fresh names; existing ones are never edited (a folded layer
gets new ones). Node order is kept (rules insert a new node right after its producer), so no
toposort is needed, and no ``cleanup()`` runs: it would also delete the user's own dead code; only
the constant subgraphs a fold leaves unused are removed.
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Any, Iterator

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues
from onnx_graphsurgeon.logger import G_LOGGER

from ...errors import ModelError, RewriteError
from .constants import EVALUATORS, evaluate, needs_only_dtype
from .io import first_line, opset_of
from .names import fresh_name, names_in
from .shapes import ShapeInfo

__all__ = ["Workspace", "quiet_gs", "node_label"]

log = logging.getLogger(__name__)

_FOLD_SUFFIX = re.compile(r"(_bnfold(_\d+)?)+$")
_STRUCTURAL_GRAPH_FIELDS = {"node", "initializer", "sparse_initializer", "input", "output", "value_info"}


@contextlib.contextmanager
def quiet_gs() -> Iterator[None]:
    """Silence onnx-graphsurgeon's own logger (it prints); errors still raise."""
    with G_LOGGER.suppress(G_LOGGER.ERROR):
        yield


def node_label(node: gs.Node) -> str:
    """``Conv 'conv1'`` for messages."""
    return f"{node.op} {node.name!r}" if node.name else f"{node.op} (unnamed)"


def _outer_references(graph: onnx.GraphProto) -> set[str]:
    """Names a (sub)graph uses without defining them itself (outer-scope references)."""
    defined = {vi.name for vi in graph.input} | {t.name for t in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(n for n in node.input if n)
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                used |= _outer_references(sub)
        defined.update(node.output)
    used.update(vi.name for vi in graph.output)
    return used - defined


class Workspace:
    """An onnx-graphsurgeon graph of ``model`` plus the bookkeeping for a faithful export."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.opset = opset_of(model)
        try:
            with quiet_gs():
                self.graph: gs.Graph = gs.import_onnx(model)
        except Exception as exc:  # gs raises its own exception types on malformed graphs
            raise ModelError(f"onnx-graphsurgeon cannot import the model: {first_line(exc)}") from None
        nodes = list(self.graph.nodes)
        # gs imports nodes one for one, in order; remember each one's source NodeProto.
        self._source: dict[int, tuple[gs.Node, int]] = {}
        if len(nodes) == len(model.graph.node):
            self._source = {id(node): (node, i) for i, node in enumerate(nodes)}
        self._touched: set[int] = set()
        self._values: dict[int, np.ndarray] = {}  # constant subgraph outputs already evaluated
        self._value_nodes: list[gs.Tensor] = []
        self._main: set[int] = {id(node) for node in nodes}
        self._keep_alive = nodes  # ids stay unique while the source nodes live
        init_names = {t.name for t in model.graph.initializer}
        input_names = {vi.name for vi in model.graph.input}
        # From IR 4 on, an initializer that is also a graph input is a default the caller may override.
        self.overridable = (init_names & input_names) if model.ir_version >= 4 else set()
        self.graph_input_names = input_names - (init_names if model.ir_version < 4 else set())
        self._names = names_in(model)
        self.shapes = ShapeInfo(model)
        self.changed = False

    # ------------------------------------------------------------------------------------------
    # reading

    def const(self, tensor: gs.Tensor, what: str = "") -> np.ndarray | str:
        """The value of a constant tensor (initializer, Constant node, Identity of one), or the reason
        it is not a constant known now (a graph input, computed at run time, unreadable)."""
        label = f"{what} {tensor.name!r}".strip() if tensor.name else (what or "an omitted input")
        if tensor.is_empty():
            return f"{label} is omitted"
        if isinstance(tensor, gs.Constant):
            if tensor.name in self.overridable:
                return f"{label} is a graph input (an initializer the caller can override at run time)"
            try:
                return np.asarray(tensor.values)
            except Exception as exc:  # external data not loaded, unsupported dtype
                return f"{label} cannot be read ({first_line(exc)})"
        if tensor.name in self.graph_input_names or tensor in self.graph.inputs:
            return f"{label} is a graph input; its value is only known at run time"
        if not tensor.inputs:
            return f"{label} has no producer in this graph"
        producer = tensor.inputs[0]
        if producer.op == "Constant" and not producer.domain:
            return self._constant_node_value(producer, label)
        if producer.domain or producer.op not in EVALUATORS or len(producer.outputs) != 1:
            return f"{label} is computed at run time by {node_label(producer)}"
        return self._evaluate(tensor, producer, label)

    def _evaluate(self, tensor: gs.Tensor, producer: gs.Node, label: str) -> np.ndarray | str:
        """A constant subgraph's value (e.g. ``Transpose(W)``), computed once with :mod:`.constants`."""
        if id(tensor) in self._values:
            return self._values[id(tensor)]
        inputs: list[np.ndarray | None] = []
        for i, source in enumerate(producer.inputs):
            if source.is_empty():
                inputs.append(None)
            elif needs_only_dtype(producer.op, i):
                dtype = source.dtype if source.dtype is not None else self.shapes.dtype(source.name)
                if dtype is None:
                    return f"{label} is computed by {node_label(producer)} from a tensor of unknown type"
                inputs.append(np.empty(0, dtype=dtype))
            else:
                value = self.const(source)
                if isinstance(value, str):
                    return f"{label} is computed at run time by {node_label(producer)} ({value})"
                inputs.append(value)
        try:
            value = evaluate(producer.op, dict(producer.attrs), inputs)
        except Exception as exc:  # unsupported attribute values, shape errors
            return f"{label} is computed by {node_label(producer)}, which normfx cannot evaluate ({type(exc).__name__})"
        self._values[id(tensor)] = value
        self._value_nodes.append(tensor)  # keep the tensor alive so its id stays unique
        return value

    @staticmethod
    def _constant_node_value(node: gs.Node, label: str) -> np.ndarray | str:
        attrs = node.attrs
        try:
            if "value" in attrs and isinstance(attrs["value"], gs.Constant):
                return np.asarray(attrs["value"].values)
            if "value_float" in attrs:
                return np.array(attrs["value_float"], dtype=np.float32)
            if "value_floats" in attrs:
                return np.array(attrs["value_floats"], dtype=np.float32)
            if "value_int" in attrs:
                return np.array(attrs["value_int"], dtype=np.int64)
            if "value_ints" in attrs:
                return np.array(attrs["value_ints"], dtype=np.int64)
        except Exception as exc:
            return f"{label} cannot be read ({type(exc).__name__})"
        return f"{label} comes from a Constant node of a kind normfx does not read ({', '.join(attrs) or 'no value'})"

    def consumers(self, tensor: gs.Tensor) -> list[gs.Node]:
        """Every node reading ``tensor`` (each once), subgraph nodes included."""
        out: list[gs.Node] = []
        for node in tensor.outputs:
            if not any(node is seen for seen in out):
                out.append(node)
        return out

    def reads_only_metadata(self, node: gs.Node, tensor: gs.Tensor) -> bool:
        """True when main-graph ``node`` uses only the type/shape of ``tensor`` (``CastLike``'s
        target, ``Shape``, ``Size``): a fold that keeps shape and dtype may rewire it freely."""
        uses = [i for i, t in enumerate(node.inputs) if t is tensor]
        if node.domain or not uses or not self.in_main_graph(node):
            return False
        if node.op == "CastLike":
            return uses == [1]
        return node.op in ("Shape", "Size") and uses == [0]

    def data_consumers(self, tensor: gs.Tensor) -> list[gs.Node]:
        """The consumers of ``tensor`` that read its values."""
        return [n for n in self.consumers(tensor) if not self.reads_only_metadata(n, tensor)]

    def move_metadata_readers(self, old: gs.Tensor, new: gs.Tensor) -> None:
        """Point the type/shape-only readers of ``old`` at ``new`` (same type and shape)."""
        for node in self.consumers(old):
            if self.reads_only_metadata(node, old):
                for i, t in enumerate(node.inputs):
                    if t is old:
                        self.set_input(node, i, new)

    def in_main_graph(self, node: gs.Node) -> bool:
        """False for nodes of subgraph bodies (If/Loop/Scan), which rules must not edit."""
        return id(node) in self._main

    def is_graph_output(self, tensor: gs.Tensor) -> bool:
        return any(t is tensor for t in self.graph.outputs)

    def other_uses(self, tensor: gs.Tensor, expected: gs.Node, what: str) -> str | None:
        """Why ``tensor`` cannot be rewritten for ``expected`` alone (None when ``expected`` is its only use)."""
        if self.is_graph_output(tensor):
            return f"{what} {tensor.name!r} is also a graph output"
        others = [n for n in self.data_consumers(tensor) if n is not expected]
        if others:
            listing = ", ".join(node_label(n) for n in others[:3]) + (" …" if len(others) > 3 else "")
            return f"{what} {tensor.name!r} also feeds {listing}; folding would change what they see"
        return None

    def sharing(self, tensor: gs.Tensor, node: gs.Node) -> int:
        """How many other nodes read the constant ``tensor`` besides ``node``."""
        return len([n for n in tensor.outputs if n is not node]) if isinstance(tensor, gs.Constant) else 0

    # ------------------------------------------------------------------------------------------
    # editing

    def fresh(self, base: str) -> str:
        """A name used by nothing in the model (tensors, nodes, subgraphs), reserved from now on."""
        return fresh_name(self._names, base or "normfx")

    def constant(self, base: str, value: np.ndarray) -> gs.Constant:
        """A new initializer holding ``value`` (its dtype kept), under a fresh name.

        ``base`` is usually the name of the tensor it replaces: ``conv.weight`` → ``conv.weight_bnfold``
        (a second fold gives ``conv.weight_bnfold_1``, not ``…_bnfold_bnfold``).
        """
        base = _FOLD_SUFFIX.sub("", base) + "_bnfold"
        name = self.fresh(base)
        proto = onnx.numpy_helper.from_array(np.ascontiguousarray(value), name)
        return gs.Constant(name, LazyValues(proto))

    def variable_like(self, base: str, like: gs.Tensor) -> gs.Variable:
        """A new intermediate tensor with the dtype/shape of ``like``."""
        name = self.fresh(base)
        var = gs.Variable(name, dtype=getattr(like, "dtype", None), shape=getattr(like, "shape", None))
        self.shapes.record(name, like.name)
        return var

    def touch(self, node: gs.Node) -> None:
        """Mark ``node`` as changed by a rule (exported from gs rather than copied from the source)."""
        self._touched.add(id(node))
        self.changed = True

    def set_input(self, node: gs.Node, index: int, tensor: gs.Tensor) -> None:
        while len(node.inputs) <= index:
            node.inputs.append(gs.Variable.empty())
        node.inputs[index] = tensor
        self.touch(node)

    def set_output(self, node: gs.Node, index: int, tensor: gs.Tensor) -> None:
        node.outputs[index] = tensor
        self.touch(node)

    def set_attr(self, node: gs.Node, key: str, value: Any) -> None:
        node.attrs[key] = value
        self.touch(node)

    def _index(self, node: gs.Node) -> int:
        # identity, not gs.Node.__eq__ (which compares names, attributes and tensors)
        return next(i for i, n in enumerate(self.graph.nodes) if n is node)

    def insert_after(self, anchor: gs.Node, node: gs.Node) -> None:
        self.graph.nodes.insert(self._index(anchor) + 1, node)
        self._main.add(id(node))
        self._keep_alive.append(node)
        self.changed = True

    def remove(self, node: gs.Node) -> None:
        """Take ``node`` out of the graph, disconnecting its tensors; drop Constant nodes left unused."""
        inputs = list(node.inputs)
        node.inputs.clear()
        node.outputs.clear()
        del self.graph.nodes[self._index(node)]
        self.changed = True
        for tensor in inputs:
            self.drop_if_unused(tensor)

    def drop_if_unused(self, tensor: gs.Tensor) -> None:
        """Once nothing reads ``tensor``, remove the constant subgraph that computed it (a Constant
        node, ``Transpose(W)``, ...); a node computing anything from run-time data is never removed."""
        if isinstance(tensor, gs.Constant) or tensor.outputs or self.is_graph_output(tensor) or not tensor.inputs:
            return
        producer = tensor.inputs[0]
        if producer.domain or len(producer.outputs) != 1:
            return
        if producer.op == "Constant" or id(tensor) in self._values:
            self.remove(producer)

    def truncate_inputs(self, node: gs.Node, count: int) -> None:
        """Drop ``node``'s inputs from position ``count`` on (e.g. a bias that moved elsewhere)."""
        while len(node.inputs) > count:
            node.inputs.pop()
        self.touch(node)

    # ------------------------------------------------------------------------------------------
    # export

    def export(self) -> onnx.ModelProto:
        """The edited graph as a new ``ModelProto`` with the source model's fields restored."""
        try:
            with quiet_gs():
                out = gs.export_onnx(self.graph, do_type_check=False)
        except Exception as exc:
            raise RewriteError(f"onnx-graphsurgeon cannot export the rewritten model: {first_line(exc)}") from None
        self._restore_nodes(out.graph)
        self._restore_graph(out.graph)
        self._restore_model(out)
        return out

    def _restore_nodes(self, graph: onnx.GraphProto) -> None:
        source = self.model.graph.node
        for node, proto in zip(self.graph.nodes, graph.node):
            entry = self._source.get(id(node))
            if entry is None:
                continue
            original = source[entry[1]]
            same_wires = list(proto.input) == list(original.input) and list(proto.output) == list(original.output)
            if id(node) not in self._touched and same_wires:
                proto.CopyFrom(original)
            else:
                proto.doc_string = original.doc_string
                del proto.metadata_props[:]
                proto.metadata_props.extend(original.metadata_props)
                if original.overload:
                    proto.overload = original.overload

    def _restore_graph(self, graph: onnx.GraphProto) -> None:
        src = self.model.graph
        live: set[str] = set()
        for node in graph.node:
            live.update(node.input)
            live.update(node.output)
        # Outer-scope references of restored subgraphs must stay defined in the main graph.
        init_names = {t.name for t in graph.initializer}
        needed = set()
        for node in graph.node:
            for attr in node.attribute:
                subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
                for sub in subs:
                    needed |= _outer_references(sub)
        missing = [t for t in src.initializer if t.name in needed and t.name not in init_names]
        graph.initializer.extend(missing)
        init_names.update(t.name for t in missing)
        live |= needed
        sparse_names = {t.values.name for t in graph.sparse_initializer}
        src_inits = [t.name for t in src.initializer]
        src_init_set = set(src_inits) | {t.values.name for t in src.sparse_initializer}
        order = {name: i for i, name in enumerate(src_inits)}
        graph.initializer.sort(key=lambda t: order.get(t.name, len(order)))
        # inputs: the source's, minus initializer-inputs whose initializer is gone (plus new ones for IR<4)
        kept = init_names | sparse_names
        inputs = [vi for vi in src.input if vi.name not in src_init_set or vi.name in kept]
        if self.model.ir_version < 4:
            declared = {vi.name for vi in inputs}
            for t in graph.initializer:
                if t.name not in declared:
                    inputs.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        del graph.input[:]
        graph.input.extend(inputs)
        del graph.output[:]
        graph.output.extend(src.output)
        # value_info: the source's entries of tensors still there, then gs's entries for new tensors
        io_names = {vi.name for vi in graph.input} | {vi.name for vi in graph.output}
        src_vi = {vi.name for vi in src.value_info}
        value_info = [vi for vi in src.value_info if vi.name in live]
        known = src_vi | io_names
        value_info += [v for v in graph.value_info if v.name in live and v.name not in known]
        del graph.value_info[:]
        graph.value_info.extend(value_info)
        for field in onnx.GraphProto.DESCRIPTOR.fields:
            if field.name in _STRUCTURAL_GRAPH_FIELDS:
                continue
            graph.ClearField(field.name)
            if field.name == "quantization_annotation":
                names = live | init_names | io_names
                graph.quantization_annotation.extend(a for a in src.quantization_annotation if a.tensor_name in names)
            else:
                _copy_field(src, graph, field)

    def _restore_model(self, out: onnx.ModelProto) -> None:
        for field in onnx.ModelProto.DESCRIPTOR.fields:
            if field.name == "graph":
                continue
            out.ClearField(field.name)
            _copy_field(self.model, out, field)


def _copy_field(src: Any, dst: Any, field: Any) -> None:
    name = field.name
    repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
    if repeated:
        getattr(dst, name).extend(getattr(src, name))
    elif field.type == field.TYPE_MESSAGE:
        if src.HasField(name):
            getattr(dst, name).CopyFrom(getattr(src, name))
    elif src.HasField(name) if field.has_presence else getattr(src, name):
        setattr(dst, name, getattr(src, name))
