"""Numerical equivalence: torch vs torch, torch vs onnxruntime, onnxruntime vs onnxruntime.

The error of one output is ``max|Δ|`` (absolute) and ``max|Δ| / max|y_ref|`` (relative).

How a candidate is judged (:func:`verify`, ``export``, ``check``, ``assert_equivalent``):

- **default** (``rtol=None``): the candidate is compared with a **float64 run of the reference** where one
  can be computed (see :mod:`normfx.noise`), and each output must satisfy
  ``max|Δ| <= atol + tol * max|y64|`` with ``tol = max(1e-5, k * floor)``: ``floor`` is the reference's
  own float32 error against its float64 run on the same inputs, ``k = 2`` (:data:`normfx.noise.K_FLOOR`).
  ``export`` also accepts ``1.5 *`` the error of a plain export of the reference run in onnxruntime
  (:data:`normfx.noise.K_PLAIN_EXPORT`), measured only when the first bound is not met. Without a float64
  run of the whole input (ONNX reference on a larger batch, or no float64 at all), the candidate is
  compared with the reference's float32 outputs and may reach ``k + 1`` floors (the reference carries
  its own floor). Small models have floors near 1e-7, so their tolerance stays 1e-5.
- **explicit** ``rtol``: exactly ``max|Δ| <= atol + rtol * max|y_ref|`` against the reference's own
  outputs, no floor measured and no widening.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .errors import InputDataError, ModelError, NormfxError, VerificationError
from .noise import DEFAULT_RTOL, K_PLAIN_EXPORT, Baseline, measure_baseline

__all__ = ["OutputError", "VerifyResult", "verify", "judge", "compare", "load_inputs", "describe_inputs", "as_runner",
           "flatten_outputs"]

Runner = Callable[[Any], list[np.ndarray]]  # arrays (list in call order, or dict by name) -> outputs


@dataclass
class OutputError:
    """Error of one output (``index`` in the flattened output list; ``name`` for ONNX outputs)."""

    index: int
    name: str
    shape: tuple[int, ...]
    max_abs_error: float
    max_rel_error: float
    max_abs_reference: float
    ok: bool
    noise_floor: float | None = None  #: the reference's own float32 relative error (None: not measured)
    plain_export_floor: float | None = None  #: a plain export's relative error in onnxruntime (None: not measured)
    tolerance: float | None = None  #: the relative tolerance this output was judged by


@dataclass
class VerifyResult:
    """The worst errors over all outputs, and each output's.

    ``versus``: what the candidate was compared with — ``"float64"`` (a float64 run of the reference),
    ``"float32 reference"`` (its own run, floor estimated apart) or ``"reference"`` (explicit ``rtol``).
    ``noise_floor`` / ``plain_export_floor``: the largest floors over the outputs, measured by
    ``noise_floor_method``; ``tolerance``: the relative tolerance of the worst output; ``k``: the floor
    multiple allowed (see the module docstring). With an explicit ``rtol`` the floors are ``None`` and
    ``tolerance == rtol``.
    """

    max_abs_error: float
    max_rel_error: float
    ok: bool
    rtol: float
    atol: float
    outputs: list[OutputError] = field(default_factory=list)
    versus: str = "reference"
    noise_floor: float | None = None
    noise_floor_method: str | None = None
    plain_export_floor: float | None = None
    tolerance: float | None = None
    k: float | None = None

    @property
    def worst(self) -> OutputError:
        return max(self.outputs, key=lambda o: (not o.ok, o.max_rel_error))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def tolerance_text(self) -> str:
        """How the tolerance was chosen, e.g. ``tolerance 5e-04 = 2 x noise floor 2.5e-04 (torch float64 copy)``."""
        if self.noise_floor is None:
            return f"rtol={self.rtol:g}, atol={self.atol:g}"
        worst = self.worst
        floor = worst.noise_floor or 0.0
        terms = [(self.rtol, f"rtol {self.rtol:g}"), ((self.k or 0.0) * floor, f"{self.k:g} x noise floor")]
        if worst.plain_export_floor is not None:
            terms.append((K_PLAIN_EXPORT * worst.plain_export_floor, f"{K_PLAIN_EXPORT:g} x plain export's error"))
        _, why = max(terms, key=lambda t: t[0])
        plain = "" if self.plain_export_floor is None else f", plain export's error {self.plain_export_floor:.3g}"
        atol = f", atol={self.atol:g}" if self.atol else ""
        return (f"tolerance {self.tolerance:.3g} = {why}; noise floor {self.noise_floor:.3g} by {self.noise_floor_method}"
                f"{plain}{atol}")

    def __str__(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        worst = self.worst
        versus = "" if self.versus == "reference" else f" vs {self.versus}"
        return (
            f"{verdict}: max rel error {self.max_rel_error:.3g}{versus}, max abs error {self.max_abs_error:.3g} "
            f"over {len(self.outputs)} output(s) ({self.tolerance_text()}; worst: {worst.name} {list(worst.shape)})"
        )


def flatten_outputs(value: Any) -> list[Any]:
    """Tensors of a (nested tuple/list/dict) output in a stable order."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return [value]
    if isinstance(value, Mapping):
        return [leaf for key in value for leaf in flatten_outputs(value[key])]
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [leaf for item in value for leaf in flatten_outputs(item)]
    if isinstance(value, (int, float)):
        return [np.asarray(value)]
    raise VerificationError(f"cannot compare an output of type {type(value).__name__}; return tensors, tuples or dicts")


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


