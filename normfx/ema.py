"""EMA control for BatchNorm-like layers, on any model, without rewriting it (tensorpack's BatchNorm switches).

* :func:`statistics` — a context manager choosing, for every layer with running statistics, which statistics
  it normalizes with (``use="batch"`` or ``use="ema"``, regardless of the model's train/eval mode) and whether
  batch statistics update the EMA (``update_ema``);
* :func:`no_ema_update` — batch statistics, EMA untouched (a GAN discriminator on fake images:
  ``D(fake, training=True, update_ema=False)``);
* :func:`use_ema` — the EMA statistics while training (``D(fake, training=False)``), gradients still flowing
  through the normalization's affine and its input; dropout and the rest of the model stay in their mode;
* :func:`call` — the same choice for one call: ``call(D, fake, update_ema=False)``.

How: the switches set each layer's own ``training`` flag and ``track_running_stats`` attribute (the two
things BatchNorm's forward reads: batch statistics when ``training``, EMA updated only when
``track_running_stats`` too) and put both back on exit, even on an exception. No buffer is written, so with
``update_ema=False`` the running statistics and ``num_batches_tracked`` stay bitwise the same (tested). Layers
covered: every ``_BatchNorm`` (BatchNorm1d/2d/3d, SyncBatchNorm, subclasses, normfx's Ghost/Virtual/Renorm)
and :class:`normfx.layers.SeparateBatchNorm` — any module with ``running_mean`` and a ``track_running_stats``
flag. Frozen BN has no EMA and is left alone. A ``model.train()``/``.eval()`` call inside the block overrides
the layers' flags until the block ends.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from torch import nn

from .errors import InputDataError, PolicyError

__all__ = ["statistics", "no_ema_update", "use_ema", "call", "statistics_layers"]

_USES = (None, "batch", "ema")


def statistics_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` for every layer of ``model`` that keeps (or could keep) running statistics."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            or (isinstance(getattr(m, "track_running_stats", None), bool) and hasattr(m, "running_mean"))]


@contextlib.contextmanager
def statistics(model: nn.Module, use: str | None = None, update_ema: bool | None = None) -> Iterator[nn.Module]:
    """Inside the block, every statistics layer of ``model`` normalizes with ``use`` statistics.

    ``use``: ``"batch"`` (batch statistics even in eval mode), ``"ema"`` (running statistics even in train
    mode) or ``None`` (each layer's mode decides, as usual). ``update_ema``: whether batch statistics update
    the running ones (``None``: as usual, i.e. yes in training); must not be ``True`` with ``use="ema"``.
    Layers built without running statistics (``track_running_stats=False``) always use batch statistics:
    ``use="ema"`` on them raises :class:`~normfx.errors.InputDataError`.
    """
    if use not in _USES:
        raise PolicyError(f"normfx.ema.statistics: use must be 'batch', 'ema' or None, got {use!r}")
    if update_ema not in (None, True, False):
        raise PolicyError(f"normfx.ema.statistics: update_ema must be True, False or None, got {update_ema!r}")
    if use == "ema" and update_ema:
        raise PolicyError("normfx.ema.statistics: use='ema' normalizes with the EMA itself, which batch statistics "
                          "cannot update at the same time; pass update_ema=False or None")
    layers = statistics_layers(model)
    if use == "ema":
        missing = [name or "<model>" for name, m in layers if getattr(m, "running_mean", None) is None]
        if missing:
            raise InputDataError(f"normfx.ema.statistics: layer {missing[0]} has no running statistics "
                                 "(track_running_stats=False), so it cannot use the EMA; exclude it or give it running "
                                 "statistics")
    saved = [(m, m.training, m.track_running_stats) for _, m in layers]
    try:
        for m, _, _ in saved:
            has_ema = getattr(m, "running_mean", None) is not None
            if use is not None:
                m.training = use == "batch"
            if update_ema is not None and has_ema:
                m.track_running_stats = bool(update_ema)
        yield model
    finally:
        for m, training, tracks in saved:
            m.training, m.track_running_stats = training, tracks


def no_ema_update(model: nn.Module) -> contextlib.AbstractContextManager:
    """Batch statistics (whatever the mode), running statistics and counters untouched."""
    return statistics(model, use="batch", update_ema=False)


def use_ema(model: nn.Module) -> contextlib.AbstractContextManager:
    """Running (EMA) statistics even in train mode; nothing updated."""
    return statistics(model, use="ema")


def call(model: nn.Module, *args: Any, use: str | None = None, update_ema: bool | None = None, **kwargs: Any) -> Any:
    """``model(*args, **kwargs)`` with the statistics choice of :func:`statistics` for this one call."""
    with statistics(model, use=use, update_ema=update_ema):
        return model(*args, **kwargs)
