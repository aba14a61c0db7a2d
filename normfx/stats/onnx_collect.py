"""Population moments of the inputs of an ONNX model's BatchNormalization nodes, measured in onnxruntime.

The ONNX counterpart of :mod:`normfx.stats.collect`. On a private copy of the model:

* the input X of each named BatchNormalization node is also exposed as a graph output (through an
  ``Identity``, so a graph input, a graph output or a tensor read by two BNs is captured alike);
* with ``batch_statistics=True`` (precise / adaptive BN) each named node in inference mode is replaced
  by its training-mode decomposition, so the layers after it see what they would see in training::

      Xr = Reshape(X, [0, 0, -1])                        # (N, C, L): any rank >= 2
      mean = ReduceMean(Xr, axes=[0, 2]); D = Xr - mean
      var = ReduceMean(D * D, axes=[0, 2])               # biased, as BatchNorm normalizes in training
      Y = Reshape(D / Sqrt(var + eps) * scale + B, Shape(X))

  (computed in float32 for a float16/bfloat16 X; ReduceMean takes ``axes`` as an attribute before
  opset 18 and as an input from 18 on). Every other BN node keeps its stored statistics;
* with ``batch_statistics=False`` nothing is replaced: every BN normalizes with its stored statistics,
  so the model computes its eval function while the named inputs are measured (``unfuse`` measures
  the BNs it inserted as identities this way).

The copy runs in onnxruntime (CPU provider) on each batch, and each captured array is reduced with the
same float64 moments code as the torch route (:func:`~normfx.stats.moments.batch_sums`, then
``to_moments`` / ``merge``), on a torch tensor viewing the array. A node runs once per batch, so
``calls == batches`` for every layer. Under torch.distributed the moments are merged across ranks as
in the torch route.

A BN node already in training mode (``training_mode=1``, ``is_test=0``, or training outputs in opsets
7-13), with ``spatial=0`` (opset < 9), or whose running-statistics outputs the graph reads is measured
as it is, never decomposed (:func:`unsupported_reason` says why; the recompute passes skip such nodes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from ..errors import InputDataError, ModelError, NormfxError
from ..passes.onnx.io import batchnorm_nodes, is_batchnorm, name_batchnorm_nodes, opset_of
from ..passes.onnx.io import first_line as _first_line
from .collect import _MERGE_EVERY, Collected, LayerStats, _fold_pending, _guarded, gather_collected
from .feed import describe, iterate_batches
from .moments import Workspace, batch_sums

__all__ = ["collect_onnx_moments", "opset_of", "unsupported_reason", "graph_inputs", "arrays_for_batch", "GraphInput"]

log = logging.getLogger(__name__)

_HALF = (TensorProto.FLOAT16, TensorProto.BFLOAT16)


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _read_names(model: onnx.ModelProto) -> set[str]:
    """Every tensor name some node (subgraphs included) or a main-graph output reads."""
    used: set[str] = {vi.name for vi in model.graph.output}

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            used.update(n for n in node.input if n)
            for attr in node.attribute:
                for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                    used.update(vi.name for vi in sub.output)
                    walk(sub)

    walk(model.graph)
    return used


def unsupported_reason(node: onnx.NodeProto, opset: int, read: set[str] | None = None) -> str | None:
    """Why BN ``node`` cannot be given new statistics (nor decomposed into its training form), if it cannot.

    opset < 7: ``is_test=0`` (the default) is training mode; opsets 7-13: declaring the optional outputs
    is; opset >= 14: ``training_mode=1`` is. ``spatial=0`` (opset < 9) keeps statistics per element.
    ``read``: tensor names the graph reads (an inference-mode node whose extra outputs are read).
    """
    attrs = _attrs(node)
    if opset < 7 and int(attrs.get("is_test", 0)) == 0:
        return ("BatchNormalization is in training mode (is_test=0): it always normalizes with batch statistics; "
                "its stored statistics are not used, nothing to recompute")
    if opset >= 14 and int(attrs.get("training_mode", 0)) != 0:
        return ("BatchNormalization is in training mode (training_mode=1): it always normalizes with batch "
                "statistics; its stored statistics are not used, nothing to recompute")
    extra = [o for o in node.output[1:] if o]
    if 7 <= opset < 14 and extra:
        return (f"BatchNormalization declares {len(extra)} training output(s) ({', '.join(map(repr, extra))}): in opset "
                f"{opset} that is training mode (batch statistics); export the model in eval mode")
    if read is not None:
        used = [o for o in extra if o in read]
        if used:
            return (f"the BatchNormalization's running-statistics output(s) {', '.join(map(repr, used))} are read by "
                    "the graph (a training-mode pattern)")
    if opset < 9 and int(attrs.get("spatial", 1)) == 0:
        return "BatchNormalization has spatial=0 (statistics per element, not per channel); not supported"
    if len(node.input) < 5 or not all(node.input[:5]) or not node.output or not node.output[0]:
        return "BatchNormalization node is malformed (needs X, scale, B, mean, var and an output Y)"
    return None


# --- graph inputs and batches --------------------------------------------------------------------


@dataclass
class GraphInput:
    """A graph input the caller must feed: name, element type, declared dims (``None``: no shape)."""

    name: str
    elem_type: int
    dims: list[int | str] | None

    @property
    def dtype(self) -> np.dtype | None:
        try:
            return np.dtype(helper.tensor_dtype_to_np_dtype(self.elem_type)) if self.elem_type else None
        except Exception:  # bfloat16, float8, ...: no plain numpy dtype
            return None

    def expected(self) -> str:
        if self.dims is None:
            return "any shape"
        return "[" + ", ".join(str(d) for d in self.dims) + "]"


def graph_inputs(model: onnx.ModelProto) -> list[GraphInput]:
    """The inputs a caller must feed (initializers, also those listed as inputs, are not among them)."""
    inits = {t.name for t in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tensor = vi.type.tensor_type
        dims: list[int | str] | None = None
        if tensor.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]
        out.append(GraphInput(vi.name, int(tensor.elem_type), dims))
    return out


def _as_array(value: Any, index: int, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        return value.numpy()
    if type(value).__module__ == "numpy" and hasattr(value, "shape"):
        return np.asarray(value)
    raise InputDataError(
        f"batch {index}: input {name!r} got a {type(value).__name__}; expected a numpy array or a torch tensor"
    )


def _fit(array: np.ndarray, spec: GraphInput, index: int) -> np.ndarray:
    """``array`` cast to the input's element type and checked against its declared shape."""
    want = spec.dtype
    if want is not None and array.dtype != want:
        kinds = {array.dtype.kind in "fc", want.kind in "fc"}
        if len(kinds) != 1 or (array.dtype.kind == "b") != (want.kind == "b"):
            raise InputDataError(
                f"batch {index}: input {spec.name!r} expects {want} values, got an array of {array.dtype}"
            )
        array = array.astype(want)
    if spec.dims is not None:
        given = tuple(array.shape)
        bad = len(given) != len(spec.dims) or any(
            isinstance(d, int) and d > 0 and d != g for d, g in zip(spec.dims, given)
        )
        if bad:
            raise InputDataError(
                f"batch {index}: input {spec.name!r} expects shape {spec.expected()} but the batch has shape "
                f"{list(given)}; check the data (axis 0 is the batch)"
            )
    return np.ascontiguousarray(array)


