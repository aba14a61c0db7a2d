"""Policies ``groupnorm``, ``layernorm`` and ``instancenorm``: replace each BatchNorm by a batch-independent
normalization, and what ``proxynorm`` (:mod:`.proxy_pairs`) shares with them.

Every new normalization is an ``nn.GroupNorm`` (channels-first, per-channel affine, the same function in
train and eval): ``layernorm`` is GroupNorm with 1 group (statistics over C and the spatial axes, as in the
Proxy Norm paper), ``instancenorm`` GroupNorm with C groups (not ``nn.InstanceNorm*``, whose affine is off by
default and whose eval mode may use running statistics). The BN's ``eps`` and affine are kept (``weight``/
``bias`` copied; ``affine=False`` gives no affine), its running statistics are dropped, and the new module
sits at the BN's path, so ``<bn>.weight``/``<bn>.bias`` keep their state_dict keys. A BN subclass that
applies its own modules after normalizing (timm's ``BatchNormAct2d``: checked numerically) becomes
:class:`~normfx.layers.GroupNormPost`, GroupNorm followed by those same modules (their keys kept too).

The group count: ``groups=G`` or ``group_size=S`` (``G = C / S``), one of them; a channel count they do not
divide is a :class:`~normfx.errors.PolicyError` naming the layer and the valid values. Default: the largest
divisor of C that is at most 32 (``proxynorm``: 4) and leaves at least 2 channels per group (so the default
never turns into an InstanceNorm). A 2-D ``(N, C)`` input (BatchNorm1d in an MLP) has no spatial axis: the
default is then 1 group (LayerNorm over the features), and one channel per group (instancenorm, group_size=1)
is refused, since every group would hold a single value and the output would be the constant β. Whether a
BatchNorm1d / SyncBatchNorm input is 2-D is proven by ``example_inputs`` or by a Conv1d/2d/3d feeding it;
without either, only choices valid on both ranks (layernorm, explicit groups with ≥ 2 channels per group)
are applied and the others are skipped with that reason.

Swaps are module swaps: they work in parts of the model torch.fx cannot trace and keep the model's class.
The model is traced once, read-only, to find functional ``F.batch_norm`` calls (reported: no module to
replace), the conv feeding each BN (``ws=true``: :mod:`.weight_std`) and the input ranks.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import fx, nn

from ...errors import InputDataError, PolicyError
from ...layers import (
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    GroupNormPost,
    is_batchnorm,
)
from ...report import APPLIED, SKIPPED
from .graph_state import GraphState
from .patterns import functional_name
from .tracing import TracedPart, rewrite_traceable_parts

__all__ = [
    "SwapOptions", "swap_options", "divisors", "choose_groups", "post_modules", "make_group_norm",
    "norm_words", "copy_parameter", "Analysis", "analyze", "input_ranks", "run_groupnorm", "run_layernorm",
    "run_instancenorm",
]

log = logging.getLogger(__name__)

KINDS = ("groupnorm", "layernorm", "instancenorm")
DEFAULT_GROUPS = {"groupnorm": 32, "proxynorm": 4}
FUNCTIONAL_REASON = ("functional batch_norm call: there is no module to replace; replace it in the model's code "
                     "(F.group_norm) or make it a BatchNorm module")
_BN_FUNCTIONS = (F.batch_norm, torch.batch_norm)
_PROBE_TOLERANCE = 1e-6


# ---------------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class SwapOptions:
    """A step's options, checked: which norm, its group rule, and Weight Standardization."""

    policy: str
    kind: str  # groupnorm | layernorm | instancenorm: the norm that replaces (or precedes, proxynorm) each BN
    groups: int = 0
    group_size: int = 0
    ws: bool = False

    @property
    def default_cap(self) -> int:
        return DEFAULT_GROUPS.get(self.policy, DEFAULT_GROUPS["groupnorm"])


def _option(ctx, key: str, default):
    try:
        return ctx.option(key)
    except KeyError:
        return default


