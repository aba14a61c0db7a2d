"""Precise and adaptive BatchNorm statistics (torch.distributed aware) and the EMA-staleness diagnosis.

* :func:`recompute_stats` — a copy of the model with population statistics measured on data;
* policies ``precise`` / ``adaptive`` (:func:`run_precise`, :func:`run_adaptive`) for ``normfx.rewrite``;
* :func:`diagnose_ema` — per-layer drift of the stored EMA statistics from the precise ones.

Modules: ``moments`` (float64 math), ``feed`` (batches → model), ``collect`` (hooks),
``distributed`` (cross-rank merge), ``recompute`` (the API and passes), ``diagnose`` (drift);
``unfuse`` (statistics of the BNs the ``unfuse`` policy inserts, train-mode deviation); the ONNX route:
``onnx_feed`` (batches → graph inputs), ``onnx_train_graph`` (BN nodes in their training-mode form),
``onnx_collect`` (BN inputs measured in onnxruntime), ``onnx_recompute`` (writing the statistics into the
graph, the ONNX passes) and ``onnx_unfuse`` (unfuse's train-mode deviation). The API functions take either
kind of model.
"""

from .diagnose import EMADiagnosis, LayerDrift, StatsRun, diagnose_ema, recompute_with_diagnosis
from .moments import Moments, batch_moments, merge
from .recompute import recompute_stats, recompute_stats_with_report, run_adaptive, run_precise

__all__ = [
    "recompute_stats",
    "recompute_stats_with_report",
    "run_precise",
    "run_adaptive",
    "diagnose_ema",
    "recompute_with_diagnosis",
    "StatsRun",
    "EMADiagnosis",
    "LayerDrift",
    "Moments",
    "batch_moments",
    "merge",
]