Arrays = "list[np.ndarray] | dict[str, np.ndarray]"


def _positional_names(names: Sequence[str]) -> bool:
    """``np.savez(path, a, b)`` names arrays arr_0, arr_1, ...: positional, not input names."""
    return all(name == f"arr_{i}" for i, name in enumerate(names))


def load_inputs(inputs: Any) -> list[np.ndarray] | dict[str, np.ndarray]:
    """Inputs as arrays: a dict by input name (from a dict or a ``.npz`` with named arrays), else a list
    in call order (a tensor/array, a tuple/list of them, a ``.npy``, or a ``.npz`` saved positionally)."""
    if isinstance(inputs, (str, os.PathLike)):
        path = os.fspath(inputs)
        if not os.path.isfile(path):
            raise InputDataError(f"inputs file {path!r} does not exist")
        try:
            loaded = np.load(path, allow_pickle=False)
        except Exception as exc:  # numpy raises several types for bad files
            raise InputDataError(f"cannot read inputs file {path!r} as .npz/.npy ({exc})") from None
        if isinstance(loaded, np.ndarray):
            return [loaded]
        with loaded:
            named = {key: loaded[key] for key in loaded.files}
        return list(named.values()) if _positional_names(list(named)) else named
    if isinstance(inputs, Mapping):
        return {str(k): _to_numpy(v) for k, v in inputs.items()}
    if isinstance(inputs, (torch.Tensor, np.ndarray)):
        return [_to_numpy(inputs)]
    if isinstance(inputs, Sequence):
        return [_to_numpy(v) for v in inputs]
    raise InputDataError(f"inputs must be a tensor, a tuple of tensors, a dict or a .npz path, got {type(inputs).__name__}")


def describe_inputs(arrays: Any) -> str:
    items = arrays.items() if isinstance(arrays, Mapping) else enumerate(arrays)
    return ", ".join(f"{k}: {list(np.shape(a))}" for k, a in items)


def _torch_runner(module: torch.nn.Module) -> Runner:
    if any(m.training for m in module.modules()):
        # A module in training mode updates its buffers (BN running statistics) when run: run a copy,
        # in the same mode, so that verifying never changes the caller's model.
        import copy

        module = copy.deepcopy(module)

    def run(arrays: Any) -> list[np.ndarray]:
        if isinstance(arrays, Mapping):  # a torch module takes its inputs by position, in the dict's order
            arrays = list(arrays.values())
        params = list(module.parameters()) + list(module.buffers())
        device = params[0].device if params else torch.device("cpu")
        tensors = [torch.from_numpy(np.array(a)).to(device) for a in arrays]
        with torch.no_grad():
            out = module(*tensors)
        return [_to_numpy(o) for o in flatten_outputs(out)]

    return run


def as_runner(model: Any, *, provider: str = "cpu", optimization: str = "disable") -> tuple[Runner, list[str] | None]:
    """A function ``arrays -> output arrays`` for a torch module, an ONNX model/path or an ORT session.

    Also returns the output names where the model has them (ONNX). ONNX models run in onnxruntime
    with graph optimizations off by default, so the graph itself is what gets checked.
    """
    if isinstance(model, torch.nn.Module):
        return _torch_runner(model), None
    from . import runtime

    if runtime.is_onnx_like(model):
        session = runtime.make_session(model, provider=provider, optimization=optimization)
        return runtime.session_runner(session), [o.name for o in session.get_outputs()]
    if callable(model):
        def call(arrays: Any) -> list[np.ndarray]:
            values = list(arrays.values()) if isinstance(arrays, Mapping) else arrays
            return [_to_numpy(o) for o in flatten_outputs(model(*values))]

        return call, None
    raise ModelError(f"cannot run a {type(model).__name__}: pass a torch.nn.Module, an ONNX model/path or an onnxruntime session")


def _errors(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], names: Sequence[str] | None):
    """``(name, shape, max|Δ|, max|ref|, relative)`` per output, shapes checked."""
    if len(reference) != len(candidate):
        raise VerificationError(f"reference has {len(reference)} output(s), candidate has {len(candidate)}")
    if not reference:
        raise VerificationError("the models have no outputs to compare")
    rows = []
    for i, (ref, cand) in enumerate(zip(reference, candidate)):
        ref, cand = np.asarray(ref), np.asarray(cand)
        name = names[i] if names and i < len(names) else f"output[{i}]"
        if ref.shape != cand.shape:
            raise VerificationError(f"{name}: reference shape {list(ref.shape)} != candidate shape {list(cand.shape)}")
        ref64, cand64 = ref.astype(np.float64), cand.astype(np.float64)
        delta = float(np.max(np.abs(ref64 - cand64))) if ref.size else 0.0
        scale = float(np.max(np.abs(ref64))) if ref.size else 0.0
        if not (np.isfinite(delta) and np.isfinite(scale)):
            delta = float("inf")
        rel = delta / scale if scale > 0 else (0.0 if delta == 0 else float("inf"))
        rows.append((name, tuple(ref.shape), delta, scale, rel))
    return rows


