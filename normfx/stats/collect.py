"""Run data through a model with only its BatchNorm layers on batch statistics, and collect the
population moments of every BN input.

How: the whole model is put in eval mode (dropout off, every other layer as at inference); a
forward pre-hook on each collected BN measures the moments of its input in float64
(:func:`normfx.stats.moments.batch_sums`) and writes the batch mean and biased variance into the
BN's running buffers, so that the BN — still in eval mode, with its own forward and any activation
a subclass adds — normalizes with the batch statistics exactly as it would in training. Every call
of a BN is collected (a BN used twice per forward contributes both inputs). Afterwards the hooks are
removed and the running buffers and every module's train/eval mode are restored; the caller writes
the population statistics (:mod:`normfx.stats.recompute`). No gradients are computed and momenta are
never touched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..errors import InputDataError, NormfxError, RewriteError
from . import distributed
from .feed import describe, feed, iterate_batches, model_device
from .moments import BatchSums, Moments, Workspace, batch_sums, merge, to_moments

__all__ = ["LayerStats", "Collected", "collect_stats", "gather_collected", "guarded", "fold_pending", "MERGE_EVERY"]

log = logging.getLogger(__name__)

MERGE_EVERY = 256  # per-call moments kept before folding them into one (bounds memory)


@dataclass
class LayerStats:
    """What one BN layer saw: population moments of its input, calls, batches that reached it."""

    name: str
    module: Any = field(repr=False)  # the nn.Module (torch route), the onnx NodeProto (ONNX route) or None
    moments: Moments | None = None
    calls: int = 0
    batches: int = 0
    _parts: list[Moments] = field(default_factory=list, repr=False)
    _pending: list[BatchSums] = field(default_factory=list, repr=False)
    _last_batch: int = field(default=-1, repr=False)

    def add(self, sums: BatchSums) -> None:
        """Keep one call's sums (folded into the moments every ``MERGE_EVERY`` calls, to bound memory)."""
        self._pending.append(sums)
        if len(self._pending) >= MERGE_EVERY:
            fold_pending(self)

    @property
    def reached(self) -> bool:
        return self.moments is not None and self.moments.count > 0


@dataclass
class Collected:
    """The result of one collection pass (already merged across ranks under torch.distributed)."""

    layers: dict[str, LayerStats]
    batches: int
    world_size: int = 1
    num_batches: int | None = None

    @property
    def unreached(self) -> list[str]:
        return [name for name, s in self.layers.items() if not s.reached]


class _Hook:
    def __init__(self, stats: LayerStats, state: dict[str, Any], workspace: Workspace, batch_statistics: bool) -> None:
        self.stats = stats
        self.state = state
        self.workspace = workspace
        self.batch_statistics = batch_statistics

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        s = self.stats
        x = args[0] if args else kwargs.get("input")  # bn(x) or bn(input=x)
        if not isinstance(x, torch.Tensor):
            raise InputDataError(f"layer {s.name!r} ({type(module).__name__}) got a {type(x).__name__} input, not a tensor")
        if x.dim() < 2 or x.shape[1] != module.num_features:
            raise InputDataError(
                f"layer {s.name!r} ({type(module).__name__}) expects {module.num_features} channels in dim 1 "
                f"but got an input of shape {tuple(x.shape)}"
            )
        per_channel = x.numel() // x.shape[1]
        if per_channel < 2 and self.batch_statistics:  # only measuring: the moments add up across batches
            raise InputDataError(
                f"layer {s.name!r} ({type(module).__name__}) gets {per_channel} value per channel "
                f"(input shape {tuple(x.shape)}): a batch variance needs at least 2; use batches of 2 or more samples"
            )
        batch = self.state["batch"]
        if s._last_batch != batch:
            s._last_batch = batch
            s.batches += 1
        s.calls += 1
        # depends on this batch alone: the same bits on any rank, in any order
        sums, mean, var = batch_sums(x, self.workspace)
        s.add(sums)
        if self.batch_statistics:  # normalize this call with the batch statistics, as BatchNorm does in training
            module.running_mean.copy_(mean)
            module.running_var.copy_(var)


def fold_pending(stats: LayerStats) -> None:
    merged = merge(stats._parts + to_moments(stats._pending))
    stats._parts = [merged] if merged is not None else []
    stats._pending = []


def _fold(stats: LayerStats) -> Moments | None:
    fold_pending(stats)
    merged = stats._parts[0] if stats._parts else None
    stats._parts = []
    return merged


