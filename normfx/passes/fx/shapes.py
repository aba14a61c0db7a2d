"""Input shapes of conv/linear calls, measured by running the example inputs once — lazily, only when
a rule needs a shape (a Linear's input rank, a padded conv's spatial size)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from ...errors import InputDataError
from .patterns import layer_info

__all__ = ["ShapeRecorder", "record_input_shapes"]


@contextmanager
def _all_eval(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.train(mode)


def record_input_shapes(model: nn.Module, example_inputs: tuple | None,
                        runner: Callable[[nn.Module], object] | None = None) -> dict[int, list[tuple[int, ...]]]:
    """Input shape of every conv/linear call on ``example_inputs`` (keyed by module id), from one
    eval-mode forward (so running statistics are not touched; modes are restored). ``runner(model)``
    runs that forward instead when there are no example inputs (e.g. one batch of calibration data)."""
    shapes: dict[int, list[tuple[int, ...]]] = {}
    handles = []

    def hook(module, args):
        if args and isinstance(args[0], torch.Tensor):
            shapes.setdefault(id(module), []).append(tuple(args[0].shape))

    for module in model.modules():
        if layer_info(module) is not None:
            handles.append(module.register_forward_pre_hook(hook))
    try:
        with _all_eval(model), torch.no_grad():
            if example_inputs is None and runner is not None:
                runner(model)
            else:
                model(*example_inputs)
    except InputDataError:
        raise
    except Exception as exc:
        if example_inputs is None:
            raise InputDataError(f"the model fails on the first batch of data: {str(exc).splitlines()[0]}") from exc
        text = ", ".join(str(list(x.shape)) for x in example_inputs if isinstance(x, torch.Tensor))
        raise InputDataError(f"the model fails on example_inputs of shape {text}: {str(exc).splitlines()[0]}") from exc
    finally:
        for handle in handles:
            handle.remove()
    return shapes


class ShapeRecorder:
    """Shapes per module, recorded on first request. Copies of a module (made private for a fold)
    are registered with :meth:`alias` and answer with their original's shapes."""

    def __init__(self, model: nn.Module, example_inputs: tuple | None,
                 runner: Callable[[nn.Module], object] | None = None) -> None:
        self._model, self._inputs, self._runner = model, example_inputs, runner
        known = example_inputs is not None or runner is not None
        self._shapes: dict[int, list[tuple[int, ...]]] | None = None if known else {}
        self._origin: dict[int, int] = {}

    def alias(self, copy: nn.Module, original: nn.Module) -> None:
        self._origin[id(copy)] = self._origin.get(id(original), id(original))

    def _lookup(self, module: nn.Module) -> list[tuple[int, ...]]:
        shapes = self._shapes or {}
        return shapes.get(id(module)) or shapes.get(self._origin.get(id(module), -1), [])

    def recorded_calls(self, module: nn.Module) -> int:
        """Calls seen so far (0 before any recording: never triggers one)."""
        return len(self._lookup(module))

    def input_shape(self, module: nn.Module) -> tuple[int, ...] | None:
        """The input shape ``module`` is called with, when example inputs were given and every call
        of it saw the same shape; None otherwise."""
        if self._shapes is None:
            self._shapes = record_input_shapes(self._model, self._inputs, self._runner)
        shapes = self._lookup(module)
        return shapes[0] if shapes and len(set(shapes)) == 1 else None
