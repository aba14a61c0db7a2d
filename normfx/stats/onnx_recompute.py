"""Precise and adaptive BN on ONNX models: the ONNX versions of ``recompute_stats``, the ``precise`` /
``adaptive`` policy passes and the EMA diagnosis.

Each targeted BatchNormalization node gets the population mean and the *unbiased* variance of its
input (what PyTorch stores in ``running_var``), measured by :func:`~normfx.stats.onnx_collect.collect_onnx_moments`
with the node on batch statistics during the pass, written into its mean/var inputs in their own dtype.
An initializer only this node reads is replaced in place (same name, dims and dtype); an initializer
other nodes read too (a torch BN called twice exports as two nodes sharing its buffers), a Constant node
or a constant subgraph (``Identity(initializer)``) gets a new initializer, and the constants that no
longer feed anything are removed. Nothing else changes: opset, IR version, metadata, node order and
every other initializer stay byte-identical.

In ONNX each node is a layer: a torch BN called twice becomes two nodes, and each gets the statistics
of its own input (the torch route merges both calls into the one module).

Nodes that cannot take new statistics are reported skipped: training mode (it always normalizes with
batch statistics), ``spatial=0``, or read running-statistics outputs. Nodes inside If/Loop/Scan bodies
or local functions, and nodes whose mean/var are graph inputs or computed at run time, raise
:class:`~normfx.errors.ModelError` naming the node and the override that excludes it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from ..errors import InputDataError, ModelError
from ..passes.onnx.io import (
    batchnorm_nodes,
    load_model_proto,
    name_batchnorm_nodes,
    node_attrs,
    opset_of,
    read_counts,
    require_loaded_data,
)
from ..passes.onnx.names import FreshNames
from ..passes.onnx.workspace import Workspace
from ..report import APPLIED, SKIPPED, Report
from .collect import Collected
from .onnx_collect import collect_onnx_moments
from .onnx_train_graph import unsupported_reason

__all__ = [
    "is_onnx_model",
    "Constants",
    "StoredStats",
    "select_nodes",
    "apply_onnx_stats",
    "recompute_onnx",
    "recompute_with_diagnosis_onnx",
    "run_precise",
    "run_adaptive",
]

log = logging.getLogger(__name__)

_MEAN, _VAR = 3, 4
_NO_FORWARD = (
    "is how a batch reaches a torch module; an ONNX model is fed arrays: give batches as arrays, "
    "(inputs, *targets) tuples or {graph input name: array} dicts and drop it"
)


def is_onnx_model(model: Any) -> bool:
    """An ``onnx.ModelProto`` or a path (the ONNX route of the statistics API)."""
    return isinstance(model, (onnx.ModelProto, str, os.PathLike))


def model_label(model: Any) -> str:
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    graph_name = model.graph.name if isinstance(model, onnx.ModelProto) else ""
    return graph_name or "ModelProto"


def check_no_forward(forward: Any, what: str = "forward=") -> None:
    if forward is not None:
        raise InputDataError(f"{what} {_NO_FORWARD}")


def _override_hint(name: str, mode: str) -> str:
    return (f"exclude it with an override, e.g. normfx.rewrite(model, {{{name!r}: 'keep', '*': '{mode}'}}, data=...) "
            f"(CLI: --override '{name}=keep')")


# --- constants of the main graph -----------------------------------------------------------------


class Constants:
    """Values of constant tensors of the main graph: initializers, Constant nodes, and small constant
    subgraphs (``Identity``, ``Cast``, ``Reshape``... of constants) — :meth:`Workspace.const
    <normfx.passes.onnx.workspace.Workspace.const>` on an onnx-graphsurgeon import of the model, looked
    up by tensor name."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self._workspace = Workspace(model)
        self._tensors = self._workspace.graph.tensors()

    def value(self, name: str) -> np.ndarray | str:
        """The value, or why it is not a constant (a phrase completing "its mean input ...")."""
        if not name:
            return "is omitted"
        tensor = self._tensors.get(name)
        if tensor is None:
            return f"{name!r} has no producer in the main graph"
        return self._workspace.const(tensor)


# --- selecting, writing ----------------------------------------------------------------------------


@dataclass
class StoredStats:
    """A targeted BN node and the statistics it holds now (float64 copies; ``dtype`` as stored)."""

    name: str
    node: onnx.NodeProto
    mean: np.ndarray
    var: np.ndarray
    eps: float


def _require_bn(model: onnx.ModelProto, label: str) -> list:
    locations = batchnorm_nodes(model)
    if not locations:
        raise ModelError(
            f"{label} has no BatchNormalization node: precise/adaptive statistics only apply to BatchNorm "
            "(check that the model is the one you meant)"
        )
    return locations


