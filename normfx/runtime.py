"""onnxruntime sessions (CPU, and CUDA when present) and interleaved latency measurement."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .errors import InputDataError, ModelError, ProviderError

__all__ = [
    "OPTIMIZATION_LEVELS",
    "Timing",
    "available_providers",
    "is_onnx_like",
    "make_session",
    "session_runner",
    "feed_for",
    "time_sessions",
    "random_inputs",
    "SUPPORTED_OPSETS",
    "check_opset",
    "input_shapes",
]

log = logging.getLogger(__name__)

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
# ai.onnx opsets normfx can export (torch.onnx's range) and run: onnxruntime has no kernels before opset 7
# (`--opset 5` fails with "Could not find an implementation for Relu(1)").
SUPPORTED_OPSETS = (7, 23)
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_NUMPY_FOR_ORT = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
}


def available_providers() -> list[str]:
    import onnxruntime as ort

    return [short for short, full in _PROVIDERS.items() if full in ort.get_available_providers()]


def is_onnx_like(model: Any) -> bool:
    import onnx
    import onnxruntime as ort

    return isinstance(model, (onnx.ModelProto, ort.InferenceSession, str, os.PathLike))


def _session_options(optimization: str, threads: int | None):
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if optimization not in levels:
        raise InputDataError(f"unknown optimization level {optimization!r}; valid: {', '.join(OPTIMIZATION_LEVELS)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[optimization]
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def make_session(model: Any, *, provider: str = "cpu", optimization: str = "all", threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` for a ModelProto, a path, or (returned as is) a session."""
    import onnx
    import onnxruntime as ort

    if isinstance(model, ort.InferenceSession):
        return model
    if provider not in _PROVIDERS:
        raise ProviderError(f"unknown provider {provider!r}; valid: {', '.join(_PROVIDERS)}")
    if provider not in available_providers():
        raise ProviderError(
            f"provider {provider!r} is not available in this onnxruntime build (available: {', '.join(available_providers())}); "
            "install onnxruntime-gpu for CUDA"
        )
    if isinstance(model, onnx.ModelProto):
        source, label = model.SerializeToString(), "the ONNX model"
    else:
        source = label = os.fspath(model)
        if not os.path.isfile(source):
            raise ModelError(f"ONNX file {source!r} does not exist")
    providers = [_PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
    try:
        return ort.InferenceSession(source, sess_options=_session_options(optimization, threads), providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types
        text = ort_message(exc)
        if "Could not find an implementation for" in text:
            opset = _model_opset(model)
            text += (f" (the model uses ai.onnx opset {opset}; " if opset is not None else " (") + (
                f"normfx supports opsets {SUPPORTED_OPSETS[0]} to {SUPPORTED_OPSETS[1]}: export with --opset "
                f"{SUPPORTED_OPSETS[0]} or later)")
        raise ModelError(f"onnxruntime cannot load {label}: {text}") from None


def ort_message(exc: BaseException) -> str:
    """An onnxruntime error on one line, with every detail it gives (indices, sizes given and expected)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def check_opset(opset: int) -> None:
    """Refuse an opset normfx cannot export and onnxruntime cannot run, naming the supported ones."""
    low, high = SUPPORTED_OPSETS
    if isinstance(opset, bool) or not isinstance(opset, int) or not low <= opset <= high:
        raise InputDataError(f"opset {opset!r} is not supported: normfx exports and verifies ai.onnx opsets {low} to "
                             f"{high} (default 17); give an opset in that range (--opset on the command line)")


def _model_opset(model: Any) -> int | None:
    import onnx

    try:
        proto = model if isinstance(model, onnx.ModelProto) else onnx.load(os.fspath(model), load_external_data=False)
    except Exception:  # only for the message
        return None
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def input_shapes(session) -> dict[str, list]:
    """``{input name: shape}`` of a session (dynamic axes as their names or None)."""
    return {spec.name: list(spec.shape) for spec in session.get_inputs()}


def _check_shape(spec, array: np.ndarray) -> None:
    """Refuse an array whose rank or fixed axes do not fit the graph input, naming every axis that differs."""
    expected = list(spec.shape)
    if array.ndim != len(expected):
        raise InputDataError(
            f"input {spec.name!r} takes {len(expected)}-D arrays of shape {expected}, got a {array.ndim}-D array of "
            f"shape {list(array.shape)}; give inputs of the model's shape"
        )
    wrong = [f"axis {i}: {got} given, {want} expected" for i, (got, want) in enumerate(zip(array.shape, expected))
             if isinstance(want, int) and want > 0 and got != want]
    if wrong:
        raise InputDataError(
            f"input {spec.name!r} takes shape {expected}, got {list(array.shape)} ({'; '.join(wrong)}); "
            "give inputs of the model's shape"
        )


def feed_for(session, arrays: Sequence[np.ndarray] | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Map arrays to the session's inputs (by name for a dict, else by position), casting floats to the
    dtype each input declares."""
    inputs = session.get_inputs()
    if isinstance(arrays, Mapping):
        expected = [i.name for i in inputs]
        missing, unknown = [n for n in expected if n not in arrays], [n for n in arrays if n not in expected]
        if missing or unknown:
            raise InputDataError(
                f"input names {', '.join(map(str, arrays)) or 'none'} do not match the model's inputs {', '.join(expected)}; "
                "name the arrays after the model's inputs (or save them positionally with np.savez(path, x))"
            )
        ordered = [arrays[i.name] for i in inputs]
    else:
        if len(arrays) != len(inputs):
            raise InputDataError(
                f"got {len(arrays)} input array(s) but the model takes {len(inputs)} ({', '.join(i.name for i in inputs)})"
            )
        ordered = list(arrays)
    feed = {}
    for spec, array in zip(inputs, ordered):
        want = _NUMPY_FOR_ORT.get(spec.type)
        array = np.asarray(array)
        if want is not None and array.dtype != want:
            if np.issubdtype(array.dtype, np.floating) != np.issubdtype(np.dtype(want), np.floating):
                raise InputDataError(f"input {spec.name!r} expects {spec.type}, got an array of {array.dtype}; convert it "
                                     f"first (e.g. array.astype('{np.dtype(want).name}'), scaled as the model expects)")
            array = array.astype(want)
        _check_shape(spec, array)
        if array.size == 0:
            raise InputDataError(f"input {spec.name!r} is empty (shape {list(array.shape)}): running or comparing on it "
                                 "would check nothing; give at least one sample")
        feed[spec.name] = array
    return feed


def session_runner(session) -> Callable[[Any], list[np.ndarray]]:
    def run(arrays: Sequence[np.ndarray] | Mapping[str, np.ndarray]) -> list[np.ndarray]:
        feed = feed_for(session, arrays)
        try:
            return list(session.run(None, feed))
        except Exception as exc:  # onnxruntime's own types; its multi-line details on one line
            shapes = ", ".join(f"{k}: {list(v.shape)}" for k, v in feed.items())
            raise InputDataError(f"onnxruntime cannot run the model on inputs ({shapes}): {ort_message(exc)}") from None

    return run


@dataclass
class Timing:
    """Latency of one model over ``runs`` timed runs, in milliseconds."""

    label: str
    median_ms: float
    p90_ms: float
    min_ms: float
    runs: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def time_sessions(
    sessions: Mapping[str, Any],
    arrays: Sequence[np.ndarray] | Mapping[str, np.ndarray],
    *,
    runs: int = 50,
    warmup: int = 5,
    progress: bool = False,
) -> dict[str, Timing]:
    """Time several sessions on the same inputs, interleaved run by run (order alternating each round),
    so that machine noise hits all of them alike. Returns one :class:`Timing` per label."""
    if runs < 1:
        raise InputDataError(f"runs must be at least 1, got {runs}")
    feeds = {label: feed_for(s, arrays) for label, s in sessions.items()}
    for _ in range(warmup):
        for label, session in sessions.items():
            session.run(None, feeds[label])
    samples: dict[str, list[float]] = {label: [] for label in sessions}
    labels = list(sessions)
    rounds = range(runs)
    if progress:
        from tqdm import tqdm

        rounds = tqdm(rounds, desc="timing", unit="round", leave=False)
    for i in rounds:
        for label in labels if i % 2 == 0 else reversed(labels):
            start = time.perf_counter()
            sessions[label].run(None, feeds[label])
            samples[label].append((time.perf_counter() - start) * 1e3)
    return {
        label: Timing(label, float(np.median(t)), float(np.percentile(t, 90)), float(np.min(t)), len(t))
        for label, t in samples.items()
    }


def random_inputs(model: Any, *, batch: int = 1, seed: int = 0) -> list[np.ndarray]:
    """Random arrays for the graph inputs of an ONNX model/path/session: dynamic first axes take
    ``batch``; any other dynamic axis is an error that asks for explicit inputs."""
    import onnxruntime as ort

    session = model if isinstance(model, ort.InferenceSession) else make_session(model, optimization="disable")
    generator = np.random.default_rng(seed)
    arrays = []
    for spec in session.get_inputs():
        shape = []
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int) and dim > 0:
                shape.append(dim)
            elif axis == 0:
                shape.append(batch)
            else:
                raise InputDataError(
                    f"input {spec.name!r} has a dynamic axis {axis} ({dim!r}); pass explicit inputs (--inputs x.npz)"
                )
        dtype = _NUMPY_FOR_ORT.get(spec.type)
        if dtype is None:
            raise InputDataError(f"input {spec.name!r} has type {spec.type}, which normfx cannot generate; pass --inputs")
        if np.issubdtype(np.dtype(dtype), np.floating):
            arrays.append(generator.standard_normal(shape).astype(dtype))
        elif dtype is np.bool_:
            arrays.append(generator.random(shape) > 0.5)
        else:
            arrays.append(generator.integers(0, 10, size=shape).astype(dtype))
    return arrays
