"""Loading ONNX models for the passes, and naming their BatchNormalization nodes.

``load_model_proto`` always returns a private copy (the caller's ``ModelProto`` and file are never
touched). A path is read with its external data (resolved relative to the file's folder), so the
returned model is self-contained; a ``ModelProto`` whose external data was not loaded keeps its
references (initializers the passes do not edit are written back exactly as they came); the passes
that read every weight or run the model in onnxruntime (``unfuse``, ``precise``, ``adaptive``, the
statistics API) refuse it with :func:`require_loaded_data`'s one-line :class:`~normfx.errors.ModelError`.

BatchNormalization nodes without a name, or sharing a name with another node, get a stable one
(``BatchNormalization_{i}``, ``i`` its rank in :func:`batchnorm_nodes` order) so report entries can
name every layer.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import onnx
from onnx import helper

from ...errors import ModelError

__all__ = [
    "NodeLocation",
    "BnLocation",
    "find_nodes",
    "name_nodes",
    "load_model_proto",
    "batchnorm_nodes",
    "onnx_batchnorm_names",
    "name_batchnorm_nodes",
    "is_batchnorm",
    "first_line",
    "opset_of",
    "node_attrs",
    "read_counts",
    "require_loaded_data",
]

log = logging.getLogger(__name__)

_BN_OP = "BatchNormalization"


def is_batchnorm(node: onnx.NodeProto) -> bool:
    """True for a default-domain ONNX BatchNormalization node."""
    return node.op_type == _BN_OP and node.domain in ("", "ai.onnx")


@dataclass
class NodeLocation:
    """One node and where it lives: ``where`` is ``""`` for the main graph, else a description of the
    subgraph or local function holding it."""

    node: onnx.NodeProto
    where: str


BnLocation = NodeLocation  # a BatchNormalization node's location


def _subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.name, attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for i, g in enumerate(attr.graphs):
                yield f"{attr.name}[{i}]", g


def _walk(graph: onnx.GraphProto, where: str, wanted: Callable[[onnx.NodeProto], bool]) -> Iterator[NodeLocation]:
    for node in graph.node:
        if wanted(node):
            yield NodeLocation(node, where)
        for attr_name, sub in _subgraphs(node):
            label = f"the {attr_name!r} subgraph of {node.op_type} node {node.name!r}"
            yield from _walk(sub, label if not where else f"{label} (in {where})", wanted)


def find_nodes(model: onnx.ModelProto, wanted: Callable[[onnx.NodeProto], bool]) -> list[NodeLocation]:
    """Every node ``wanted`` accepts: main graph (in node order, descending into If/Loop/Scan bodies where
    they occur), then the bodies of local functions."""
    found = list(_walk(model.graph, "", wanted))
    for func in model.functions:
        for node in func.node:
            if wanted(node):
                qualified = f"{func.domain}.{func.name}" if func.domain else func.name
                found.append(NodeLocation(node, f"local function {qualified!r}"))
    return found


def batchnorm_nodes(model: onnx.ModelProto) -> list[BnLocation]:
    """Every BatchNormalization node, in :func:`find_nodes` order."""
    return find_nodes(model, is_batchnorm)


def _planned_names(model: onnx.ModelProto, locations: list[NodeLocation]) -> list[str]:
    """The name each located node has after :func:`name_nodes`: its own when unique, else
    ``{op_type}_{i}`` (``i`` its rank in ``locations``), bumped past names already taken."""
    counts: dict[str, int] = {}
    for loc in find_nodes(model, lambda node: True):
        counts[loc.node.name] = counts.get(loc.node.name, 0) + 1
    taken = {name for name in counts if name}
    planned: list[str] = []
    for index, loc in enumerate(locations):
        name = loc.node.name
        if name and counts.get(name, 0) == 1:
            planned.append(name)
            continue
        candidate, bump = f"{loc.node.op_type}_{index}", 0
        while candidate in taken:
            bump += 1
            candidate = f"{loc.node.op_type}_{index}_{bump}"
        taken.add(candidate)
        planned.append(candidate)
    return planned


def name_nodes(model: onnx.ModelProto, wanted: Callable[[onnx.NodeProto], bool]) -> list[NodeLocation]:
    """Give the unnamed / duplicate-named nodes ``wanted`` accepts a stable name, in place; idempotent.
    Returns their locations."""
    locations = find_nodes(model, wanted)
    for loc, name in zip(locations, _planned_names(model, locations)):
        if loc.node.name != name:
            loc.node.name = name
    return locations


def onnx_batchnorm_names(model: onnx.ModelProto) -> list[str]:
    """Names of the BatchNormalization nodes (subgraphs and local functions included), as reported.

    Unnamed or duplicate-named nodes are listed under the name :func:`name_batchnorm_nodes` gives
    them (``BatchNormalization_{i}``); the model is not modified.
    """
    return _planned_names(model, batchnorm_nodes(model))


def name_batchnorm_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give unnamed / duplicate-named BatchNormalization nodes their stable names, in place; idempotent."""
    name_nodes(model, is_batchnorm)
    return model


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when empty), for one-line errors."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def opset_of(model: onnx.ModelProto) -> int:
    """The default-domain opset the model imports (1 when it declares none)."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 1


def node_attrs(node: onnx.NodeProto) -> dict[str, Any]:
    """A NodeProto's attributes as ``{name: value}`` (``onnx.helper.get_attribute_value``)."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def read_counts(model: onnx.ModelProto) -> Counter[str]:
    """How many times each tensor name is read: node inputs (subgraph bodies included), subgraph outputs
    and main-graph outputs (a name read twice by one node counts twice)."""
    counts: Counter[str] = Counter(vi.name for vi in model.graph.output)

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            counts.update(n for n in node.input if n)
            for _, sub in _subgraphs(node):
                counts.update(vi.name for vi in sub.output)
                walk(sub)

    walk(model.graph)
    return counts


