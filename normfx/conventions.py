"""Converting BatchNorm numbers between the conventions of PyTorch, TF/Keras, Caffe, Caffe2 and cuDNN.

Pure float64 array math (numpy in, numpy out) plus the two torch-facing helpers that use it
(:func:`raise_eps`, :func:`from_keras` / :func:`to_keras`). The devils (Yuxin Wu, "Devils in BatchNorm"):

- **momentum**: PyTorch and cuDNN weight the *new* batch (``running = (1 - m)·running + m·batch``, default 0.1);
  TF/Keras, Caffe2, ONNX and MXNet weight the *old* value (``running = m·running + (1 - m)·batch``, default
  0.9/0.99), as does Caffe's ``moving_average_fraction`` (0.999). PyTorch 0.1 ≡ TF 0.9.
- **Caffe** stores ``running_mean · scale_factor`` and ``running_var · scale_factor`` (three blobs: the sums and the
  scale factor); the statistics are the blobs divided by the factor (0 when the factor is 0). Its BatchNorm has no
  affine: γ and β live in the following Scale layer.
- **Caffe2** (Detectron checkpoints) names a blob ``running_inv_var`` / ``*_riv`` that holds the running
  *variance*, not an inverse: copy it as it is.
- **cuDNN** needs ε ≥ 1e-5 (``CUDNN_BN_MIN_EPSILON``); its saved ``inv_variance`` is a real inverse standard
  deviation ``1 / sqrt(var_biased + ε)`` of the batch.
- **biased vs unbiased variance**: a batch normalizes with the biased variance (divide by n); PyTorch's running
  variance tracks the unbiased one (n - 1); Keras 3 tracks the biased one. n is the values per channel in a
  batch (N·H·W). Eval-mode models use whatever is stored as it is, so conversions keep stored values unless asked.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from .errors import InputDataError, ModelError

__all__ = [
    "FRAMEWORKS",
    "convert_momentum",
    "caffe_to_stats",
    "stats_to_caffe",
    "caffe2_to_stats",
    "stats_to_caffe2",
    "cudnn_inv_std_to_var",
    "biased_to_unbiased",
    "unbiased_to_biased",
    "compensate_eps",
    "EpsChange",
    "EpsReport",
    "raise_eps",
    "from_keras",
    "to_keras",
    "KERAS_KEYS",
]

log = logging.getLogger(__name__)

#: how each framework's momentum weights the running average: "new" (weight of the batch) or "old" (decay)
FRAMEWORKS = {
    "pytorch": "new",
    "cudnn": "new",  # exponentialAverageFactor
    "tensorflow": "old",
    "keras": "old",
    "caffe2": "old",
    "onnx": "old",
    "mxnet": "old",
    "caffe": "old",  # moving_average_fraction (Caffe also bias-corrects its sums through scale_factor)
}

#: Keras/TF BatchNormalization weight names, in ``layer.get_weights()`` order
KERAS_KEYS = ("gamma", "beta", "moving_mean", "moving_variance")


def _f64(values: Any, what: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    array = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise InputDataError(f"{what} has NaN/Inf values; conventions convert finite statistics only")
    return array


def _framework(name: str) -> str:
    key = name.lower().replace("/", "").replace(" ", "")
    key = {"tf": "tensorflow", "torch": "pytorch", "tfkeras": "keras"}.get(key, key)
    if key not in FRAMEWORKS:
        raise InputDataError(f"unknown framework {name!r}; one of {', '.join(FRAMEWORKS)}")
    return key


def convert_momentum(momentum: float, source: str, target: str) -> float:
    """``momentum`` of framework ``source`` in framework ``target``'s convention (``1 - m`` when one weights the new
    batch and the other the old value): ``convert_momentum(0.9, "keras", "pytorch") == 0.1`` (up to rounding)."""
    m = float(momentum)
    if not 0.0 <= m <= 1.0:
        raise InputDataError(f"momentum {momentum!r} is outside [0, 1]")
    same = FRAMEWORKS[_framework(source)] == FRAMEWORKS[_framework(target)]
    return m if same else 1.0 - m


def caffe_to_stats(mean_blob: Any, var_blob: Any, scale_factor: Any) -> tuple[np.ndarray, np.ndarray]:
    """Caffe BatchNorm blobs (``blobs[0]``, ``blobs[1]``, ``blobs[2]``) → ``(running_mean, running_var)``: the sums
    divided by the scale factor, as Caffe's own forward does (factor 0 → statistics 0)."""
    factor = float(np.asarray(_f64(scale_factor, "scale_factor")).reshape(-1)[0])
    inv = 0.0 if factor == 0 else 1.0 / factor
    return _f64(mean_blob, "Caffe mean blob") * inv, _f64(var_blob, "Caffe variance blob") * inv


