"""How stale is a model's EMA? Per-layer drift between stored running statistics and precise ones.

For each BN layer and channel c, with the stored (EMA) statistics ``mu_ema, var_ema`` and the
precise population statistics ``mu_p, var_p`` measured on data (the model is not modified):

* relative mean shift ``|mu_ema - mu_p| / sqrt(var_p + eps)``: how far, in units of the precise
  standard deviation the layer divides by, the EMA mean is off; reported as the mean and the max
  over channels;
* variance ratio ``(var_ema + eps) / (var_p + eps)``: the ratio of the variances the layer actually
  divides by (equal to ``var_ema / var_p`` whenever ``var >> eps``, and finite for dead channels);
  reported as the mean, min and max over channels. 1 is perfect; a layer normalizing with a stale
  ratio r scales its output by ``1/sqrt(r)``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ModelError
from ..io_utils import atomic_path
from ..report import Report
from .collect import Collected, collect_stats
from .recompute import apply_stats, check_mode, select_layers, unwrap_parallel

__all__ = [
    "LayerDrift", "EMADiagnosis", "StatsRun", "diagnose_ema", "drift_from", "layer_drift", "recompute_with_diagnosis",
]

log = logging.getLogger(__name__)


@dataclass
class LayerDrift:
    """Drift of one BN layer's stored statistics from the precise ones (see the module docstring)."""

    layer: str
    channels: int
    calls: int
    count: int
    mean_shift_mean: float
    mean_shift_max: float
    var_ratio_mean: float
    var_ratio_min: float
    var_ratio_max: float


