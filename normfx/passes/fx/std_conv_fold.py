"""Rule: StdConv (Weight Standardization) in eval mode → a plain Conv1d/2d/3d holding the standardized kernel.

``ŵ = (w − mean) / sqrt(var + ws_eps)`` depends on the weight only, so in eval it is a constant: the layer
becomes the stock conv of the same geometry with ``weight = ŵ`` (computed in float64 by the layer's own
``standardized_weight``, rounded once) and the same bias, at the same path (``weight``/``bias`` keys kept).
It then takes part in the BatchNorm and ProxyNorm folds like any conv. A StdConv in training mode is left
alone: its kernel is still being trained through the standardization.
"""

from __future__ import annotations

from torch import fx, nn

from ...fold import std_conv_weight
from ...layers import StdConv
from .graph_state import GraphState

__all__ = ["find_sites", "check", "apply", "plain_conv", "TRAINING_REASON"]

TRAINING_REASON = ("StdConv is in training mode: its kernel is trained through the standardization "
                   "(call model.eval() to fold it for inference)")


def find_sites(gm: fx.GraphModule) -> list[str]:
    """The StdConv modules the graph calls (each target once, in graph order)."""
    targets: dict[str, None] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), StdConv):
            targets.setdefault(str(node.target))
    return list(targets)


def check(module: nn.Module) -> str:
    """Why ``module`` is not folded ("" when it is)."""
    if module.training:
        return TRAINING_REASON
    return ""


def plain_conv(module: nn.Module) -> nn.Module:
    """The stock conv computing what the eval-mode StdConv ``module`` computes."""
    base = next(b for b in (nn.Conv1d, nn.Conv2d, nn.Conv3d) if isinstance(module, b))
    conv = base(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                padding=module.padding, dilation=module.dilation, groups=module.groups, bias=module.bias is not None,
                padding_mode=module.padding_mode, device=module.weight.device, dtype=module.weight.dtype)
    conv.weight = nn.Parameter(std_conv_weight(module), requires_grad=module.weight.requires_grad)
    if module.bias is not None:
        conv.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=module.bias.requires_grad)
    conv.train(module.training)
    return conv


def apply(state: GraphState, target: str) -> dict:
    """Swap the StdConv at ``target`` for its plain conv (every call of it in this graph: the same function)."""
    module = state.gm.get_submodule(target)
    conv = plain_conv(module)
    state.gm.set_submodule(target, conv)
    state.shapes.alias(conv, module)  # its recorded input shapes answer for the plain conv
    return {"source": type(module).__name__, "result": type(conv).__name__, "ws_eps": module.ws_eps}