def swap_options(ctx, kind: str | None = None) -> SwapOptions:
    """Check the step's options; ``kind`` fixes the norm (plain policies), else the ``norm`` option picks it."""
    policy = ctx.rule
    groups, group_size = int(_option(ctx, "groups", 0)), int(_option(ctx, "group_size", 0))
    for key, value in (("groups", groups), ("group_size", group_size)):
        if value < 0:
            raise PolicyError(f"policy {policy!r}: {key} must be >= 1 (or 0 for the default), got {value}")
    if groups and group_size:
        raise PolicyError(f"policy {policy!r}: set groups or group_size, not both (groups={groups}, "
                          f"group_size={group_size})")
    if kind is None:
        kind = str(_option(ctx, "norm", "groupnorm")).strip().lower()
        if kind not in ("groupnorm", "layernorm"):
            raise PolicyError(f"policy {policy!r}: norm={_option(ctx, 'norm', '')!r} is not one of groupnorm, "
                              "layernorm")
        if kind == "layernorm" and (groups or group_size):
            raise PolicyError(f"policy {policy!r}: norm=layernorm is GroupNorm with 1 group; groups/group_size "
                              "apply to norm=groupnorm only")
    return SwapOptions(policy, kind, groups, group_size, bool(_option(ctx, "ws", False)))


# ------------------------------------------------------------------------------------------------ group rule


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _default_groups(channels: int, cap: int) -> int:
    if channels == 1:
        return 1
    return max(d for d in divisors(channels) if d <= cap and channels // d >= 2)


@dataclass(frozen=True)
class Groups:
    """The group count chosen for one layer (``count`` 0: the layer is skipped for ``reason``)."""

    count: int = 0
    rule: str = ""  # how the count was chosen, for the report
    reason: str = ""


UNKNOWN_RANK = ("input rank unknown: a BatchNorm1d/SyncBatchNorm may see a 2-D (N, C) input, where a group holds only "
                "its own channels' values; pass example_inputs to prove the rank")


def choose_groups(layer: str, channels: int, opts: SwapOptions, rank: int | None) -> Groups:
    """The group count for ``layer`` (C = ``channels``; ``rank`` of its input, None when unknown and possibly 2-D).

    Raises :class:`PolicyError` when ``groups``/``group_size`` does not divide C."""
    flat = rank == 2
    if opts.kind == "layernorm":
        count, rule = 1, "1 group: LayerNorm over the features" if flat else "1 group: LayerNorm over C and space"
    elif opts.kind == "instancenorm":
        count, rule = channels, f"{channels} groups: InstanceNorm"
    elif opts.groups:
        if channels % opts.groups:
            raise PolicyError(f"policy {opts.policy!r}: layer {layer!r} has {channels} channels, which groups="
                              f"{opts.groups} does not divide; valid group counts for it: "
                              f"{', '.join(map(str, divisors(channels)))} (or set a per-layer override)")
        count, rule = opts.groups, f"groups={opts.groups}"
    elif opts.group_size:
        if channels % opts.group_size:
            raise PolicyError(f"policy {opts.policy!r}: layer {layer!r} has {channels} channels, which group_size="
                              f"{opts.group_size} does not divide; valid group sizes for it: "
                              f"{', '.join(map(str, divisors(channels)))} (or set a per-layer override)")
        count, rule = channels // opts.group_size, f"group_size={opts.group_size}"
    elif flat:
        count, rule = 1, "2-D (N, C) input, no spatial axis: default 1 group"
    elif rank is None:
        return Groups(reason=f"the default group count depends on the {UNKNOWN_RANK} (or set groups= or group_size=, "
                             "or use layernorm)")
    else:
        count = _default_groups(channels, opts.default_cap)
        rule = f"default: the largest divisor of {channels} that is <= {opts.default_cap} with >= 2 channels per group"
    if channels // count == 1 and flat:
        return Groups(reason="one channel per group on a 2-D (N, C) input: every group holds a single value and the "
                             "output would be the constant bias; use layernorm or fewer groups")
    if channels // count == 1 and rank is None:
        return Groups(reason=f"one channel per group: {UNKNOWN_RANK}")
    if rank is None and count > 1:
        rule += f"; input rank not proven (a 2-D input would give {channels // count} values per group)"
    return Groups(count, rule)


def norm_words(groups: int, channels: int) -> str:
    """``GroupNorm(4 groups)``, ``GroupNorm(1 group = LayerNorm)``, ``GroupNorm(16 groups = InstanceNorm)``."""
    if groups == 1:
        return "GroupNorm(1 group = LayerNorm)"
    if groups == channels:
        return f"GroupNorm({groups} groups = InstanceNorm)"
    return f"GroupNorm({groups} groups)"


# ------------------------------------------------------------------------------------------ BN subclasses


_STOCK = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, FrozenBatchNorm, FrozenBatchNorm1d,
          FrozenBatchNorm2d, FrozenBatchNorm3d)


