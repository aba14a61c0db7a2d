"""Pre-pass of ``fuse`` and ``unfrozen``: frozen BatchNorms of other libraries become normfx's FrozenBatchNorm.

Each candidate (:func:`normfx.layers.foreign.is_candidate`: BN-like buffers and ``eps``, not a torch/normfx BN)
is probed (:func:`normfx.layers.foreign.recognize`). A match is swapped, at the same path, for the normfx
``FrozenBatchNorm{1,2,3}d`` holding the same numbers and the module's children as ``post`` modules (timm's
``drop``/``act``), so the state_dict keys stay (``weight``, ``bias``, ``running_mean``, ``running_var``,
``act.*``; the swap adds ``num_batches_tracked``, which BatchNorm checkpoints carry), and the policy's own rules
then see an ordinary frozen BN: ``fuse`` folds it, ``unfrozen`` makes it trainable. A lookalike whose forward
differs is left as it is and reported ``skipped`` with the reason. The report entries of matched layers name the
foreign class (``details["foreign"]``).
"""

from __future__ import annotations

import copy
import logging

from torch import nn

from ...layers.foreign import find_foreign
from ...report import SKIPPED

__all__ = ["swap", "annotate"]

log = logging.getLogger(__name__)


def swap(model: nn.Module, ctx, *, copy_first: bool = False) -> tuple[nn.Module, dict[str, str]]:
    """Swap every matched foreign frozen BN the policy targets; report lookalikes. Returns the model (a deep copy
    when ``copy_first`` and something was swapped, so the caller's model is never touched) and ``{path: foreign
    class name}`` of the swapped layers."""
    found = find_foreign(model)
    swapped: dict[str, str] = {}
    replacements = {}
    for name, match in found.items():
        if not ctx.targets(name):
            continue
        if match.frozen is None:
            ctx.report.add(name, ctx.rule, SKIPPED, match.reason, source=match.source)
            continue
        replacements[name] = match
    if not replacements:
        return model, swapped
    if copy_first:
        model = copy.deepcopy(model)
    by_id = {id(model.get_submodule(name)) if name else id(model): name for name in replacements}
    paths = [(path, module) for path, module in model.named_modules(remove_duplicate=False) if id(module) in by_id]
    for path, module in paths:  # a module registered under several paths gets one frozen BN at all of them
        match = replacements[by_id[id(module)]]
        if path == "":
            model = match.frozen
        else:
            model.set_submodule(path, match.frozen)
        swapped[path] = match.source
        log.info("%s: %s matched as a frozen BatchNorm, swapped for %s", path or "<model>", match.source,
                 type(match.frozen).__name__)
    return model, swapped


def annotate(ctx, swapped: dict[str, str]) -> None:
    """Name the foreign class in the report entries this step wrote for the swapped layers."""
    for entry in ctx.report.entries:
        if entry.rule == ctx.rule and entry.name in swapped:
            entry.details.setdefault("foreign", swapped[entry.name])
