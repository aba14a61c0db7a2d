"""The ``normfx`` command line. Exit codes: 0 ok, 1 verification failed (or ``check``: not equivalent),
2 bad input (one line on stderr naming the problem and the fix), 3 internal error (one line; ``-v``
shows the traceback)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from typing import Any, Callable, Sequence

from . import __version__
from .errors import NormfxError, PolicyError, VerificationError

log = logging.getLogger("normfx")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(EXIT_BAD_INPUT)


def emit(text: str = "") -> None:
    """Write a line of the command's result to stdout (the CLI owns the terminal)."""
    sys.stdout.write(text + "\n")


def policy_from_args(args: argparse.Namespace) -> Any:
    """``--policy`` (repeatable) and ``--override GLOB=STEP`` (repeatable) as a policy object."""
    default = getattr(args, "default_policy", None)
    steps = args.policy or ([default] if default else [])
    overrides = getattr(args, "override", None) or []
    if not overrides:
        if not steps:
            raise PolicyError("give a policy with --policy NAME (see `normfx policies`)")
        return steps if len(steps) > 1 else steps[0]
    mapping: dict[str, Any] = {}
    for item in overrides:
        glob, eq, step = item.partition("=")
        if not eq or not glob or not step:
            raise PolicyError(f"--override {item!r} must be GLOB=STEP, e.g. 'backbone.*=frozen'")
        mapping.setdefault(glob, []).append(step)
    if steps:
        mapping.setdefault("*", steps)
    return mapping


