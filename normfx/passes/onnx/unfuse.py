"""Policy ``unfuse`` on ONNX: put a BatchNormalization back after every Conv / ConvTranspose / Gemm /
MatMul(+Add) that no normalization follows, so a fused export fine-tunes with BN's parameterization.

Each eligible layer ``y = layer(x) + b`` becomes ``BatchNormalization(layer_nobias(x))``: the layer
loses its bias (a Conv/ConvTranspose its third input, a Gemm its ``C``, a ``MatMul → Add(constant)``
its Add), and a new BN node — named ``<layer>_bn`` — takes over the output tensor (same name, so
consumers and graph outputs are unchanged). Its parameters come from
:func:`normfx.fold.unfold_bn_params`: without data identity statistics (``mean = 0``,
``var = 1 - eps``, ``scale = 1``, ``B = b``), exact in eval mode; with ``data`` the per-channel mean and
(unbiased) variance of each new BN's input are measured over the data by onnxruntime with the model
computing its eval function (:func:`normfx.stats.onnx_collect.collect_onnx_moments`,
``batch_statistics=False``), and ``scale = sqrt(var + eps)``, ``B = mean + b``: still exact in eval,
and close to the fused function in train mode. ``epsilon`` is the ``eps`` option, ``momentum`` the
``momentum`` option in ONNX's convention (``1 - momentum``: PyTorch's 0.1 is ONNX's 0.9).

With data, the train-mode deviation is measured too (as on the torch route):
``report.metrics["unfuse_train_mode_rel_error"]`` is ``max|y_train - y_eval| / max|y_eval|`` over the
float outputs on the first batch of the data, ``y_train`` with only the inserted BNs on batch statistics
(:func:`normfx.stats.onnx_unfuse.train_mode_deviation`), plus a report note. The first batch is kept
as the statistics pass goes by, so one-shot data (a generator) is read once. It is not measured (a note
says why) when the first batch gives an inserted BN a single value per channel (train mode needs 2;
PyTorch raises there). Batches of one sample are fine for the statistics: counts add up across
batches; a BN whose data gave one value per channel in all keeps identity statistics, and its report
entry says so.

Each rule is match → check (a reason when it declines) → apply, as in :mod:`.fuse`. Skipped with a
reason: layers in subgraphs (If/Loop/Scan bodies) or local functions; a weight that is not a constant;
a layer whose output already feeds a normalization (directly, or through shape-only ops / its bias
Add); — unless ``classifier=true`` — the classifier (prediction head): a layer whose output reaches a
graph output through nodes that each take exactly one computed data input (activations, pooling,
reductions, Flatten/Reshape, Dropout, Softmax, Identity, ...: constants and shape-only inputs such as
``Shape(x)`` do not count); a node merging two computed tensors (a residual Add, a Concat), a node
with parameters (a layer, a normalization, PRelu), a node of another domain or with a subgraph ends
the path, so a backbone returning its features keeps its residual stream unfused; a MatMul whose
input is not proven 2-D (BN normalizes axis 1, a MatMul's features are its last axis); a Gemm whose
``C`` varies along rows.

ONNX has one BN op: ``norm`` = ``batchnorm``, ``frozen`` or ``sync`` all insert BatchNormalization
(the class distinction exists only on the torch route). Existing initializers are never edited: the
layer keeps its weight tensor, the BN gets new initializers. ``ctx.dry_run`` (explain) inserts the BNs
on the private copy but measures nothing. A ModelProto whose external data was not loaded is refused
(:func:`.io.require_loaded_data`). The options are checked by :func:`normfx.passes.unfuse_options.unfuse_options`,
shared with the torch route.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ...errors import ModelError
from ...fold import unfold_bn_params
from ...report import APPLIED, SKIPPED
from ..unfuse_options import (
    NO_DATA_NOTE,
    NORMS,
    UnfuseOptions,
    refuse_or_note,
    train_mode_note,
    unfuse_options,
)
from .io import NodeLocation, opset_of, require_loaded_data
from .unfuse_sites import LAYER_OPS, MIN_OPSET, Site, check, computed_tensors, layer_nodes, name_layer_nodes
from .workspace import Workspace

if TYPE_CHECKING:
    from ...stats.onnx_unfuse import FirstBatch

__all__ = ["run", "NORMS", "LAYER_OPS", "layer_nodes", "name_layer_nodes"]

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# apply


@dataclass(eq=False)
class Inserted:
    """A BN put back after a layer: its node name and its four parameter constants (new initializers)."""

    site: Site
    bn_name: str
    params: dict[str, gs.Constant]  # scale, B, mean, var


_KEYS = {"scale": "weight", "B": "bias", "mean": "running_mean", "var": "running_var"}


def _set_values(inserted: Inserted, values: dict[str, np.ndarray]) -> None:
    for key, source in _KEYS.items():
        inserted.params[key].values = np.ascontiguousarray(values[source])


def _apply(site: Site, ws: Workspace, eps: float, momentum: float) -> Inserted:
    """``layer(x) + b`` → ``BN(layer_nobias(x))`` with identity statistics (exact in eval)."""
    node, out = site.node, site.out
    _, values = unfold_bn_params(site.weight, site.bias, kind=site.kind, groups=site.groups, eps=eps)
    bn_name = ws.fresh(f"{site.name}_bn")
    params = {key: gs.Constant(ws.fresh(f"{bn_name}.{key}"), np.ascontiguousarray(values[src]))
              for key, src in _KEYS.items()}
    pre = ws.variable_like(f"{node.outputs[0].name}_prebn", node.outputs[0])
    old_layer_out = node.outputs[0]
    old = list(node.inputs[2:])
    ws.set_output(node, 0, pre)
    if site.bias_add is not None:
        ws.move_metadata_readers(old_layer_out, pre)
    if node.op == "Gemm" and ws.opset < 11 and len(node.inputs) > 2:  # C is required before Gemm-11
        ws.set_input(node, 2, gs.Constant(ws.fresh(f"{site.name}.C_zero"), np.zeros(site.channels, site.weight.dtype)))
    elif len(node.inputs) > 2:
        ws.truncate_inputs(node, 2)
    attrs = {"epsilon": float(eps), "momentum": float(1.0 - momentum)}
    bn = gs.Node("BatchNormalization", name=bn_name, attrs=attrs,
                 inputs=[pre, *(params[k] for k in _KEYS)], outputs=[out])
    ws.insert_after(node, bn)
    if site.bias_add is not None:
        ws.remove(site.bias_add)
    for tensor in old:
        ws.drop_if_unused(tensor)
    return Inserted(site, bn_name, params)


# ----------------------------------------------------------------------------------------------
# statistics


def _measure(ws: Workspace, inserted: list[Inserted], ctx: Any, opts: UnfuseOptions) -> tuple[dict[str, str], FirstBatch]:
    """Measure each inserted BN's input over ``ctx.data`` and write the unfolded parameters.

    Returns ``{bn name: "" | why identity statistics stayed}`` and the first batch for the train-mode
    deviation (kept as the data goes by: one-shot data is read once)."""
    from ...stats.onnx_collect import collect_onnx_moments
    from ...stats.onnx_unfuse import FirstBatch

    staged = ws.export()  # identity statistics: the model computes its fused (eval) function
    names = [item.bn_name for item in inserted]
    first = FirstBatch()
    collected = collect_onnx_moments(staged, ctx.data, names, num_batches=opts.num_batches, batch_statistics=False,
                                     progress=True, desc="unfuse statistics", on_batch=first)
    kept: dict[str, str] = {}
    for item in inserted:
        moments = collected.layers[item.bn_name].moments
        count = 0 if moments is None else int(moments.count)
        if count < 2:  # one batch of one sample into a Gemm/MatMul (counts add up across batches)
            kept[item.bn_name] = (f"never reached by the data in {collected.batches} batch(es)" if not count else
                                  "the data gave 1 value per channel; a variance needs 2")
            log.warning("%s: %s; identity statistics kept", item.bn_name, kept[item.bn_name])
            continue
        site = item.site
        _, values = unfold_bn_params(site.weight, site.bias, kind=site.kind, groups=site.groups,
                                     channel_mean=moments.mean, channel_var=moments.var_unbiased, eps=opts.eps)
        _set_values(item, values)
        item.site.details["values_per_channel"] = count
        kept[item.bn_name] = ""
    return kept, first


def _deviation(model: onnx.ModelProto, names: list[str], first: FirstBatch, ctx: Any) -> None:
    """The train-mode deviation on the first batch, into ``ctx.report`` (or a note saying why not)."""
    from ...stats.onnx_unfuse import train_mode_deviation

    single = [name for name in names if first.values_per_channel.get(name, 0) < 2]
    if single or first.feed is None:
        ctx.report.note(f"train-mode deviation not measured: the first batch gives {single[0]!r} one value per "
                        "channel, on which BatchNorm cannot run in train mode; use batches of 2 or more samples")
        return
    deviation = train_mode_deviation(model, names, first.feed)
    ctx.report.metrics["unfuse_train_mode_rel_error"] = deviation
    ctx.report.note(train_mode_note(deviation))


# ----------------------------------------------------------------------------------------------
# the pass


def _where_reason(loc: NodeLocation, opset: int) -> str | None:
    """Why a layer is not even looked at: it lives in a subgraph / local function, or the opset is too old."""
    if loc.where:
        return f"inside {loc.where}: layers in subgraphs and local functions are not unfused"
    if opset < MIN_OPSET:
        return (f"the model's opset {opset} is below {MIN_OPSET}, whose BatchNormalization normfx does not write; "
                "convert the model to a newer opset (onnx.version_converter)")
    return None


def _applied(item: Inserted, norm: str, measured: bool, why: str) -> tuple[str, str, dict[str, Any]]:
    """The report entry of an inserted BN: ``measured`` when data gave its statistics."""
    if measured:
        source, what = "data", "statistics measured on data"
    else:
        source, what = "identity", f"identity statistics: {why or 'no data'}"
    details = {"bn": item.bn_name, "statistics": source, "norm": norm, "op": "BatchNormalization",
               "pattern": "→".join([item.site.node.op, *(["Add"] if item.site.bias_add else [])]),
               **item.site.details}
    return APPLIED, f"BatchNormalization {item.bn_name!r} inserted after it ({what})", details


def run(model: onnx.ModelProto, ctx: Any) -> onnx.ModelProto:
    """Insert a BatchNormalization after every targeted eligible layer; returns a new ModelProto
    (``model`` itself when nothing changed). Options: ``norm``, ``eps``, ``momentum``, ``classifier``,
    ``num_batches`` (see the policy)."""
    opts = unfuse_options(ctx)
    require_loaded_data(model)
    locations = name_layer_nodes(model)
    if not locations:
        raise ModelError(
            "the ONNX model has no Conv, ConvTranspose, Gemm or MatMul node that unfuse could put a "
            "BatchNormalization after; pass the fused model (a CNN/MLP export) you meant to unfuse"
        )
    opset = opset_of(model)
    decisions: dict[str, tuple[str, str, dict[str, Any]]] = {}
    main: list[str] = []
    for loc in locations:
        if ctx.targets(loc.node.name):
            reason = _where_reason(loc, opset)
            if reason:
                decisions[loc.node.name] = (SKIPPED, reason, {})
            else:
                main.append(loc.node.name)

    ws = Workspace(model) if main else None
    inserted: list[Inserted] = []
    if ws is not None:
        by_name = {n.name: n for n in ws.graph.nodes if n.op in LAYER_OPS and n.domain in (None, "", "ai.onnx")}
        computed = computed_tensors(ws)
        sites: list[Site] = []
        for name in main:
            result = check(by_name[name], name, ws, opts.classifier, computed)
            if isinstance(result, str):
                decisions[name] = (SKIPPED, result, {})
            else:
                sites.append(result)
        # all checks first, then the edits: a check must not see another layer's new BN
        inserted = [_apply(site, ws, opts.eps, opts.momentum) for site in sites]

    measure = ws is not None and bool(inserted) and ctx.data is not None
    kept, first = _measure(ws, inserted, ctx, opts) if measure and not ctx.dry_run else ({}, None)
    for item in inserted:
        why = kept.get(item.bn_name, "")
        decisions[item.site.name] = _applied(item, opts.norm, measure and not why, why)
    for loc in locations:
        if loc.node.name in decisions:
            status, reason, details = decisions[loc.node.name]
            ctx.report.add(loc.node.name, ctx.rule, status, reason, **details)
    if not inserted:
        refuse_or_note(ctx, "the ONNX model", [d[1] for d in decisions.values() if d[0] == SKIPPED])
    if inserted and opts.norm != "batchnorm":
        ctx.report.note(f"unfuse:norm={opts.norm} on ONNX inserts BatchNormalization: ONNX has one BN op, the "
                        "FrozenBatchNorm/SyncBatchNorm distinction exists only on the torch route")
    if inserted and ctx.data is None:
        log.warning(NO_DATA_NOTE)
        ctx.report.note(NO_DATA_NOTE)
    if ws is None or not ws.changed:
        return model
    out = ws.export()
    if first is not None:
        _deviation(out, [item.bn_name for item in inserted], first, ctx)
    return out
