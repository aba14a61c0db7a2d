"""Gemm / MatMul (+ Add) → BatchNormalization: fold the BN into the linear layer before it (exact).

``Gemm``: ``Y = alpha * A' B' + beta * C`` (``A' = A^T`` if ``transA``, ``B' = B^T`` if ``transB``).
The BN scales column ``j`` of ``Y``: ``B'`` is scaled per output column (written back in the same
layout, ``transA``/``transB``/``alpha`` untouched) and the new ``C`` is ``(beta * C) * scale + shift``
with ``beta = 1``. A ``C`` that varies along rows does not fold.

``MatMul(A, W)`` with a constant 2-D ``W (K, N)``, optionally followed by ``Add`` of a per-feature
constant: ``W`` is scaled per column, the bias becomes ``b * scale + shift`` (an ``Add`` is inserted
when there was none). The BN must see the layer's features on its axis 1 — directly (2-D output) or
through a shape chain such as ``Transpose(0, 2, 1)`` (:mod:`.chain`).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ...fold import fold_bn_after
from .bn import BnSite
from .chain import Chain, chain_uses, follow, walk_up
from .edits import (
    add_bias_after,
    bypass_backward,
    input_name,
    optional_const,
    pattern,
    per_feature,
    shared_reason,
    start_dims,
)
from .rule import Decline, Fold, FoldOptions
from .shapes import dims_text
from .workspace import Workspace, node_label

__all__ = ["find", "GEMM_RULE", "MATMUL_RULE"]

GEMM_RULE = "gemm_bn"
MATMUL_RULE = "matmul_bn"


def _mismatch(label: str, n: int, site: BnSite) -> str:
    return f"{label} has {n} output features but the BatchNormalization has {site.channels} channels"


def find(site: BnSite, ws: Workspace, *, options: FoldOptions = FoldOptions()) -> Fold | Decline | None:
    """The fold of ``site`` into the Gemm or MatMul(+Add) producing its input, if there is one."""
    duplicate_shared = options.duplicate_shared
    producer, chain = walk_up(site.x)
    if producer is None or producer.domain:
        return None
    if producer.op == "Gemm":
        return _gemm(site, ws, producer, chain, duplicate_shared)
    if producer.op == "MatMul":
        return _matmul(site, ws, producer, None, chain, duplicate_shared)
    if producer.op == "Add":
        for i, tensor in enumerate(producer.inputs[:2]):
            source = tensor.inputs[0] if tensor.inputs else None
            if source is not None and source.op == "MatMul" and not source.domain:
                other = producer.inputs[1 - i]
                if isinstance(ws.const(other), np.ndarray):
                    return _matmul(site, ws, source, (producer, 1 - i), chain, duplicate_shared)
    return None


def _channels_on_axis1(
    site: BnSite, ws: Workspace, layer: gs.Node, out: gs.Tensor, chain: Chain, rank: int | None, rule: str
) -> Decline | None:
    """The layer's feature axis (its output's last) must reach the BN as axis 1."""
    label = node_label(layer)
    dims = start_dims(ws, out, rank, None if rank is None else rank - 1, site.channels)
    if dims is None:
        reason = f"the rank of {label}'s output is unknown, so its feature axis cannot be matched to the BN's"
        return Decline(rule, reason)
    followed = follow(chain, dims, len(dims) - 1, ws)
    if isinstance(followed, str):
        return Decline(rule, followed)
    end_dims, axis = followed
    if axis != 1:
        return Decline(
            rule,
            f"the BatchNormalization normalizes axis 1 of {dims_text(end_dims)}, but {label}'s output features "
            f"arrive on axis {axis}; only a per-feature BN folds",
        )
    return None


def _gemm(site: BnSite, ws: Workspace, gemm: gs.Node, chain: Chain, duplicate_shared: bool) -> Fold | Decline:
    label = node_label(gemm)
    attrs = gemm.attrs
    beta = float(attrs.get("beta", 1.0))  # alpha stays on the node: alpha·A·(B·s) is what the fold needs
    trans_b = int(attrs.get("transB", 0))
    b = optional_const(gemm, 1, "B", ws)
    if b is None or isinstance(b, str):
        return Decline(GEMM_RULE, b or f"{label} has no B input")
    if b.ndim != 2:
        return Decline(GEMM_RULE, f"{label} has a B of rank {b.ndim}")
    c = optional_const(gemm, 2, "C", ws)
    if isinstance(c, str):
        return Decline(GEMM_RULE, c)
    weight = b if trans_b else b.T  # linear layout (out, in)
    n = weight.shape[0]
    if n != site.channels:
        return Decline(GEMM_RULE, _mismatch(label, n, site))
    c_vec = per_feature(c, n, 2, f"{label}'s C")
    if isinstance(c_vec, str):
        return Decline(GEMM_RULE, c_vec)
    reason = chain_uses(chain, gemm.outputs[0], site.node, ws) or shared_reason(gemm, (1, 2), ws, duplicate_shared)
    if reason:
        return Decline(GEMM_RULE, f"{label}: {reason}" if not reason.startswith(label) else reason)
    declined = _channels_on_axis1(site, ws, gemm, gemm.outputs[0], chain, 2, GEMM_RULE)
    if declined:
        return declined

    def apply() -> None:
        bias = None if c_vec is None else beta * c_vec
        new_w, new_b = fold_bn_after(weight, bias, site.scale, site.shift, kind="linear")
        new_b_matrix = new_w if trans_b else np.ascontiguousarray(new_w.T)
        old = list(gemm.inputs[1:])
        ws.set_input(gemm, 1, ws.constant(input_name(gemm, 1, "weight"), new_b_matrix))
        ws.set_input(gemm, 2, ws.constant(input_name(gemm, 2, "C"), new_b))
        ws.set_attr(gemm, "beta", 1.0)
        bypass_backward(site, chain.nodes[-1] if chain.nodes else gemm, ws)
        for tensor in old:
            ws.drop_if_unused(tensor)

    details = {"direction": "backward", "into": gemm.name or label}
    details["pattern"] = pattern("Gemm", *chain.ops, "BatchNormalization")
    return Fold(GEMM_RULE, label, apply, details)


def _matmul(
    site: BnSite,
    ws: Workspace,
    matmul: gs.Node,
    add: tuple[gs.Node, int] | None,
    chain: Chain,
    duplicate_shared: bool,
) -> Fold | Decline:
    label = node_label(matmul)
    w = optional_const(matmul, 1, "weight", ws)
    if w is None or isinstance(w, str):
        first = ws.const(matmul.inputs[0]) if matmul.inputs else "missing"
        if isinstance(first, np.ndarray):
            reason = f"{label}'s constant is its first operand (W @ x); only x @ W with a constant W folds"
            return Decline(MATMUL_RULE, reason)
        return Decline(MATMUL_RULE, w or f"{label} has no second input")
    if w.ndim != 2:
        return Decline(MATMUL_RULE, f"{label}'s weight has rank {w.ndim}; only a 2-D (K, N) weight folds")
    n = w.shape[1]
    if n != site.channels:
        return Decline(MATMUL_RULE, _mismatch(label, n, site))
    raw = ws.shapes.raw(matmul.outputs[0].name) or ws.shapes.raw(matmul.inputs[0].name)
    rank = len(raw) if raw is not None else None
    bias = None
    end = matmul
    if add is not None:
        add_node, index = add
        reason = ws.other_uses(matmul.outputs[0], add_node, "MatMul output")
        if reason:
            return Decline(MATMUL_RULE, f"{label}: {reason}")
        bias = per_feature(np.asarray(ws.const(add_node.inputs[index])), n, rank, f"{node_label(add_node)}'s constant")
        if isinstance(bias, str):
            return Decline(MATMUL_RULE, bias)
        end = add_node
    reason = chain_uses(chain, end.outputs[0], site.node, ws) or shared_reason(matmul, (1,), ws, duplicate_shared)
    if reason:
        return Decline(MATMUL_RULE, f"{label}: {reason}" if not reason.startswith(label) else reason)
    declined = _channels_on_axis1(site, ws, matmul, end.outputs[0], chain, rank, MATMUL_RULE)
    if declined:
        return declined
    details = {"direction": "backward", "into": matmul.name or label}
    details["pattern"] = pattern("MatMul", *(["Add"] if add else []), *chain.ops, "BatchNormalization")

    def apply() -> None:
        new_w, new_b = fold_bn_after(np.ascontiguousarray(w.T), bias, site.scale, site.shift, kind="linear")
        old = [matmul.inputs[1]]
        ws.set_input(matmul, 1, ws.constant(input_name(matmul, 1, "weight"), np.ascontiguousarray(new_w.T)))
        if add is not None:
            add_node, index = add
            old.append(add_node.inputs[index])
            ws.set_input(add_node, index, ws.constant(add_node.inputs[index].name, new_b))
            last = add_node
        else:
            last = add_bias_after(matmul, new_b, ws, f"{matmul.name or 'MatMul'}.bn_shift")
            details["added"] = last.name
        bypass_backward(site, chain.nodes[-1] if chain.nodes else last, ws)
        for tensor in old:
            ws.drop_if_unused(tensor)

    return Fold(MATMUL_RULE, label, apply, details)
