"""``normfx stats``: recompute BN statistics on data (precise or adaptive BN) and show how stale the
stored EMA statistics were.

    normfx stats --model NAME|model.onnx|module:factory --data inputs.npz|inputs.npy|module:factory
                 [--mode precise|adaptive] [--batch-size B] [--num-batches N]
                 [--out stats.pt|stats.json] [--plot drift.png] [--json]

``--data``: an ``.npy`` array of inputs (split into batches of ``--batch-size`` along axis 0); an
``.npz`` with one array (the same) or several arrays of equal length (each batch is a dict fed as
keyword arguments); or ``module:factory`` whose result is an iterable of batches (used as is) or one
array (split into batches). Floating arrays are cast to the model's dtype.
``--model model.onnx``: the statistics of its BatchNormalization nodes, measured in onnxruntime (one
row per node); batches are fed to the graph input (``.npz`` with several arrays: by input name).
``--out stats.pt`` (torch models only): the model's state_dict with the new statistics
(``model.load_state_dict``); ``--out stats.json``: per-layer statistics, the drift table and the
report. Outputs are written atomically and never over an input.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any, Iterable

import numpy as np
import torch

from .errors import InputDataError, ModelError
from .stats.recompute import MODES

__all__ = ["add_parser", "run", "load_data", "model_dtype"]

log = logging.getLogger(__name__)

_OUT_SUFFIXES = (".pt", ".json")
_PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def add_parser(subparsers: Any) -> None:
    """Register the ``stats`` subcommand on an ``argparse`` subparsers object."""
    from .cli import add_model_args

    p = subparsers.add_parser(
        "stats",
        help="recompute BN statistics on data (precise/adaptive BN) and show the drift of the stored EMA",
        description=__doc__.split("\n\n")[0],
    )
    add_model_args(p)
    p.add_argument("--data", required=True,
                   help="inputs.npy / inputs.npz, or module:factory returning an iterable of batches "
                        "(module:factory IMPORTS AND RUNS that code)")
    p.add_argument("--mode", choices=MODES, default="precise",
                   help="precise: training-distribution data; adaptive: target-domain data (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size for array data (default: %(default)s)")
    p.add_argument("--num-batches", type=int, default=0, help="use only the first N batches (0 = all)")
    p.add_argument("--out", help="stats.pt (state_dict with the new statistics) or stats.json (statistics, drift, report)")
    p.add_argument("--plot", help="save the EMA drift figure (png/pdf/svg)")
    p.add_argument("--json", action="store_true", help="print the drift and report as JSON instead of tables")
    p.set_defaults(func=run)


def _as_batches(array: Any, batch_size: int, dtype: torch.dtype | None, label: str) -> list[Any]:
    tensor = torch.as_tensor(array)
    if tensor.dim() == 0:
        raise InputDataError(f"{label} holds a scalar; expected an array of inputs with the samples along axis 0")
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    return list(torch.split(tensor, batch_size)) if tensor.shape[0] else []


def load_data(spec: str, *, batch_size: int = 32, dtype: torch.dtype | None = None) -> Iterable[Any]:
    """Batches from ``.npy``/``.npz`` files or ``module:factory`` (see the module docstring)."""
    if batch_size < 1:
        raise InputDataError(f"--batch-size must be >= 1, got {batch_size}")
    lower = spec.lower()
    if lower.endswith((".npy", ".npz")):
        if not os.path.isfile(spec):
            raise InputDataError(f"data file {spec!r} does not exist")
        try:
            loaded = np.load(spec, allow_pickle=False)
            if not isinstance(loaded, np.ndarray):
                with loaded:
                    loaded = {key: loaded[key] for key in loaded.files}
        except Exception as exc:  # numpy raises ValueError/OSError/zipfile errors on bad files
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if "pickle" in text:  # numpy's advice (allow_pickle=True) is no fix for a data file
                text = "it is not an array of numbers (corrupt, or it holds pickled Python objects)"
            raise InputDataError(f"cannot read data file {spec!r}: {text}; save inputs with numpy.save/savez") from None
        if isinstance(loaded, np.ndarray):
            return _as_batches(loaded, batch_size, dtype, spec)
        arrays = loaded
        if not arrays:
            raise InputDataError(f"data file {spec!r} holds no arrays")
        if len(arrays) == 1:
            return _as_batches(next(iter(arrays.values())), batch_size, dtype, spec)
        lengths = {key: (a.shape[0] if a.ndim else None) for key, a in arrays.items()}
        if len(set(lengths.values())) != 1 or None in lengths.values():
            raise InputDataError(f"the arrays of {spec!r} must have the same length along axis 0, got {lengths}")
        split = {key: _as_batches(a, batch_size, dtype, f"{spec}[{key}]") for key, a in arrays.items()}
        return [dict(zip(split, parts)) for parts in zip(*split.values())]
    if ":" in spec:
        from .loading import load_factory

        try:
            made = load_factory(spec)
        except ModelError as exc:
            raise InputDataError(f"--data {spec}: {exc}") from None
        if isinstance(made, (np.ndarray, torch.Tensor)):
            return _as_batches(made, batch_size, dtype, spec)
        return made
    raise InputDataError(f"--data {spec!r}: give an .npy/.npz file of inputs or module:factory returning batches")


def model_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating parameter/buffer (array data is cast to it)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return None


def _check_outputs(args: argparse.Namespace) -> list[str]:
    from .io_utils import check_output_path

    protect = [p for p in (args.data, args.model, getattr(args, "weights", None)) if p and os.path.exists(p)]
    if args.out:
        if not args.out.lower().endswith(_OUT_SUFFIXES):
            raise InputDataError(f"--out {args.out!r}: use a .pt (state_dict) or .json (statistics) file name")
        check_output_path(args.out, protect)
    if args.plot:
        if not args.plot.lower().endswith(_PLOT_SUFFIXES):
            raise InputDataError(f"--plot {args.plot!r}: use a .png, .pdf or .svg file name")
        check_output_path(args.plot, protect)
    if args.out and args.plot and os.path.realpath(args.out) == os.path.realpath(args.plot):
        raise InputDataError("--out and --plot name the same file; give two different paths")
    return protect


def _statistics(model: torch.nn.Module, report: Any) -> dict[str, Any]:
    modules = dict(model.named_modules())
    out = {}
    for entry in report.applied:
        bn = modules[entry.name]
        out[entry.name] = {
            "running_mean": bn.running_mean.detach().cpu().double().tolist(),
            "running_var": bn.running_var.detach().cpu().double().tolist(),
            "eps": float(bn.eps),
            "count": entry.details.get("count"),
            "calls": entry.details.get("calls"),
        }
    return out


def _onnx_statistics(model: Any, report: Any) -> dict[str, Any]:
    """Per recomputed BatchNormalization node: the mean/var it now holds, its epsilon, count and calls."""
    from .stats.onnx_recompute import Constants

    constants = Constants(model)
    nodes = {n.name: n for n in model.graph.node if n.op_type == "BatchNormalization"}
    out = {}
    for entry in report.applied:
        node = nodes[entry.name]
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        mean, var = (np.asarray(constants.value(node.input[i]), np.float64) for i in (3, 4))
        out[entry.name] = {
            "running_mean": mean.tolist(),
            "running_var": var.tolist(),
            "eps": float(eps),
            "count": entry.details.get("count"),
            "calls": entry.details.get("calls"),
            "mean_input": node.input[3],
            "var_input": node.input[4],
        }
    return out


def run(args: argparse.Namespace) -> int:
    """Run ``normfx stats``; errors are :class:`~normfx.errors.NormfxError` subclasses (exit code 2 in the CLI)."""
    from .cli import emit, load_from_args
    from .io_utils import atomic_path, atomic_write_text
    from .stats.diagnose import recompute_with_diagnosis

    if args.num_batches < 0:
        raise InputDataError(f"--num-batches must be >= 0 (0 = all), got {args.num_batches}")
    protect = _check_outputs(args)
    loaded = load_from_args(args)
    onnx_model = loaded.kind == "onnx"
    if onnx_model and args.out and args.out.lower().endswith(".pt"):
        raise InputDataError(
            f"--out {args.out!r}: a .pt file holds a torch state_dict; for an ONNX model write --out stats.json, or the "
            "model itself with `normfx rewrite --model MODEL.onnx --policy precise --data DATA --out NEW.onnx`"
        )
    if not onnx_model and not isinstance(loaded.model, torch.nn.Module):
        raise ModelError(f"normfx stats needs a torch model or an .onnx file; got {type(loaded.model).__name__}")
    data = load_data(args.data, batch_size=args.batch_size, dtype=None if onnx_model else model_dtype(loaded.model))
    result = recompute_with_diagnosis(loaded.model, data, num_batches=args.num_batches or None, mode=args.mode)
    payload = {
        "model": loaded.label,
        "data": args.data,
        "mode": args.mode,
        "diagnosis": result.diagnosis.to_dict(),
        "report": result.report.to_dict(),
    }
    if args.json:
        emit(json.dumps(payload, indent=2))
    else:
        emit(result.diagnosis.format())
        emit(f"{args.mode} statistics: {len(result.report.applied)} layer(s) recomputed, "
             f"{len(result.report.skipped)} skipped")
        for entry in result.report.skipped:
            emit(f"  {entry}")
    if args.plot:  # first: a plot that fails leaves no statistics file behind
        result.diagnosis.plot(args.plot)
        if not args.json:
            emit(f"wrote {args.plot}")
    if args.out:
        if args.out.lower().endswith(".pt"):
            state = {k: v.detach().cpu().clone() for k, v in result.model.state_dict().items()}
            with atomic_path(args.out, protect) as tmp:
                torch.save(state, tmp)
        else:
            statistics = _onnx_statistics if onnx_model else _statistics
            payload["statistics"] = statistics(result.model, result.report)
            atomic_write_text(args.out, json.dumps(payload, indent=2) + "\n", protect=protect)
        if not args.json:
            emit(f"wrote {args.out}")
    return 0