def add_policy_args(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument("--policy", action="append", required=required, metavar="STEP",
                        help="policy step, e.g. fuse or 'fuse:forward=false'; repeat for a sequence")
    parser.add_argument("--override", action="append", metavar="GLOB=STEP",
                        help="per-layer policy, first match wins, e.g. 'backbone.*=frozen'; repeatable")


def add_model_args(parser: argparse.ArgumentParser, *, default: str | None = None) -> None:
    from .models import DEFAULT_MODEL

    parser.add_argument("--model", default=default if default is not None else DEFAULT_MODEL,
                        help="zoo name (see `normfx models`), a path to model.onnx, or module:factory "
                             "(module:factory IMPORTS AND RUNS that code); default: %(default)s")
    parser.add_argument("--weights", help="torch state_dict to load into the model (read with weights_only=True)")
    parser.add_argument("--input-shape", help="example input shape with batch, e.g. 1,3,224,224")
    parser.add_argument("--batch", type=int, default=1, help="batch size of the zoo's example input")
    parser.add_argument("--seed", type=int, default=0, help="seed of the zoo model's random weights and inputs")


def load_from_args(args: argparse.Namespace):
    """The model ``--model`` names; a torch model is checked for never-run lazy modules and run once on its example
    input, so that an input that does not fit is a one-line error here (exit 2), not an internal error later."""
    from .input_checks import check_example_inputs, check_lazy_modules
    from .loading import load_model, parse_shape

    shape = parse_shape(args.input_shape) if args.input_shape else None
    loaded = load_model(args.model, weights=args.weights, input_shape=shape, batch=args.batch, seed=args.seed)
    if loaded.kind != "onnx":
        check_lazy_modules(loaded.model, loaded.label)
        if loaded.example_inputs is not None:
            hint = "give --input-shape with the shape the model takes"
            if loaded.kind == "zoo":
                from . import models

                hint += f" (this zoo model takes {'x'.join(map(str, models.info(args.model).input_shape))})"
            check_example_inputs(loaded.model, loaded.example_inputs, loaded.label, hint)
    return loaded


def write_json_atomic(path: str, payload: Any, *, protect: Sequence[str] = ()) -> None:
    from .io_utils import atomic_write_text

    atomic_write_text(path, json.dumps(payload, indent=2, default=str) + "\n", protect=protect)


# --- subcommands -------------------------------------------------------------------------------


def cmd_models(args: argparse.Namespace) -> int:
    from . import models

    rows = [models.info(name) for name in models.names()]
    if args.json:
        emit(json.dumps([{"name": r.name, "description": r.description, "input_shape": list(r.input_shape),
                          "tags": sorted(r.tags)} for r in rows], indent=2))
        return EXIT_OK
    width = max(len(r.name) for r in rows)
    for r in rows:
        emit(f"{r.name:<{width}}  {'x'.join(map(str, r.input_shape)):<12}  {r.description}")
    return EXIT_OK


def cmd_policies(args: argparse.Namespace) -> int:
    from .policy import describe_policies

    described = describe_policies()
    if args.json:
        emit(json.dumps(described, indent=2))
        return EXIT_OK
    for d in described:
        kinds = "/".join(k for k in ("torch", "onnx") if d[k])
        emit(f"{d['name']:<10} [{kinds}] {d['help']}")
        for key, opt in d["options"].items():
            emit(f"{'':<12}{key}={opt['default']} ({opt['type']}): {opt['help']}")
    return EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    from .engine import explain

    loaded = load_from_args(args)
    report = explain(loaded.model, policy_from_args(args), example_inputs=loaded.example_inputs)
    report.model = loaded.label
    if args.json:
        emit(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        emit(report.format())
    return EXIT_OK


def _rewrite_check_inputs(args: argparse.Namespace, path: str) -> list:
    """Random inputs to verify an ONNX rewrite on: ``--input-shape`` for a single-input model, else the
    graph's own shapes with a dynamic batch axis of ``--batch``."""
    import numpy as np

    from .errors import InputDataError
    from .loading import parse_shape
    from .runtime import make_session, random_inputs

    if args.input_shape:
        session = make_session(path, optimization="disable")
        if len(session.get_inputs()) != 1:
            raise InputDataError(f"--input-shape gives one input but {path!r} takes {len(session.get_inputs())}")
        shape = parse_shape(args.input_shape)
        return [np.random.default_rng(args.seed).standard_normal(shape).astype(np.float32)]
    try:
        return random_inputs(path, batch=args.batch, seed=args.seed)
    except InputDataError as exc:
        raise InputDataError(f"cannot make inputs to verify the result: {str(exc).split('; pass')[0]}; give --input-shape") from None


def _check_rewrite_out(path: str, protect: Sequence[str]) -> None:
    """Refuse ``--out`` early when it is an input file, a folder, or under a file (missing folders are created)."""
    from .io_utils import check_output_path

    check_output_path(path, protect)


def _external_data_files(path: str) -> list[str]:
    """The external-data files an ONNX model file refers to (they are inputs too: never written over)."""
    import onnx

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:  # not readable here: loading the model reports it properly
        return []
    folder = os.path.dirname(os.path.abspath(path))
    files = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if location:
                files.add(os.path.join(folder, location))
    return sorted(files)


def _data_files(specs: Sequence[str], steps: Sequence[str]) -> dict[str, str]:
    """``--data FILE`` (every step's data) or ``--data STEP=FILE`` per step → ``{step or "": FILE}``."""
    from .errors import InputDataError

    files: dict[str, str] = {}
    for spec in specs:
        step, eq, path = spec.partition("=")
        if not eq or os.path.exists(spec) or not re.fullmatch(r"[A-Za-z_][\w-]*", step):
            step, path = "", spec
        elif step not in steps:
            raise InputDataError(f"--data {spec!r}: {step!r} is not a step of the policy ({', '.join(steps)}); write "
                                 "--data STEP=FILE with one of them, or --data FILE for every step")
        if step in files:
            raise InputDataError(f"--data is given twice for {('step ' + repr(step)) if step else 'every step'}")
        files[step] = path
    if "" in files and len(files) > 1:
        raise InputDataError("give either one --data FILE for every step or --data STEP=FILE per step, not both")
    return files


def cmd_rewrite(args: argparse.Namespace) -> int:
    from .cli_stats import load_data, model_dtype
    from .engine import rewrite_with_report
    from .errors import InputDataError
    from .policy import parse_policy
    from .verify import verify

    if args.num_batches < 0:
        raise InputDataError(f"--num-batches must be >= 0 (0 = all), got {args.num_batches}")
    loaded = load_from_args(args)
    onnx_model = loaded.kind == "onnx"
    if args.out and not onnx_model:
        from .torch_save import check_torch_out

        check_torch_out(args.out, loaded.label, [p for p in (args.weights, *(args.data or [])) if p])
    raw = policy_from_args(args)
    steps = parse_policy(raw).ordered_steps()
    data_files = _data_files(args.data or [], [s.name for s in steps])
    needing = [s.name for s in steps if s.spec.needs_data]
    if needing and not args.data:
        raise PolicyError(f"policy {', '.join(needing)} needs calibration data: give --data inputs.npy|inputs.npz|module:factory")
    takes_batches = args.num_batches and any("num_batches" in s.spec.options for s in steps)
    policy = parse_policy(raw, {"num_batches": args.num_batches} if takes_batches else None)
    inputs = [loaded.model, *_external_data_files(loaded.model)] if onnx_model else []
    protect = [p for p in (*inputs, *data_files.values(), args.weights) if p and os.path.exists(p)]
    if args.out:
        _check_rewrite_out(args.out, protect)
    dtype = None if onnx_model else model_dtype(loaded.model)
    loaded_data = {step: load_data(spec, batch_size=args.batch_size, dtype=dtype) for step, spec in data_files.items()}
    data = loaded_data.get("") if "" in loaded_data else (loaded_data or None)
    if onnx_model:
        result, report = rewrite_with_report(loaded.model, policy, data=data, strict=args.strict)
        check = verify(loaded.model, result, _rewrite_check_inputs(args, loaded.model), rtol=args.rtol)
    else:
        if loaded.example_inputs is None:
            raise PolicyError(f"{loaded.label}: no example input is known; give --input-shape")
        result, report = rewrite_with_report(loaded.model, policy, example_inputs=loaded.example_inputs, data=data,
                                             strict=args.strict)
        check = verify(loaded.model, result, loaded.example_inputs, rtol=args.rtol)
    report.model = loaded.label
    exact = all(s.spec.exact for s in policy.ordered_steps())
    failed = exact and not check.ok
    saved_as = "ONNX model"
    if args.out and not failed and onnx_model:
        from .io_utils import atomic_write_bytes

        atomic_write_bytes(args.out, result.SerializeToString(), protect=protect)
    elif args.out and not failed:
        from .torch_save import save_torch_result

        saved_as = save_torch_result(loaded.model, result, loaded.example_inputs, args.out, policy=str(policy),
                                     protect=protect)
    written = args.out if args.out and not failed else None
    if args.json:
        emit(json.dumps({"report": report.to_dict(), "verification": check.to_dict(), "exact": exact, "out": written},
                        indent=2, default=str))
    else:
        emit(report.format())
        inexact = [s.name for s in policy.ordered_steps() if not s.spec.exact]
        if inexact:
            emit(f"difference from the original (not enforced: policy {', '.join(inexact)} changes the function by "
                 f"design): max rel error {check.max_rel_error:.3g}, max abs error {check.max_abs_error:.3g}")
        else:
            emit(f"verification against the original: {check}")
        if written:
            emit(f"wrote {written} ({saved_as})")
        elif args.out:
            emit(f"nothing written to {args.out}: the verification failed")
    return EXIT_FAILED if failed else EXIT_OK


Command = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="normfx", description="Compile the normalization layers of neural networks.")
    parser.add_argument("--version", action="version", version=f"normfx {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (repeat for debug)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)

    p = sub.add_parser("models", help="list the built-in model zoo")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("policies", help="list the policies and their options")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_policies)

    p = sub.add_parser("explain", help="say what a policy would do to every normalization layer, and why")
    add_model_args(p)
    add_policy_args(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("rewrite", help="rewrite a torch or ONNX model by a policy, print the report and verify it",
                       description="Rewrite a model by a policy, print the report and verify the result against the "
                                   "original (torch: on its example input; ONNX: in onnxruntime on random inputs). "
                                   "Exit 1 when an exact policy's result is not equivalent (nothing is written).")
    add_model_args(p)
    add_policy_args(p)
    p.add_argument("--data", action="append", metavar="[STEP=]FILE",
                   help="calibration data for precise/adaptive/unfuse: inputs.npy / inputs.npz, or module:factory "
                        "returning an iterable of batches (IMPORTS AND RUNS that code); STEP=FILE gives one step its "
                        "own data (repeat: --data unfuse=source.npz --data adaptive=target.npz)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size for array data (default: %(default)s)")
    p.add_argument("--num-batches", type=int, default=0, help="use only the first N batches of --data (0 = all)")
    p.add_argument("--out", help="write the result here (atomically, folders created, never over an input): ONNX in, "
                                 "ONNX out; a torch model as a state_dict NAME.pt when the policy keeps the module "
                                 "structure (frozen, unfrozen, precise, adaptive), else a torch.export program NAME.pt2")
    p.add_argument("--strict", action="store_true", help="fail when any targeted layer is skipped")
    p.add_argument("--rtol", type=float, default=None,
                   help="exact relative tolerance of the verification (default: against a float64 run of the original, "
                        "tolerance max(1e-5, 2 x its own float32 error))")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_rewrite)

    for module_name in ("cli_onnx", "cli_stats"):
        _add_optional_commands(sub, module_name)
    _add_optional_commands(sub, "cli_lint")
    return parser


def _add_optional_commands(sub: Any, module_name: str) -> None:
    import importlib

    module = importlib.import_module(f"normfx.{module_name}")
    module.add_parser(sub)


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return int(args.func(args))
    except NormfxError as exc:
        message = " ".join(str(exc).split())
        sys.stderr.write(f"normfx {args.command}: error: {message}\n")
        return EXIT_FAILED if isinstance(exc, VerificationError) else EXIT_BAD_INPUT
    except KeyboardInterrupt:
        sys.stderr.write("normfx: interrupted\n")
        return 130
    except BrokenPipeError:  # e.g. `normfx models | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (OSError, MemoryError) as exc:
        sys.stderr.write(f"normfx {args.command}: error: {type(exc).__name__}: {exc}\n")
        return EXIT_BAD_INPUT
    except Exception as exc:  # a bug, or a model normfx does not support: one line, traceback with -v
        if args.verbose:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        sys.stderr.write(f"normfx {args.command}: internal error: {type(exc).__name__}: {first} (rerun with -v for the traceback)\n")
        return EXIT_INTERNAL

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
