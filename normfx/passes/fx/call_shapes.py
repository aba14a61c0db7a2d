"""Input shapes for the fold rules of ``fuse``: those :class:`ShapeRecorder` records (conv/linear calls) and
also those of ProxyNormAct calls (the rank of their leftover per-channel constants) and StdConv calls (a
StdConv becomes a plain conv whose input shape a forward fold may need), from the same single forward."""

from __future__ import annotations

import torch
from torch import nn

from ...errors import InputDataError
from ...layers import ProxyNormAct, StdConv
from .shapes import ShapeRecorder

__all__ = ["CallShapes"]


class CallShapes(ShapeRecorder):
    """A :class:`ShapeRecorder` that also knows the input shapes of ProxyNormAct and StdConv calls."""

    def __init__(self, model: nn.Module, example_inputs: tuple | None) -> None:
        self._example = example_inputs
        self._extra: dict[int, list[tuple[int, ...]]] = {}
        super().__init__(model, None, self._run if example_inputs is not None else None)

    def _run(self, model: nn.Module) -> None:
        handles = []

        def hook(module, args):
            if args and isinstance(args[0], torch.Tensor):
                self._extra.setdefault(id(module), []).append(tuple(args[0].shape))

        for module in model.modules():
            if isinstance(module, (ProxyNormAct, StdConv)):
                handles.append(module.register_forward_pre_hook(hook))
        try:
            model(*self._example)
        except Exception as exc:
            text = ", ".join(str(list(x.shape)) for x in self._example if isinstance(x, torch.Tensor))
            raise InputDataError(f"the model fails on example_inputs of shape {text}: {str(exc).splitlines()[0]}") from exc
        finally:
            for handle in handles:
                handle.remove()

    def ranks(self, module: nn.Module) -> set[int]:
        """The ranks of every recorded input of ``module`` (empty without example inputs)."""
        self.input_shape(module)  # records on first use
        return {len(shape) for shape in self._lookup(module)}

    def _lookup(self, module: nn.Module) -> list[tuple[int, ...]]:
        found = super()._lookup(module)
        if found:
            return found
        return self._extra.get(id(module)) or self._extra.get(self._origin.get(id(module), -1), [])
