"""Counting what is left: BatchNorm calls in a torch model (fx graphs and eager parts) or an ONNX graph."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .layers import is_batchnorm

__all__ = ["batchnorm_calls"]


def _torch_calls(model: nn.Module) -> int:
    count, called = 0, set()
    for module in model.modules():
        if isinstance(module, fx.GraphModule):
            for node in module.graph.nodes:
                if node.op == "call_module" and is_batchnorm(module.get_submodule(node.target)):
                    count += 1
                    called.add(id(module.get_submodule(node.target)))
                elif node.op == "call_function" and node.target in (F.batch_norm, torch.batch_norm):
                    count += 1
    # BN modules of eager (untraced) parts are counted once each.
    return count + sum(1 for m in model.modules() if is_batchnorm(m) and id(m) not in called)


def batchnorm_calls(model: Any) -> int:
    """BatchNorm calls left in ``model``: for a torch module, BN modules and ``batch_norm`` functions
    called by its fx graphs plus BN modules of eager parts; for an ONNX model, BatchNormalization nodes
    (subgraphs included)."""
    if isinstance(model, nn.Module):
        return _torch_calls(model)
    from .passes.onnx.io import batchnorm_nodes, load_model_proto

    return len(batchnorm_nodes(load_model_proto(model)))