def select_nodes(model: onnx.ModelProto, targets: Callable[[str], bool], report: Report | None, rule: str,
                 mode: str, label: str = "the ONNX model") -> dict[str, StoredStats]:
    """The targeted BN nodes whose statistics can be recomputed; nodes that cannot are reported skipped.

    Raises :class:`ModelError` for a model without BatchNormalization, and for a targeted node in a
    subgraph / local function or whose mean/var are not constants (the message names the override
    that excludes it). ``model`` must be named (:func:`name_batchnorm_nodes`).
    """
    require_loaded_data(model, label)
    locations = _require_bn(model, label)
    opset = opset_of(model)
    read = set(read_counts(model))
    constants = Constants(model)
    layers: dict[str, StoredStats] = {}
    for loc in locations:
        node, name = loc.node, loc.node.name
        if not targets(name):
            continue
        if loc.where:
            raise ModelError(
                f"BatchNormalization {name!r} is inside {loc.where}: normfx recomputes the statistics of BN nodes "
                f"in the main graph only; {_override_hint(name, mode)}"
            )
        reason = unsupported_reason(node, opset, read)
        if reason:
            if report is not None:
                report.add(name, rule, SKIPPED, reason, op="BatchNormalization")
            continue
        values = []
        for slot, what in ((_MEAN, "mean"), (_VAR, "variance")):
            value = constants.value(node.input[slot])
            if isinstance(value, str):
                raise ModelError(
                    f"BatchNormalization {name!r}: its {what} input {value}; normfx writes statistics into initializers "
                    f"and Constant nodes only; {_override_hint(name, mode)}"
                )
            if value.ndim != 1 or value.dtype.kind != "f":
                raise ModelError(
                    f"BatchNormalization {name!r}: its {what} input {node.input[slot]!r} is a {value.dtype} array of "
                    f"shape {list(value.shape)}, not a (C,) float vector; {_override_hint(name, mode)}"
                )
            values.append(value)
        layers[name] = StoredStats(name, node, values[0], values[1], float(node_attrs(node).get("epsilon", 1e-5)))
    return layers


class _Writer:
    """Writes new constant values into BN inputs: in place when only that input reads the initializer,
    else as a new initializer (and drops the constants nothing reads any more)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        graph = model.graph
        self.uses = read_counts(model)
        self.fresh = FreshNames(model)
        self.inputs = {vi.name for vi in graph.input}
        self.outputs = {vi.name for vi in graph.output}

    def _init_index(self, name: str) -> int | None:
        for i, t in enumerate(self.model.graph.initializer):
            if t.name == name:
                return i
        return None

    def write(self, node: onnx.NodeProto, slot: int, value: np.ndarray, suffix: str) -> str:
        """Put ``value`` (already in the stored dtype and shape) into input ``slot`` of ``node``; returns
        the name now read there."""
        graph = self.model.graph
        name = node.input[slot]
        index = self._init_index(name)
        if index is not None and self.uses[name] == 1:
            old = graph.initializer[index]
            new = numpy_helper.from_array(value, name)
            new.doc_string = old.doc_string
            old.CopyFrom(new)
            return name
        new_name = self.fresh(f"{node.name}.{suffix}")
        graph.initializer.append(numpy_helper.from_array(value, new_name))
        if self.model.ir_version < 4:  # IR 3: every initializer is also a graph input
            graph.input.append(helper.make_tensor_value_info(new_name, int(graph.initializer[-1].data_type), list(value.shape)))
            self.inputs.add(new_name)
        node.input[slot] = new_name
        self.uses[new_name] += 1
        self._release(name)
        return new_name

    def _release(self, name: str) -> None:
        """One read of ``name`` is gone: drop the initializer / constant producer nothing reads any more."""
        self.uses[name] -= 1
        if self.uses[name] > 0 or name in self.outputs:
            return
        graph = self.model.graph
        index = self._init_index(name)
        if index is not None:
            if name in self.inputs and self.model.ir_version >= 4:
                return  # a graph input with a default: part of the model's interface
            del graph.initializer[index]
            if name in self.inputs:  # IR 3: its input declaration goes with it
                for i, vi in enumerate(graph.input):
                    if vi.name == name:
                        del graph.input[i]
                        break
                self.inputs.discard(name)
            return
        for i, producer in enumerate(graph.node):
            if name in producer.output:
                if any(self.uses[o] > 0 or o in self.outputs for o in producer.output if o):
                    return
                sources = [n for n in producer.input if n]
                del graph.node[i]
                for source in sources:
                    self._release(source)
                return


def _store(value: np.ndarray, like: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(value, dtype=np.float64).astype(like.dtype).reshape(like.shape)


def apply_onnx_stats(model: onnx.ModelProto, layers: dict[str, StoredStats], collected: Collected,
                     report: Report | None, rule: str, mode: str) -> None:
    """Write each node's population mean and unbiased variance into ``model`` (in place), reporting each."""
    writer = _Writer(model)
    for name, stored in layers.items():
        s = collected.layers[name]
        if not s.reached:  # a main-graph node runs on every batch; only an empty pass leaves it unreached
            reason = f"never reached by the data in {collected.batches} batch(es): statistics left unchanged"
            if report is not None:
                report.add(name, rule, SKIPPED, reason, batches=collected.batches)
            continue
        m = s.moments
        if m.mean.numel() != stored.mean.size:
            raise InputDataError(
                f"layer {name!r}: measured {m.mean.numel()} channels but its mean input holds {stored.mean.size} values"
            )
        mean = _store(m.mean.cpu().numpy(), stored.mean)
        var = _store(m.var_unbiased.cpu().numpy(), stored.var)
        if not (np.isfinite(mean).all() and np.isfinite(var).all()):
            raise InputDataError(
                f"layer {name!r}: the statistics of its input are not finite in {stored.var.dtype} "
                "(NaN/inf activations, or a variance beyond the initializer's range); check the data, or use a float32 model"
            )
        writer.write(stored.node, _MEAN, mean, "running_mean")
        writer.write(stored.node, _VAR, var, "running_var")
        if report is not None:
            report.add(
                name, rule, APPLIED,
                f"{mode} statistics over {int(m.count)} values per channel from {s.calls} call(s) in {s.batches} batch(es)",
                mode=mode, count=int(m.count), calls=s.calls, batches=s.batches, world_size=collected.world_size,
            )


