"""GroupNorm followed by the modules a BN+act subclass carried: what the ``groupnorm`` / ``layernorm`` /
``instancenorm`` policies put in place of such a BatchNorm (:mod:`normfx.passes.fx.norm_swap`)."""

from __future__ import annotations

from torch import nn

from .post import PostModules

__all__ = ["GroupNormPost"]


class GroupNormPost(PostModules, nn.GroupNorm):
    """``nn.GroupNorm(num_groups, num_channels, eps, affine, device=, dtype=)`` followed by ``post`` modules (the
    activation a BN+act subclass carried), under their own names, so that ``<layer>.weight``, ``<layer>.bias`` and
    ``<layer>.act.*`` keep their state_dict keys."""
