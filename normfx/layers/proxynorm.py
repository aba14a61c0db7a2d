"""Proxy Norm (Labatie et al., NeurIPS 2021): the proxy-normalized activation that, after a GroupNorm or
LayerNorm *without* affine, makes a batch-independent network behave like a BatchNorm one.

``ProxyNormAct(y) = (φ(γ·y + β) − E[φ(γ·ỹ + β)]) / sqrt(Var[φ(γ·ỹ + β)] + ε)`` per channel, where the proxy
variable ``ỹ ~ N(β̃, (1 + γ̃)²)`` is represented, as in Graphcore's official implementation, by
``num_samples`` (200) fixed midpoint quantiles of N(0, 1), ``q_i = sqrt(2)·erfinv(2(i + 0.5)/n − 1)``,
``ỹ = (1 + γ̃)·q + β̃``; the proxy variance is the biased one (``tf.nn.moments``), ``ε = 0.03``; the
statistics are computed in at least float32 whatever the input dtype. Learnable per channel: ``weight``
(γ, init 1), ``bias`` (β, init 0), ``proxy_weight`` (γ̃, init 0) and ``proxy_bias`` (β̃, init 0); the
official recipe weight-decays γ̃ and β̃ towards 0 and not γ, β (:func:`param_groups` builds such groups).

Gradients flow through the proxy statistics (they depend on γ, β, γ̃, β̃), so the layer learns to keep its
output channel-wise normalized. In eval mode the statistics are constants of the parameters: ``fuse``
folds them (:meth:`ProxyNormAct.proxy_moments` gives them).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Iterable

import torch
import torch.fx
from torch import Tensor, nn

__all__ = ["ProxyNormAct", "proxy_quantiles", "param_groups", "PROXY_SAMPLES", "PROXY_EPS"]

PROXY_SAMPLES = 200
PROXY_EPS = 0.03


def proxy_quantiles(num_samples: int = PROXY_SAMPLES, dtype: torch.dtype = torch.float64) -> Tensor:
    """The ``num_samples`` midpoint quantiles of N(0, 1): ``sqrt(2)·erfinv(2(i + 0.5)/n − 1)``, computed in float64."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 to have a proxy variance, got {num_samples}")
    levels = (torch.arange(num_samples, dtype=torch.float64) + 0.5) * (2.0 / num_samples) - 1.0
    return (math.sqrt(2.0) * torch.special.erfinv(levels)).to(dtype)


def _per_channel(vector: Tensor, like: Tensor) -> Tensor:
    """``(C,)`` → ``(1, C, 1, ..., 1)`` to broadcast against a channels-first ``like`` of any rank ≥ 2."""
    if like.dim() < 2:  # here, not in forward: torch.fx keeps this call a leaf, so tracing never reads the rank
        raise ValueError(f"ProxyNormAct expects a channels-first input (N, C, ...) of rank >= 2, got shape "
                         f"{tuple(like.shape)}")
    return vector.reshape((1, -1) + (1,) * (like.dim() - 2))


torch.fx.wrap("_per_channel")  # a leaf call for torch.fx: the rank is read at run time


class _Elementwise(nn.Module):
    """A callable activation (``torch.tanh``, ``lambda x: x * torch.sigmoid(x)``) as a module."""

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