def _probe(bn: nn.Module, dtype: torch.dtype, device) -> torch.Tensor:
    spatial = (7,) if isinstance(bn, (nn.BatchNorm1d, FrozenBatchNorm1d)) else (
        (3, 3, 3) if isinstance(bn, (nn.BatchNorm3d, FrozenBatchNorm3d)) else (5, 5))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((3, bn.num_features, *spatial), generator=generator, dtype=torch.float64)
    return x.to(dtype=dtype, device=device)


def post_modules(bn: nn.Module) -> tuple[dict[str, nn.Module] | None, str]:
    """The modules ``bn`` applies after normalizing (``{}`` for a stock BN), or None and why its forward is not
    "BatchNorm, then its child modules" (a subclass is checked numerically: normfx cannot read its forward)."""
    if isinstance(bn, nn.modules.lazy.LazyModuleMixin) and bn.has_uninitialized_params():
        return None, "lazy BatchNorm is not initialized yet: run one forward pass first"
    if isinstance(bn, FrozenBatchNorm):
        return {n: getattr(bn, n) for n in bn.post_names}, ""
    if type(bn) in _STOCK:
        return {}, ""
    children = OrderedDict(bn.named_children())
    ref = next((t for t in (bn.weight, bn.running_mean) if t is not None), None)
    dtype, device = (ref.dtype, ref.device) if ref is not None else (torch.float32, None)
    x = _probe(bn, dtype, device)
    probe = copy.deepcopy(bn).eval()
    running = probe.running_mean is not None and probe.running_var is not None
    try:
        with torch.no_grad():
            expected = probe(x)
            got = F.batch_norm(x, probe.running_mean if running else None, probe.running_var if running else None,
                               probe.weight, probe.bias, not running, 0.0, probe.eps)
            for child in children.values():
                got = child(got)
    except Exception as exc:  # a subclass whose forward needs more than one tensor, ...
        return None, f"{type(bn).__name__} cannot be probed ({type(exc).__name__}): normfx cannot read its forward"
    if not isinstance(expected, torch.Tensor) or expected.shape != got.shape or not bool(
            ((expected - got).abs().max() / expected.abs().max().clamp_min(1e-12)) <= _PROBE_TOLERANCE):
        return None, (f"{type(bn).__name__} has a forward that is not BatchNorm followed by its child modules; "
                      "normfx cannot replace it generically (convert it by hand or exclude it with an override)")
    return dict(children), ""


def bn_reference(bn: nn.Module) -> tuple[torch.dtype, torch.device | None]:
    ref = next((t for t in (bn.weight, bn.running_mean, bn.bias) if t is not None), None)
    return (ref.dtype, ref.device) if ref is not None else (torch.get_default_dtype(), None)


def copy_parameter(source: torch.Tensor) -> nn.Parameter:
    """A new Parameter holding a copy of ``source``: a BN parameter keeps its requires_grad, a FrozenBatchNorm's
    buffer becomes trainable."""
    trainable = source.requires_grad if isinstance(source, nn.Parameter) else True
    return nn.Parameter(source.detach().clone(), requires_grad=trainable)


def make_group_norm(bn: nn.Module, groups: int, affine: bool, post: Mapping[str, nn.Module] | None = None
                    ) -> nn.GroupNorm:
    """A GroupNorm with ``bn``'s channels and eps, its affine copied when ``affine`` (and the BN has one), followed by
    ``post`` modules (:class:`~normfx.layers.GroupNormPost`) when given; same device, dtype and training mode as
    ``bn``."""
    dtype, device = bn_reference(bn)
    affine = affine and bn.weight is not None
    if post:
        norm = GroupNormPost(groups, bn.num_features, bn.eps, affine, post=post, device=device, dtype=dtype)
    else:
        norm = nn.GroupNorm(groups, bn.num_features, bn.eps, affine, device=device, dtype=dtype)
    if affine:
        norm.weight = copy_parameter(bn.weight)
        norm.bias = copy_parameter(bn.bias)
    norm.train(bn.training)
    return norm


