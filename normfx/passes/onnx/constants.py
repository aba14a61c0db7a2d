"""Values of small constant subgraphs, so rules can read weights the exporters did not fold.

With constant folding off (the only way to keep BatchNormalization nodes in a torch export), the
exporters emit weights as ``Transpose(W)`` (Linear on a 3-D input), biases as
``Expand(CastLike(0, x), Shape(W))`` (a conv without bias), BN statistics as ``Identity(...)``.
:func:`evaluate` computes the output of one such node from constant inputs with numpy, following the
ONNX definition of each supported op; anything else is "not a constant".
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import onnx

__all__ = ["EVALUATORS", "evaluate", "needs_only_dtype"]


def _axes(attrs: dict, inputs: Sequence[np.ndarray | None], index: int) -> list[int] | None:
    if "axes" in attrs:
        return [int(a) for a in attrs["axes"]]
    if len(inputs) > index and inputs[index] is not None:
        return [int(a) for a in np.asarray(inputs[index]).reshape(-1)]
    return None


def _reshape(attrs: dict, x: np.ndarray, shape: np.ndarray) -> np.ndarray:
    target = [int(v) for v in np.asarray(shape).reshape(-1)]
    if not int(attrs.get("allowzero", 0)):
        target = [x.shape[i] if v == 0 else v for i, v in enumerate(target)]
    return x.reshape(target)


def _squeeze(attrs: dict, inputs: Sequence[np.ndarray | None]) -> np.ndarray:
    x, axes = inputs[0], _axes(attrs, inputs, 1)
    return np.squeeze(x, axis=None if axes is None else tuple(a % x.ndim for a in axes))


def _unsqueeze(attrs: dict, inputs: Sequence[np.ndarray | None]) -> np.ndarray:
    x, axes = inputs[0], _axes(attrs, inputs, 1)
    if axes is None:
        raise ValueError("Unsqueeze without axes")
    rank = x.ndim + len(axes)
    return np.expand_dims(x, tuple(sorted(a % rank for a in axes)))


def _shape(attrs: dict, x: np.ndarray) -> np.ndarray:
    dims = list(x.shape)
    start, end = int(attrs.get("start", 0)), attrs.get("end")
    return np.array(dims[start:None if end is None else int(end)], dtype=np.int64)


def _cast(to: int, x: np.ndarray) -> np.ndarray:
    return x.astype(onnx.helper.tensor_dtype_to_np_dtype(int(to)))


def _float_only(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    def run(attrs: dict, inputs: Sequence[np.ndarray | None]) -> np.ndarray:
        if any(v is None or v.dtype.kind != "f" for v in inputs):
            raise ValueError("arithmetic is evaluated on float constants only")
        a, b = inputs
        out = fn(a, b)
        return out.astype(np.result_type(a, b))

    return run


EVALUATORS: dict[str, Callable[[dict, Sequence[Any]], np.ndarray]] = {
    "Identity": lambda attrs, ins: ins[0],
    "Transpose": lambda attrs, ins: np.transpose(ins[0], attrs.get("perm")),
    "Reshape": lambda attrs, ins: _reshape(attrs, ins[0], ins[1]),
    "Flatten": lambda attrs, ins: ins[0].reshape(
        (int(np.prod(ins[0].shape[: int(attrs.get("axis", 1)) % (ins[0].ndim + 1)])), -1)
    ),
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Cast": lambda attrs, ins: _cast(attrs["to"], ins[0]),
    "CastLike": lambda attrs, ins: ins[0].astype(ins[1].dtype),
    "Shape": lambda attrs, ins: _shape(attrs, ins[0]),
    "Expand": lambda attrs, ins: np.array(
        np.broadcast_to(ins[0], np.broadcast_shapes(ins[0].shape, tuple(int(d) for d in ins[1])))
    ),
    "Concat": lambda attrs, ins: np.concatenate(ins, axis=int(attrs["axis"])),
    "Gather": lambda attrs, ins: np.take(ins[0], ins[1].astype(np.int64), axis=int(attrs.get("axis", 0))),
    "Add": _float_only(np.add),
    "Sub": _float_only(np.subtract),
    "Mul": _float_only(np.multiply),
    "Div": _float_only(np.divide),
}


def needs_only_dtype(op: str, index: int) -> bool:
    """Inputs whose *type* matters but not their value (CastLike's target)."""
    return op == "CastLike" and index == 1


def evaluate(op: str, attrs: dict, inputs: Sequence[np.ndarray | None]) -> np.ndarray:
    """The output of default-domain op ``op`` on constant ``inputs`` (raises when unsupported)."""
    fn = EVALUATORS.get(op)
    if fn is None:
        raise ValueError(f"{op} is not evaluated")
    with np.errstate(all="ignore"):
        return np.asarray(fn(attrs, inputs))
