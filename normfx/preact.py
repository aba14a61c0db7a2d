"""Pure math of the pre-activation fold (BN → activation → conv/linear): arrays in, arrays out, float64 inside.

Positive homogeneity: for ``k > 0``, ``act(k·z) = k·act'(z)`` with ``act' = act`` for ReLU, LeakyReLU and
PReLU, and ``act'(z) = clamp(z, 0, 6/k)`` for ReLU6. For ``k < 0``: ``relu(k·z) = k·min(z, 0)`` (a clamp with
bounds ``(-inf, 0)``), ``relu6(k·z) = k·clamp(z, 6/k, 0)``, ``prelu_α(k·z) = k·α·prelu_{1/α}(z)`` (``α ≠ 0``).
So a BN ``y = s·x + t`` before one of these activations, reading a tensor stored as ``z = a·x + o`` (the
*stream representation*: a per-channel scale ``a ≠ 0`` and offset ``o`` the producers carry), becomes
``act(s·x + t) = gain·act'(z)`` exactly when ``o = a·t/s``: ``k = s/a`` moves through the activation and the
gain goes into the conv/linear that reads the activation (zero padding stays exact: ``gain·0 = 0``).
Channels with ``s = 0`` are the constant ``act(t)``: gain 0 and that constant added by the reader.

:class:`OffsetSolver` chooses the stream representations: offsets are free at conv/linear outputs (their bias),
add up through residual additions, concatenate slice by slice, pass through pools; each pre-activation BN
requires a value on the tensor it reads, other readers require 0 or absorb anything. It keeps every BN whose
requirement contradicts an earlier one (the fewest kept: one per conflicting reader) and says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .errors import RewriteError
from .fold import as_float64 as _f64

__all__ = [
    "ACTIVATIONS",
    "ActivationSplit",
    "split_activation",
    "activation_reference",
    "apply_split",
    "propagate_channels",
    "sign_flip",
    "reparameterize_bn",
    "OffsetSolver",
    "Solution",
]

ACTIVATIONS = ("relu", "relu6", "leaky_relu", "prelu")


@dataclass
class ActivationSplit:
    """``act(s·x + t) = gain·act'(z) + constant`` per channel, for ``z = a·x + offset``.

    ``act'`` is a clamp to ``[lower, upper]`` (ReLU/ReLU6 forms) or a PReLU with per-channel ``slope``
    (LeakyReLU/PReLU forms). ``constant`` is non-zero only on ``s = 0`` channels (where ``gain = 0``).
    """

    offset: np.ndarray
    gain: np.ndarray
    constant: np.ndarray
    lower: np.ndarray | None = None
    upper: np.ndarray | None = None
    slope: np.ndarray | None = None

    @property
    def clamp(self) -> bool:
        return self.slope is None


def sign_flip(lower: Any, upper: Any, gain: Any = None) -> np.ndarray | None:
    """±1 per channel when every channel's clamp ``[lower, upper]`` is ``[0, ∞)`` (+1) or ``(-∞, 0]`` (−1): then
    ``clamp(z) = s·relu(s·z)``, one multiplication by a sign before a plain ReLU, the outer ``s`` going into the
    consumers' gain. Channels with ``gain`` 0 count as +1 (their value is never read). None when some channel
    has other bounds (ReLU6)."""
    lower, upper = _f64(lower), _f64(upper)
    dead = np.zeros(lower.shape, dtype=bool) if gain is None else _f64(gain) == 0
    positive = (lower == 0) & (upper == np.inf)
    negative = (lower == -np.inf) & (upper == 0) & ~dead
    if lower.shape != upper.shape or not np.all(positive | negative | dead):
        return None
    return np.where(negative, -1.0, 1.0)


def propagate_channels(ops: dict, channels: dict, selected: Callable[[Any, int], int]) -> None:
    """Fill ``channels`` (tensor → channel count) through the channel-transparent ops of a region, until nothing
    changes. ``ops``: tensor → ``(kind, inputs)`` for the tensors an op computes (kind ``cat``, ``select`` or
    any elementwise/pool kind that keeps the channel count); ``selected(tensor, input_channels)``: the channel
    count a ``select`` keeps. Shared by the fx and ONNX routes."""
    changed = True
    while changed:
        changed = False
        for node, (kind, inputs) in ops.items():
            known = [i for i in inputs if i in channels]
            if kind == "select":
                if node not in channels and known:
                    channels[node], changed = selected(node, channels[inputs[0]]), True
            elif kind != "cat":
                value = next((channels[n] for n in [node, *inputs] if n in channels), None)
                for n in [node, *inputs]:
                    if value is not None and n not in channels:
                        channels[n], changed = value, True
            elif node not in channels and len(known) == len(inputs):
                channels[node], changed = sum(channels[i] for i in inputs), True
            elif node in channels and len(known) == len(inputs) - 1:
                missing = next(i for i in inputs if i not in channels)
                channels[missing], changed = channels[node] - sum(channels[i] for i in known), True


def activation_reference(act: str, x: np.ndarray, slope: Any = None, axis: int = 1) -> np.ndarray:
    """The activation itself, in float64 (``slope``: LeakyReLU's scalar or PReLU's per-channel slope)."""
    x = np.asarray(x, dtype=np.float64)
    if act == "relu":
        return np.maximum(x, 0.0)
    if act == "relu6":
        return np.clip(x, 0.0, 6.0)
    if act in ("leaky_relu", "prelu"):
        alpha = _f64(0.01 if slope is None else slope)
        if alpha.ndim == 1 and alpha.size > 1:
            shape = [1] * x.ndim
            shape[axis if x.ndim > 1 else 0] = -1
            alpha = alpha.reshape(shape)
        return np.where(x >= 0, x, alpha * x)
    raise RewriteError(f"activation {act!r} is not positively homogeneous; use one of {', '.join(ACTIVATIONS)}")


def split_activation(scale: Any, shift: Any, act: str, *, slope: Any = None, stream_scale: Any = None) -> ActivationSplit:
    """Move the per-channel ``scale`` of a BN (``y = scale·x + shift``) through ``act``.

    ``stream_scale`` (``a``, default 1) is the per-channel scale of the stored input ``z = a·x + o``;
    the result's ``offset`` is the ``o`` it needs. Raises :class:`RewriteError` when a channel cannot move:
    a PReLU/LeakyReLU channel with slope 0 and a negative ``k`` among channels keeping their slope.
    """
    s, t = _f64(scale), _f64(shift)
    if s.ndim != 1 or t.shape != s.shape:
        raise RewriteError(f"scale and shift must be (C,) vectors, got {s.shape} and {t.shape}")
    a = np.ones_like(s) if stream_scale is None else _f64(stream_scale)
    if a.shape != s.shape or np.any(a == 0) or not np.all(np.isfinite(a)):
        raise RewriteError("stream_scale must be a finite non-zero (C,) vector")
    if act not in ACTIVATIONS:
        raise RewriteError(f"activation {act!r} is not positively homogeneous; use one of {', '.join(ACTIVATIONS)}")
    live = s != 0
    k = s / a
    offset = np.where(live, a * t / np.where(live, s, 1.0), 0.0)
    constant = np.where(live, 0.0, activation_reference(act, t, _per_channel_slope(act, slope, len(s))))
    gain = np.where(live, k, 0.0)
    if act in ("relu", "relu6"):
        top = np.inf if act == "relu" else 6.0
        lower = np.where(k < 0, (-np.inf if act == "relu" else top / np.where(k < 0, k, 1.0)), 0.0)
        upper = np.where(k > 0, top / np.where(k > 0, k, 1.0) if act == "relu6" else np.inf, 0.0)
        lower = np.where(live, lower, 0.0)
        upper = np.where(live, upper, top)
        return ActivationSplit(offset, gain, constant, lower=lower, upper=upper)
    alpha = _per_channel_slope(act, slope, len(s))
    negative = live & (k < 0)
    if np.any(negative & (alpha == 0)):
        bad = int(np.flatnonzero(negative & (alpha == 0))[0])
        raise RewriteError(f"channel {bad}: slope 0 with a negative scale needs min(z, 0), which a PReLU cannot give")
    new_slope = np.where(negative, 1.0 / np.where(alpha == 0, 1.0, alpha), alpha)
    gain = np.where(negative, k * alpha, gain)
    return ActivationSplit(offset, gain, constant, slope=new_slope)


def _per_channel_slope(act: str, slope: Any, n: int) -> np.ndarray | None:
    if act not in ("leaky_relu", "prelu"):
        return None
    alpha = _f64(0.01 if slope is None else slope).reshape(-1)
    if alpha.size == 1:
        return np.full(n, float(alpha[0]))
    if alpha.size != n:
        raise RewriteError(f"PReLU has {alpha.size} slopes for {n} channels")
    return alpha


def apply_split(split: ActivationSplit, z: np.ndarray, axis: int = 1) -> np.ndarray:
    """``gain·act'(z) + constant`` in float64 (the right-hand side of the identity, for checks and tests)."""
    z = np.asarray(z, dtype=np.float64)
    shape = [1] * z.ndim
    shape[axis] = -1

    def pc(v: np.ndarray) -> np.ndarray:
        return v.reshape(shape)

    if split.clamp:
        inner = np.minimum(np.maximum(z, pc(split.lower)), pc(split.upper))
    else:
        inner = np.where(z >= 0, z, pc(split.slope) * z)
    return pc(split.gain) * inner + pc(split.constant)


