"""``normfx export``, ``normfx check`` and ``normfx bench``: the ONNX deployment commands."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from .cli import (
    EXIT_FAILED,
    EXIT_OK,
    add_model_args,
    add_policy_args,
    emit,
    load_from_args,
    policy_from_args,
    write_json_atomic,
)
from .errors import InputDataError, ModelError

__all__ = ["add_parser"]


def _latency_table(timings: dict[str, Any], baseline: str, candidate: str) -> list[str]:
    base, cand = timings[baseline], timings[candidate]
    return [
        f"latency ({base.runs} interleaved runs): {baseline} median {base.median_ms:.3f} ms (p90 {base.p90_ms:.3f}), "
        f"{candidate} median {cand.median_ms:.3f} ms (p90 {cand.p90_ms:.3f}), ratio {cand.median_ms / base.median_ms:.3f}x"
    ]


def _time_pair(baseline: Any, candidate: Any, arrays: list, *, provider: str, optimization: str, runs: int,
               warmup: int, threads: int | None, labels=("original", "normfx")) -> dict[str, Any]:
    from .runtime import make_session, time_sessions

    sessions = {
        labels[0]: make_session(baseline, provider=provider, optimization=optimization, threads=threads),
        labels[1]: make_session(candidate, provider=provider, optimization=optimization, threads=threads),
    }
    return time_sessions(sessions, arrays, runs=runs, warmup=warmup, progress=os.isatty(2))


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export, export_onnx
    from .io_utils import check_distinct_outputs, check_output_path
    from .runtime import check_opset
    from .verify import load_inputs

    check_distinct_outputs(out=args.out, report=args.report)
    check_opset(args.opset)
    loaded = load_from_args(args)
    if loaded.kind != "onnx" and loaded.example_inputs is None:
        raise InputDataError(f"{loaded.label}: no example input is known; give --input-shape")
    from .cli import _external_data_files

    sources = [loaded.model, *_external_data_files(loaded.model)] if loaded.kind == "onnx" else []
    protect = [p for p in sources + [args.weights, args.inputs] if p]
    check_output_path(args.out, protect=protect)
    if args.report:
        check_output_path(args.report, protect=protect)
    if loaded.kind == "onnx":
        inputs, check_inputs = (args.inputs or None), None
    else:
        inputs, check_inputs = loaded.example_inputs, (args.inputs or None)
    result = export(loaded.model, inputs, args.out, policy=policy_from_args(args), opset=args.opset,
                    dynamic_batch=not args.static_batch, rtol=args.rtol, atol=args.atol, strict=args.strict,
                    check_inputs=check_inputs)
    if result.torch_report is not None:
        result.torch_report.model = loaded.label
        emit("torch.fx route:")
        emit(result.torch_report.format())
        emit("")
    emit("ONNX route:")
    emit(onnx_route_text(result.onnx_report, after_torch=loaded.kind != "onnx"))
    emit("")
    emit(f"verification (onnxruntime vs {'torch' if loaded.kind != 'onnx' else 'the input graph'}): {result.verification}")
    checks = _labelled_extra_checks(result, torch_model=loaded.kind != "onnx", dynamic=not args.static_batch)
    for label, extra in checks:
        emit(f"verification {label}: {extra}")
    emit(f"BatchNormalization nodes left: {result.batchnorm_left}")
    payload = result.to_dict()
    payload.setdefault("extra_checks", [{"check": label, **extra.to_dict()} for label, extra in checks])
    if args.runs > 0:
        if loaded.kind == "onnx":
            baseline = loaded.model
            arrays = load_inputs(args.inputs) if args.inputs else None
        else:
            baseline = export_onnx(loaded.model, loaded.example_inputs, opset=args.opset, dynamic_batch=not args.static_batch)
            arrays = load_inputs(loaded.example_inputs)
        if arrays is None:
            from .runtime import random_inputs

            arrays = random_inputs(result.model)
        timings = _time_pair(baseline, result.model, arrays, provider=args.provider, optimization="all",
                             runs=args.runs, warmup=args.warmup, threads=args.threads)
        for line in _latency_table(timings, "original", "normfx"):
            emit(line + " (both with onnxruntime's own optimizations on)")
        payload["latency"] = {k: v.to_dict() for k, v in timings.items()}
        payload["latency"]["ratio"] = timings["normfx"].median_ms / timings["original"].median_ms
    emit(f"wrote {args.out}")
    if args.report:
        write_json_atomic(args.report, payload, protect=protect + [args.out])
        emit(f"wrote {args.report}")
    return EXIT_OK


def onnx_route_text(report: Any, *, after_torch: bool) -> str:
    """The ONNX route's report, or in words why it has nothing to list (no empty table)."""
    if report.entries:
        return report.format()
    if after_torch:
        return ("nothing to do: the exported graph has no normalization node left (the torch.fx route already "
                "rewrote every layer the policy targets)")
    return "nothing to do: the graph has no normalization node the policy targets"


