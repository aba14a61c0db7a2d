"""Input shapes of conv/linear calls (and of other module kinds a pass names, e.g. ProxyNormAct and StdConv for
``fuse``), measured by running the example inputs once — lazily, only when a rule needs a shape (a Linear's input
rank, a padded conv's spatial size, the rank of a ProxyNormAct's leftover constants)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

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
                        runner: Callable[[nn.Module], object] | None = None,
                        kinds: tuple[type, ...] = ()) -> dict[int, list[tuple[int, ...]]]:
    """Input shape of every conv/linear call, and of every call of a module of one of ``kinds``, on
    ``example_inputs`` (keyed by module id), from one eval-mode forward (so running statistics are not
    touched; modes are restored). ``runner(model)`` runs that forward instead when there are no example
    inputs (e.g. one batch of calibration data)."""
    shapes: dict[int, list[tuple[int, ...]]] = {}
    handles = []

    def hook(module, args):
        if args and isinstance(args[0], torch.Tensor):
            shapes.setdefault(id(module), []).append(tuple(args[0].shape))

    for module in model.modules():
        if layer_info(module) is not None or isinstance(module, kinds):
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
    """Shapes per module, recorded on first request: conv/linear calls and calls of modules of ``kinds``.
    Copies of a module (made private for a fold) are registered with :meth:`alias` and answer with their
    original's shapes."""

    def __init__(self, model: nn.Module, example_inputs: tuple | None,
                 runner: Callable[[nn.Module], object] | None = None, *, kinds: Iterable[type] = ()) -> None:
        self._model, self._inputs, self._runner = model, example_inputs, runner
        self._kinds = tuple(kinds)
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
            self._shapes = record_input_shapes(self._model, self._inputs, self._runner, self._kinds)
        shapes = self._lookup(module)
        return shapes[0] if shapes and len(set(shapes)) == 1 else None

    def linear_rank_reason(self, module: nn.Module, target: str, noun: str = "BN", *, relation: str = "folds into it",
                           proof: str = "example_inputs") -> str:
        """A per-channel map (``noun``: a BN, a ProxyNormAct's affine) acts on axis 1, the Linear ``module`` on the
        last axis: they meet only on 2-D tensors, which only ``proof`` can show ("" when proven). ``relation``
        says how the map meets the Linear (``"folds into it"``, ``"can follow it"``)."""
        shape = self.input_shape(module)
        if shape is None:
            return (f"'{target}' is a Linear: a {noun} {relation} only when its input is 2-D (N, features); "
                    f"pass {proof} to prove it")
        if len(shape) != 2:
            return f"'{target}' gets a {len(shape)}-D input: {noun}'s channel axis 1 is not the Linear's features"
        return ""

    def ranks(self, module: nn.Module) -> set[int]:
        """The ranks of every recorded input of ``module`` (empty without example inputs)."""
        self.input_shape(module)  # records on first use
        return {len(shape) for shape in self._lookup(module)}
