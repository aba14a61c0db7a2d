"""Copy on write for passes that take the caller's model (``copies_input``): trace the caller's model
as it is, copy only what gets edited, and at the end copy whatever is still the caller's, so the result
shares no module, parameter or buffer with the input — at a fraction of a whole-model deepcopy."""

from __future__ import annotations

import copy
from itertools import chain

from torch import nn

__all__ = ["Ownership"]


class Ownership:
    """Which modules and tensors belong to the caller (never edited, never left in the result)."""

    def __init__(self, model: nn.Module, owned: bool) -> None:
        self.modules = set() if owned else {id(m) for m in model.modules()}
        self.tensors = set() if owned else {id(t) for t in chain(model.parameters(), model.buffers())}
        self._memo: dict = {}  # one deepcopy memo: modules shared inside the model stay shared in the copy

    def is_callers(self, module: nn.Module) -> bool:
        return id(module) in self.modules

    def private(self, module: nn.Module) -> nn.Module:
        """``module`` itself when it is ours, else a deep copy (aliasing inside the model preserved)."""
        return copy.deepcopy(module, self._memo) if self.is_callers(module) else module

    def editable(self, module: nn.Module) -> nn.Module:
        """A module whose attributes and parameter slots may be replaced: a shallow clone of a
        caller's leaf module (its tensors are replaced by the editor or copied by :meth:`finish`)."""
        if not self.is_callers(module):
            return module
        clone = module.__class__.__new__(module.__class__)
        # parameters, buffers, children and every hook registry get their own container
        clone.__dict__.update({k: v.copy() if isinstance(v, (dict, set, list)) else v for k, v in vars(module).items()})
        return clone

    def finish(self, root: nn.Module) -> nn.Module:
        """Replace every module and tensor of the caller still reachable from ``root`` by a copy."""
        if self.is_callers(root):
            return self.private(root)
        seen: set[int] = set()

        def visit(module: nn.Module) -> None:
            if id(module) in seen:
                return
            seen.add(id(module))
            for name, child in list(module._modules.items()):
                if child is None:
                    continue
                if self.is_callers(child):
                    module._modules[name] = self.private(child)
                else:
                    visit(child)
            for name, param in list(module._parameters.items()):
                if param is not None and id(param) in self.tensors:
                    module._parameters[name] = self._memo.setdefault(
                        id(param), nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))
            for name, buffer in list(module._buffers.items()):
                if buffer is not None and id(buffer) in self.tensors:
                    module._buffers[name] = self._memo.setdefault(id(buffer), buffer.clone())

        visit(root)
        return root
