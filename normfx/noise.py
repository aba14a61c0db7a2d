"""The float32 noise floor of a reference model: how far its own run is from a float64 run of it.

A fixed tolerance between two float32 runs cannot tell a wrong fold from rounding on a deep, ill-conditioned
network (deep SiLU/SE nets differ from their own float64 run by 1e-4 and more). So verification judges a
candidate against a **float64 reference** where one can be computed, and measures the reference's own
error against it — its *noise floor* — on the same inputs:

- torch modules: a float64 deep copy of the module, run on the inputs cast to float64 (method
  ``"torch float64 copy"``);
- ONNX models: the graph cast to float64 (float initializers, constants, graph inputs/outputs, ``Cast``
  targets) run by onnx's reference evaluator on a small batch (onnxruntime has no float64 Conv on CPU)
  (method ``"onnx float64 (reference evaluator)"``), when the graph is small enough for it
  (:data:`EVALUATOR_MAC_BUDGET` multiply-accumulates per sample);
- where neither runs (a plain callable, a graph the evaluator cannot run, a module whose code forces
  float32): the spread of the reference's float32 output when every float input is perturbed by one
  rounding step (method ``"input perturbation"``); no float64 outputs exist then.

The candidate's error may then be ``k`` times the floor (:data:`K_FLOOR` = 2), see :mod:`normfx.verify`.
Pure of the CLI; the arrays are numpy, the math float64.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "K_FLOOR",
    "K_PLAIN_EXPORT",
    "DEFAULT_RTOL",
    "FLOOR_SAMPLES",
    "Baseline",
    "relative_errors",
    "measure_baseline",
    "onnx_to_float64",
]

log = logging.getLogger(__name__)

#: the default relative tolerance: exact rewrites stay within 1e-5 of the reference in float32
DEFAULT_RTOL = 1e-5
#: a candidate may be off the float64 reference by this many times the reference's own float32 error
K_FLOOR = 2.0
#: an onnxruntime candidate may also be off by this many times a plain export's error (the graph as
#: torch.onnx exports it, BN kept, run in onnxruntime): no worse than deploying without normfx
K_PLAIN_EXPORT = 1.5
#: samples (along the first axis) the onnx reference evaluator runs in float64: it is slow on convs
FLOOR_SAMPLES = 1
#: random draws of the input perturbation
_PERTURBATION_DRAWS = 3
#: multiply-accumulates (per sample) above which the reference evaluator is too slow (its numpy convs ran
#: at about 6 MMAC/s on a loaded 2-core machine: 5e7 is ~8 s); the floor is then estimated by input perturbation
EVALUATOR_MAC_BUDGET = 5e7

METHOD_TORCH = "torch float64 copy"
METHOD_ONNX = "onnx float64 (reference evaluator)"
METHOD_PERTURBATION = "input perturbation"

Arrays = Any  # list[np.ndarray] | dict[str, np.ndarray]
Runner = Callable[[Arrays], list[np.ndarray]]


@dataclass
class Baseline:
    """What a candidate is judged against on one set of inputs.

    ``outputs``: the arrays the candidate is compared with — float64 outputs where ``versus`` is
    ``"float64"``, else the reference's own float32 outputs. ``floors``: per output, the relative error
    ``max|Δ| / max|y64|`` of the reference's float32 run against float64 (or the perturbation spread).
    ``k``: the multiple of the floor a candidate may reach: :data:`K_FLOOR` against float64 outputs,
    ``K_FLOOR + 1`` against float32 outputs (the reference carries its own floor: triangle inequality).
    """

    outputs: list[np.ndarray]
    floors: list[float]
    method: str
    versus: str
    k: float
    detail: str = ""


def relative_errors(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> list[float]:
    """Per output ``max|Δ| / max|reference|`` in float64 (0 for empty or equal outputs, inf for NaN)."""
    errors = []
    for ref, cand in zip(reference, candidate):
        ref64, cand64 = np.asarray(ref, np.float64), np.asarray(cand, np.float64)
        if ref64.shape != cand64.shape:
            errors.append(float("inf"))
            continue
        delta = float(np.max(np.abs(ref64 - cand64))) if ref64.size else 0.0
        scale = float(np.max(np.abs(ref64))) if ref64.size else 0.0
        if not (np.isfinite(delta) and np.isfinite(scale)):
            errors.append(float("inf"))
        else:
            errors.append(delta / scale if scale > 0 else (0.0 if delta == 0 else float("inf")))
    return errors


def _map_arrays(arrays: Arrays, fn: Callable[[np.ndarray], np.ndarray]) -> Arrays:
    if isinstance(arrays, Mapping):
        return {k: fn(np.asarray(v)) for k, v in arrays.items()}
    return [fn(np.asarray(v)) for v in arrays]


def _as_float64(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float64) if np.issubdtype(array.dtype, np.floating) else array


def _first_samples(arrays: Arrays, count: int) -> tuple[Arrays, bool]:
    """The first ``count`` samples of every input when they share a first axis longer than that."""
    values = list(arrays.values()) if isinstance(arrays, Mapping) else list(arrays)
    sizes = {np.shape(v)[0] if np.ndim(v) else None for v in values}
    if len(sizes) != 1 or None in sizes or next(iter(sizes)) <= count:
        return arrays, False
    return _map_arrays(arrays, lambda a: a[:count]), True


# --- torch ---------------------------------------------------------------------------------------


def _torch_float64(module: torch.nn.Module, arrays: Arrays) -> list[np.ndarray]:
    from .verify import flatten_outputs

    double = copy.deepcopy(module).double()
    values = list(arrays.values()) if isinstance(arrays, Mapping) else list(arrays)
    params = list(double.parameters()) + list(double.buffers())
    device = params[0].device if params else torch.device("cpu")
    tensors = [torch.from_numpy(np.array(_as_float64(np.asarray(v)))).to(device) for v in values]
    with torch.no_grad():
        out = double(*tensors)
    return [o.detach().cpu().numpy() if isinstance(o, torch.Tensor) else np.asarray(o) for o in flatten_outputs(out)]


# --- ONNX ----------------------------------------------------------------------------------------


def onnx_to_float64(model: Any) -> Any:
    """A copy of an ONNX model computing in float64: float initializers, ``Constant``/``ConstantOfShape``
    tensors, graph inputs, outputs and value infos, and ``Cast(to=FLOAT)`` targets become double."""
    import onnx
    from onnx import TensorProto, numpy_helper

    double = onnx.ModelProto.FromString(model.SerializeToString())

    def cast_tensor(tensor: Any) -> None:
        if tensor.data_type == TensorProto.FLOAT:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float64), tensor.name))

    def visit(graph: Any) -> None:
        for init in graph.initializer:
            cast_tensor(init)
        for info in [*graph.input, *graph.output, *graph.value_info]:
            if info.type.tensor_type.elem_type == TensorProto.FLOAT:
                info.type.tensor_type.elem_type = TensorProto.DOUBLE
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    cast_tensor(attr.t)
                elif attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        visit(sub)
                if node.op_type in ("Cast", "CastLike") and attr.name == "to" and attr.i == TensorProto.FLOAT:
                    attr.i = TensorProto.DOUBLE

    visit(double.graph)
    return double


def conv_macs(proto: Any) -> float:
    """Multiply-accumulates per sample of the Conv/ConvTranspose/Gemm/MatMul nodes with initializer weights
    (spatial sizes from shape inference; 32x32 where unknown)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # shape inference is an estimate's help only
        inferred = proto
    shapes = {}
    for info in [*inferred.graph.value_info, *inferred.graph.output]:
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    weights = {t.name: int(np.prod(t.dims)) for t in proto.graph.initializer}
    total = 0.0
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        size = weights.get(node.input[1])
        if size is None:
            continue
        spatial = 1.0
        if node.op_type in ("Conv", "ConvTranspose"):
            dims = shapes.get(node.output[0], [])[2:]
            spatial = float(np.prod(dims)) if dims and all(d for d in dims) else 1024.0
            if node.op_type == "ConvTranspose":  # every input position meets every weight
                dims_in = shapes.get(node.input[0], [])[2:]
                spatial = float(np.prod(dims_in)) if dims_in and all(d for d in dims_in) else spatial
        total += size * spatial
    return total