# ----------------------------------------------------------------------------------------- graph analysis


@dataclass
class BnUse:
    """One call of a BN module in a traced graph: the conv feeding it (for ``ws``) and the rank that conv proves."""

    conv: str | None = None  # model path of a conv that may be standardized
    conv_reason: str = ""  # why the conv before it cannot be standardized ("" when ``conv`` is set or none exists)
    rank: int | None = None


@dataclass
class Analysis:
    uses: dict[str, list[BnUse]] = field(default_factory=dict)  # BN module path -> its calls
    functional: list[str] = field(default_factory=list)  # names of functional batch_norm calls
    untraceable: list[tuple[str, str]] = field(default_factory=list)

    def owner(self, name: str) -> str | None:
        """The innermost untraceable module holding ``name`` (None when none does)."""
        return max((p for p, _ in self.untraceable if p == "" or name.startswith(p + ".")), key=len, default=None)


def aliased_modules(model: nn.Module) -> set[int]:
    paths = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    return {key for key, count in paths.items() if count > 1}


def analyze(model: nn.Module) -> Analysis:
    """Trace ``model`` read-only (untraceable modules are copied before their children are traced) and record,
    for each BN module call, the conv feeding it; and every functional batch_norm call."""
    from .weight_std import conv_before

    found = Analysis()
    aliased = aliased_modules(model)

    def look(part: TracedPart) -> fx.GraphModule:
        state = GraphState(part, aliased=aliased)
        for node in state.gm.graph.nodes:
            if node.op == "call_module" and is_batchnorm(state.gm.get_submodule(node.target)):
                conv, reason, rank = conv_before(state, node)
                use = BnUse(part.qualified(str(conv.target)) if conv is not None else None, reason, rank)
                found.uses.setdefault(part.qualified(str(node.target)), []).append(use)
            elif node.op == "call_function" and node.target in _BN_FUNCTIONS:
                found.functional.append(part.qualified(functional_name(node)))
        return part.graph_module

    rewrite_traceable_parts(model, look, lambda path, why: found.untraceable.append((path, why)),
                            make_private=copy.deepcopy)
    return found


# ------------------------------------------------------------------------------------------------ input ranks

_RANK_BY_CLASS = ((nn.BatchNorm2d, 4), (nn.BatchNorm3d, 5), (FrozenBatchNorm2d, 4), (FrozenBatchNorm3d, 5))


def class_rank(bn: nn.Module) -> int | None:
    """The input rank a BN class enforces (2d: 4, 3d: 5); None for 1d / SyncBatchNorm (2-D possible)."""
    return next((rank for cls, rank in _RANK_BY_CLASS if isinstance(bn, cls)), None)


def input_ranks(model: nn.Module, example_inputs: tuple | None, modules: Mapping[str, nn.Module]) -> dict[str, set]:
    """Input ranks each of ``modules`` (path → module) sees on ``example_inputs`` (one eval-mode forward, modes
    restored, nothing updated); ``{}`` without example inputs."""
    if example_inputs is None or not modules:
        return {}
    seen: dict[int, set] = {}
    handles = [m.register_forward_pre_hook(
        lambda mod, args: seen.setdefault(id(mod), set()).add(args[0].dim()) if args and isinstance(
            args[0], torch.Tensor) else None) for m in {id(m): m for m in modules.values()}.values()]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(*example_inputs)
    except Exception as exc:
        text = ", ".join(str(list(x.shape)) for x in example_inputs if isinstance(x, torch.Tensor))
        raise InputDataError(f"the model fails on example_inputs of shape {text}: {str(exc).splitlines()[0]}") from exc
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.train(mode)
    return {name: seen[id(m)] for name, m in modules.items() if id(m) in seen}


