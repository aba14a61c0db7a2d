"""A normalization followed by the modules a BN+act subclass carried (timm's ``BatchNormAct2d``: its activation).

:class:`PostModules` is the mixin: ``post`` modules are registered under their own names and applied in order
after the normalization's forward, so ``<layer>.weight``, ``<layer>.bias`` and ``<layer>.act.*`` keep their
state_dict keys when normfx replaces such a layer (:class:`~normfx.layers.frozen.BatchNormPost`,
:class:`~normfx.layers.groupnorm.GroupNormPost`).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

__all__ = ["PostModules"]


class PostModules:
    """Mixin, listed before an ``nn.Module`` normalization: its forward, then the ``post`` modules in order."""

    def __init__(self, *args, post: Mapping[str, nn.Module] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.post_names = tuple(post or ())
        for name, module in (post or {}).items():
            self.add_module(name, module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        for name in self.post_names:
            y = getattr(self, name)(y)
        return y
