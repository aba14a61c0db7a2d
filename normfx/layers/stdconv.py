"""Weight Standardization (Qiao et al.; BiT's GN + WS): a convolution whose kernel is standardized per output
channel before use.

``ŵ[o] = (w[o] − mean(w[o])) / sqrt(var(w[o]) + ws_eps)`` over the fan-in of output channel ``o`` (its
``Cin/groups × kernel`` weights), with the *biased* variance and ``ws_eps`` added to the variance (default
1e-6, as timm's ``StdConv2d``; BiT used 1e-10). The parameters and state_dict keys are those of the plain
conv (``weight``, ``bias``), so a plain conv checkpoint loads as it is. In eval mode ``ŵ`` is a constant:
``fuse`` turns the layer back into a plain conv holding ``ŵ`` (:meth:`standardized_weight`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["StdConv1d", "StdConv2d", "StdConv3d", "StdConv", "std_conv_class", "WS_EPS"]

WS_EPS = 1e-6


class StdConv:
    """Mixin: the standardized kernel and the forward that uses it (for ``nn.Conv1d/2d/3d`` subclasses)."""

    ws_eps: float

    def standardized_weight(self) -> Tensor:
        """``(w − mean) / sqrt(var + ws_eps)`` per output channel, over its fan-in (biased variance)."""
        w = self.weight
        dims = tuple(range(1, len(self.kernel_size) + 2))  # static (torch.fx): every dim but the output channel
        var, mean = torch.var_mean(w, dim=dims, keepdim=True, correction=0)
        return (w - mean) / (var + self.ws_eps).sqrt()

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)

    @classmethod
    def from_conv(cls, conv: nn.Module, ws_eps: float = WS_EPS):
        """A StdConv with ``conv``'s geometry and a copy of its parameters (training mode kept)."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                  dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                  padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype, ws_eps=ws_eps)
        new.load_state_dict(conv.state_dict())
        new.weight.requires_grad_(conv.weight.requires_grad)
        if conv.bias is not None:
            new.bias.requires_grad_(conv.bias.requires_grad)
        new.train(conv.training)
        return new

    def extra_repr(self) -> str:
        return super().extra_repr() + f", ws_eps={self.ws_eps}"  # type: ignore[misc]


def _checked(ws_eps: float) -> float:
    ws_eps = float(ws_eps)
    if not ws_eps > 0:
        raise ValueError(f"ws_eps must be > 0, got {ws_eps}")
    return ws_eps


class StdConv1d(StdConv, nn.Conv1d):
    """``nn.Conv1d`` with Weight Standardization; takes Conv1d's arguments and ``ws_eps``."""

    def __init__(self, *args, ws_eps: float = WS_EPS, **kwargs) -> None:
        nn.Conv1d.__init__(self, *args, **kwargs)
        self.ws_eps = _checked(ws_eps)


class StdConv2d(StdConv, nn.Conv2d):
    """``nn.Conv2d`` with Weight Standardization; takes Conv2d's arguments and ``ws_eps``."""

    def __init__(self, *args, ws_eps: float = WS_EPS, **kwargs) -> None:
        nn.Conv2d.__init__(self, *args, **kwargs)
        self.ws_eps = _checked(ws_eps)


class StdConv3d(StdConv, nn.Conv3d):
    """``nn.Conv3d`` with Weight Standardization; takes Conv3d's arguments and ``ws_eps``."""

    def __init__(self, *args, ws_eps: float = WS_EPS, **kwargs) -> None:
        nn.Conv3d.__init__(self, *args, **kwargs)
        self.ws_eps = _checked(ws_eps)


def std_conv_class(conv: nn.Module) -> type:
    """The StdConv class matching a Conv1d/2d/3d."""
    for base, std in ((nn.Conv1d, StdConv1d), (nn.Conv2d, StdConv2d), (nn.Conv3d, StdConv3d)):
        if isinstance(conv, base):
            return std
    raise TypeError(f"Weight Standardization applies to Conv1d/2d/3d, not {type(conv).__name__}")