def reparameterize_bn(mean: Any, weight: Any, stream_scale: Any, stream_offset: Any) -> tuple[np.ndarray, np.ndarray]:
    """A BN kept on a stored tensor ``z = a·x + o``: ``(mean', weight')`` with ``mean' = a·mean + o`` and
    ``weight' = weight/a`` give ``BN'(z) = BN(x)`` exactly (variance, eps and bias unchanged)."""
    a, o = _f64(stream_scale), _f64(stream_offset)
    return a * _f64(mean) + o, _f64(weight) / a


# ----------------------------------------------------------------------------------------------
# the offset solver


@dataclass
class Solution:
    """Per tensor key: the stream ``(scale, offset)`` vectors; ``kept``: site id → reason it keeps its BN."""

    scale: dict[Any, np.ndarray] = field(default_factory=dict)
    offset: dict[Any, np.ndarray] = field(default_factory=dict)
    kept: dict[Any, str] = field(default_factory=dict)


class OffsetSolver:
    """Stream representations ``z = a·x + o`` for the tensors around pre-activation BNs.

    Describe the tensors in topological order: :meth:`producer` (a conv/linear output: ``a`` and ``o`` free),
    :meth:`source` (anything else: ``a = 1``, ``o = 0``), :meth:`add`, :meth:`cat`, :meth:`pool` (``positive``
    for a max pool, which commutes with a positive scale only). Then the readers: :meth:`require_zero` (``o = 0``,
    and ``a = 1`` unless ``scale_free``: a model output, a zero-padded conv, an unknown op) and :meth:`site` (a
    pre-activation BN wanting ``o = a·t/s``). :meth:`solve` gives every tensor's ``(a, o)``; a site whose
    requirement contradicts earlier ones is kept (with the reason), the others are exact.
    """

    def __init__(self) -> None:
        self._classes: dict[Any, np.ndarray] = {}  # tensor -> scale-class id per channel
        self._expr: dict[Any, list[dict[int, float]]] = {}  # tensor -> per channel {variable: coefficient}
        self._parent: list[int] = []
        self._positive: set[int] = set()
        self._fixed: set[int] = set()
        self._variables = 0
        self._zero: list[tuple[Any, bool, str]] = []
        self._sites: list[tuple[Any, Any, np.ndarray, np.ndarray, str]] = []
        self._origin: dict[int, str] = {}  # class root -> what fixed it (for reasons)

    # -- description
    def _new_classes(self, n: int) -> np.ndarray:
        start = len(self._parent)
        self._parent.extend(range(start, start + n))
        return np.arange(start, start + n)

    def _find(self, i: int) -> int:
        while self._parent[i] != i:
            self._parent[i] = self._parent[self._parent[i]]
            i = self._parent[i]
        return i

    def _union(self, i: int, j: int) -> None:
        ri, rj = self._find(i), self._find(j)
        if ri != rj:
            self._parent[rj] = ri
            if rj in self._positive:
                self._positive.add(ri)
            if rj in self._fixed:
                self._fixed.add(ri)
                self._origin.setdefault(ri, self._origin.get(rj, ""))

    def channels(self, key: Any) -> int:
        return len(self._classes[key])

    def producer(self, key: Any, channels: int) -> None:
        self._classes[key] = self._new_classes(channels)
        self._expr[key] = [{self._variables + c: 1.0} for c in range(channels)]
        self._variables += channels

    def source(self, key: Any, channels: int, what: str = "") -> None:
        self._classes[key] = self._new_classes(channels)
        for c in self._classes[key]:
            self._fixed.add(int(c))
            self._origin[int(c)] = what
        self._expr[key] = [{} for _ in range(channels)]

    def add(self, key: Any, inputs: Sequence[Any]) -> None:
        sizes = {self.channels(i) for i in inputs}
        if len(sizes) != 1:
            raise RewriteError(f"addition of tensors with {sorted(sizes)} channels")
        first = self._classes[inputs[0]]
        for other in inputs[1:]:
            for i, j in zip(first, self._classes[other]):
                self._union(int(i), int(j))
        self._classes[key] = first.copy()
        expr = [dict() for _ in first]
        for name in inputs:
            for c, terms in enumerate(self._expr[name]):
                for var, coef in terms.items():
                    expr[c][var] = expr[c].get(var, 0.0) + coef
        self._expr[key] = expr

    def cat(self, key: Any, inputs: Sequence[Any]) -> None:
        self._classes[key] = np.concatenate([self._classes[i] for i in inputs])
        self._expr[key] = [dict(t) for i in inputs for t in self._expr[i]]

    def select(self, key: Any, source: Any, indices: Sequence[int]) -> None:
        """``key`` holds the channels ``indices`` of ``source`` (a channel slice)."""
        self._classes[key] = self._classes[source][np.asarray(indices, dtype=int)]
        self._expr[key] = [dict(self._expr[source][i]) for i in indices]

    def pool(self, key: Any, source: Any, positive: bool = False) -> None:
        self._classes[key] = self._classes[source].copy()
        self._expr[key] = [dict(t) for t in self._expr[source]]
        if positive:
            for c in self._classes[key]:
                self._positive.add(self._find(int(c)))

    def require_zero(self, key: Any, scale_free: bool, why: str) -> None:
        self._zero.append((key, scale_free, why))

    def site(self, site_id: Any, key: Any, scale: Any, shift: Any, act: str, label: str = "") -> None:
        """A pre-activation BN (``label`` names it in the reasons of the BNs it conflicts with)."""
        self._sites.append((site_id, key, _f64(scale), _f64(shift), act, label or str(site_id)))

    # -- solving
    def solve(self) -> Solution:
        for key, scale_free, why in self._zero:
            if not scale_free:
                for c in self._classes[key]:
                    root = self._find(int(c))
                    self._fixed.add(root)
                    self._origin.setdefault(root, why)
        for c in list(self._positive):
            self._positive.add(self._find(c))
        rows: list[tuple[dict[int, float], float]] = []
        pivots: dict[int, int] = {}  # variable -> row index
        for key, _, why in self._zero:
            for terms in self._expr[key]:
                if _insert(rows, pivots, terms, 0.0, why) is not None:  # pragma: no cover - zeros always fit
                    raise RewriteError(f"inconsistent zero requirement ({why})")
        chosen: dict[int, float] = {}
        solution = Solution()
        for site_id, key, s, t, act, label in self._sites:
            classes = [self._find(int(c)) for c in self._classes[key]]
            trial = dict(chosen)
            a = np.ones_like(s)
            for c, root in enumerate(classes):
                if root in self._fixed:
                    continue
                if root not in trial and s[c] != 0:
                    trial[root] = abs(s[c]) if root in self._positive else s[c]
                a[c] = trial.get(root, 1.0)
            saved_rows, saved_pivots = list(rows), dict(pivots)
            reason = ""
            for c, terms in enumerate(self._expr[key]):
                if s[c] == 0:
                    continue
                others = _insert(rows, pivots, terms, a[c] * t[c] / s[c], label)
                if others is not None:
                    reason = self._conflict(c, terms, classes[c], others)
                    break
            if reason:
                rows[:], pivots = saved_rows, saved_pivots
                solution.kept[site_id] = reason
            else:
                chosen = trial
        values = _back_substitute(rows, pivots, self._variables)
        for key, classes in self._classes.items():
            solution.scale[key] = np.array([chosen.get(self._find(int(c)), 1.0) for c in classes])
            solution.offset[key] = np.array([sum(coef * values[v] for v, coef in terms.items()) for terms in self._expr[key]])
        return solution

    def _conflict(self, channel: int, terms: dict[int, float], root: int, others: list[str]) -> str:
        if not terms:
            what = self._origin.get(root) or "a layer that cannot carry an offset"
            return (f"its input channel {channel} comes from {what}, not from a conv/linear whose bias could carry "
                    "the BN's shift")
        return (f"its input channel {channel} already carries the offset {', '.join(others)} needs (a different one): "
                "one tensor cannot carry two offsets")


