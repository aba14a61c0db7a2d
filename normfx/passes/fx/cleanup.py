"""Leave nothing behind in ``fuse``'s fx output: no call that computes nothing.

- A folded BN+activation module (timm's ``BatchNormAct2d``, a FrozenBatchNorm with ``post`` modules) keeps its
  activation as a *direct* call of that module (:func:`call_post`), no ``nn.Sequential`` around it; its no-op
  children (``drop = nn.Identity()``, an ``act = nn.Identity()`` without activation, a Dropout in eval) are not
  called at all. Where the BN module is not called elsewhere, the kept modules stay at their own paths
  (``<bn>.act``), so their state_dict keys do not change and the BN's own tensors are gone.
- Calls the model itself leaves that are the identity in eval (:func:`remove_noop_calls`): ``nn.Identity``,
  ``nn.Dropout*`` modules in eval, and functional dropouts with ``training=False`` (timm's ``DropPath`` needs
  nothing: in eval its forward returns its input, so torch.fx records no call). They are removed from the graph;
  ``fuse``'s report gets one note listing them (no entry: they are not normalization layers). The fused model is
  for inference: putting it back in train mode does not bring them back (nor the BNs).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import fx, nn

__all__ = ["is_noop", "call_post", "remove_noop_calls"]

_FUNCTIONAL_DROPOUTS = {F.dropout: 2, F.dropout1d: 2, F.dropout2d: 2, F.dropout3d: 2, F.alpha_dropout: 2,
                        F.feature_alpha_dropout: 2}  # position of ``training`` in each signature


def is_noop(module: nn.Module) -> bool:
    """``nn.Identity`` (stock forward), or a Dropout module in eval: its call returns its input."""
    if isinstance(module, nn.Identity) and type(module).forward is nn.Identity.forward:
        return True
    return isinstance(module, nn.modules.dropout._DropoutNd) and not module.training


def call_post(gm: fx.GraphModule, bn_node: fx.Node, post: dict[str, nn.Module], replacement: fx.Node,
              fresh_name) -> fx.Node:
    """Insert direct calls of ``post``'s modules that do something, after ``bn_node``, on ``replacement``;
    returns the last node (``replacement`` itself when every post module is a no-op). ``bn_node`` must still
    be in the graph; ``fresh_name(base)`` gives an unused attribute name."""
    kept = {name: module for name, module in post.items() if not is_noop(module)}
    if not kept:
        return replacement
    target = str(bn_node.target) if bn_node.op == "call_module" else ""
    other_calls = any(n is not bn_node and n.op == "call_module" and n.target == target for n in gm.graph.nodes)
    if target and not other_calls:
        holder = target  # the BN module is called nowhere else: its children stay where they were
    else:
        base = (target or bn_node.name).replace(".", "_") + "_post"
        holder = fresh_name(base)
    container = nn.Module()
    for name, module in kept.items():
        container.add_module(name, module)
    if holder == target:
        gm.set_submodule(holder, container)  # replaces the folded BN module: its tensors leave the state_dict
    else:
        gm.add_submodule(holder, container)
    result = replacement
    anchor = bn_node
    for name in kept:
        with gm.graph.inserting_after(anchor):
            result = gm.graph.call_module(f"{holder}.{name}", (result,))
        anchor = result
    return result


def _functional_noop(node: fx.Node) -> bool:
    position = _FUNCTIONAL_DROPOUTS.get(node.target)
    if position is None:
        return False
    training = node.kwargs["training"] if "training" in node.kwargs else (
        node.args[position] if len(node.args) > position else True)
    return training is False


def remove_noop_calls(gm: fx.GraphModule) -> list[str]:
    """Remove every call that is the identity in eval (see the module doc); returns what was removed
    (``"Dropout 'classifier.0'"``, ``"dropout()"``)."""
    removed = []
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if not is_noop(module) or len(node.args) != 1 or node.kwargs:
                continue
            what = f"{type(module).__name__} '{node.target}'"
        elif node.op == "call_function" and _functional_noop(node):
            what = f"{node.target.__name__}()"
        else:
            continue
        source = node.args[0] if node.args else node.kwargs.get("input")
        if not isinstance(source, fx.Node):
            continue
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        removed.append(what)
    return removed
