"""The ``normfx`` command line. Exit codes: 0 ok, 1 verification failed (or ``check``: not equivalent),
2 bad input (one line on stderr naming the problem and the fix), 3 internal error (one line; ``-v``
shows the traceback)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Callable, Sequence

from . import __version__
from .errors import ModelError, NormfxError, PolicyError, VerificationError

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
    from .loading import load_model, parse_shape

    shape = parse_shape(args.input_shape) if args.input_shape else None
    return load_model(args.model, weights=args.weights, input_shape=shape, batch=args.batch, seed=args.seed)


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


def cmd_rewrite(args: argparse.Namespace) -> int:
    from .engine import rewrite_with_report
    from .policy import parse_policy
    from .verify import verify

    loaded = load_from_args(args)
    if loaded.kind == "onnx":
        raise ModelError(f"`normfx rewrite` rewrites torch models; for {loaded.label} use `normfx export --model {loaded.label} --out OUT.onnx`")
    policy = parse_policy(policy_from_args(args))
    needing = [s.name for s in policy.ordered_steps() if s.spec.needs_data]
    if needing:
        raise PolicyError(f"policy {', '.join(needing)} needs calibration data: use `normfx stats --data ...`")
    if loaded.example_inputs is None:
        raise PolicyError(f"{loaded.label}: no example input is known; give --input-shape")
    result, report = rewrite_with_report(loaded.model, policy, example_inputs=loaded.example_inputs, strict=args.strict)
    report.model = loaded.label
    check = verify(loaded.model, result, loaded.example_inputs, rtol=args.rtol)
    exact = all(s.spec.exact for s in policy.ordered_steps())
    if args.json:
        emit(json.dumps({"report": report.to_dict(), "verification": check.to_dict(), "exact": exact}, indent=2, default=str))
    else:
        emit(report.format())
        emit(f"verification against the original: {check}")
    return EXIT_FAILED if exact and not check.ok else EXIT_OK


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

    p = sub.add_parser("rewrite", help="rewrite a torch model by a policy, print the report and verify it")
    add_model_args(p)
    add_policy_args(p)
    p.add_argument("--strict", action="store_true", help="fail when any targeted layer is skipped")
    p.add_argument("--rtol", type=float, default=1e-5, help="relative tolerance of the verification")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_rewrite)

    for module_name in ("cli_onnx", "cli_stats"):
        _add_optional_commands(sub, module_name)
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
