"""The affine rules of ``fuse``, in rounds: each elementwise affine chain of the graph
(:mod:`.affine_site`) is offered, in this order, to

0. :mod:`.layer_affine` — into the Conv/ConvTranspose/Gemm/MatMul before it, as a BN's affine would;
1. :mod:`.norm_affine` — into the normalization before it (exact where its scale varies as the affine);
2. :mod:`.affine_conv` — into every Conv/ConvTranspose/Gemm/MatMul after it (``forward=true`` only);
3. :mod:`.affine_pool` — moved past the average pooling after it (so it can fold next round);
4. :mod:`.affine_merge` — rewritten as at most one Mul and one Add.

A fold can open another (a merged chain, a chain moved past a pooling), so rounds repeat until nothing
changes. Each chain gets one report entry, named after its first node (a chain a rule rewrote keeps
its entry): ``applied`` with what was done, or ``kept`` with every rule's reason. Chains that only a
layer's own bias/scale could be (right after a Conv/Gemm/MatMul), scalar chains and chains that vary
along more than the channel axis are reported only when a rule rewrote them or they follow a
normalization, so ``fuse`` on a plain network lists its BatchNorms and nothing else.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import onnx_graphsurgeon as gs

from ...errors import RewriteError
from . import affine_conv, affine_merge, affine_pool, layer_affine, norm_affine
from .affine_site import LINEAR_OPS, AffineSite, read_sites
from .chain import walk_up
from .forward import applied_details
from .rule import Decline, Fold, FoldOptions
from .workspace import Workspace, node_label

__all__ = ["AffineEntry", "AffineRules"]

log = logging.getLogger(__name__)


@dataclass
class AffineEntry:
    """What happened to one affine chain: the folds applied, and why what is left was left."""

    name: str
    applied: list[str] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def folded(self) -> bool:
        return bool(self.applied)

    @property
    def reason(self) -> str:
        done = "; then ".join(self.applied)
        rest = "; ".join(self.left)
        if done and rest:
            return f"{done} (what is left is kept: {rest})"
        return done or rest


def _describe(fold: Fold, site: AffineSite) -> str:
    ops = "→".join(site.ops)
    if fold.rule == norm_affine.RULE:
        return f"{ops} folded into the preceding {fold.into} ({fold.details.get('how')})"
    if fold.rule == layer_affine.RULE:
        return f"{ops} folded into the preceding {fold.into} (as a BatchNorm's affine)"
    if fold.rule == affine_merge.RULE:
        return f"{ops} merged into {fold.into}"
    if fold.rule == affine_pool.RULE:
        return f"{ops} moved past {fold.into}"
    partial = [p.details["partial"] for p in (fold.parts or [fold]) if "partial" in p.details]
    if partial:
        return f"{ops}: " + "; ".join(partial)
    return f"{ops} folded into the following {fold.into}"


class AffineRules:
    """Runs the affine rules on a workspace and keeps one :class:`AffineEntry` per chain."""

    def __init__(self, ws: Workspace, options: FoldOptions, *, forward: bool = True,
                 targets: Callable[[str], bool] | None = None) -> None:
        self.ws, self.options, self.forward, self.targets = ws, options, forward, targets
        self.names: dict[int, str] = {}  # id(node a rule created) -> the entry it belongs to
        self.entries: dict[str, AffineEntry] = {}
        self._alive: list[gs.Node] = []  # keep created nodes alive so their ids stay unique

    def _creator(self, name: str) -> Callable[[gs.Node], None]:
        def created(node: gs.Node) -> None:
            self.names[id(node)] = name
            self._alive.append(node)

        return created

    def run(self) -> bool:
        """Rounds until nothing changes; True when something was rewritten."""
        changed = False
        while self._round():
            changed = True
        return changed

    def _round(self) -> bool:
        progress = False
        for site in read_sites(self.ws, self.names):
            if self.targets is not None and not self.targets(site.name):
                continue
            if _stale(site):
                progress = True  # an earlier fold this round changed its neighbourhood: look again next round
                continue
            progress |= self._one(site)
        return progress

    def _one(self, site: AffineSite) -> bool:
        ws, options, created = self.ws, self.options, self._creator(site.name)
        declines: list[Decline] = []
        found: Fold | Decline | list[Decline] | None = layer_affine.find(site, ws, options=options)  # Conv → chain
        if isinstance(found, Fold):
            return self._apply(site, found)
        if isinstance(found, Decline):
            declines.append(found)
        found = norm_affine.find(site, ws, options=options)
        if isinstance(found, Fold):
            return self._apply(site, found)
        after_norm = isinstance(found, Decline)
        if after_norm:
            declines.append(found)
        if self.forward:
            found = affine_conv.find(site, ws, options=options, created=created)
            if isinstance(found, Fold):
                return self._apply(site, found)
            declines.extend(found)
        for rule in (affine_pool.find, affine_merge.find):
            found = rule(site, ws, created)
            if isinstance(found, Fold):
                return self._apply(site, found)
            if isinstance(found, Decline):
                declines.append(found)
        if after_norm or site.name in self.entries or _reportable(site, ws):
            entry = self._entry(site)
            reasons = [d.reason for d in declines]
            if not self.forward and site.per_channel and affine_conv.reaches_a_layer(site, ws):
                reasons.append("forward folding into the next layer is off (forward=false)")
            reasons = reasons or [_alone(site, ws)]
            entry.left = list(dict.fromkeys(reasons))
            entry.details.setdefault("pattern", "→".join(site.ops))
        return False

    def _entry(self, site: AffineSite) -> AffineEntry:
        entry = self.entries.get(site.name)
        if entry is None:
            entry = self.entries[site.name] = AffineEntry(site.name)
            entry.details["nodes"] = [n.name for n in site.nodes]
        return entry

    def _apply(self, site: AffineSite, fold: Fold) -> bool:
        entry = self._entry(site)
        try:
            fold.apply()
        except RewriteError as exc:
            raise RewriteError(f"{site.name}: {fold.rule} into {fold.into} failed: {exc}") from None
        log.debug("%s: %s (%s)", site.name, fold.rule, fold.into)
        entry.applied.append(_describe(fold, site))
        entry.rules.append(fold.rule)
        entry.left = []
        details = {k: v for k, v in applied_details(fold).items() if k != "direction"}
        entry.details.setdefault("steps", []).append({"fold": fold.rule, **details})
        return True


def _stale(site: AffineSite) -> bool:
    return any(not n.outputs or len(n.inputs) != 2 for n in site.nodes)


def _reportable(site: AffineSite, ws: Workspace) -> bool:
    """A per-channel chain that is not a layer's own bias/scale (those belong to the layer)."""
    if not site.per_channel or site.scalar:
        return False
    producer, _ = walk_up(site.x)
    return producer is None or producer.op not in LINEAR_OPS


def _alone(site: AffineSite, ws: Workspace) -> str:
    x, y = site.x, site.y
    source = f"input from {node_label(x.inputs[0])}" if x.inputs else f"input {x.name!r}"
    sinks = [node_label(n) for n in ws.data_consumers(y)[:3]]
    if ws.is_graph_output(y):
        sinks.append("the graph output")
    return (f"no normalization before it and no Conv/ConvTranspose/Gemm/MatMul after it to fold into "
            f"({source}; output to {', '.join(sinks) or 'nothing'})")