def _labelled_extra_checks(result: Any, *, torch_model: bool, dynamic: bool) -> list[tuple[str, Any]]:
    """``export``'s extra verifications with what each one checked (as ``normfx.export`` runs them: another
    batch size for a dynamic-batch torch export first, then ``--inputs``)."""
    labels = []
    if torch_model and dynamic:
        labels.append("at another batch size")
    labels += ["on --inputs"] * (len(result.extra_checks) - len(labels))
    return list(zip(labels, result.extra_checks))


def cmd_check(args: argparse.Namespace) -> int:
    from .runtime import random_inputs
    from .verify import verify

    for path in (args.reference, args.candidate):
        if not os.path.isfile(path):
            raise ModelError(f"ONNX file {path!r} does not exist")
    inputs = args.inputs if args.inputs else random_inputs(args.reference, batch=args.batch, seed=args.seed)
    result = verify(args.reference, args.candidate, inputs, rtol=args.rtol, atol=args.atol, provider=args.provider)
    if args.json:
        emit(json.dumps(result.to_dict(), indent=2))
    elif result.ok:
        emit(f"equivalent: {result}")
    else:
        worst = result.worst
        versus = "" if result.versus == "reference" else f" vs {result.versus}"
        emit(f"NOT equivalent: output {worst.name} {list(worst.shape)}: max abs error {worst.max_abs_error:.3g}, "
             f"max rel error {worst.max_rel_error:.3g}{versus} ({result.tolerance_text()})")
    return EXIT_OK if result.ok else EXIT_FAILED


def cmd_bench(args: argparse.Namespace) -> int:
    from .runtime import make_session, random_inputs, time_sessions
    from .verify import load_inputs

    for path in [args.model] + ([args.baseline] if args.baseline else []):
        if not os.path.isfile(path):
            raise ModelError(f"ONNX file {path!r} does not exist")
    arrays = load_inputs(args.inputs) if args.inputs else random_inputs(args.model, batch=args.batch, seed=args.seed)
    sessions = {"model": make_session(args.model, provider=args.provider, optimization=args.optimization, threads=args.threads)}
    if args.baseline:
        sessions = {"baseline": make_session(args.baseline, provider=args.provider, optimization=args.optimization,
                                             threads=args.threads), **sessions}
        _check_same_inputs(sessions, arrays, args)
    timings = time_sessions(sessions, arrays, runs=args.runs, warmup=args.warmup, progress=os.isatty(2))
    payload: dict[str, Any] = {k: v.to_dict() for k, v in timings.items()}
    if args.baseline:
        payload["ratio"] = timings["model"].median_ms / timings["baseline"].median_ms
    if args.json:
        emit(json.dumps(payload, indent=2))
        return EXIT_OK
    emit(f"provider {args.provider}, optimization {args.optimization}, threads {args.threads}, {args.runs} runs")
    for label, t in timings.items():
        emit(f"{label:<9} median {t.median_ms:.3f} ms  p90 {t.p90_ms:.3f} ms  min {t.min_ms:.3f} ms")
    if args.baseline:
        emit(f"ratio model/baseline (medians): {payload['ratio']:.3f}x")
    return EXIT_OK


