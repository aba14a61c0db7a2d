"""Pure branch-merge math (structural reparameterization): a sum of convolutions reading the same tensor
becomes one convolution. Arrays in, arrays out, float64 inside; no graphs here (the torch.fx and ONNX
passes both call this module, so the two routes decide and compute alike).

A branch is a conv (weight ``(Cout, Cin/g, *k)``, bias, stride, dilation, zero padding ``(begin, end)`` per
spatial axis, groups) or the identity ``x`` itself, optionally scaled per channel (an eval-mode BN reading
``x``: ``x * scale + shift``). The identity is a conv with a 1-tap kernel holding ``scale`` at input channel
``c``'s position within its group, so it merges with convs of any groups when ``Cin == Cout``.

Geometry (:func:`plan_merge`): output position ``i`` of a conv reads input positions
``i*s - p_begin + j*d`` for taps ``j = 0..k-1``. A branch zero-padded to the merged kernel ``K`` at offset
``o`` reads the same positions in a conv with padding ``P_begin = p_begin + o*d`` — so the merge is exact
iff every branch shares stride, dilation (on axes where its kernel has more than one tap), groups and
channels, and one ``(P_begin, P_end)`` serves all: ``o = (P_begin - p_begin)/d`` is an integer in
``[0, K - k]`` and ``P_end = p_end + (K - k - o)*d``. (Equal output sizes follow.) Otherwise the borders
would differ, and the branch is declined with that reason. Padding other than zeros (reflect, replicate,
circular) on a padded branch is declined too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

__all__ = ["Geometry", "MergePlan", "plan_merge", "pad_kernel", "identity_kernel", "merge_kernels", "kernel_text"]


@dataclass(frozen=True)
class Geometry:
    """One summand's geometry; ``identity`` branches have 1-tap kernels, stride 1, no padding, any groups."""

    label: str
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]  # (begin, end) per spatial axis
    groups: int
    in_channels: int
    out_channels: int
    padding_mode: str = "zeros"
    identity: bool = False

    @classmethod
    def of_identity(cls, label: str, channels: int, rank: int) -> "Geometry":
        ones = (1,) * rank
        return cls(label, ones, ones, ones, ((0, 0),) * rank, 0, channels, channels, "zeros", True)

    @property
    def padded(self) -> bool:
        return any(b or e for b, e in self.pads)


@dataclass
class MergePlan:
    """What :func:`plan_merge` decided: the merged conv's geometry, which branches merge (with the offset of
    each one's kernel inside the merged kernel), and every declined branch with its reason."""

    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    pads: tuple[tuple[int, int], ...] = ()
    groups: int = 1
    merged: list[int] = field(default_factory=list)
    offsets: dict[int, tuple[int, ...]] = field(default_factory=dict)
    declined: list[tuple[int, str]] = field(default_factory=list)
    reason: str = ""  # why nothing merges, when nothing does

    @property
    def ok(self) -> bool:
        return len(self.merged) >= 2


def kernel_text(kernel: Sequence[int]) -> str:
    return "×".join(str(int(k)) for k in kernel)


def _pads_text(pads: Sequence[tuple[int, int]]) -> str:
    if all(b == e for b, e in pads):
        values = [b for b, _ in pads]
        return str(values[0]) if len(set(values)) == 1 else str(tuple(values))
    return str(tuple(tuple(p) for p in pads))


def _describe(g: Geometry) -> str:
    if g.identity:
        return g.label
    return f"{g.label} ({kernel_text(g.kernel)}, padding {_pads_text(g.pads)})"


def _dilation(branches: Sequence[Geometry], axis: int) -> int:
    """The dilation that matters on ``axis``: any multi-tap kernel's (1-tap kernels ignore dilation)."""
    return next((b.dilation[axis] for b in branches if b.kernel[axis] > 1), 1)


def _compatibility(g: Geometry, anchor: Geometry, dilation: tuple[int, ...]) -> str:
    """Why ``g`` cannot share one conv with ``anchor`` ("" when it can, padding aside)."""
    if g.identity:
        if anchor.in_channels != anchor.out_channels:
            return (f"identity branch {g.label} needs as many output channels as input channels; "
                    f"{_describe(anchor)} maps {anchor.in_channels} to {anchor.out_channels}")
        if any(s != 1 for s in anchor.stride):
            return f"identity branch {g.label} has stride 1, {_describe(anchor)} stride {tuple(anchor.stride)}"
        return "" if g.in_channels == anchor.in_channels else f"identity branch {g.label} has {g.in_channels} channels, {_describe(anchor)} reads {anchor.in_channels}"
    if g.out_channels != anchor.out_channels:
        return f"{_describe(g)} has {g.out_channels} output channels, {_describe(anchor)} {anchor.out_channels}"
    if g.in_channels != anchor.in_channels:
        return f"{_describe(g)} reads {g.in_channels} channels, {_describe(anchor)} {anchor.in_channels}"
    if g.groups != anchor.groups:
        return f"{_describe(g)} has groups={g.groups}, {_describe(anchor)} groups={anchor.groups}"
    if tuple(g.stride) != tuple(anchor.stride):
        return f"{_describe(g)} has stride {tuple(g.stride)}, {_describe(anchor)} stride {tuple(anchor.stride)}"
    for axis, k in enumerate(g.kernel):
        if k > 1 and g.dilation[axis] != dilation[axis]:
            return f"{_describe(g)} has dilation {tuple(g.dilation)}, {_describe(anchor)} dilation {tuple(anchor.dilation)}"
    return ""


