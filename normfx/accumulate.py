"""Gradient accumulation that keeps the normalization batch size (NBS) while the SGD batch grows.

The recipe (docs/training.md): cut the SGD batch of B samples into micro-batches of n samples (n = the NBS
you want), run forward + backward on each with its mean loss weighted by ``n_i / B``, and step the optimizer
once. BatchNorm then normalizes each micro-batch on its own: the accumulated gradient is the big-batch
gradient of the same model with ``GhostBatchNorm(virtual_batch_size=n)`` (tested to fp32 rounding).

:func:`accumulate_gradients` does this, and by default (``match_ema=True``) also gives every BN-like layer
the momentum ``1 − (1 − m)^(1/k)`` for the k micro-batches of the step, so the EMA moves as far per optimizer
step as with one big batch: the running statistics then equal the Ghost BN model's as well.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .ema import statistics_layers
from .errors import InputDataError
from .layers._batch_stats import check_positive_int, horizon_momentum

__all__ = ["split_batch", "batch_size", "ema_horizon", "accumulate_gradients"]


def batch_size(batch: Any) -> int:
    """Samples in a batch: a tensor's first dimension, or the first tensor's in a tuple/list/dict."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else ()
    for item in items:
        if isinstance(item, torch.Tensor):
            return int(item.shape[0])
    raise InputDataError(f"cannot tell the batch size of a {type(batch).__name__}: give tensors or tuples of tensors")


def split_batch(batch: Any, size: int) -> list[Any]:
    """Cut a tensor, or a tuple/list/dict of tensors with the same first dimension, into micro-batches of
    ``size`` samples (the last holds the remainder, as Ghost BN's virtual batches do)."""
    check_positive_int("split_batch", "size", size)
    if isinstance(batch, torch.Tensor):
        return list(torch.split(batch, size))
    if isinstance(batch, dict):
        keys, parts = list(batch), [split_batch(v, size) for v in batch.values()]
        return [dict(zip(keys, group)) for group in zip(*parts)]
    if isinstance(batch, (tuple, list)):
        return [type(batch)(group) for group in zip(*(split_batch(item, size) for item in batch))]
    raise InputDataError(f"cannot split a {type(batch).__name__}: give a tensor or a tuple/list/dict of tensors")


@contextlib.contextmanager
def ema_horizon(model: nn.Module, updates: int) -> Iterator[nn.Module]:
    """Inside the block, ``updates`` forwards move every BN-like layer's EMA as far as one did (momentum
    ``1 − (1 − m)^(1/updates)``; ``momentum=None`` layers unchanged); momenta restored afterwards."""
    check_positive_int("ema_horizon", "updates", updates)
    layers = [m for _, m in statistics_layers(model) if getattr(m, "momentum", None) is not None]
    saved = [m.momentum for m in layers]
    try:
        for m in layers:
            m.momentum = horizon_momentum(float(m.momentum), updates)
        yield model
    finally:
        for m, momentum in zip(layers, saved):
            m.momentum = momentum


def accumulate_gradients(model: nn.Module, micro_batches: Sequence[Any], loss_fn: Callable[[Any], torch.Tensor], *,
                         match_ema: bool = True) -> torch.Tensor:
    """Forward + backward each micro-batch (``loss_fn(micro_batch)`` returns its *mean* loss), weighted so that
    the gradients add up to those of the mean loss over all samples. Gradients accumulate into ``.grad`` as
    usual (zero them before, step after). Returns the big batch's mean loss (detached)."""
    micro_batches = list(micro_batches)
    if not micro_batches:
        raise InputDataError("accumulate_gradients: no micro-batches given")
    sizes = [batch_size(b) for b in micro_batches]
    total = sum(sizes)
    horizon = ema_horizon(model, len(micro_batches)) if match_ema else contextlib.nullcontext()
    loss_sum = None
    with horizon:
        for batch, size in zip(micro_batches, sizes):
            loss = loss_fn(batch) * (size / total)
            loss.backward()
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    return loss_sum
