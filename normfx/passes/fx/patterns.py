"""Recognizing things in an fx graph by behaviour, not exact type: BatchNorm (modules, subclasses,
Frozen BN, functional ``F.batch_norm`` with constant statistics), conv/linear layers, activations."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ...errors import RewriteError
from ...fold import bn_affine
from ...layers import FrozenBatchNorm, is_batchnorm
from .frozen import STANDARD_BATCHNORM, freeze_module

__all__ = ["BnSite", "LayerInfo", "find_bn_sites", "layer_info", "activation_name", "describe_node"]

_BN_FUNCTIONS = (F.batch_norm, torch.batch_norm)
_F_BATCH_NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_TORCH_BATCH_NORM_ARGS = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps", "cudnn_enabled")


@dataclass
class BnSite:
    """One BatchNorm call in a graph, with its eval-mode affine ``y = x * scale + shift`` (float64).

    ``reason`` is set when the call cannot be folded at all (training mode, ...). ``post`` are modules
    a BN subclass applies after normalizing (its activation); they stay in the graph after a fold.
    """

    node: fx.Node
    name: str
    scale: np.ndarray | None = None
    shift: np.ndarray | None = None
    post: dict[str, nn.Module] = field(default_factory=dict)
    reason: str = ""
    attrs: list[str] = field(default_factory=list)  # get_attr targets only this call reads (functional BN)

    @property
    def input_node(self) -> fx.Node:
        return self.node.args[0] if self.node.args else self.node.kwargs["input"]


@dataclass
class LayerInfo:
    """A conv / conv_transpose / linear module and its geometry, in fold.py's terms."""

    module: nn.Module
    kind: str
    groups: int = 1
    stride: Any = 1
    padding: Any = 0
    dilation: Any = 1
    output_padding: Any = 0
    padding_mode: str = "zeros"

    @property
    def zero_padded(self) -> bool:
        if self.kind == "linear" or self.padding_mode != "zeros":
            return False
        if isinstance(self.padding, str):
            return self.padding != "valid"
        return any(int(p) != 0 for p in self.padding)


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _forward_is_stock(module: nn.Module, bases: tuple[type, ...]) -> bool:
    """A subclass that does not override forward behaves like its torch base class."""
    return any(isinstance(module, b) and type(module).forward is b.forward for b in bases)


def layer_info(module: nn.Module) -> LayerInfo | None:
    """LayerInfo for a Conv{1,2,3}d / ConvTranspose{1,2,3}d / Linear (or a subclass with the stock
    forward); None for anything else."""
    if _forward_is_stock(module, _CONV):
        return LayerInfo(module, "conv", module.groups, module.stride, module.padding, module.dilation, 0, module.padding_mode)
    if _forward_is_stock(module, _CONV_T):
        return LayerInfo(module, "conv_transpose", module.groups, module.stride, module.padding, module.dilation,
                         module.output_padding, module.padding_mode)
    if _forward_is_stock(module, (nn.Linear,)):
        return LayerInfo(module, "linear")
    return None


def _constant(gm: fx.GraphModule, value: Any) -> tuple[bool, Any]:
    """(True, value) for a constant argument or a get_attr tensor; (False, None) for a computed one."""
    if isinstance(value, fx.Node):
        if value.op != "get_attr":
            return False, None
        return True, _fetch_attr(gm, value.target)
    return True, value


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    owner, _, attr = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr)


def _module_site(gm: fx.GraphModule, node: fx.Node, name: str) -> BnSite:
    module = gm.get_submodule(node.target)
    site = BnSite(node, name)
    if isinstance(module, FrozenBatchNorm):
        source = module
    else:
        if module.training and module.track_running_stats:
            site.reason = "BatchNorm is in training mode: it normalizes with batch statistics (call model.eval() first)"
            return site
        if type(module) in STANDARD_BATCHNORM and module.running_mean is not None:
            source = module  # stock BN in eval: its affine is read directly
        else:
            source, why = freeze_module(module)  # subclasses: checked numerically, activation kept as post
            if source is None:
                site.reason = why
                return site
    site.scale, site.shift = bn_affine(source.running_mean, source.running_var, source.weight, source.bias, source.eps)
    site.post = {n: getattr(module, n) for n in getattr(source, "post_names", ())}
    return site


def _function_site(gm: fx.GraphModule, node: fx.Node, name: str) -> BnSite:
    names = _F_BATCH_NORM_ARGS if node.target is F.batch_norm else _TORCH_BATCH_NORM_ARGS
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    defaults = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
    values: dict[str, Any] = {}
    site = BnSite(node, name)
    for key in ("running_mean", "running_var", "weight", "bias", "training", "eps"):
        ok, value = _constant(gm, bound.get(key, defaults.get(key)))
        if not ok:
            site.reason = f"functional batch_norm's {key} is computed at run time, not a constant: cannot fold"
            return site
        values[key] = value
    if values["training"] is not False:
        site.reason = "functional batch_norm with training=True normalizes with batch statistics"
        return site
    if values["running_mean"] is None or values["running_var"] is None:
        site.reason = "functional batch_norm without running statistics uses batch statistics"
        return site
    try:
        site.scale, site.shift = bn_affine(values["running_mean"], values["running_var"], values["weight"], values["bias"],
                                           float(values["eps"]))
    except RewriteError as exc:
        site.reason = str(exc)
        return site
    site.attrs = [a.target for a in node.all_input_nodes if a.op == "get_attr"]
    return site


def functional_name(node: fx.Node) -> str:
    """``block1.batch_norm``: the module whose forward made the call, then the node's name (so that
    per-layer globs such as ``block1.*`` reach functional calls too)."""
    stack = node.meta.get("nn_module_stack") or {}
    owner = next(reversed(stack.values()))[0] if stack else ""
    return f"{owner}.{node.name}" if owner else node.name


def find_bn_sites(gm: fx.GraphModule, qualify) -> list[BnSite]:
    """Every BatchNorm call in ``gm``; ``qualify(name)`` maps a graph-local name to the model's."""
    sites = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and is_batchnorm(gm.get_submodule(node.target)):
            sites.append(_module_site(gm, node, qualify(node.target)))
        elif node.op == "call_function" and node.target in _BN_FUNCTIONS:
            sites.append(_function_site(gm, node, qualify(functional_name(node))))
    return sites


_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.ELU, nn.Hardswish, nn.Hardsigmoid,
                       nn.Sigmoid, nn.Tanh, nn.Mish, nn.PReLU, nn.SELU, nn.CELU, nn.Softplus)
_ACTIVATION_FUNCTIONS = {F.relu, F.relu6, F.silu, F.gelu, F.leaky_relu, F.elu, F.hardswish, F.hardsigmoid, F.mish,
                         torch.relu, torch.sigmoid, torch.tanh, F.selu, F.celu, F.softplus}
_ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "tanh", "clamp", "clamp_min"}


def activation_name(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The activation a node computes (for reasons and the pre-activation pattern), or None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return type(module).__name__ if isinstance(module, _ACTIVATION_MODULES) else None
    if node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS:
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method" and node.target in _ACTIVATION_METHODS:
        return node.target
    return None


def describe_node(gm: fx.GraphModule, node: fx.Node) -> str:
    """A short human name for what a node does (for skip reasons)."""
    if node.op == "call_module":
        return f"{type(gm.get_submodule(node.target)).__name__} '{node.target}'"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return {operator.add: "an addition", operator.mul: "a multiplication"}.get(node.target, f"{name}()")
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "placeholder":
        return f"the model input '{node.target}'"
    if node.op == "output":
        return "the model output"
    return f"{node.op} '{node.target}'"