class ProxyNormAct(nn.Module):
    """The proxy-normalized activation of Proxy Norm (see the module docstring).

    Args:
        num_channels: C, the size of dim 1 of the input (channels-first, any rank ≥ 2).
        activation: an elementwise activation, as a module (``nn.ReLU()``, ``nn.SiLU()``, ``nn.GELU()``, ...;
            a per-channel one such as ``nn.PReLU(C)`` works too) or a callable (``torch.tanh``).
        num_samples: proxy quantiles, an int ≥ 2 (official: 200). eps: the proxy ε (official: 0.03).

    Input: channels-first ``(N, C, ...)`` of rank ≥ 2 (a 1-D ``(C,)`` raises ``ValueError``). Dtypes: the proxy
    statistics are computed in ``promote_types(parameter dtype, float32)``; the activation's own parameters (a
    ``nn.PReLU``'s weight) are cast to that dtype for them, so a ``.half()``/``.bfloat16()`` layer works. The output
    follows torch type promotion of the input with the layer's parameters: an fp32 layer given a bf16 input returns
    fp32, a bf16 layer given an fp32 input returns fp32 too; cast the layer (``.to(dtype)``) to keep a dtype.
    """

    def __init__(self, num_channels: int, activation: nn.Module | Callable[[Tensor], Tensor] | None = None, *,
                 num_samples: int = PROXY_SAMPLES, eps: float = PROXY_EPS, device: Any = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
            raise ValueError(f"num_channels must be a positive int, got {num_channels!r}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples < 2:
            raise ValueError(f"num_samples must be an int >= 2, got {num_samples!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if activation is None:
            activation = nn.ReLU()
        if not isinstance(activation, nn.Module):
            if not callable(activation):
                raise TypeError(f"activation must be an nn.Module or a callable, got {type(activation).__name__}")
            activation = _Elementwise(activation)
        factory = {"device": device, "dtype": dtype}
        self.num_channels, self.num_samples, self.eps = num_channels, int(num_samples), float(eps)
        self.activation = activation
        self.weight = nn.Parameter(torch.ones(num_channels, **factory))
        self.bias = nn.Parameter(torch.zeros(num_channels, **factory))
        self.proxy_weight = nn.Parameter(torch.zeros(num_channels, **factory))
        self.proxy_bias = nn.Parameter(torch.zeros(num_channels, **factory))
        stats_dtype = torch.promote_types(dtype or torch.get_default_dtype(), torch.float32)
        self.register_buffer("quantiles", proxy_quantiles(self.num_samples, stats_dtype).to(device), persistent=False)

    def proxy_moments(self) -> tuple[Tensor, Tensor]:
        """Per-channel mean and biased variance of ``φ(γ·ỹ + β)`` over the proxy quantiles, in at least float32."""
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        q = self.quantiles.to(dtype)
        proxy_y = (1.0 + self.proxy_weight.to(dtype)).unsqueeze(1) * q + self.proxy_bias.to(dtype).unsqueeze(1)
        pre = self.weight.to(dtype).unsqueeze(1) * proxy_y + self.bias.to(dtype).unsqueeze(1)
        proxy_z = self._activation_in(pre.unsqueeze(0), dtype).squeeze(0)  # (1, C, n): per-channel ones see dim 1
        mean = proxy_z.mean(dim=1)
        var = (proxy_z - mean.unsqueeze(1)).square().mean(dim=1)
        return mean, var

    def _activation_in(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """The activation on ``x`` (of ``dtype``); its parameters of another dtype (a half-precision ``nn.PReLU``'s
        weight) cast to ``dtype`` for this call, so that no op mixes dtypes. Decided on the module's parameters,
        never on ``x``: torch.fx tracing and the fp32 path (plain call) are unchanged."""
        params = dict(self.activation.named_parameters())
        if all(p.dtype == dtype for p in params.values()):
            return self.activation(x)
        cast = {name: p.to(dtype) if p.is_floating_point() else p for name, p in params.items()}
        return torch.func.functional_call(self.activation, cast, (x,))

    def _apply(self, fn, recurse=True):  # .double(), .half(), .to(...): quantiles recomputed, never rounded twice
        result = super()._apply(fn, recurse)
        q = self.quantiles
        dtype = torch.promote_types(q.dtype, torch.float32) if q.dtype.is_floating_point else torch.float32
        self.quantiles = proxy_quantiles(self.num_samples, dtype).to(q.device)
        return result

    def forward(self, y: Tensor) -> Tensor:
        z = self.activation(_per_channel(self.weight, y) * y + _per_channel(self.bias, y))
        mean, var = self.proxy_moments()
        inv_std = torch.rsqrt(var + self.eps)
        return (z - _per_channel(mean.to(z.dtype), z)) * _per_channel(inv_std.to(z.dtype), z)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, num_samples={self.num_samples}, eps={self.eps}"


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups following the official Proxy Norm recipe: every ProxyNormAct's
    ``proxy_weight``/``proxy_bias`` (γ̃, β̃) decayed towards 0 with ``weight_decay``, its ``weight``/``bias``
    (γ, β) and every other 1-D parameter (norm affines, biases) not decayed, the rest decayed."""
    proxy, plain_1d = set(), set()
    for module in model.modules():
        if isinstance(module, ProxyNormAct):
            proxy.update({id(module.proxy_weight), id(module.proxy_bias)})
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if id(param) in proxy or param.dim() > 1:
            decay.append(param)
        else:
            plain_1d.add(id(param))
            no_decay.append(param)
    groups: Iterable[dict[str, Any]] = ({"params": decay, "weight_decay": weight_decay},
                                        {"params": no_decay, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]