def _tensors_with_data(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto holding values in ``graph``: initializers, sparse ones, Constant-node attributes;
    subgraph bodies included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
        for _, sub in _subgraphs(node):
            yield from _tensors_with_data(sub)


def require_loaded_data(model: onnx.ModelProto, what: str = "the ONNX model") -> None:
    """Raise :class:`~normfx.errors.ModelError` when a tensor of ``model`` keeps its values in an external
    file that was not loaded (``onnx.load(path, load_external_data=False)``): neither onnxruntime nor a
    pass can read it from the ModelProto alone. The message names the first such tensor and the fix."""
    tensors = [_tensors_with_data(model.graph)]
    tensors += [_tensors_with_data(onnx.GraphProto(node=func.node)) for func in model.functions]
    for source in tensors:
        for tensor in source:
            if tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL:
                location = next((e.value for e in tensor.external_data if e.key == "location"), "")
                where = f" (file {location!r})" if location else ""
                raise ModelError(
                    f"{what}: tensor {tensor.name!r} keeps its data in an external file{where} that was not loaded; "
                    "pass the .onnx path, or call onnx.load_external_data_for_model(model, folder) first"
                )


def _validate(model: onnx.ModelProto, label: str) -> None:
    if not model.HasField("graph") or model.ir_version < 1:
        raise ModelError(f"{label} is not an ONNX model (no graph or IR version); pass a .onnx file or a ModelProto")
    if model.ir_version >= 3 and not model.opset_import:
        raise ModelError(f"{label} declares no opset (opset_import is empty); re-export the model with an opset")
    if not model.graph.output:
        raise ModelError(f"{label} has a graph without outputs; the file is truncated or not a model")


def load_model_proto(model: Any) -> onnx.ModelProto:
    """A private copy of an ONNX model given as an ``onnx.ModelProto`` or a path to a ``.onnx`` file.

    Raises :class:`~normfx.errors.ModelError` (one line, naming the file) for a missing file, a
    folder, a file that is not ONNX, a truncated or corrupt protobuf, and missing external data.
    BatchNormalization nodes are named as described in :func:`name_batchnorm_nodes`.
    """
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        _validate(copy, "the given ModelProto")
        return name_batchnorm_nodes(copy)
    if not isinstance(model, (str, os.PathLike)):
        raise ModelError(f"cannot load an ONNX model from a {type(model).__name__}; pass a path or an onnx.ModelProto")
    path = os.fspath(model)
    label = f"ONNX file {path!r}"
    if not os.path.exists(path):
        raise ModelError(f"{label} does not exist; check the path")
    if os.path.isdir(path):
        raise ModelError(f"{label} is a folder; pass the .onnx file inside it")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning, ... for bad bytes
        reason = first_line(exc)
        raise ModelError(f"{label} is not a readable ONNX model (corrupt, truncated or not ONNX): {reason}") from None
    _validate(proto, label)
    try:
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(proto, os.path.dirname(os.path.abspath(path)))
    except Exception as exc:  # missing / short external data files
        reason = first_line(exc)
        raise ModelError(f"{label}: cannot load its external data (keep the data files beside it): {reason}") from None
    log.debug("loaded %s (ir_version=%d)", path, proto.ir_version)
    return name_batchnorm_nodes(proto)

