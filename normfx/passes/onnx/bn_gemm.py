"""BatchNormalization → Gemm / MatMul: fold the BN into the linear layer after it (always exact).

``Gemm(BN(x), B, C)`` with ``transA = 0``: ``B'`` is scaled along its input features and the shift
becomes ``alpha * (W shift)`` added through ``C`` (new ``C = (beta/alpha) C + W shift`` with
``beta = alpha``). ``transA = 1`` contracts over the BN's batch axis: declined.

``MatMul(BN(x), W)`` with a constant 2-D ``W``: the BN channels must be ``x``'s last axis (a 2-D BN
input, or through a shape chain); the shift goes into the following per-feature ``Add`` when there
is one, else into a new ``Add``.

The same rule folds the per-channel affine chains ``fuse`` reads (:mod:`.affine_conv`): ``kind``
(:class:`.forward.SiteKind`) names the site in the rule name, the reasons and the pattern.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from ...fold import fold_bn_before
from .chain import Chain, follow
from .edits import (
    add_bias_after,
    bypass_forward,
    input_name,
    optional_const,
    per_feature,
    shared_reason,
    start_dims,
)
from .forward import BN_SITE, SiteKind
from .rule import Decline, Fold, FoldOptions
from .shapes import dims_text
from .workspace import Workspace, node_label

__all__ = ["find", "GEMM_RULE", "MATMUL_RULE"]

GEMM_RULE = BN_SITE.rule("gemm")
MATMUL_RULE = BN_SITE.rule("matmul")


def _feature_axis_ok(
    site: Any, ws: Workspace, chain: Chain, rank: int | None, rule: str, label: str, kind: SiteKind
) -> Decline | int:
    """Follow the site's channels (axis 1) to the layer; they must land on the last axis. Returns the rank."""
    dims = start_dims(ws, site.y, rank if not chain.nodes else None, 1, site.channels)
    if dims is None:
        return Decline(
            rule,
            f"the rank of the {kind.noun} output {site.y.name!r} is unknown, so its channel axis "
            f"cannot be matched to {label}'s input features",
        )
    followed = follow(chain, dims, 1, ws)
    if isinstance(followed, str):
        return Decline(rule, followed)
    end_dims, axis = followed
    if axis != len(end_dims) - 1:
        return Decline(
            rule,
            f"the {kind.short} channels reach {label} on axis {axis} of {dims_text(end_dims)}, "
            "not the last axis it contracts over",
        )
    return len(end_dims)


def _mismatch(label: str, k: int, site: Any, kind: SiteKind) -> str:
    return f"{label} has {k} input features but the {kind.noun} has {site.channels} channels"


def find(
    site: Any, ws: Workspace, target: gs.Node, tin: gs.Tensor, chain: Chain, *,
    options: FoldOptions = FoldOptions(), kind: SiteKind = BN_SITE,
) -> Fold | Decline | None:
    """The forward fold of ``site`` (``x · site.scale + site.shift`` along axis 1) into Gemm/MatMul ``target``
    (reading ``tin`` through ``chain``); ``kind`` names the site in the rule name and the reasons."""
    duplicate_shared = options.duplicate_shared
    if target.domain or target.op not in ("Gemm", "MatMul"):
        return None
    rule = kind.rule(target.op.lower())
    label = node_label(target)
    if not target.inputs or target.inputs[0] is not tin or any(t is tin for t in target.inputs[1:]):
        return Decline(rule, f"the {kind.noun} feeds {label}'s weight operand, not its data input")
    if target.op == "Gemm":
        return _gemm(site, ws, target, chain, duplicate_shared, label, kind)
    return _matmul(site, ws, target, chain, duplicate_shared, label, kind)


