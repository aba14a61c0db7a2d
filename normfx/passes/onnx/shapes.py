"""Tensor shapes for the ONNX rules: ONNX shape inference run once, lazily, on a weightless copy.

Dimensions are kept *symbolic* so that rules can prove facts about dynamic shapes: each dimension
is a :data:`Dim` ``(coefficient, symbols)`` — ``(64, ())`` is 64, ``(1, ("N",))`` the named dim
``N``, and a dimension nothing is known about gets a symbol of its own that equals only itself. A
product of dims is again a ``Dim``, so "the dims before the channel axis multiply to the same thing"
is an exact test, whether the batch is 1 or ``N``.
"""

from __future__ import annotations

import itertools
import logging
from typing import Iterable, Sequence

import numpy as np
import onnx

__all__ = ["Dim", "ShapeInfo", "dim", "prod", "divide", "dims_text", "static_value"]

log = logging.getLogger(__name__)

Dim = tuple[int, tuple[str, ...]]

_fresh = itertools.count()
_UNKNOWN = "\x00?"  # prefix of symbols that stand for unknown dims (never an ONNX dim_param)


def dim(value: int | str | None) -> Dim:
    """A ``Dim`` from an int, a symbolic name, or ``None`` (unknown: a symbol equal only to itself)."""
    if value is None:
        return (1, (f"{_UNKNOWN}{next(_fresh)}",))
    if isinstance(value, str):
        return (1, (value,))
    return (int(value), ())


def prod(dims: Iterable[Dim]) -> Dim:
    """The product of ``dims`` (the empty product is 1)."""
    coef, syms = 1, []
    for c, s in dims:
        coef *= c
        syms.extend(s)
    if coef == 0:
        return (0, ())
    return (coef, tuple(sorted(syms)))


def divide(total: Dim, part: Dim) -> Dim | None:
    """``total / part`` when it is exact (``None`` otherwise)."""
    coef, syms = total
    pcoef, psyms = part
    if pcoef == 0 or coef % pcoef:
        return None
    remaining = list(syms)
    for s in psyms:
        if s not in remaining:
            return None
        remaining.remove(s)
    return (coef // pcoef, tuple(remaining))


def static_value(d: Dim) -> int | None:
    """The dimension as an int when it is known, else None."""
    return d[0] if not d[1] else None


def dims_text(dims: Sequence[Dim]) -> str:
    """``[N, 64, ?, 7]`` for messages."""

    def one(d: Dim) -> str:
        coef, syms = d
        parts = ["?" if s.startswith(_UNKNOWN) else s for s in syms]
        if coef != 1 or not parts:
            parts.insert(0, str(coef))
        return "*".join(parts)

    return "[" + ", ".join(one(d) for d in dims) + "]"


def _strip_weights(model: onnx.ModelProto, max_elements: int = 64) -> onnx.ModelProto:
    """A copy of ``model`` for shape inference: large float initializers become typed graph inputs
    (their shapes are all inference needs), small ones (Reshape targets, axes) stay as values."""
    out = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(out, field, getattr(model, field))
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    src, dst = model.graph, out.graph
    dst.name = src.name
    dst.node.extend(src.node)
    dst.input.extend(src.input)
    dst.output.extend(src.output)
    dst.value_info.extend(src.value_info)
    declared = {vi.name for vi in src.input}
    int_types = {onnx.TensorProto.INT64, onnx.TensorProto.INT32}
    for init in src.initializer:
        count = 1
        for d in init.dims:
            count *= d
        if count <= max_elements or init.data_type in int_types:
            dst.initializer.append(init)
        elif init.name not in declared:
            dst.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    dst.sparse_initializer.extend(src.sparse_initializer)
    return out


class ShapeInfo:
    """Shapes of the tensors of a model's main graph, from ONNX shape inference (computed on first use)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self._model = model
        self._shapes: dict[str, list[int | str | None]] | None = None
        self._types: dict[str, int] = {}
        self.error: str = ""

    def _compute(self) -> dict[str, list[int | str | None]]:
        shapes: dict[str, list[int | str | None]] = {}
        graph = self._model.graph
        try:
            inferred = onnx.shape_inference.infer_shapes(_strip_weights(self._model), data_prop=True).graph
        except Exception as exc:  # inference fails on some exotic models: rules then see unknown shapes
            self.error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.debug("shape inference failed: %s", self.error)
            inferred = graph
        for vi in itertools.chain(inferred.input, inferred.value_info, inferred.output):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                self._types[vi.name] = vi.type.tensor_type.elem_type
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                shapes[vi.name] = [
                    d.dim_value if d.HasField("dim_value") else (d.dim_param if d.HasField("dim_param") else None)
                    for d in vi.type.tensor_type.shape.dim
                ]
        for init in graph.initializer:
            shapes[init.name] = list(init.dims)
        return shapes

    def raw(self, name: str) -> list[int | str | None] | None:
        """The inferred shape of tensor ``name`` (ints, dim_param strings, ``None`` for unknown dims),
        or ``None`` when even the rank is unknown."""
        if self._shapes is None:
            self._shapes = self._compute()
        return self._shapes.get(name)

    def dtype(self, name: str) -> np.dtype | None:
        """The inferred element type of tensor ``name`` as a numpy dtype (None when unknown)."""
        if self._shapes is None:
            self._shapes = self._compute()
        elem = self._types.get(name)
        try:
            return None if elem is None else np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))
        except (KeyError, TypeError, ValueError):
            return None

    def dims(self, name: str) -> list[Dim] | None:
        """The shape of ``name`` as symbolic :data:`Dim` values (fresh symbols for unknown dims)."""
        raw = self.raw(name)
        return None if raw is None else [dim(d) for d in raw]

    def record(self, name: str, like: str) -> None:
        """Give a tensor the rules created the shape of an existing one (same shape by construction)."""
        raw = self.raw(like)
        if raw is not None and self._shapes is not None:
            self._shapes[name] = raw
