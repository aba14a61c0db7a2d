"""Checks of what a user hands to ``export`` / the CLI before any work starts, so that a model that cannot
run on its example input, a never-run lazy module or an unsupported opset is a one-line error (exit code 2)
instead of an internal error deep inside tracing or onnxruntime."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .errors import InputDataError, ModelError
from .runtime import check_opset

__all__ = ["check_lazy_modules", "check_example_inputs", "check_export_arguments", "describe_shapes"]


def check_lazy_modules(model: torch.nn.Module, label: str = "the model") -> None:
    """Refuse a model with lazy modules (``LazyBatchNorm2d``, ``LazyConv2d``, ...) that were never run: their
    parameters and statistics have no shape yet, so there is nothing to fold, freeze or export."""
    from torch.nn.modules.lazy import LazyModuleMixin

    lazy = [(name, type(m).__name__) for name, m in model.named_modules()
            if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params()]
    if lazy:
        name, kind = lazy[0]
        more = f" (and {len(lazy) - 1} more)" if len(lazy) > 1 else ""
        raise ModelError(
            f"{label}: {kind} {name or '(root)'!r}{more} was never run, so its parameters and statistics do not exist "
            "yet: call the model once on an example input (model(x)) and train or load its weights before rewriting it"
        )


def describe_shapes(inputs: Sequence[Any]) -> str:
    return ", ".join("x".join(map(str, t.shape)) if hasattr(t, "shape") else type(t).__name__ for t in inputs)


def check_example_inputs(model: torch.nn.Module, inputs: Sequence[Any], label: str = "the model",
                         hint: str = "give example inputs of the shape and dtype the model takes") -> None:
    """Run an eval-mode model once on its example inputs; a failure is the user's input that does not fit
    (``--input-shape 1,5,64,64`` on a 3-channel model), reported in one line. A model with layers in training
    mode is not run (that would update its BN statistics): its mode is reported elsewhere."""
    for index, tensor in enumerate(inputs):
        if isinstance(tensor, torch.Tensor) and tensor.numel() == 0:
            raise InputDataError(f"example input {index} of {label} is empty (shape {describe_shapes([tensor])}): a "
                                 "verification on it would compare nothing; give at least one sample")
    if any(m.training for m in model.modules()):
        return
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as exc:  # the model's own code: any type
        first = " ".join(str(exc).split()) or type(exc).__name__
        raise InputDataError(
            f"{label} does not run on the example input of shape {describe_shapes(inputs)}: "
            f"{type(exc).__name__}: {first}; {hint}"
        ) from None


def check_export_arguments(model: Any, example_inputs: Any, opset: int) -> None:
    """What ``normfx.export`` checks before it starts: the opset, lazy modules, and that the torch model runs on
    its example inputs."""
    check_opset(opset)
    if not isinstance(model, torch.nn.Module):
        return
    check_lazy_modules(model)
    from .engine import _normalize_inputs

    inputs = _normalize_inputs(example_inputs)
    if inputs is not None:
        check_example_inputs(model, inputs)