def stats_to_caffe(mean: Any, var: Any, scale_factor: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(running_mean, running_var)`` → Caffe's three blobs for a given ``scale_factor`` (1 by default: the
    statistics stored as they are, which Caffe reads back unchanged)."""
    factor = float(scale_factor)
    if factor <= 0:
        raise InputDataError(f"Caffe scale_factor must be > 0 to store statistics, got {scale_factor!r}")
    return _f64(mean, "running_mean") * factor, _f64(var, "running_var") * factor, np.array([factor])


def caffe2_to_stats(rm: Any, riv: Any) -> tuple[np.ndarray, np.ndarray]:
    """Caffe2 SpatialBN blobs ``rm`` / ``riv`` ("running_inv_var") → ``(running_mean, running_var)``. ``riv`` already
    holds the variance (the name lies); inverting it is the devil."""
    return _f64(rm, "Caffe2 rm"), _f64(riv, "Caffe2 riv")


def stats_to_caffe2(mean: Any, var: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(running_mean, running_var)`` → Caffe2 ``(rm, riv)``: the variance goes into ``riv`` as it is."""
    return _f64(mean, "running_mean"), _f64(var, "running_var")


def cudnn_inv_std_to_var(inv_std: Any, eps: float) -> np.ndarray:
    """cuDNN's saved ``inv_variance`` (``1 / sqrt(var + eps)`` of the batch) → the biased batch variance."""
    inv = _f64(inv_std, "inv_variance")
    if np.any(inv <= 0):
        raise InputDataError("inv_variance must be > 0 (it is 1 / sqrt(var + eps))")
    return 1.0 / (inv * inv) - float(eps)


def _count(n: int) -> int:
    if int(n) != n or n < 2:
        raise InputDataError(f"values per channel n must be an integer >= 2 (N·H·W of a batch), got {n!r}")
    return int(n)


def biased_to_unbiased(var: Any, n: int) -> np.ndarray:
    """Biased variance (divide by n) → unbiased (divide by n - 1): ``var · n / (n - 1)``."""
    n = _count(n)
    return _f64(var, "variance") * n / (n - 1)


def unbiased_to_biased(var: Any, n: int) -> np.ndarray:
    """Unbiased variance → biased: ``var · (n - 1) / n``."""
    n = _count(n)
    return _f64(var, "variance") * (n - 1) / n