def _reduce(rows: list, pivots: dict[int, int], terms: dict[int, float], rhs: float,
            owners: list[str]) -> tuple[dict[int, float], float]:
    row = {v: c for v, c in terms.items() if c != 0}
    changed = True
    while changed:
        changed = False
        for var in [v for v in row if v in pivots]:
            coef = row.get(var, 0.0)
            if coef == 0:
                row.pop(var, None)
                continue
            prow, prhs, owner = rows[pivots[var]]
            if owner not in owners:
                owners.append(owner)
            for v, c in prow.items():
                row[v] = row.get(v, 0.0) - coef * c
                if abs(row[v]) < 1e-12:
                    del row[v]
            rhs -= coef * prhs
            changed = True
    return row, rhs


def _insert(rows: list, pivots: dict[int, int], terms: dict[int, float], rhs: float, owner: str) -> list[str] | None:
    """Add the equation ``Σ terms·x = rhs`` (required by ``owner``); None when it fits, else the owners of the
    earlier equations it contradicts (nothing added)."""
    owners: list[str] = []
    row, rhs = _reduce(rows, pivots, terms, rhs, owners)
    if not row:
        return None if abs(rhs) <= 1e-9 * max(1.0, abs(rhs)) else owners
    pivot = max(row, key=lambda v: abs(row[v]))
    coef = row[pivot]
    rows.append(({v: c / coef for v, c in row.items()}, rhs / coef, owner))
    pivots[pivot] = len(rows) - 1
    return None


def _back_substitute(rows: list, pivots: dict[int, int], n: int) -> np.ndarray:
    values = np.zeros(n)
    owner = {index: var for var, index in pivots.items()}
    for index in range(len(rows) - 1, -1, -1):
        if index not in owner:
            continue
        var = owner[index]
        row, rhs, _ = rows[index]
        values[var] = rhs - sum(c * values[v] for v, c in row.items() if v != var)
    return values
