"""Population moments of the inputs of an ONNX model's BatchNormalization nodes, measured in onnxruntime.

The ONNX counterpart of :mod:`normfx.stats.collect`. On a private copy of the model:

* the input X of each named BatchNormalization node is also exposed as a graph output (through an
  ``Identity``, so a graph input, a graph output or a tensor read by two BNs is captured alike);
* with ``batch_statistics=True`` (precise / adaptive BN) each named node in inference mode is replaced
  by its training-mode form (:mod:`normfx.stats.onnx_train_graph`), so the layers after it see what
  they would see in training. Every other BN node keeps its stored statistics;
* with ``batch_statistics=False`` nothing is replaced: every BN normalizes with its stored statistics,
  so the model computes its eval function while the named inputs are measured (``unfuse`` measures
  the BNs it inserted as identities this way).

The copy runs in onnxruntime (CPU provider) on each batch (fed as :mod:`normfx.stats.onnx_feed`
says), and each captured array is reduced with the same float64 moments code as the torch route
(:func:`~normfx.stats.moments.batch_sums`, then ``to_moments`` / ``merge``), on a torch tensor viewing
the array. A node runs once per batch, so ``calls == batches`` for every layer. Under
torch.distributed the moments are merged across ranks as in the torch route.

Values per channel: on batch statistics each batch must give every named node at least 2 values per
channel (a batch variance needs 2); measuring only, moments add up across batches, so a batch of one
sample is fine and only the total count matters — a layer whose total is 1 gets moments of count 1
(``var_unbiased`` is NaN) and the caller decides (``unfuse`` keeps identity statistics and says why).

A BN node without a training-mode form (:func:`~normfx.stats.onnx_train_graph.unsupported_reason`) is
measured as it is, never decomposed; the recompute passes skip such nodes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import torch
from onnx import helper

from ..errors import InputDataError, ModelError, NormfxError
from ..passes.onnx.io import (
    batchnorm_nodes,
    first_line,
    is_batchnorm,
    name_batchnorm_nodes,
    opset_of,
    read_counts,
    require_loaded_data,
)
from ..passes.onnx.names import FreshNames
from .collect import Collected, LayerStats, gather_collected, guarded
from .feed import describe, iterate_batches
from .moments import Workspace, batch_sums
from .onnx_feed import arrays_for_batch, graph_inputs
from .onnx_train_graph import replace_with_batch_statistics, unsupported_reason

__all__ = ["collect_onnx_moments", "BatchCallback"]

log = logging.getLogger(__name__)

#: ``on_batch(index, feed, inputs)``: a batch's feed dict and each named node's captured input
BatchCallback = Callable[[int, dict[str, np.ndarray], dict[str, np.ndarray]], None]


# --- the private graph ---------------------------------------------------------------------------


def _channels(model: onnx.ModelProto, node: onnx.NodeProto) -> int | None:
    """C from the node's constant scale/B/mean/var (initializers), when one is."""
    inits = {t.name: t for t in model.graph.initializer}
    for name in node.input[1:5]:
        if name in inits and len(inits[name].dims) == 1:
            return int(inits[name].dims[0])
    return None


@dataclass
class _Prepared:
    work: onnx.ModelProto
    captures: dict[str, str]  # BN name -> graph output holding its input
    nodes: dict[str, onnx.NodeProto]  # BN name -> a copy of the original node
    channels: dict[str, int | None]


def _prepare(model: onnx.ModelProto, names: Sequence[str], batch_statistics: bool) -> _Prepared:
    work = onnx.ModelProto()
    work.CopyFrom(model)
    name_batchnorm_nodes(work)
    locations = batchnorm_nodes(work)
    if not locations:
        raise ModelError(
            "the ONNX model has no BatchNormalization node: BN statistics only apply to BatchNorm "
            "(check that the model is the one you meant)"
        )
    by_name = {loc.node.name: loc for loc in locations}
    for name in names:
        loc = by_name.get(name)
        if loc is None:
            listed = ", ".join(repr(n) for n in list(by_name)[:5]) + (", ..." if len(by_name) > 5 else "")
            raise ModelError(f"the ONNX model has no BatchNormalization node named {name!r}; its BN nodes: {listed}")
        if loc.where:
            raise ModelError(
                f"BatchNormalization {name!r} is inside {loc.where}: normfx measures BN nodes of the main graph only; "
                f"exclude it with an override, e.g. {{{name!r}: 'keep', '*': 'adaptive'}} (CLI: --override '{name}=keep')"
            )
    decompose = []
    if batch_statistics:
        opset, read = opset_of(work), set(read_counts(work))
        for name in names:
            reason = unsupported_reason(by_name[name].node, opset, read)
            if reason:
                log.debug("%s: measured as it is (%s)", name, reason)
            else:
                decompose.append(name)
    fresh = FreshNames(work)
    wanted = set(names)
    captures: dict[str, str] = {}
    originals: dict[str, onnx.NodeProto] = {}
    nodes: list[onnx.NodeProto] = []
    for node in work.graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        if is_batchnorm(node) and node.name in wanted and node.name not in captures:
            capture = fresh(f"{node.name}/normfx_input")
            nodes.append(helper.make_node("Identity", [node.input[0]], [capture], name=capture))
            captures[node.name] = capture
            originals[node.name] = copy  # graph.node.extend copies it: this one stays as it was
        nodes.append(copy)
    graph = work.graph
    graph.ClearField("node")
    graph.node.extend(nodes)
    replace_with_batch_statistics(work, decompose, fresh)
    graph.output.extend(helper.make_empty_tensor_value_info(captures[name]) for name in names)
    channels = {name: _channels(work, originals[name]) for name in names}
    return _Prepared(work, {name: captures[name] for name in names}, originals, channels)