def _gemm(
    site: Any, ws: Workspace, gemm: gs.Node, chain: Chain, duplicate_shared: bool, label: str, kind: SiteKind
) -> Fold | Decline:
    rule = kind.rule("gemm")
    attrs = gemm.attrs
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    trans_b = int(attrs.get("transB", 0))
    if int(attrs.get("transA", 0)):
        reason = f"{label} has transA=1: it contracts over the {kind.noun}'s batch axis, not its channels"
        return Decline(rule, reason)
    if alpha == 0.0:
        return Decline(rule, f"{label} has alpha=0 (its output ignores the {kind.noun})")
    b = optional_const(gemm, 1, "B", ws)
    if b is None or isinstance(b, str):
        return Decline(rule, b or f"{label} has no B input")
    c = optional_const(gemm, 2, "C", ws)
    if isinstance(c, str):
        return Decline(rule, c)
    if b.ndim != 2:
        return Decline(rule, f"{label} has a B of rank {b.ndim}")
    weight = b if trans_b else b.T  # (out, in)
    n, k = weight.shape
    if k != site.channels:
        return Decline(rule, _mismatch(label, k, site, kind))
    c_vec = per_feature(c, n, 2, f"{label}'s C")
    if isinstance(c_vec, str):
        return Decline(rule, c_vec)
    checked = _feature_axis_ok(site, ws, chain, 2, rule, label, kind)
    if isinstance(checked, Decline):
        return checked
    reason = shared_reason(gemm, (1, 2), ws, duplicate_shared)
    if reason:
        return Decline(rule, reason)
    details = {"direction": "forward", "into": gemm.name or label, "pattern": kind.pattern(site, *chain.ops, "Gemm")}

    def apply() -> None:
        # Y = alpha * x W'^T + alpha * (W shift + (beta/alpha) C): new C with beta := alpha.
        bias = None if c_vec is None else c_vec * (beta / alpha)
        new_w, new_b = fold_bn_before(weight, bias, site.scale, site.shift, kind="linear")
        old = list(gemm.inputs[1:])
        new_b_matrix = new_w if trans_b else np.ascontiguousarray(new_w.T)
        ws.set_input(gemm, 1, ws.constant(input_name(gemm, 1, "weight"), new_b_matrix))
        ws.set_input(gemm, 2, ws.constant(input_name(gemm, 2, "C"), new_b))
        ws.set_attr(gemm, "beta", alpha)
        bypass_forward(site, chain, gemm, ws)
        for tensor in old:
            ws.drop_if_unused(tensor)

    return Fold(rule, label, apply, details)


def _matmul(
    site: Any, ws: Workspace, matmul: gs.Node, chain: Chain, duplicate_shared: bool, label: str, kind: SiteKind
) -> Fold | Decline:
    rule = kind.rule("matmul")
    w = optional_const(matmul, 1, "weight", ws)
    if w is None or isinstance(w, str):
        return Decline(rule, w or f"{label} has no weight input")
    if w.ndim != 2:
        return Decline(rule, f"{label}'s weight has rank {w.ndim}; only a 2-D (K, N) weight folds")
    k, n = w.shape
    if k != site.channels:
        return Decline(rule, _mismatch(label, k, site, kind))
    rank = _feature_axis_ok(site, ws, chain, None, rule, label, kind)
    if isinstance(rank, Decline):
        return rank
    out = matmul.outputs[0]
    add, index, bias = None, None, None
    single = out.outputs[0] if len(out.outputs) == 1 and not ws.is_graph_output(out) else None
    if single is not None and single.op == "Add" and not single.domain:
        candidate = out.outputs[0]
        for i, tensor in enumerate(candidate.inputs[:2]):
            if tensor is out and candidate.inputs[1 - i] is not out:
                value = ws.const(candidate.inputs[1 - i])
                if isinstance(value, np.ndarray):
                    vec = per_feature(value, n, rank, "Add constant")
                    if isinstance(vec, np.ndarray):
                        add, index, bias = candidate, 1 - i, vec
    reason = shared_reason(matmul, (1,), ws, duplicate_shared)
    if reason:
        return Decline(rule, reason)
    details = {"direction": "forward", "into": matmul.name or label, "pattern": kind.pattern(site, *chain.ops, "MatMul")}

    def apply() -> None:
        new_w, new_b = fold_bn_before(np.ascontiguousarray(w.T), bias, site.scale, site.shift, kind="linear")
        old = [matmul.inputs[1]]
        ws.set_input(matmul, 1, ws.constant(input_name(matmul, 1, "weight"), np.ascontiguousarray(new_w.T)))
        if add is not None:
            old.append(add.inputs[index])
            ws.set_input(add, index, ws.constant(add.inputs[index].name, new_b))
        else:
            details["added"] = add_bias_after(matmul, new_b, ws, f"{matmul.name or 'MatMul'}.{kind.prefix}_shift").name
        bypass_forward(site, chain, matmul, ws)
        for tensor in old:
            ws.drop_if_unused(tensor)

    return Fold(rule, label, apply, details)