def arrays_for_batch(batch: Any, index: int, inputs: Sequence[GraphInput]) -> dict[str, np.ndarray]:
    """The feed of one batch: an array/tensor (the only graph input), a tuple/list ``(inputs, *targets)``
    (its first element), or a dict ``{graph input name: array}``; floats cast to each input's type."""
    names = [i.name for i in inputs]
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise InputDataError(f"batch {index} is an empty {type(batch).__name__}: expected (inputs, *targets)")
        batch = batch[0]
    if isinstance(batch, Mapping):
        keys = [str(k) for k in batch]
        unknown, missing = [k for k in keys if k not in names], [n for n in names if n not in keys]
        if unknown or missing:
            raise InputDataError(
                f"batch {index}: dict keys {', '.join(map(repr, keys)) or 'none'} do not match the model's inputs "
                f"{', '.join(map(repr, names))}; name the arrays after the graph inputs"
            )
        given = {str(k): v for k, v in batch.items()}
        return {spec.name: _fit(_as_array(given[spec.name], index, spec.name), spec, index) for spec in inputs}
    if isinstance(batch, torch.Tensor) or (type(batch).__module__ == "numpy" and hasattr(batch, "shape")):
        if len(inputs) != 1:
            raise InputDataError(
                f"batch {index}: the model takes {len(inputs)} inputs ({', '.join(map(repr, names))}); "
                "give each batch as a dict {input name: array}"
            )
        spec = inputs[0]
        return {spec.name: _fit(_as_array(batch, index, spec.name), spec, index)}
    raise InputDataError(
        f"batch {index} is a {type(batch).__name__}: expected an array/tensor, a tuple/list (inputs, *targets) "
        "or a dict {graph input name: array}"
    )


# --- the private graph ---------------------------------------------------------------------------


