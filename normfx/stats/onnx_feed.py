"""How a batch of ``data`` reaches an ONNX model in onnxruntime: the graph inputs a caller must feed, and
the feed dict of one batch (arrays or tensors cast to each input's element type, checked against its
declared shape, with one-line :class:`~normfx.errors.InputDataError` errors naming the batch and the input).

The ONNX counterpart of :func:`normfx.stats.feed.feed`: a batch is an array/tensor (the only graph
input), a tuple/list ``(inputs, *targets)`` (its first element) or a dict ``{graph input name: array}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import torch
from onnx import helper

from ..errors import InputDataError

__all__ = ["GraphInput", "graph_inputs", "arrays_for_batch"]


@dataclass
class GraphInput:
    """A graph input the caller must feed: name, element type, declared dims (``None``: no shape)."""

    name: str
    elem_type: int
    dims: list[int | str] | None

    @property
    def dtype(self) -> np.dtype | None:
        try:
            return np.dtype(helper.tensor_dtype_to_np_dtype(self.elem_type)) if self.elem_type else None
        except Exception:  # bfloat16, float8, ...: no plain numpy dtype
            return None

    def expected(self) -> str:
        if self.dims is None:
            return "any shape"
        return "[" + ", ".join(str(d) for d in self.dims) + "]"


def graph_inputs(model: onnx.ModelProto) -> list[GraphInput]:
    """The inputs a caller must feed (initializers, also those listed as inputs, are not among them)."""
    inits = {t.name for t in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tensor = vi.type.tensor_type
        dims: list[int | str] | None = None
        if tensor.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]
        out.append(GraphInput(vi.name, int(tensor.elem_type), dims))
    return out


def _as_array(value: Any, index: int, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        return value.numpy()
    if type(value).__module__ == "numpy" and hasattr(value, "shape"):
        return np.asarray(value)
    raise InputDataError(
        f"batch {index}: input {name!r} got a {type(value).__name__}; expected a numpy array or a torch tensor"
    )


def _fit(array: np.ndarray, spec: GraphInput, index: int) -> np.ndarray:
    """``array`` cast to the input's element type and checked against its declared shape."""
    want = spec.dtype
    if want is not None and array.dtype != want:
        kinds = {array.dtype.kind in "fc", want.kind in "fc"}
        if len(kinds) != 1 or (array.dtype.kind == "b") != (want.kind == "b"):
            raise InputDataError(
                f"batch {index}: input {spec.name!r} expects {want} values, got an array of {array.dtype}; convert "
                f"the data first (e.g. array.astype('{want}'), scaled as the model expects)"
            )
        array = array.astype(want)
    if spec.dims is not None:
        given = tuple(array.shape)
        bad = len(given) != len(spec.dims) or any(
            isinstance(d, int) and d > 0 and d != g for d, g in zip(spec.dims, given)
        )
        if bad:
            raise InputDataError(
                f"batch {index}: input {spec.name!r} expects shape {spec.expected()} but the batch has shape "
                f"{list(given)}; check the data (axis 0 is the batch)"
            )
    return np.ascontiguousarray(array)


def arrays_for_batch(batch: Any, index: int, inputs: Sequence[GraphInput]) -> dict[str, np.ndarray]:
    """The feed of one batch: an array/tensor (the only graph input), a tuple/list ``(inputs, *targets)``
    (its first element), or a dict ``{graph input name: array}``; floats cast to each input's type."""
    names = [i.name for i in inputs]
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise InputDataError(f"batch {index} is an empty {type(batch).__name__}: expected (inputs, *targets)")
        batch = batch[0]
    if isinstance(batch, Mapping):
        keys = [str(k) for k in batch]
        unknown, missing = [k for k in keys if k not in names], [n for n in names if n not in keys]
        if unknown or missing:
            raise InputDataError(
                f"batch {index}: dict keys {', '.join(map(repr, keys)) or 'none'} do not match the model's inputs "
                f"{', '.join(map(repr, names))}; name the arrays after the graph inputs"
            )
        given = {str(k): v for k, v in batch.items()}
        return {spec.name: _fit(_as_array(given[spec.name], index, spec.name), spec, index) for spec in inputs}
    if isinstance(batch, torch.Tensor) or (type(batch).__module__ == "numpy" and hasattr(batch, "shape")):
        if len(inputs) != 1:
            raise InputDataError(
                f"batch {index}: the model takes {len(inputs)} inputs ({', '.join(map(repr, names))}); "
                "give each batch as a dict {input name: array}"
            )
        spec = inputs[0]
        return {spec.name: _fit(_as_array(batch, index, spec.name), spec, index)}
    raise InputDataError(
        f"batch {index} is a {type(batch).__name__}: expected an array/tensor, a tuple/list (inputs, *targets) "
        "or a dict {graph input name: array}"
    )