def _onnx_float64(model: Any, arrays: Arrays) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    from .passes.onnx.io import load_model_proto

    proto = load_model_proto(model)
    macs = conv_macs(proto)
    if macs > EVALUATOR_MAC_BUDGET:
        raise _TooLarge(f"{macs:.2g} multiply-accumulates per sample, over the float64 evaluator's budget "
                        f"{EVALUATOR_MAC_BUDGET:.0g}")
    evaluator = ReferenceEvaluator(onnx_to_float64(proto))
    names = [i.name for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    if isinstance(arrays, Mapping):
        feeds = {k: _as_float64(np.asarray(v)) for k, v in arrays.items()}
    else:
        feeds = {name: _as_float64(np.asarray(v)) for name, v in zip(names, arrays)}
    return [np.asarray(o) for o in evaluator.run(None, feeds)]


# --- the floor -----------------------------------------------------------------------------------


def _perturbation_floors(run: Runner, arrays: Arrays, outputs: list[np.ndarray]) -> list[float]:
    """Largest relative change of the outputs when every float input moves by up to one rounding step."""
    rng = np.random.default_rng(0)

    def nudge(array: np.ndarray) -> np.ndarray:
        if not np.issubdtype(array.dtype, np.floating):
            return array
        step = np.finfo(array.dtype).eps
        return (array * (1 + step * rng.uniform(-1, 1, array.shape))).astype(array.dtype)

    floors = [0.0] * len(outputs)
    for _ in range(_PERTURBATION_DRAWS):
        moved = run(_map_arrays(arrays, nudge))
        floors = [max(f, e) for f, e in zip(floors, relative_errors(outputs, moved))]
    return floors


def measure_baseline(reference: Any, run: Runner, arrays: Arrays, outputs: list[np.ndarray] | None = None) -> Baseline:
    """Float64 outputs of ``reference`` on ``arrays`` and its float32 noise floor (see the module docstring).

    ``run`` runs the reference as it is (float32); ``outputs`` are its outputs on ``arrays`` if already known.
    """
    outputs = run(arrays) if outputs is None else outputs
    failure = ""
    if isinstance(reference, torch.nn.Module):
        try:
            exact = _torch_float64(reference, arrays)
            narrow = [o.dtype for o in exact if np.issubdtype(o.dtype, np.floating) and o.dtype != np.float64]
            if narrow:
                failure = f"the float64 copy returned {narrow[0]} outputs (the model casts inside)"
            elif len(exact) == len(outputs):
                return Baseline(exact, relative_errors(exact, outputs), METHOD_TORCH, "float64", K_FLOOR)
            else:
                failure = "the float64 copy returned another number of outputs"
        except Exception as exc:  # model code that forces float32, or device-specific kernels
            failure = f"the float64 copy did not run ({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''})"
    else:
        from . import runtime

        if runtime.is_onnx_like(reference) and not _is_session(reference):
            subset, partial = _first_samples(arrays, FLOOR_SAMPLES)
            try:
                exact = _onnx_float64(reference, subset)
                if len(exact) == len(outputs):
                    if not partial:
                        return Baseline(exact, relative_errors(exact, outputs), METHOD_ONNX, "float64", K_FLOOR)
                    floors = relative_errors(exact, run(subset))
                    return Baseline(outputs, floors, METHOD_ONNX, "float32 reference", K_FLOOR + 1,
                                    detail=f"floor on the first {FLOOR_SAMPLES} sample(s)")
                failure = "the float64 graph returned another number of outputs"
            except _TooLarge as exc:
                failure = f"the graph is too large for onnx's reference evaluator ({exc})"
            except Exception as exc:  # the evaluator lacks some ops or shapes
                failure = f"onnx's reference evaluator could not run the float64 graph ({type(exc).__name__})"
    if failure:
        log.info("noise floor by input perturbation: %s", failure)
    floors = _perturbation_floors(run, arrays, outputs)
    return Baseline(outputs, floors, METHOD_PERTURBATION, "float32 reference", K_FLOOR + 1, detail=failure)


class _TooLarge(Exception):
    """The float64 evaluation would take too long."""


def _is_session(model: Any) -> bool:
    return type(model).__name__ == "InferenceSession"