class _Namer:
    """Fresh tensor/node names that collide with nothing in the model."""

    def __init__(self, model: onnx.ModelProto) -> None:
        from ..passes.onnx.workspace import _names_in

        self.taken = _names_in(model)

    def __call__(self, base: str) -> str:
        from ..passes.onnx.workspace import fresh_name

        return fresh_name(self.taken, base)


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor shape inference can tell (empty when it cannot run)."""
    types = {t.name: int(t.data_type) for t in model.graph.initializer}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as exc:  # > 2 GiB, ops shape inference does not know: the decomposition casts instead
        log.debug("shape inference failed (%s); element types unknown", _first_line(exc))
        inferred = model
    for coll in (inferred.graph.input, inferred.graph.value_info, inferred.graph.output):
        for vi in coll:
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                types[vi.name] = int(vi.type.tensor_type.elem_type)
    return types


class _Decomposer:
    """Builds the training-mode decomposition of BN nodes (shared constants made once)."""

    def __init__(self, work: onnx.ModelProto, fresh: _Namer, types: dict[str, int]) -> None:
        self.work, self.fresh, self.types = work, fresh, types
        self.opset = opset_of(work)
        self.inits: list[onnx.TensorProto] = []
        self._consts: dict[str, str] = {}

    def _const(self, key: str, value: np.ndarray) -> str:
        if key not in self._consts:
            name = self.fresh(f"normfx_stats/{key}")
            self.inits.append(onnx.numpy_helper.from_array(value, name))
            self._consts[key] = name
        return self._consts[key]

    def nodes(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        x, scale, bias = node.input[0], node.input[1], node.input[2]
        y = node.output[0]
        eps = float(_attrs(node).get("epsilon", 1e-5))
        base = node.name or y
        out: list[onnx.NodeProto] = []

        def add(op: str, inputs: list[str], tag: str, **attrs: Any) -> str:
            name = self.fresh(f"{base}/normfx_train/{tag}")
            out.append(helper.make_node(op, inputs, [name], name=name, **attrs))
            return name

        x_type = self.types.get(x)
        if x_type is None and self.opset < 15:  # before opset 15 X, scale, B, mean and var share one type
            x_type = next((self.types[n] for n in node.input[1:5] if n in self.types), None)
        upcast = x_type in _HALF
        xr = add("Reshape", [x, self._const("shape_nc_rest", np.array([0, 0, -1], np.int64))], "x3")
        if upcast:
            xr = add("Cast", [xr], "x3_float", to=TensorProto.FLOAT)
        if self.opset >= 18:
            axes_in, axes_attr = [self._const("axes_0_2", np.array([0, 2], np.int64))], {}
        else:
            axes_in, axes_attr = [], {"axes": [0, 2]}
        mean = add("ReduceMean", [xr] + axes_in, "mean", keepdims=1, **axes_attr)
        centered = add("Sub", [xr, mean], "centered")
        square = add("Mul", [centered, centered], "square")
        var = add("ReduceMean", [square] + axes_in, "var", keepdims=1, **axes_attr)
        compute = TensorProto.FLOAT if upcast else x_type
        if compute is not None:
            eps_name = self._const(f"eps_{eps!r}_{compute}", np.array(eps, dtype=helper.tensor_dtype_to_np_dtype(compute)))
        elif self.opset >= 15:
            eps_name = add("CastLike", [self._const(f"eps_{eps!r}_float", np.array(eps, np.float32)), var], "eps")
        else:
            raise ModelError(
                f"BatchNormalization {node.name!r}: the element type of its input {x!r} is unknown (shape inference "
                "cannot tell), so normfx cannot build its training-mode form; run onnx.shape_inference on the model first"
            )
        std = add("Sqrt", [add("Add", [var, eps_name], "var_eps")], "std")
        normalized = add("Div", [centered, std], "normalized")
        per_channel = self._const("shape_1_c_1", np.array([1, -1, 1], np.int64))
        scale3 = add("Reshape", [scale, per_channel], "scale")
        bias3 = add("Reshape", [bias, per_channel], "bias")
        if self.opset >= 15:  # scale/B may have their own type (T1) from opset 15 on
            scale3 = add("CastLike", [scale3, normalized], "scale_cast")
            bias3 = add("CastLike", [bias3, normalized], "bias_cast")
        elif upcast:
            scale3 = add("Cast", [scale3], "scale_cast", to=TensorProto.FLOAT)
            bias3 = add("Cast", [bias3], "bias_cast", to=TensorProto.FLOAT)
        result = add("Add", [add("Mul", [normalized, scale3], "scaled"), bias3], "y3")
        if upcast:
            result = add("Cast", [result], "y3_cast", to=x_type)
        shape = add("Shape", [x], "x_shape")
        out.append(helper.make_node("Reshape", [result, shape], [y], name=self.fresh(f"{base}/normfx_train/y")))
        return out


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
    opset = opset_of(work)
    read = _read_names(work)
    wanted = set(names)
    decompose = set()
    if batch_statistics:
        for name in names:
            reason = unsupported_reason(by_name[name].node, opset, read)
            if reason:
                log.debug("%s: measured as it is (%s)", name, reason)
            else:
                decompose.add(name)
        if decompose and opset < 7:
            raise ModelError(
                f"the model imports opset {opset}: normfx needs opset >= 7 to run BatchNormalization on batch statistics; "
                "convert it first with onnx.version_converter.convert_version(model, 13)"
            )
    fresh = _Namer(work)
    decomposer = _Decomposer(work, fresh, _elem_types(work) if decompose else {})
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
            originals[node.name] = copy
            if node.name in decompose:
                nodes.extend(decomposer.nodes(node))
                continue
        nodes.append(copy)
    graph = work.graph
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.initializer.extend(decomposer.inits)
    if work.ir_version < 4:  # IR 3: every initializer is also a graph input
        graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in decomposer.inits)
    graph.output.extend(helper.make_empty_tensor_value_info(captures[name]) for name in names)
    channels = {name: _channels(work, originals[name]) for name in names}
    return _Prepared(work, {name: captures[name] for name in names}, originals, channels)


# --- measuring ------------------------------------------------------------------------------------


def _measure(stats: LayerStats, array: np.ndarray, channels: int | None, workspace: Workspace) -> None:
    x = torch.from_numpy(np.ascontiguousarray(array))
    if not (x.is_floating_point()):
        raise InputDataError(f"layer {stats.name!r} (BatchNormalization) got a {x.dtype} input; expected floats")
    if x.dim() < 2 or (channels is not None and x.shape[1] != channels):
        raise InputDataError(
            f"layer {stats.name!r} (BatchNormalization) expects {channels if channels is not None else 'C'} channels "
            f"in dim 1 but got an input of shape {tuple(x.shape)}"
        )
    per_channel = x.numel() // x.shape[1] if x.shape[1] else 0
    if per_channel < 2:
        raise InputDataError(
            f"layer {stats.name!r} (BatchNormalization) gets {per_channel} value per channel "
            f"(input shape {tuple(x.shape)}): a batch variance needs at least 2; use batches of 2 or more samples"
        )
    stats.calls += 1
    stats.batches += 1
    sums, _, _ = batch_sums(x, workspace)
    stats._pending.append(sums)
    if len(stats._pending) >= _MERGE_EVERY:
        _fold_pending(stats)


def collect_onnx_moments(
    model: onnx.ModelProto,
    data: Any,
    node_names: Sequence[str],
    *,
    num_batches: int | None = None,
    batch_statistics: bool = True,
    progress: bool = True,
    desc: str = "BN statistics",
) -> Collected:
    """Feed ``data`` through ``model`` in onnxruntime and return the population moments of the input of
    each BatchNormalization node named in ``node_names`` (names as ``onnx_batchnorm_names`` gives them).

    ``model`` is never modified (the run uses a private copy). With ``batch_statistics=True`` the named
    nodes normalize with the statistics of the current batch during the pass (their training-mode
    decomposition); with ``False`` every BN keeps its stored statistics and the inputs are only measured.
    ``.layers[name].moments`` are float64 per-channel (axis 1) moments; ``.calls == .batches``.

    A batch is an array/tensor (fed to the model's only graph input), a tuple/list
    ``(inputs, *targets)`` (its first element) or a dict ``{graph input name: array}``; floating
    arrays are cast to the input's element type. Raises :class:`InputDataError` for a batch that does
    not fit (naming the batch, the input, the expected and the given shape), a batch onnxruntime
    fails on, empty data, or one value per channel; :class:`ModelError` for a named node in a
    subgraph or local function, an unknown name, or a model without BatchNormalization.
    """
    if not isinstance(model, onnx.ModelProto):
        raise ModelError(f"collect_onnx_moments needs an onnx.ModelProto, got {type(model).__name__}")
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
        for index, batch in _guarded(iterate_batches(data, num_batches, progress=progress, desc=desc)):
            feed = arrays_for_batch(batch, index, inputs)
            try:
                arrays = session.run(outputs, feed)
            except Exception as exc:  # onnxruntime's own exception types
                raise InputDataError(
                    f"batch {index} ({describe(batch)}) failed in onnxruntime: {_first_line(exc)}"
                ) from None
            for name, array in zip(names, arrays):
                try:
                    _measure(stats[name], array, prepared.channels[name], workspace)
                except NormfxError as exc:
                    raise type(exc)(f"batch {index} ({describe(batch)}): {exc}") from None
            batches += 1
    except Exception as exc:
        failure = exc

    def channels(local):
        return [prepared.channels[name] or (int(m.mean.numel()) if m is not None else 0) for name, m in zip(names, local)]

    return gather_collected(stats, channels, batches, num_batches, failure)
