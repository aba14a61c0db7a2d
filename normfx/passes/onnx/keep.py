"""Policy ``keep`` on ONNX: leave every targeted BatchNormalization as it is, and report it kept."""

from __future__ import annotations

from typing import Any

import onnx

from ...report import KEPT
from .io import batchnorm_nodes, name_batchnorm_nodes

__all__ = ["run"]


def run(model: onnx.ModelProto, ctx: Any) -> onnx.ModelProto:
    """Report each BatchNormalization the policy gives ``keep`` (subgraphs too); change nothing."""
    name_batchnorm_nodes(model)
    for loc in batchnorm_nodes(model):
        name = loc.node.name
        if ctx.targets(name):
            where = f" (in {loc.where})" if loc.where else ""
            ctx.report.add(name, ctx.rule, KEPT, f"policy 'keep': left as it is{where}", op="BatchNormalization")
    return model