def _result(outputs: list[OutputError], rtol: float, atol: float, **extra: Any) -> VerifyResult:
    result = VerifyResult(
        max_abs_error=max(o.max_abs_error for o in outputs),
        max_rel_error=max(o.max_rel_error for o in outputs),
        ok=all(o.ok for o in outputs),
        rtol=rtol,
        atol=atol,
        outputs=outputs,
        **extra,
    )
    result.tolerance = result.worst.tolerance
    return result


def compare(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], *, rtol: float, atol: float,
            names: Sequence[str] | None = None) -> VerifyResult:
    """Compare two lists of output arrays with exactly ``max|Δ| <= atol + rtol * max|y_ref|`` (no floor)."""
    outputs = [
        OutputError(i, name, shape, delta, rel, scale, bool(delta <= atol + rtol * scale), tolerance=rtol)
        for i, (name, shape, delta, scale, rel) in enumerate(_errors(reference, candidate, names))
    ]
    return _result(outputs, rtol, atol)


def judge(baseline: Baseline, candidate: Sequence[np.ndarray], *, rtol: float = DEFAULT_RTOL, atol: float = 0.0,
          names: Sequence[str] | None = None, plain_export_floors: Sequence[float] | None = None) -> VerifyResult:
    """Judge candidate outputs against a :class:`~normfx.noise.Baseline` (float64 outputs and noise floors).

    Output ``i`` passes when ``max|Δ_i| <= atol + tol_i * max|y_i|`` with
    ``tol_i = max(rtol, baseline.k * floor_i, K_PLAIN_EXPORT * plain_export_floor_i)`` (the last term only
    where ``plain_export_floors`` is given).
    """
    outputs = []
    for i, (name, shape, delta, scale, rel) in enumerate(_errors(baseline.outputs, candidate, names)):
        floor = baseline.floors[i]
        plain = plain_export_floors[i] if plain_export_floors is not None else None
        tol = max(rtol, baseline.k * floor, K_PLAIN_EXPORT * plain if plain is not None else 0.0)
        if not np.isfinite(tol):  # a reference that is NaN/inf in float32 proves nothing
            tol = rtol
        ok = delta <= atol + tol * scale
        outputs.append(OutputError(i, name, shape, delta, rel, scale, bool(ok), noise_floor=floor,
                                   plain_export_floor=plain, tolerance=tol))
    return _result(
        outputs, rtol, atol, versus=baseline.versus, noise_floor=max(o.noise_floor or 0.0 for o in outputs),
        noise_floor_method=baseline.method + (f", {baseline.detail}" if baseline.detail else ""),
        plain_export_floor=None if plain_export_floors is None else max(o.plain_export_floor or 0.0 for o in outputs),
        k=baseline.k,
    )


def verify(reference: Any, candidate: Any, inputs: Any, *, rtol: float | None = None, atol: float = 0.0,
           provider: str = "cpu") -> VerifyResult:
    """Run ``reference`` and ``candidate`` on ``inputs`` and compare every output.

    Either side may be a ``torch.nn.Module`` (run as it is, under ``no_grad``; its mode is not
    changed), an ``onnx.ModelProto``, a path to a ``.onnx`` file or an ``onnxruntime.InferenceSession``.
    ``inputs``: a tensor/array, a tuple of them, a dict, or a ``.npz``/``.npy`` path.

    ``rtol=None`` (default): judged against a float64 run of the reference with tolerance
    ``max(1e-5, 2 x the reference's own float32 error)`` (see the module docstring; the result reports the
    error, the floor, its method and the tolerance). An explicit ``rtol`` means exactly that tolerance
    against the reference's own outputs.
    """
    arrays = load_inputs(inputs)
    if any(a.size == 0 for a in (arrays.values() if isinstance(arrays, dict) else arrays)):
        raise InputDataError(f"the inputs ({describe_inputs(arrays)}) hold no values, so there is nothing to compare: "
                             "give at least one sample")
    ref_run, ref_names = as_runner(reference, provider=provider)
    cand_run, cand_names = as_runner(candidate, provider=provider)
    try:
        ref_out = ref_run(arrays)
        cand_out = cand_run(arrays)
    except NormfxError:
        raise
    except Exception as exc:  # torch and onnxruntime raise many types for inputs that do not fit
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputDataError(f"running the models on inputs ({describe_inputs(arrays)}) failed: {first}") from exc
    names = ref_names or cand_names
    if rtol is not None:
        return compare(ref_out, cand_out, rtol=rtol, atol=atol, names=names)
    _errors(ref_out, cand_out, names)  # output count and shapes first: a mismatch needs no floor
    baseline = measure_baseline(reference, ref_run, arrays, ref_out)
    return judge(baseline, cand_out, atol=atol, names=names)
