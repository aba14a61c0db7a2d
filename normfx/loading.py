"""Turning what a user names on the command line into a model: a zoo name, an ``.onnx`` file, or
``module:factory`` (user code, which is imported and run), plus optional torch weights."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .errors import InputDataError, ModelError

__all__ = ["LoadedModel", "load_model", "load_factory", "parse_shape"]

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model and what is known about how to call it."""

    model: Any  # torch.nn.Module or a path to an .onnx file
    example_inputs: tuple | None
    label: str
    kind: str  # "zoo", "factory" or "onnx"


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` → ``(1, 3, 224, 224)``."""
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise InputDataError(f"cannot read input shape {text!r}: write it like 1,3,224,224") from None
    if not shape or any(d <= 0 for d in shape):
        raise InputDataError(f"input shape {text!r} must be positive integers like 1,3,224,224")
    return shape


def load_factory(spec: str) -> Any:
    """Import ``module:attr`` (the current folder is importable) and call ``attr()``. Runs user code."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelError(f"{spec!r} is not module:factory (e.g. mypkg.models:build)")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # user code: ImportError, SyntaxError, anything its import runs
        raise ModelError(f"cannot import {module_name!r} from {spec!r}: {type(exc).__name__}: {_first_line(exc)}") from exc
    factory = getattr(module, attr, None)
    if factory is None:
        raise ModelError(f"module {module_name!r} has no attribute {attr!r}")
    if not callable(factory):
        return factory
    try:
        return factory()
    except Exception as exc:  # user code
        raise ModelError(f"{spec}() raised {type(exc).__name__}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _load_weights(model: torch.nn.Module, weights: str) -> None:
    if not os.path.isfile(weights):
        raise ModelError(f"weights file {weights!r} does not exist")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad files
        raise ModelError(
            f"cannot read weights {weights!r} as a torch state_dict (loaded with weights_only=True; "
            f"{type(exc).__name__}); save it with torch.save(model.state_dict(), path)"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"weights {weights!r} hold a {type(state).__name__}, expected a state_dict")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # size mismatches: the details are on the lines after the first
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise ModelError(f"weights {weights!r} do not fit the model: {' '.join(lines[1:3]) or lines[0]}") from None
    problems = [f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                for what, keys in (("missing keys", result.missing_keys), ("unexpected keys", result.unexpected_keys)) if keys]
    if problems:
        raise ModelError(f"weights {weights!r} do not fit the model ({'; '.join(problems)})")


def load_model(spec: str, *, weights: str | None = None, input_shape: Sequence[int] | None = None,
               batch: int = 1, seed: int = 0) -> LoadedModel:
    """Load a zoo model by name, an ONNX file by path, or ``module:factory``.

    A factory returns a ``torch.nn.Module`` or ``(module, example_inputs)``. ``input_shape``
    (full shape, batch included) makes example inputs when the source gives none.
    """
    from . import models

    if spec.endswith(".onnx") or (os.path.exists(spec) and ":" not in spec):
        if weights:
            raise ModelError("--weights applies to torch models, not to an .onnx file")
        if not os.path.isfile(spec):
            raise ModelError(f"ONNX file {spec!r} does not exist")
        return LoadedModel(spec, None, spec, "onnx")
    if ":" in spec:
        made = load_factory(spec)
        model, example = made if isinstance(made, tuple) and len(made) == 2 else (made, None)
        if not isinstance(model, torch.nn.Module):
            raise ModelError(f"{spec} returned a {type(model).__name__}, expected a torch.nn.Module or (module, example_inputs)")
        kind = "factory"
    elif spec in models.names():
        model = models.create(spec, seed=seed)
        example = models.example_input(spec, batch=batch, seed=seed)
        kind = "zoo"
    else:
        raise ModelError(
            f"unknown model {spec!r}: give a zoo name ({', '.join(models.names())}), a path to an .onnx file, or module:factory"
        )
    if weights:
        _load_weights(model, weights)
    if input_shape is not None:
        example = torch.randn(tuple(input_shape), generator=torch.Generator().manual_seed(seed))
    if isinstance(example, torch.Tensor):
        example = (example,)
    model.eval()
    return LoadedModel(model, tuple(example) if example is not None else None, spec, kind)