# --- the API ---------------------------------------------------------------------------------------


def _recompute_into(model: onnx.ModelProto, data: Any, *, targets: Callable[[str], bool], report: Report, rule: str,
                    mode: str, num_batches: int | None, progress: bool, label: str = "the ONNX model",
                    ) -> tuple[Collected | None, dict[str, StoredStats]]:
    name_batchnorm_nodes(model)
    layers = select_nodes(model, targets, report, rule, mode, label)
    if not layers:
        return None, layers
    collected = collect_onnx_moments(model, data, list(layers), num_batches=num_batches, batch_statistics=True,
                                     progress=progress, desc=f"{mode} BN")
    apply_onnx_stats(model, layers, collected, report, rule, mode)
    return collected, layers


def recompute_onnx(model: Any, data: Any, *, num_batches: int | None = None, mode: str = "precise",
                   progress: bool = True) -> tuple[onnx.ModelProto, Report, Collected, dict[str, StoredStats]]:
    """``recompute_stats`` on an ONNX model or path: a new ModelProto, its report, and what was measured."""
    work = load_model_proto(model)
    label = model_label(model)
    report = Report(policy=mode, model=label)
    collected, layers = _recompute_into(work, data, targets=lambda name: True, report=report, rule=mode, mode=mode,
                                        num_batches=num_batches, progress=progress, label=label)
    if collected is None:
        raise ModelError(
            f"{label} has no BatchNormalization node with statistics to recompute "
            f"({len(report.skipped)} skipped: {'; '.join(str(e) for e in report.skipped[:3])})"
        )
    return work, report, collected, layers


def recompute_with_diagnosis_onnx(model: Any, data: Any, *, num_batches: int | None = None, mode: str = "precise",
                                  progress: bool = True) -> Any:
    """``recompute_with_diagnosis`` on an ONNX model: a :class:`~normfx.stats.diagnose.StatsRun` whose
    model is the new ModelProto and whose diagnosis compares each node's old mean/var with the measured ones."""
    from .diagnose import EMADiagnosis, StatsRun, layer_drift

    work, report, collected, layers = recompute_onnx(model, data, num_batches=num_batches, mode=mode, progress=progress)
    rows = []
    for name, stored in layers.items():
        s = collected.layers[name]
        if s.reached:
            rows.append(layer_drift(name, s.calls, s.moments, torch.from_numpy(stored.mean.astype(np.float64)),
                                    torch.from_numpy(stored.var.astype(np.float64)), stored.eps))
    diagnosis = EMADiagnosis(rows, mode, collected.batches, collected.world_size, collected.unreached)
    diagnosis.skipped = {e.name: e.reason for e in report.skipped}
    return StatsRun(work, report, diagnosis)


def _run_pass(model: onnx.ModelProto, ctx: Any, mode: str) -> onnx.ModelProto:
    check_no_forward(ctx.feed, "feed=")
    name_batchnorm_nodes(model)
    if ctx.dry_run:  # explain: say what would happen, with or without data
        layers = select_nodes(model, ctx.targets, ctx.report, ctx.rule, mode)
        needs = "" if ctx.data is not None else " (needs data=: an iterable of batches)"
        for name in layers:
            ctx.report.add(name, ctx.rule, APPLIED, f"would recompute {mode} statistics from data{needs}", mode=mode)
        return model
    if ctx.data is None:
        raise InputDataError(f"policy {ctx.rule!r} measures statistics and needs data: pass data= an iterable of batches")
    _recompute_into(model, ctx.data, targets=ctx.targets, report=ctx.report, rule=ctx.rule, mode=mode,
                    num_batches=ctx.option("num_batches") or None, progress=True)
    return model


def run_precise(model: onnx.ModelProto, ctx: Any) -> onnx.ModelProto:
    """Policy ``precise`` on ONNX: recompute the targeted BN nodes' statistics over ``ctx.data``."""
    return _run_pass(model, ctx, "precise")


def run_adaptive(model: onnx.ModelProto, ctx: Any) -> onnx.ModelProto:
    """Policy ``adaptive`` on ONNX: the same on target-domain ``ctx.data`` (adaptive BN)."""
    return _run_pass(model, ctx, "adaptive")