def layer_rank(name: str, bn: nn.Module, measured: Mapping[str, set], uses: list[BnUse]) -> int | None:
    """The rank the layer's input is known to have: 2 when any call sees a 2-D input, else the smallest rank proven
    by example inputs, the BN class or the conv feeding it; None when a 2-D input is not ruled out."""
    if name in measured:
        ranks = measured[name]
        return 2 if 2 in ranks else min(ranks)
    rank = class_rank(bn)
    if rank is not None:
        return rank
    proven = [u.rank for u in uses if u.rank is not None]
    if uses and len(proven) == len(uses):
        return min(proven)
    return None


# ------------------------------------------------------------------------------------------------- the pass


def replace_all(model: nn.Module, old: nn.Module, new: nn.Module) -> nn.Module:
    """Put ``new`` at every path holding ``old``; returns the root (``new`` when the model is ``old``)."""
    if model is old:
        return new
    for path, module in list(model.named_modules(remove_duplicate=False)):
        if module is old and path:
            model.set_submodule(path, new)
    return model


def _run_swap(model: nn.Module, ctx, kind: str) -> nn.Module:
    from .weight_std import standardize

    opts = swap_options(ctx, kind)
    targets = [(name, m) for name, m in model.named_modules() if is_batchnorm(m) and ctx.targets(name)]
    found = analyze(model) if not is_batchnorm(model) else Analysis()  # a lone BN traces into F.batch_norm
    for name in found.functional:
        if ctx.targets(name):
            ctx.report.add(name, ctx.rule, SKIPPED, FUNCTIONAL_REASON, source="F.batch_norm")
    possibly_flat = {name: m for name, m in targets if class_rank(m) is None}
    measured = input_ranks(model, ctx.example_inputs, possibly_flat)
    for name, bn in targets:
        source = type(bn).__name__
        post, why = post_modules(bn)
        if post is None:
            ctx.report.add(name, ctx.rule, SKIPPED, why, source=source)
            continue
        uses = found.uses.get(name, [])
        groups = choose_groups(name, bn.num_features, opts, layer_rank(name, bn, measured, uses))
        if not groups.count:
            ctx.report.add(name, ctx.rule, SKIPPED, groups.reason, source=source)
            continue
        norm = make_group_norm(bn, groups.count, affine=True, post=post)
        model = replace_all(model, bn, norm)
        words = [f"{source} → {norm_words(groups.count, bn.num_features)}"]
        if post:
            words.append(f"then its own {', '.join(type(m).__name__ for m in post.values())}")
        if bn.weight is None:
            words.append("no affine (affine=False)")
        if "2-D" in groups.rule or "not proven" in groups.rule:
            words.append(groups.rule)
        details = {"source": source, "result": [type(norm).__name__], "groups": groups.count, "group_rule": groups.rule,
                   "affine": norm.affine, "modules": {"norm": name}}
        if opts.ws:
            owner = found.owner(name)
            unknown = (f"'{owner}' cannot be traced by torch.fx, so the conv feeding it is unknown" if owner
                       else "torch.fx cannot trace the model" if owner == "" else "it is never called by forward")
            words.extend(ws_words(model, uses, details, standardize, unknown))
        ctx.report.add(name, ctx.rule, APPLIED, "; ".join(words), **details)
    return model


def ws_words(model: nn.Module, uses: list[BnUse], details: dict, standardize, unknown: str) -> list[str]:
    """Standardize the convs feeding the calls of one replaced BN (module swap); the words for its report entry
    (``unknown``: why no call of it was seen)."""
    from .weight_std import NO_CONV

    words, convs, kept = [], [], []
    if not uses:
        kept.append(unknown)
    for use in uses:
        if use.conv is not None:
            new = standardize(model, use.conv, None)
            convs.append(use.conv)
            words.append(f"conv '{use.conv}' → {new}")
        else:
            kept.append(use.conv_reason or NO_CONV)
    for reason in dict.fromkeys(kept):
        words.append(f"no Weight Standardization: {reason}")
    details["ws_convs"] = convs
    if kept:
        details["ws_skipped"] = list(dict.fromkeys(kept))
    return words


def run_groupnorm(model: nn.Module, ctx) -> nn.Module:
    return _run_swap(model, ctx, "groupnorm")


def run_layernorm(model: nn.Module, ctx) -> nn.Module:
    return _run_swap(model, ctx, "layernorm")


def run_instancenorm(model: nn.Module, ctx) -> nn.Module:
    return _run_swap(model, ctx, "instancenorm")
