"""BatchNormalization nodes on batch statistics in ONNX: the training-mode form of an inference-mode node.

An inference-mode BatchNormalization node normalizes with its stored mean/var. To run it as BatchNorm
does in training (with the statistics of the current batch) the node is replaced by its decomposition::

    Xr = Reshape(X, [0, 0, -1])                        # (N, C, L): any rank >= 2
    mean = ReduceMean(Xr, axes=[0, 2]); D = Xr - mean
    var = ReduceMean(D * D, axes=[0, 2])               # biased, as BatchNorm normalizes in training
    Y = Reshape(D / Sqrt(var + eps) * scale + B, Shape(X))

computed in float32 for a float16/bfloat16 X; ReduceMean takes ``axes`` as an attribute before opset
18 and as an input from 18 on. The running statistics are not updated (the graph stays a pure
function). Every other node is kept as it is.

Users: :func:`~normfx.stats.onnx_collect.collect_onnx_moments` (precise / adaptive BN measure with the
nodes on batch statistics) and the train-mode deviation of ``unfuse`` (:mod:`normfx.stats.onnx_unfuse`).

A node already in training mode (``training_mode=1``, ``is_test=0``, or training outputs in opsets
7-13), with ``spatial=0`` (opset < 9), or whose running-statistics outputs the graph reads has no such
form: :func:`unsupported_reason` says why.
"""

from __future__ import annotations

import logging
from typing import Any, Collection, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..errors import ModelError
from ..passes.onnx.io import first_line, is_batchnorm, name_batchnorm_nodes, node_attrs, opset_of, read_counts
from ..passes.onnx.names import FreshNames

__all__ = ["unsupported_reason", "replace_with_batch_statistics", "with_batch_statistics"]

log = logging.getLogger(__name__)

_HALF = (TensorProto.FLOAT16, TensorProto.BFLOAT16)


def unsupported_reason(node: onnx.NodeProto, opset: int, read: Collection[str] | None = None) -> str | None:
    """Why BN ``node`` cannot be given new statistics (nor put on batch statistics), if it cannot.

    opset < 7: ``is_test=0`` (the default) is training mode; opsets 7-13: declaring the optional outputs
    is; opset >= 14: ``training_mode=1`` is. ``spatial=0`` (opset < 9) keeps statistics per element.
    ``read``: tensor names the graph reads (an inference-mode node whose extra outputs are read).
    """
    attrs = node_attrs(node)
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


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor shape inference can tell (initializers only when it cannot run)."""
    types = {t.name: int(t.data_type) for t in model.graph.initializer}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as exc:  # > 2 GiB, ops shape inference does not know: the decomposition casts instead
        log.debug("shape inference failed (%s); element types unknown", first_line(exc))
        inferred = model
    for coll in (inferred.graph.input, inferred.graph.value_info, inferred.graph.output):
        for vi in coll:
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                types[vi.name] = int(vi.type.tensor_type.elem_type)
    return types


class _TrainingForm:
    """Builds the training-mode decomposition of BN nodes (shared constants made once)."""

    def __init__(self, opset: int, fresh: FreshNames, types: dict[str, int]) -> None:
        self.opset, self.fresh, self.types = opset, fresh, types
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
        eps = float(node_attrs(node).get("epsilon", 1e-5))
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


def replace_with_batch_statistics(work: onnx.ModelProto, names: Collection[str], fresh: FreshNames | None = None) -> None:
    """Replace each main-graph BatchNormalization node named in ``names`` by its training-mode form, in
    ``work`` itself (a private copy: nothing else changes). The caller has checked the nodes
    (:func:`unsupported_reason`); ``fresh`` gives the new names (it must know every name of ``work``)."""
    wanted = set(names)
    if not wanted:
        return
    opset = opset_of(work)
    if opset < 7:
        raise ModelError(
            f"the model imports opset {opset}: normfx needs opset >= 7 to run BatchNormalization on batch statistics; "
            "convert it first with onnx.version_converter.convert_version(model, 13)"
        )
    form = _TrainingForm(opset, fresh or FreshNames(work), _elem_types(work))
    nodes: list[onnx.NodeProto] = []
    for node in work.graph.node:
        if is_batchnorm(node) and node.name in wanted:
            nodes.extend(form.nodes(node))
        else:
            nodes.append(node)
    graph = work.graph
    kept = [onnx.NodeProto() for _ in nodes]
    for copy, node in zip(kept, nodes):
        copy.CopyFrom(node)
    graph.ClearField("node")
    graph.node.extend(kept)
    graph.initializer.extend(form.inits)
    if work.ir_version < 4:  # IR 3: every initializer is also a graph input
        graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in form.inits)


def with_batch_statistics(model: onnx.ModelProto, node_names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` in which the BatchNormalization nodes named in ``node_names`` (names as
    ``onnx_batchnorm_names`` gives them) normalize with the statistics of the batch they are given, as
    BatchNorm does in training; every other node, BNs included, is as in ``model`` (eval).

    Raises :class:`~normfx.errors.ModelError` for a name that is no main-graph BatchNormalization node,
    or a node without a training-mode form (:func:`unsupported_reason`)."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    name_batchnorm_nodes(work)
    opset, read = opset_of(work), set(read_counts(work))
    nodes = {n.name: n for n in work.graph.node if is_batchnorm(n)}
    for name in dict.fromkeys(node_names):
        node = nodes.get(name)
        if node is None:
            raise ModelError(f"the ONNX model has no BatchNormalization node named {name!r} in its main graph")
        reason = unsupported_reason(node, opset, read)
        if reason:
            raise ModelError(f"BatchNormalization {name!r} cannot run on batch statistics: {reason}")
    replace_with_batch_statistics(work, list(node_names))
    return work