# --- measuring ------------------------------------------------------------------------------------


def _measure(stats: LayerStats, array: np.ndarray, channels: int | None, workspace: Workspace,
             batch_statistics: bool) -> None:
    x = torch.from_numpy(np.ascontiguousarray(array))
    if not (x.is_floating_point()):
        raise InputDataError(f"layer {stats.name!r} (BatchNormalization) got a {x.dtype} input; expected floats")
    if x.dim() < 2 or (channels is not None and x.shape[1] != channels):
        raise InputDataError(
            f"layer {stats.name!r} (BatchNormalization) expects {channels if channels is not None else 'C'} channels "
            f"in dim 1 but got an input of shape {tuple(x.shape)}"
        )
    per_channel = x.numel() // x.shape[1] if x.shape[1] else 0
    if per_channel < (2 if batch_statistics else 1):  # measuring only, counts add up across batches
        raise InputDataError(
            f"layer {stats.name!r} (BatchNormalization) gets {per_channel} value per channel "
            f"(input shape {tuple(x.shape)}): a batch variance needs at least 2; use batches of 2 or more samples"
            if batch_statistics else
            f"layer {stats.name!r} (BatchNormalization) gets no value (input shape {tuple(x.shape)}): an empty batch"
        )
    stats.calls += 1
    stats.batches += 1
    sums, _, _ = batch_sums(x, workspace)
    stats.add(sums)


def collect_onnx_moments(
    model: onnx.ModelProto,
    data: Any,
    node_names: Sequence[str],
    *,
    num_batches: int | None = None,
    batch_statistics: bool = True,
    progress: bool = True,
    desc: str = "BN statistics",
    on_batch: BatchCallback | None = None,
) -> Collected:
    """Feed ``data`` through ``model`` in onnxruntime and return the population moments of the input of
    each BatchNormalization node named in ``node_names`` (names as ``onnx_batchnorm_names`` gives them).

    ``model`` is never modified (the run uses a private copy). With ``batch_statistics=True`` the named
    nodes normalize with the statistics of the current batch during the pass (their training-mode
    decomposition); with ``False`` every BN keeps its stored statistics and the inputs are only measured.
    ``.layers[name].moments`` are float64 per-channel (axis 1) moments; ``.calls == .batches``.
    ``on_batch(index, feed, inputs)`` is called after each batch with the feed dict onnxruntime ran and
    ``{node name: its input array}`` (e.g. to keep the first batch of one-shot data).

    A batch is an array/tensor (fed to the model's only graph input), a tuple/list
    ``(inputs, *targets)`` (its first element) or a dict ``{graph input name: array}``; floating
    arrays are cast to the input's element type. Raises :class:`InputDataError` for a batch that does
    not fit (naming the batch, the input, the expected and the given shape), a batch onnxruntime
    fails on, empty data, or (``batch_statistics=True``) a batch giving a node one value per channel;
    :class:`ModelError` for a named node in a subgraph or local function, an unknown name, a model
    without BatchNormalization, or external data that was not loaded.
    """
    if not isinstance(model, onnx.ModelProto):
        raise ModelError(f"collect_onnx_moments needs an onnx.ModelProto, got {type(model).__name__}")
    require_loaded_data(model)
    names = list(dict.fromkeys(node_names))
    if not names:
        raise ModelError("collect_onnx_moments: no BatchNormalization node named; pass at least one node name")
    prepared = _prepare(model, names, batch_statistics)
    from ..runtime import make_session

    session = make_session(prepared.work, optimization="all")
    inputs = graph_inputs(prepared.work)
    outputs = [prepared.captures[name] for name in names]
    stats = {name: LayerStats(name, prepared.nodes[name]) for name in names}
    workspace = Workspace()
    batches = 0
    failure: BaseException | None = None
    try:
        for index, batch in guarded(iterate_batches(data, num_batches, progress=progress, desc=desc)):
            feed = arrays_for_batch(batch, index, inputs)
            try:
                arrays = session.run(outputs, feed)
            except Exception as exc:  # onnxruntime's own exception types
                raise InputDataError(
                    f"batch {index} ({describe(batch)}) failed in onnxruntime: {first_line(exc)}"
                ) from None
            for name, array in zip(names, arrays):
                try:
                    _measure(stats[name], array, prepared.channels[name], workspace, batch_statistics)
                except NormfxError as exc:
                    raise type(exc)(f"batch {index} ({describe(batch)}): {exc}") from None
            if on_batch is not None:
                on_batch(index, feed, dict(zip(names, arrays)))
            batches += 1
    except Exception as exc:
        failure = exc

    def channels(local):
        return [prepared.channels[name] or (int(m.mean.numel()) if m is not None else 0) for name, m in zip(names, local)]

    return gather_collected(stats, channels, batches, num_batches, failure)