def compensate_eps(var: Any, eps: float, new_eps: float, weight: Any = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Raise ε to ``new_eps`` keeping the eval-mode BN exact; returns ``(var', weight', via_weight)``.

    Per channel ``var' = var + eps - new_eps`` keeps ``var' + new_eps = var + eps``, so ``γ/σ`` and the output are
    unchanged. A channel where that would leave ``var' <= 0`` keeps its variance and scales γ instead:
    ``γ' = γ · sqrt(var + new_eps) / sqrt(var + eps)`` (``via_weight`` marks those channels). Without γ
    (``affine=False``) such a channel cannot be compensated: :class:`InputDataError`.
    """
    v = _f64(var, "running_var")
    eps, new_eps = float(eps), float(new_eps)
    shifted = v + (eps - new_eps)
    via_weight = shifted <= 0
    new_var = np.where(via_weight, v, shifted)
    if not via_weight.any():
        return new_var, None if weight is None else _f64(weight, "weight"), via_weight
    if weight is None:
        raise InputDataError(f"{int(via_weight.sum())} channel(s) have running_var <= {new_eps - eps:.3g}: raising eps "
                             "would need a γ to compensate, and this BN has affine=False")
    if np.any(v[via_weight] + eps <= 0):
        raise InputDataError("running_var + eps <= 0: the BN is undefined; recompute its statistics first")
    g = _f64(weight, "weight")
    ratio = np.sqrt((v + new_eps) / (v + eps))
    return new_var, np.where(via_weight, g * ratio, g), via_weight


@dataclass
class EpsChange:
    """One BN whose ε was raised: the old and new ε, the channels compensated through γ instead of the variance,
    and the largest relative change of the stored variance."""

    layer: str
    old_eps: float
    new_eps: float
    via_weight: list[int] = field(default_factory=list)
    max_rel_var_change: float = 0.0


@dataclass
class EpsReport:
    """What :func:`raise_eps` changed. Eval outputs are unchanged (up to rounding to the model's dtype); training
    with batch statistics does change: those use the new ε directly."""

    min_eps: float
    changed: list[EpsChange] = field(default_factory=list)

    def __str__(self) -> str:
        if not self.changed:
            return f"every BN already has eps >= {self.min_eps:g}"
        lines = [f"eps raised to {self.min_eps:g} in {len(self.changed)} BN layer(s), running_var compensated "
                 "(eval outputs unchanged; train mode normalizes with the new eps):"]
        for c in self.changed:
            extra = f", {len(c.via_weight)} channel(s) via γ" if c.via_weight else ""
            lines.append(f"  {c.layer}: {c.old_eps:g} -> {c.new_eps:g}, max rel var change {c.max_rel_var_change:.3g}{extra}")
        return "\n".join(lines)


def _eps_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from .layers import is_batchnorm

    return [(n, m) for n, m in model.named_modules()
            if is_batchnorm(m) and isinstance(getattr(m, "eps", None), (int, float)) and m.running_var is not None]


@torch.no_grad()
def raise_eps(model: nn.Module, min_eps: float = 1e-5) -> tuple[nn.Module, EpsReport]:
    """A copy of ``model`` whose BN layers (BN modules, SyncBN, subclasses, Frozen BN) with ``eps < min_eps`` get
    ``eps = min_eps`` and a compensated running_var (see :func:`compensate_eps`), and the report of what changed.
    The caller's model is not modified."""
    import copy

    if not isinstance(model, nn.Module):
        raise ModelError(f"raise_eps takes a torch.nn.Module, got {type(model).__name__}")
    min_eps = float(min_eps)
    if not min_eps > 0:
        raise InputDataError(f"min_eps must be > 0, got {min_eps!r}")
    result = copy.deepcopy(model)
    report = EpsReport(min_eps)
    for name, module in _eps_layers(result):
        if module.eps >= min_eps:
            continue
        weight = getattr(module, "weight", None)
        new_var, new_weight, via_weight = compensate_eps(module.running_var, module.eps, min_eps, weight)
        old = module.running_var.detach().double().cpu().numpy()
        module.running_var.copy_(torch.from_numpy(new_var))
        if new_weight is not None and via_weight.any():
            weight.copy_(torch.from_numpy(new_weight))
        change = float(np.max(np.abs(new_var - old) / np.maximum(np.abs(old), np.finfo(np.float64).tiny)))
        report.changed.append(EpsChange(name or "<model>", float(module.eps), min_eps,
                                        np.flatnonzero(via_weight).tolist(), change))
        module.eps = min_eps
    for change in report.changed:
        log.info("%s: eps %g -> %g", change.layer, change.old_eps, change.new_eps)
    return result, report


def _keras_key(key: str) -> str | None:
    """``"block1/bn/gamma:0"`` / ``"gamma"`` → ``"gamma"`` (the last path component without the ``:0`` suffix)."""
    base = re.split(r"[/.]", key.split(":")[0])[-1]
    return base if base in KERAS_KEYS else None


def from_keras(weights: Mapping[str, Any], *, epsilon: float = 1e-3, momentum: float = 0.99, dims: int = 2,
               dtype: torch.dtype = torch.float32) -> nn.modules.batchnorm._BatchNorm:
    """A new ``nn.BatchNorm{dims}d`` holding a Keras/TF BatchNormalization's weights.

    ``weights`` maps ``gamma``/``beta``/``moving_mean``/``moving_variance`` (TF variable names such as
    ``"bn/gamma:0"`` work too) to arrays; a layer built with ``scale=False`` / ``center=False`` has no
    gamma / beta (1 / 0 here). ``epsilon`` and ``momentum`` are the Keras layer's (defaults: Keras's 1e-3 and
    0.99); momentum becomes PyTorch's ``1 - momentum``. Statistics are copied as they are (exact in eval);
    Keras's layer is channels-last (axis=-1), the torch BN channels-first: transpose the input, not the weights.
    """
    found: dict[str, np.ndarray] = {}
    for key, value in weights.items():
        short = _keras_key(str(key))
        if short is None:
            raise InputDataError(f"unknown Keras BatchNormalization weight {key!r}; expected {', '.join(KERAS_KEYS)}")
        if short in found:
            raise InputDataError(f"Keras weight {short!r} is given twice")
        found[short] = _f64(value, str(key)).reshape(-1)
    missing = [k for k in ("moving_mean", "moving_variance") if k not in found]
    if missing:
        raise InputDataError(f"Keras BatchNormalization weights lack {', '.join(missing)}")
    channels = found["moving_mean"].size
    if any(v.size != channels for v in found.values()):
        raise InputDataError(f"Keras weights have different sizes: { {k: v.size for k, v in found.items()} }")
    if dims not in (1, 2, 3):
        raise InputDataError(f"dims must be 1, 2 or 3, got {dims!r}")
    bn_class = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    bn = bn_class(channels, eps=float(epsilon), momentum=convert_momentum(momentum, "keras", "pytorch"), dtype=dtype)
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(found.get("gamma", np.ones(channels))))
        bn.bias.copy_(torch.from_numpy(found.get("beta", np.zeros(channels))))
        bn.running_mean.copy_(torch.from_numpy(found["moving_mean"]))
        bn.running_var.copy_(torch.from_numpy(found["moving_variance"]))
    return bn.eval()


def to_keras(bn: nn.Module) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A torch BN's weights as a Keras/TF BatchNormalization's: ``({gamma, beta, moving_mean, moving_variance}: float64
    arrays, {epsilon, momentum, center, scale})``, momentum in Keras's convention (``1 - m``). ``affine=False`` gives
    ``center=scale=False`` and no gamma/beta, as Keras stores it."""
    from .layers import is_batchnorm

    if not is_batchnorm(bn) or getattr(bn, "running_mean", None) is None:
        raise ModelError(f"to_keras takes a BatchNorm with running statistics, got {type(bn).__name__}")
    affine = getattr(bn, "weight", None) is not None
    weights: dict[str, np.ndarray] = {}
    if affine:
        weights["gamma"] = _f64(bn.weight, "weight")
        weights["beta"] = _f64(bn.bias, "bias")
    weights["moving_mean"] = _f64(bn.running_mean, "running_mean")
    weights["moving_variance"] = _f64(bn.running_var, "running_var")
    momentum = bn.momentum if bn.momentum is not None else 0.1
    if bn.momentum is None:
        log.warning("momentum=None (cumulative average) has no Keras equivalent; using PyTorch's default 0.1")
    config = {"epsilon": float(bn.eps), "momentum": convert_momentum(momentum, "pytorch", "keras"),
              "center": affine, "scale": affine}
    return weights, config