def guarded(batches: Any) -> Any:
    """The batches of ``batches``, turning an error raised by the user's data iterator into
    :class:`InputDataError` naming the batch it was producing."""
    iterator, index = iter(batches), 0
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except NormfxError:
            raise
        except Exception as exc:  # the user's loader / generator failed
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise InputDataError(f"the data raised {type(exc).__name__} while producing batch {index}: {first}") from exc
        index += 1
        yield item


def collect_stats(
    model: nn.Module,
    data: Any,
    layers: Mapping[str, nn.Module],
    *,
    num_batches: int | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    progress: bool = True,
    desc: str = "BN statistics",
    batch_statistics: bool = True,
) -> Collected:
    """Feed ``data`` through ``model`` with the given BN ``layers`` on batch statistics; return moments.

    ``model`` is used in place but left as found: modes, running buffers and momenta are restored
    (the caller owns the copy). Under torch.distributed (initialized, world size > 1) every rank
    must call this with the same model; the returned moments are those of the union of all ranks'
    batches, identical on every rank.

    ``batch_statistics=False`` only measures: every layer keeps normalizing with its stored statistics,
    so the model computes its eval-mode function while its BN inputs are measured (``unfuse`` uses it
    to measure the statistics of BNs it inserted as identities).
    """
    stats = {name: LayerStats(name, module) for name, module in layers.items()}
    modes = {module: module.training for module in model.modules()}
    saved = {name: (m.running_mean.clone(), m.running_var.clone()) for name, m in layers.items()}
    state: dict[str, Any] = {"batch": -1}
    workspace = Workspace()  # one scratch buffer: hooks run one at a time
    handles = [
        module.register_forward_pre_hook(_Hook(stats[name], state, workspace, batch_statistics), with_kwargs=True)
        for name, module in layers.items()
    ]
    device = model_device(model)
    batches = 0
    failure: BaseException | None = None
    try:
        model.eval()
        with torch.no_grad():
            for index, batch in guarded(iterate_batches(data, num_batches, progress=progress, desc=desc)):
                state["batch"] = index
                try:
                    feed(model, batch, forward, device)
                except NormfxError as exc:
                    raise type(exc)(f"batch {index} ({describe(batch)}): {exc}") from exc
                except Exception as exc:  # the user's model/forward failed on this batch
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                    raise InputDataError(
                        f"batch {index} ({describe(batch)}) failed in the model's forward: {type(exc).__name__}: "
                        f"{first}; check that data yields what the model expects, or pass forward=callable(model, batch)"
                    ) from exc
                batches += 1
    except Exception as exc:
        failure = exc
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
        with torch.no_grad():
            for name, module in layers.items():
                module.running_mean.copy_(saved[name][0])
                module.running_var.copy_(saved[name][1])
    return gather_collected(stats, lambda local: [int(m.num_features) for m in layers.values()], batches,
                            num_batches, failure)


def gather_collected(stats: dict[str, LayerStats], channels: Callable[[list[Moments | None]], list[int]], batches: int,
                     num_batches: int | None, failure: BaseException | None) -> Collected:
    """End a collection pass on every rank: re-raise a failure (any rank's), fold each layer's moments, merge
    them and the call/batch counts across ranks (``channels(local moments)`` gives each layer's channel
    count, needed where a rank saw nothing), and check that some batch came."""
    if distributed.any_rank_failed(failure is not None):
        if failure is not None:
            raise failure
        raise RewriteError("another rank failed while collecting BN statistics; see that rank's error")
    local = [_fold(s) for s in stats.values()]
    merged = distributed.gather_moments(local, channels(local))
    counts = distributed.sum_across_ranks([batches] + [v for s in stats.values() for v in (s.calls, s.batches)])
    _, size = distributed.world()
    total_batches = int(counts[0])
    for i, (s, moments) in enumerate(zip(stats.values(), merged)):
        s.moments = moments
        s.calls, s.batches = int(counts[1 + 2 * i]), int(counts[2 + 2 * i])
    if total_batches == 0:
        raise InputDataError("data yielded no batches: give at least one batch (check the loader, the file, num_batches)")
    if num_batches and batches < num_batches:
        log.warning("data ran out after %d batch(es); num_batches=%d asked for more", batches, num_batches)
    return Collected(stats, total_batches, size, num_batches or None)