@dataclass
class EMADiagnosis:
    """Per-layer drift rows plus what the pass saw; ``format()`` is a table, ``to_dict()`` JSON-ready."""

    rows: list[LayerDrift]
    mode: str = "precise"
    batches: int = 0
    world_size: int = 1
    unreached: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def worst(self) -> LayerDrift | None:
        """The row with the largest maximum mean shift."""
        return max(self.rows, key=lambda r: r.mean_shift_max, default=None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "batches": self.batches,
            "world_size": self.world_size,
            "definitions": {
                "mean_shift": "|mu_ema - mu_precise| / sqrt(var_precise + eps), per channel; mean and max over channels",
                "var_ratio": "(var_ema + eps) / (var_precise + eps), per channel; mean, min and max over channels",
            },
            "layers": [asdict(r) for r in self.rows],
            "unreached": list(self.unreached),
            "skipped": dict(self.skipped),
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def format(self) -> str:
        """A plain-text table, one row per layer, then a summary line."""
        head = ("layer", "C", "calls", "shift mean", "shift max", "var ratio mean", "min", "max")
        body = [
            (r.layer, str(r.channels), str(r.calls), f"{r.mean_shift_mean:.4f}", f"{r.mean_shift_max:.4f}",
             f"{r.var_ratio_mean:.4f}", f"{r.var_ratio_min:.4f}", f"{r.var_ratio_max:.4f}")
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
        def line(row):
            return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        lines = [line(head), "-" * len(line(head))] + [line(row) for row in body]
        worst = self.worst()
        summary = f"{len(self.rows)} layer(s), {self.batches} batch(es), mode {self.mode}"
        if worst is not None:
            summary += f"; largest mean shift {worst.mean_shift_max:.4f} at {worst.layer}"
        lines.append(summary)
        for name in self.unreached:
            lines.append(f"{name}: never reached by the data")
        for name, reason in self.skipped.items():
            lines.append(f"{name}: skipped ({reason})")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()

    def plot(self, path: str | os.PathLike) -> str:
        """Save a two-panel figure (mean shift, variance ratio per layer) to ``path`` (atomically); return it."""
        from matplotlib.figure import Figure  # a standalone Figure renders with Agg; pyplot's state is untouched

        fig = Figure(figsize=(max(6.0, 0.28 * len(self.rows) + 2), 6.0), layout="constrained")
        ax1, ax2 = fig.subplots(2, 1, sharex=True)
        x = list(range(len(self.rows)))
        ax1.bar(x, [r.mean_shift_max for r in self.rows], color="#f4a261", label="max over channels")
        ax1.bar(x, [r.mean_shift_mean for r in self.rows], color="#e76f51", label="mean over channels")
        ax1.set_ylabel("|mu_ema - mu| / sigma")
        ax1.set_title(f"EMA vs {self.mode} BN statistics ({self.batches} batches)")
        ax1.legend(loc="best", fontsize=8)
        means = [r.var_ratio_mean for r in self.rows]
        lo = [r.var_ratio_mean - r.var_ratio_min for r in self.rows]
        hi = [r.var_ratio_max - r.var_ratio_mean for r in self.rows]
        ax2.errorbar(x, means, yerr=[lo, hi], fmt="o", color="#264653", ecolor="#2a9d8f", capsize=2,
                     label="mean (bars: min..max)")
        ax2.axhline(1.0, color="grey", lw=0.8, ls="--")
        if self.rows and all(v > 0 for r in self.rows for v in (r.var_ratio_min, r.var_ratio_max)):
            ax2.set_yscale("log")
        ax2.set_ylabel("var_ema / var")
        ax2.legend(loc="best", fontsize=8)
        ax2.set_xticks(x)
        ax2.set_xticklabels([r.layer for r in self.rows], rotation=60, ha="right", fontsize=7)
        path = os.fspath(path)
        with atomic_path(path) as tmp:  # the file mode a plain open() gives, never a partial figure
            fig.savefig(tmp, dpi=120, format=(os.path.splitext(path)[1][1:] or "png").lower())
        return path


def _finite(value: float) -> float:
    return float(value) if math.isfinite(value) else float("inf")


def layer_drift(name: str, calls: int, moments: Any, mu_ema: torch.Tensor, var_ema: torch.Tensor,
                eps: float) -> LayerDrift:
    """One layer's drift: stored ``mu_ema``/``var_ema`` against the precise ``moments`` (both routes use it)."""
    mu_ema = mu_ema.detach().to("cpu", torch.float64)
    var_ema = var_ema.detach().to("cpu", torch.float64)
    mu = moments.mean.to("cpu", torch.float64)
    var = moments.var_unbiased.to("cpu", torch.float64)
    shift = (mu_ema - mu).abs() / (var + eps).sqrt()
    ratio = (var_ema + eps) / (var + eps)
    return LayerDrift(
        name, int(mu.numel()), calls, int(moments.count),
        _finite(shift.mean()), _finite(shift.max()),
        _finite(ratio.mean()), _finite(ratio.min()), _finite(ratio.max()),
    )


def drift_from(model: nn.Module, layers: dict[str, nn.Module], collected: Collected, mode: str) -> EMADiagnosis:
    """Compare the stored statistics of ``model``'s layers (by name) with the collected precise ones."""
    stored = dict(model.named_modules())
    rows = []
    for name in layers:
        s = collected.layers[name]
        if not s.reached:
            continue
        bn = stored[name]
        rows.append(layer_drift(name, s.calls, s.moments, bn.running_mean, bn.running_var, float(bn.eps)))
    return EMADiagnosis(rows, mode, collected.batches, collected.world_size, collected.unreached)


@dataclass
class StatsRun:
    """One pass over data: the model with new statistics, its report, and the drift of the old ones."""

    model: Any  # nn.Module (torch route) or onnx.ModelProto (ONNX route)
    report: Report
    diagnosis: EMADiagnosis


def recompute_with_diagnosis(
    model: Any,
    data: Any,
    *,
    num_batches: int | None = None,
    mode: str = "precise",
    forward: Callable[[nn.Module, Any], Any] | None = None,
    progress: bool = True,
) -> StatsRun:
    """:func:`normfx.recompute_stats` and :func:`diagnose_ema` from a single pass over ``data``.

    ``model`` may also be an ONNX model (``onnx.ModelProto`` or a path): the run's model is then a new
    ModelProto and the diagnosis compares each BatchNormalization node's stored mean/var.
    """
    check_mode(mode)
    from .onnx_recompute import check_no_forward, is_onnx_model, recompute_with_diagnosis_onnx

    if is_onnx_model(model):
        check_no_forward(forward)
        return recompute_with_diagnosis_onnx(model, data, num_batches=num_batches, mode=mode, progress=progress)
    if not isinstance(model, nn.Module):
        raise ModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
    source = unwrap_parallel(model)
    work = copy.deepcopy(source)
    report = Report(policy=mode, model=type(work).__name__)
    layers = select_layers(work, lambda name: True, report, mode)
    if not layers:
        raise ModelError(
            f"{type(work).__name__} has no BatchNorm layer with running statistics "
            f"({'; '.join(str(e) for e in report.skipped[:3])})"
        )
    collected = collect_stats(work, data, layers, num_batches=num_batches, forward=forward, progress=progress,
                              desc=f"{mode} BN")
    diagnosis = drift_from(source, layers, collected, mode)
    diagnosis.skipped = {e.name: e.reason for e in report.skipped}
    apply_stats(layers, collected, report, mode, mode)
    return StatsRun(work, report, diagnosis)


def diagnose_ema(
    model: Any,
    data: Any,
    *,
    num_batches: int | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    plot: str | os.PathLike | None = None,
    progress: bool = True,
    mode: str = "precise",
) -> EMADiagnosis:
    """Measure precise statistics on ``data`` and report, per BN layer, how far the stored (EMA) ones drift.

    The model (an ``nn.Module``, or an ONNX ``ModelProto`` / path: one row per BatchNormalization node)
    is not modified (the pass runs on a copy). ``data``, ``num_batches``, ``forward``,
    ``progress`` are as in :func:`normfx.recompute_stats`; ``plot=path`` also saves a matplotlib
    figure (Agg backend); ``mode`` only labels the result. Under torch.distributed every rank gets
    the same diagnosis. The two measures are defined in this module's docstring: the mean shift in
    units of the precise sigma (mean and max over channels) and the ratio of the variances the layer
    divides by (mean, min, max over channels).
    """
    run = recompute_with_diagnosis(model, data, num_batches=num_batches, mode=mode, forward=forward, progress=progress)
    if plot is not None:
        run.diagnosis.plot(plot)
    return run.diagnosis