def _check_same_inputs(sessions: dict[str, Any], arrays: Any, args: argparse.Namespace) -> None:
    """A latency ratio compares two models on the same inputs: refuse a baseline that cannot take them."""
    from .runtime import feed_for

    try:
        feed_for(sessions["baseline"], arrays)
    except InputDataError as exc:
        given = "--inputs" if args.inputs else f"random inputs of the model's shape (batch {args.batch})"
        raise InputDataError(
            f"the baseline {args.baseline!r} cannot run on the inputs of {args.model!r} ({given}): {str(exc).split('; give inputs')[0]}; a ratio needs "
            "the same inputs: export both with the same input shape (or a dynamic batch axis), or bench each alone"
        ) from None


def _add_runtime_args(parser: argparse.ArgumentParser, *, runs: int) -> None:
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cpu", help="onnxruntime execution provider")
    parser.add_argument("--runs", type=int, default=runs, help="timed runs (interleaved with the baseline)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed warm-up runs")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (fixed for stable timing)")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("export", help="rewrite, export to ONNX, verify in onnxruntime, time, write atomically",
                       description="Rewrite a model by a policy (fx route), export it to ONNX, rewrite the graph "
                                   "(ONNX route), verify it in onnxruntime and write it. A module:factory model "
                                   "IMPORTS AND RUNS that code. Exit 1 when verification fails (nothing is written).")
    add_model_args(p)
    add_policy_args(p, required=False)
    p.set_defaults(policy=None)
    p.add_argument("--out", required=True, help="output .onnx path (written atomically; never the input)")
    p.add_argument("--report", help="also write the reports, verification and latency as JSON here")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--static-batch", action="store_true", help="export a fixed batch axis (default: dynamic)")
    p.add_argument("--inputs", help=".npz/.npy of inputs to verify on (an .onnx model: instead of random inputs; "
                                    "a torch model: in addition to its example input)")
    p.add_argument("--strict", action="store_true", help="fail when any targeted layer is skipped")
    p.add_argument("--rtol", type=float, default=None,
                   help="exact relative tolerance against the reference's float32 outputs (default: judged against a "
                        "float64 run, tolerance max(1e-5, 2 x the reference's own float32 error))")
    p.add_argument("--atol", type=float, default=0.0)
    _add_runtime_args(p, runs=30)
    p.set_defaults(func=cmd_export, default_policy="fuse")

    p = sub.add_parser("check", help="are two ONNX models numerically equivalent? exit 0 yes, 1 no, 2 bad input")
    p.add_argument("reference")
    p.add_argument("candidate")
    p.add_argument("--inputs", help=".npz/.npy of inputs (default: random inputs of the reference's input shapes)")
    p.add_argument("--rtol", type=float, default=None,
                   help="exact relative tolerance against the reference's float32 outputs (default: judged against a "
                        "float64 run, tolerance max(1e-5, 2 x the reference's own float32 error))")
    p.add_argument("--atol", type=float, default=0.0)
    p.add_argument("--batch", type=int, default=1, help="size of a dynamic batch axis for random inputs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("bench", help="time an ONNX model in onnxruntime, optionally against a baseline")
    p.add_argument("model")
    p.add_argument("--baseline", help="another .onnx to time interleaved with the model")
    p.add_argument("--inputs", help=".npz/.npy of inputs (default: random)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--optimization", choices=["disable", "basic", "extended", "all"], default="all")
    p.add_argument("--json", action="store_true")
    _add_runtime_args(p, runs=100)
    p.set_defaults(func=cmd_bench)
