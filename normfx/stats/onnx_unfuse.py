"""How far train mode strays after ``unfuse`` on an ONNX model, measured in onnxruntime.

The ONNX counterpart of :func:`normfx.stats.unfuse.train_mode_deviation`: the relative error
``max|y_train - y_eval| / max|y_eval|`` (the worst over the float graph outputs) on one batch, where in
``y_train`` only the BatchNormalization nodes ``unfuse`` inserted normalize with the batch's statistics
(their training-mode form, :func:`~normfx.stats.onnx_train_graph.with_batch_statistics`) and every
other node is as in the model (eval): how close fine-tuning starts to the fused function.

:class:`FirstBatch` keeps the first batch's feed while
:func:`~normfx.stats.onnx_collect.collect_onnx_moments` goes through the data (its ``on_batch``), so
one-shot data (a generator) is iterated once.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import onnx

from ..errors import RewriteError
from ..passes.onnx.io import first_line
from .onnx_train_graph import with_batch_statistics

__all__ = ["FirstBatch", "train_mode_deviation"]


class FirstBatch:
    """An ``on_batch`` callback for :func:`~normfx.stats.onnx_collect.collect_onnx_moments` that keeps a copy
    of batch 0's feed, and how many values per channel each measured node got from it."""

    def __init__(self) -> None:
        self.feed: dict[str, np.ndarray] | None = None
        self.values_per_channel: dict[str, int] = {}

    def __call__(self, index: int, feed: dict[str, np.ndarray], inputs: dict[str, np.ndarray]) -> None:
        if index != 0:
            return
        self.feed = {name: np.array(value, copy=True) for name, value in feed.items()}  # the data may reuse buffers
        self.values_per_channel = {
            name: (a.size // a.shape[1]) if a.ndim >= 2 and a.shape[1] else 0 for name, a in inputs.items()
        }


def _outputs(model: onnx.ModelProto, feed: Mapping[str, np.ndarray], what: str) -> list:
    from ..runtime import make_session

    names = [o.name for o in model.graph.output]
    try:
        return make_session(model, optimization="all").run(names, dict(feed))
    except Exception as exc:  # onnxruntime's own exception types
        raise RewriteError(f"measuring the train-mode deviation: the {what} failed in onnxruntime: "
                           f"{first_line(exc)}") from None


def train_mode_deviation(model: onnx.ModelProto, bn_names: Sequence[str], feed: Mapping[str, np.ndarray]) -> float:
    """Worst relative error of ``model``'s float outputs on ``feed`` with the BatchNormalization nodes
    ``bn_names`` on batch statistics vs the model as it is (every node in eval)."""
    reference = _outputs(model, feed, "model")
    candidate = _outputs(with_batch_statistics(model, bn_names), feed, "model with its new BNs on batch statistics")
    worst = 0.0
    for ref, got in zip(reference, candidate):
        if isinstance(ref, np.ndarray) and ref.dtype.kind == "f" and ref.size:
            ref64, got64 = ref.astype(np.float64), np.asarray(got, dtype=np.float64)
            worst = max(worst, float(np.abs(ref64 - got64).max() / max(float(np.abs(ref64).max()), 1e-30)))
    return worst
