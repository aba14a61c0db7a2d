"""Statistics for ``unfuse``: measure the BatchNorms it put back, and how far train mode strays.

The BNs are inserted with identity statistics, so the model computes its fused (eval) function. Their
inputs are measured over the data with only measuring hooks (:func:`collect_stats` with
``batch_statistics=False``: no layer switches to batch statistics, so every BN sees what it will see in
eval), and each gets ``running_mean = mean``, ``running_var = var`` (unbiased, as PyTorch stores it),
``gamma = sqrt(var + eps)``, ``beta = mean + b`` from :func:`normfx.fold.unfold_bn_params`.

The train-mode deviation is the relative error ``max|y_train - y_eval| / max|y_eval|`` on the first batch
of the data, where in ``y_train`` the inserted BNs normalize with the batch's statistics (the rest of
the model in eval; running statistics restored afterwards): how close fine-tuning starts to the fused
function.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..errors import InputDataError
from ..fold import unfold_bn_params
from .collect import collect_stats
from .feed import feed, iterate_batches, model_device

__all__ = ["Replayable", "calibrate", "train_mode_deviation"]

log = logging.getLogger(__name__)


class Replayable:
    """``data`` whose first batch can be looked at without losing it: a one-shot iterator (a generator)
    replays the batch it gave up; a re-iterable (list, DataLoader) is simply iterated again."""

    def __init__(self, data: Any) -> None:
        self._data = data
        self._rest: Iterator[tuple[int, Any]] | None = None
        self._first: list[Any] = []

    def first(self) -> Any:
        if not self._first:
            self._rest = iterate_batches(self._data, None, progress=False, desc="")
            try:
                self._first.append(next(self._rest)[1])
            except StopIteration:
                raise InputDataError("data yielded no batches: give at least one batch") from None
        return self._first[0]

    @property
    def _one_shot(self) -> bool:
        try:
            return iter(self._data) is self._data
        except TypeError:
            return False

    def __iter__(self) -> Iterator[Any]:
        if self._first and self._one_shot:
            yield self._first[0]
            yield from (batch for _, batch in self._rest)
        else:
            yield from self._data

    def __len__(self) -> int:
        return len(self._data)

    def runner(self, forward: Callable | None) -> Callable[[nn.Module], Any]:
        """``run(model)``: one forward on the first batch (to record layer input shapes)."""
        return lambda model: feed(model, self.first(), forward, model_device(model))


def _tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for v in output.values() for t in _tensors(v)]
    if isinstance(output, (tuple, list)):
        return [t for v in output for t in _tensors(v)]
    return []


def train_mode_deviation(model: nn.Module, bns: dict[str, nn.Module], batch: Any, forward: Callable | None) -> float:
    """Worst relative error of the model's outputs with ``bns`` on batch statistics vs all in eval."""
    modes = {m: m.training for m in model.modules()}
    saved = {name: {k: v.clone() for k, v in bn.state_dict().items()} for name, bn in bns.items()}
    device = model_device(model)
    try:
        model.eval()
        with torch.no_grad():
            reference = _tensors(feed(model, batch, forward, device))
            for bn in bns.values():
                bn.train()
            candidate = _tensors(feed(model, batch, forward, device))
    finally:
        for module, training in modes.items():
            module.training = training
        for name, bn in bns.items():
            bn.load_state_dict(saved[name])
    worst = 0.0
    for ref, got in zip(reference, candidate):
        if ref.is_floating_point() and ref.numel():
            ref64, got64 = ref.double(), got.double()
            worst = max(worst, float((ref64 - got64).abs().max() / ref64.abs().max().clamp_min(1e-30)))
    return worst


def calibrate(model: nn.Module, inserted: list, data: Replayable | None, ctx: Any) -> dict[str, str]:
    """Measure and set the statistics of the inserted BNs; returns ``{bn name: "data" | "identity ..."}``.

    ``inserted`` items have ``bn_name``, ``layer`` (a LayerInfo) and ``bias`` (the layer's old bias).
    Without data (or in ``explain``) the identity statistics stay.
    """
    bns = {item.bn_name: model.get_submodule(item.bn_name) for item in inserted}
    if data is None:
        return {name: "identity" for name in bns}
    if ctx.dry_run:
        return {name: "would measure on data" for name in bns}
    num_batches = ctx.option("num_batches") or None
    collected = collect_stats(model, data, bns, num_batches=num_batches, forward=ctx.feed, progress=True,
                              desc="unfuse statistics", batch_statistics=False)
    sources: dict[str, str] = {}
    for item in inserted:
        bn, stats = bns[item.bn_name], collected.layers[item.bn_name]
        if not stats.reached:
            sources[item.bn_name] = f"identity: never reached by the data in {collected.batches} batch(es)"
            log.warning("%s: %s", item.bn_name, sources[item.bn_name])
            continue
        _, params = unfold_bn_params(item.layer.module.weight.detach(), item.bias, kind=item.layer.kind,
                                     groups=item.layer.groups, channel_mean=stats.moments.mean,
                                     channel_var=stats.moments.var_unbiased, eps=bn.eps)
        with torch.no_grad():
            for key, value in params.items():
                getattr(bn, key).copy_(value)
            bn.num_batches_tracked.fill_(stats.calls)
        sources[item.bn_name] = f"data: {int(stats.moments.count)} values per channel"
    if ctx.option("norm") != "frozen":
        deviation = train_mode_deviation(model, bns, data.first(), ctx.feed)
        ctx.report.note(f"train mode vs eval on the first batch of data (inserted BNs on batch statistics): "
                        f"max rel error {deviation:.3g}")
        ctx.report.metrics["unfuse_train_mode_rel_error"] = deviation
    return sources