def plan_merge(branches: Sequence[Geometry]) -> MergePlan:
    """Which of ``branches`` (summands reading the same tensor) merge into one conv, and its geometry.

    The anchor is the conv with the most taps (the first of equals); branches incompatible with it
    (channels, groups, stride, dilation, padding mode) or whose padding is inconsistent with the merged
    kernel's (the borders would differ) are declined, each with its reason. A plan merges when at least two
    branches, one of them a conv, are left.
    """
    plan = MergePlan()
    for i, b in enumerate(branches):
        if b.padded and b.padding_mode != "zeros":
            plan.declined.append((i, f"{_describe(b)} pads with padding_mode '{b.padding_mode}': only zero padding "
                                     "merges exactly"))
    odd = {i for i, _ in plan.declined}
    convs = [i for i, b in enumerate(branches) if not b.identity and i not in odd]
    if not convs:
        plan.reason = "; ".join(why for _, why in plan.declined) or "no conv among the branches"
        return plan
    anchor_index = max(convs, key=lambda i: (int(np.prod(branches[i].kernel)), -i))
    anchor = branches[anchor_index]
    rank = len(anchor.kernel)
    conv_branches = [branches[i] for i in convs]
    dilation = tuple(_dilation([anchor] + conv_branches, a) for a in range(rank))
    compatible = []
    for i, b in enumerate(branches):
        if i in odd:
            continue
        why = "" if i == anchor_index else _compatibility(b, anchor, dilation)
        if len(b.kernel) != rank:
            why = f"{_describe(b)} has {len(b.kernel)} spatial axes, {_describe(anchor)} {rank}"
        if why:
            plan.declined.append((i, why))
        else:
            compatible.append(i)
    kernel = tuple(max(branches[i].kernel[a] for i in compatible) for a in range(rank))
    # the merged padding on each axis: that of the first compatible branch whose kernel spans the axis
    pads = []
    for a in range(rank):
        source = next(branches[i] for i in compatible if branches[i].kernel[a] == kernel[a])
        if source.identity:  # every compatible kernel is 1 tap wide here
            source = anchor
        pads.append(tuple(source.pads[a]))
    for i in list(compatible):
        b = branches[i]
        offset, why = [], ""
        for a in range(rank):
            d, k, (pb, pe) = dilation[a], b.kernel[a], b.pads[a]
            slack = kernel[a] - k
            shift = pads[a][0] - pb
            o = shift // d if shift % d == 0 else -1
            if not 0 <= o <= slack or pads[a][1] != pe + (slack - o) * d:
                why = (f"{_describe(b)} is not centred like the merged {kernel_text(kernel)} kernel with padding "
                       f"{_pads_text(pads)}: merging would change the result at the borders (inconsistent padding)")
                break
            offset.append(o)
        if why:
            plan.declined.append((i, why))
            compatible.remove(i)
        else:
            plan.offsets[i] = tuple(offset)
    plan.declined.sort()
    if len(compatible) < 2 or all(branches[i].identity for i in compatible):
        plan.reason = "; ".join(why for _, why in plan.declined) or "fewer than two branches to merge"
        return plan
    plan.merged = compatible
    plan.kernel, plan.pads, plan.dilation = kernel, tuple(pads), dilation
    plan.stride, plan.groups = tuple(anchor.stride), anchor.groups
    return plan


def pad_kernel(weight: Any, kernel: Sequence[int], offset: Sequence[int]) -> np.ndarray:
    """``weight`` ``(Cout, Cin/g, *k)`` zero-padded to spatial size ``kernel``, its taps starting at ``offset``."""
    w = np.asarray(weight, dtype=np.float64)
    spatial = w.shape[2:]
    if len(spatial) != len(kernel) or len(offset) != len(kernel):
        raise ValueError(f"kernel {tuple(spatial)} and target {tuple(kernel)} / offset {tuple(offset)} differ in rank")
    widths = [(0, 0), (0, 0)]
    for k, size, o in zip(spatial, kernel, offset):
        if not 0 <= o <= size - k:
            raise ValueError(f"a {k}-tap kernel does not fit at offset {o} in {size} taps")
        widths.append((o, size - k - o))
    return np.pad(w, widths)


def identity_kernel(channels: int, groups: int, rank: int, scale: Any = None) -> np.ndarray:
    """The 1-tap conv kernel ``(C, C/groups, 1, ...)`` computing ``x * scale`` per channel (``scale`` 1 when
    None): output channel ``c`` reads input channel ``c``, which is entry ``c mod C/groups`` of its group."""
    if channels % groups:
        raise ValueError(f"{channels} channels do not split into {groups} groups")
    per_group = channels // groups
    s = np.ones(channels) if scale is None else np.asarray(scale, dtype=np.float64).reshape(-1)
    if s.shape != (channels,):
        raise ValueError(f"scale has shape {s.shape}, expected ({channels},)")
    w = np.zeros((channels, per_group) + (1,) * rank)
    c = np.arange(channels)
    w[(c, c % per_group) + (0,) * rank] = s
    return w


def merge_kernels(weights: Sequence[Any], biases: Sequence[Any], offsets: Sequence[Sequence[int]],
                  kernel: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The merged conv's float64 ``(weight, bias)``: each weight padded to ``kernel`` at its offset, summed;
    biases (None = zero) summed."""
    total = None
    for w, o in zip(weights, offsets):
        padded = pad_kernel(w, kernel, o)
        total = padded if total is None else total + padded
    if total is None:
        raise ValueError("no branch to merge")
    bias = np.zeros(total.shape[0])
    for b in biases:
        if b is not None:
            bias = bias + np.asarray(b, dtype=np.float64).reshape(-1)
    return total, bias
