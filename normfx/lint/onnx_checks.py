"""The checks that apply to an ONNX graph: BatchNormalization in training mode, eps, statistics and affine,
the fold's fp16 range and precision, and what ``fuse`` cannot fold (``explain``'s reason). Momentum only
matters in training and reach is a graph property (every node runs once per inference), so neither is checked.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from ..passes.onnx.io import batchnorm_nodes, load_model_proto, node_attrs, opset_of
from . import precision, statistics
from .fixes import ONNX
from .report import ERROR, INFO, LintReport
from .structure import probe_fuse, report_unfoldable

__all__ = ["lint_onnx", "training_mode_reason"]

_PARAMS = ("scale", "B", "input_mean", "input_var")


def training_mode_reason(node: onnx.NodeProto, opset: int) -> str | None:
    """Why a BatchNormalization node runs in training mode (batch statistics), if it does."""
    attrs = node_attrs(node)
    if opset < 7 and int(attrs.get("is_test", 0)) == 0:
        return f"is_test=0 (opset {opset}): training mode"
    if opset >= 14 and int(attrs.get("training_mode", 0)) != 0:
        return "training_mode=1"
    extra = [name for name in node.output[1:] if name]
    if opset < 14 and extra:
        return f"it declares {len(extra)} running/saved-statistics output(s), which selects training mode in opset {opset}"
    return None


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    values[node.output[0]] = attr.t
    return values  # type: ignore[return-value]


def _array(tensors: dict[str, Any], name: str) -> np.ndarray | None:
    tensor = tensors.get(name)
    if tensor is None:
        return None
    array = numpy_helper.to_array(tensor)
    return array.astype(np.float64) if np.issubdtype(array.dtype, np.floating) else None


def _folded_params(result: onnx.ModelProto, into: str) -> dict[str, np.ndarray] | None:
    tensors = _constants(result.graph)
    for node in result.graph.node:
        if node.name == into:
            found = {name: _array(tensors, name) for name in node.input if name in tensors}
            return {name: value for name, value in found.items() if value is not None}
    return None


def lint_onnx(model: Any, report: LintReport) -> LintReport:
    proto = load_model_proto(model)
    opset = opset_of(proto)
    report.kind = "onnx"
    tensors = _constants(proto.graph)
    locations = batchnorm_nodes(proto)
    report.layers = len(locations)
    report.ran("training_mode")
    keep: list[str] = []
    for loc in locations:
        node, name = loc.node, loc.node.name
        why = training_mode_reason(node, opset)
        if why:
            report.add(ERROR, "training_mode", name,
                       f"BatchNormalization in training mode in an exported graph ({why}): it normalizes each batch by "
                       "its own statistics; export the model after model.eval()", None, opset=opset)
        eps = float(node_attrs(node).get("epsilon", 1e-5))
        statistics.check_eps(report, name, eps, ONNX)
        names = list(node.input[1:5])
        values = [_array(tensors, n) for n in names] if len(names) == 4 else [None]
        if any(v is None for v in values):
            report.add(INFO, "statistics", name, "scale/B/mean/var are not all constant initializers"
                       f"{' (' + loc.where + ')' if loc.where else ''}: their values are not checked", None)
            continue
        scale, bias, mean, var = values
        errors_before = len(report.errors)
        statistics.check_values(report, name, mean, var, scale, bias, ONNX)
        if len(report.errors) > errors_before:
            keep.append(name)
        precision.check_scale(report, name, var, scale, eps, ONNX)
    if locations:
        report_unfoldable(report, probe_fuse(proto, None, keep), ONNX, _folded_params)
    return report
