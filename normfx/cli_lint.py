"""``normfx lint``: check a torch model or an ONNX graph for the silent BatchNorm bugs (see ``normfx.lint``).
Exit 0: no finding at error severity; 1: at least one error; 2: bad input."""

from __future__ import annotations

import argparse
import json
import shlex
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    """Register the ``lint`` subcommand on an ``argparse`` subparsers object."""
    from .cli import add_model_args

    p = sub.add_parser(
        "lint", help="find silent BatchNorm bugs (eps, statistics, momentum, unused/reused BN, fp16 folds, ...)",
        description="Check every BatchNorm of a torch model or an ONNX graph and print each finding with its "
                    "severity, layer, explanation and the normfx fix. Exit 0 when no finding is an error, 1 when one "
                    "is, 2 on bad input. Torch models run one forward (eval, no grad) on the example input (zoo "
                    "models have one; otherwise give --input-shape) to see which BN layers are reached.")
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def _with_model(text: str | None, label: str) -> str | None:
    return text.replace("--model MODEL", f"--model {shlex.quote(label)}") if text else text


def run(args: argparse.Namespace) -> int:
    from .cli import EXIT_FAILED, EXIT_OK, emit, load_from_args
    from .lint import lint

    loaded = load_from_args(args)
    report = lint(loaded.model, loaded.example_inputs)
    report.model = loaded.label
    for finding in report.findings:
        finding.fix = _with_model(finding.fix, loaded.label)
    if args.json:
        emit(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        emit(report.format())
    return EXIT_OK if report.ok else EXIT_FAILED
