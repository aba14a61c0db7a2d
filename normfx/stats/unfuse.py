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
from typing import Any, Callable

import torch
from torch import nn

from ..fold import unfold_bn_params
from ..passes.unfuse_options import train_mode_note
from .collect import collect_stats
from .feed import Replayable, feed, model_device

__all__ = ["calibrate", "train_mode_deviation", "shape_runner"]

log = logging.getLogger(__name__)


def shape_runner(data: Replayable, forward: Callable | None) -> Callable[[nn.Module], Any]:
    """``run(model)``: one forward on the first batch of ``data`` (to record layer input shapes)."""
    return lambda model: feed(model, data.first(), forward, model_device(model))


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


def calibrate(model: nn.Module, inserted: list, data: Replayable | None, ctx: Any, options: Any) -> dict[str, tuple[str, str]]:
    """Measure and set the statistics of the inserted BNs; returns ``{bn name: (source, words)}`` with
    source ``"data"`` or ``"identity"`` and the words the report says about it.

    ``inserted`` items have ``bn_name``, ``layer`` (a LayerInfo) and ``bias`` (the layer's old bias).
    Without data (or in ``explain``) the identity statistics stay.
    """
    bns = {item.bn_name: model.get_submodule(item.bn_name) for item in inserted}
    if data is None:
        return {name: ("identity", "identity statistics: no data") for name in bns}
    if ctx.dry_run:
        return {name: ("data", "statistics to be measured on the data") for name in bns}
    collected = collect_stats(model, data, bns, num_batches=options.num_batches, forward=ctx.feed, progress=True,
                              desc="unfuse statistics", batch_statistics=False)
    sources: dict[str, tuple[str, str]] = {}
    for item in inserted:
        bn, stats = bns[item.bn_name], collected.layers[item.bn_name]
        count = int(stats.moments.count) if stats.reached else 0
        if count < 2:
            why = (f"never reached by the data in {collected.batches} batch(es)" if not count else
                   "the data gave 1 value per channel; a variance needs 2")
            sources[item.bn_name] = ("identity", f"identity statistics: {why}")
            log.warning("%s: %s", item.bn_name, why)
            continue
        _, params = unfold_bn_params(item.layer.module.weight.detach(), item.bias, kind=item.layer.kind,
                                     groups=item.layer.groups, channel_mean=stats.moments.mean,
                                     channel_var=stats.moments.var_unbiased, eps=bn.eps)
        with torch.no_grad():
            for key, value in params.items():
                getattr(bn, key).copy_(value)
            bn.num_batches_tracked.fill_(stats.calls)
        sources[item.bn_name] = ("data", f"statistics measured on the data: {count} values per channel")
    if options.norm != "frozen":
        try:
            deviation = train_mode_deviation(model, bns, data.first(), ctx.feed)
        except ValueError as exc:  # BatchNorm refuses train mode on one value per channel
            if "value per channel" not in str(exc):
                raise
            ctx.report.note("train-mode deviation not measured: the first batch gives one value per channel, on which "
                            "BatchNorm cannot run in train mode")
        else:
            ctx.report.note(train_mode_note(deviation))
            ctx.report.metrics["unfuse_train_mode_rel_error"] = deviation
    return sources
