"""The one code path behind ``rewrite`` and ``explain``: copy the model, run each policy step's pass
over the layers it targets, collect the report, enforce ``strict``."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .errors import ModelError, PolicyError, RewriteError
from .gc_pause import paused_gc
from .input_checks import check_lazy_modules
from .layers import is_batchnorm
from .policy import Policy, Step, parse_policy, policy_names
from .report import KEPT, Report

__all__ = ["PassContext", "rewrite", "rewrite_with_report", "explain"]

log = logging.getLogger(__name__)


@dataclass
class PassContext:
    """What a pass receives besides the model: its step, which layers it targets, where to report."""

    step: Step
    policy: Policy
    report: Report
    example_inputs: tuple | None = None
    data: Any = None
    dry_run: bool = False  # explain(): the model is still a private copy; skip only costly work (measuring data)
    extras: dict[str, Any] = field(default_factory=dict)
    owns_model: bool = True  # False: the model is the caller's; the pass must not mutate it (copies_input)
    feed: Any = None  # feed(model, batch): how passes that run data feed a batch (default model(batch))

    def targets(self, layer_name: str) -> bool:
        """True when the policy assigns this step to the layer (first matching glob wins)."""
        return self.policy.targets(self.step, layer_name)

    def option(self, key: str) -> Any:
        return self.step.option(key)

    @property
    def rule(self) -> str:
        return self.step.name


def _normalize_inputs(example_inputs: Any) -> tuple | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if isinstance(example_inputs, tuple):
        return example_inputs
    raise ModelError(
        f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}"
    )


def _is_onnx(model: Any) -> bool:
    try:
        import onnx
    except ImportError:  # pragma: no cover - onnx is a dependency
        return False
    import os

    return isinstance(model, (onnx.ModelProto, str, os.PathLike))


def _batchnorm_names(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if is_batchnorm(m)]


def _data_per_step(data: Any, parsed: Policy, report: Report) -> Callable[[Step], Any]:
    """Which data each step gets: ``data`` itself, or — when ``data`` maps step names to data
    (``{"unfuse": source_batches, "adaptive": target_batches}``) — the step's own entry (None if absent)."""
    steps = parsed.ordered_steps()
    names = [s.name for s in steps]
    per_step = isinstance(data, Mapping) and bool(data) and all(isinstance(k, str) for k in data) \
        and bool(set(data) & set(policy_names()))
    if per_step:
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise PolicyError(f"data is given for step(s) {', '.join(unknown)} that the policy {parsed} does not have; "
                              f"its steps: {', '.join(names)}")
        idle = [s.name for s in steps if s.name in data and not s.spec.takes_data]
        if idle:
            raise PolicyError(f"data is given for step {idle[0]!r}, which takes no data; the steps that do: "
                              f"{', '.join(s.name for s in steps if s.spec.takes_data) or 'none'}")
        missing = [s.name for s in steps if s.spec.needs_data and data.get(s.name) is None]
        if missing:
            raise PolicyError(f"step {missing[0]!r} needs data but the per-step data has no {missing[0]!r} entry "
                              f"(CLI: --data {missing[0]}=FILE)")
        chosen = {name: data.get(name) for name in names}
    else:
        chosen = {name: data for name in names}
    _warn_same_data(steps, chosen, report)
    return lambda step: chosen[step.name]


def _warn_same_data(steps: list[Step], chosen: dict[str, Any], report: Report) -> None:
    """A step that recomputes statistics on the very data an earlier step calibrated on changes next to nothing."""
    for i, first in enumerate(steps):
        if not first.spec.calibrates_on_data or chosen[first.name] is None:
            continue
        for later in steps[i + 1:]:
            if later.spec.recomputes_statistics and chosen[later.name] is chosen[first.name]:
                note = (f"{later.name} after {first.name} on the same data recomputes the statistics {first.name} just "
                        f"measured (up to batch-to-batch noise): the model hardly changes; calibrate {first.name} on "
                        f"source-domain data instead: data={{'{first.name}': source_batches, '{later.name}': "
                        f"target_batches}} (CLI: --data {first.name}=SOURCE --data {later.name}=TARGET)")
                log.warning(note)
                report.note(note)
                return


def _run(model: Any, policy: Any, *, example_inputs: Any, data: Any, options: dict, dry_run: bool, feed: Any = None):
    parsed = parse_policy(policy, options)
    report = Report(policy=str(parsed), model=type(model).__name__)
    data_for = _data_per_step(data, parsed, report)
    if _is_onnx(model):
        from .passes.onnx.io import load_model_proto, onnx_batchnorm_names

        work = load_model_proto(model)
        kind, layer_names = "onnx", onnx_batchnorm_names(work)
    elif isinstance(model, torch.jit.ScriptModule):
        raise ModelError("TorchScript modules cannot be rewritten: pass the eager nn.Module (before torch.jit.script/trace)")
    elif isinstance(model, torch.nn.Module):
        check_lazy_modules(model)  # a never-run LazyBatchNorm/LazyConv has no parameters to rewrite or copy
        work = model  # copied below, unless the first pass makes its own private model (copies_input)
        kind, layer_names = "torch", _batchnorm_names(model)
    else:
        raise ModelError(
            f"cannot rewrite a {type(model).__name__}: pass a torch.nn.Module, an onnx.ModelProto or a path to a .onnx file"
        )
    inputs = _normalize_inputs(example_inputs)
    owned = kind == "onnx"
    for step in parsed.ordered_steps():
        spec = step.spec
        run_pass = spec.torch_pass if kind == "torch" else spec.onnx_pass
        if run_pass is None:
            other = "ONNX" if kind == "torch" else "torch"
            raise PolicyError(f"policy {step.name!r} works on {other} models only; it cannot rewrite a {kind} model")
        if not owned and not spec.copies_input:
            work, owned = copy.deepcopy(work), True
        ctx = PassContext(step, parsed, report, inputs, data_for(step), dry_run, dict(options), owns_model=owned,
                          feed=feed)
        log.debug("running step %s (dry_run=%s)", step, dry_run)
        # a graph pass runs with the collector paused (gc_pause.py); a pass over data may run for long: not paused
        with nullcontext() if spec.takes_data and ctx.data is not None else paused_gc():
            result = run_pass(work, ctx)
        if result is not None:
            work = result
        owned = True
    if not owned:
        work = copy.deepcopy(work)
    seen = report.names()
    for name in layer_names:
        if name not in seen:
            steps = parsed.steps_for(name)
            reason = "no policy step matches this layer" if not steps else "no rule of the policy applies to this layer kind"
            report.add(name, "none", KEPT, reason)
    return work, report


def rewrite_with_report(
    model: Any,
    policy: Any,
    *,
    example_inputs: Any = None,
    data: Any = None,
    strict: bool = False,
    feed: Any = None,
    **options: Any,
) -> tuple[Any, Report]:
    """Like :func:`rewrite`, and also return the :class:`~normfx.report.Report`."""
    result, report = _run(model, policy, example_inputs=example_inputs, data=data, options=options, dry_run=False,
                          feed=feed)
    if strict and report.skipped:
        listing = "; ".join(f"{e.name} ({e.rule}: {e.reason})" for e in report.skipped)
        raise RewriteError(f"strict=True and {len(report.skipped)} layer(s) were skipped: {listing}")
    return result, report


def rewrite(
    model: Any,
    policy: Any,
    *,
    example_inputs: Any = None,
    data: Any = None,
    strict: bool = False,
    feed: Any = None,
    **options: Any,
) -> Any:
    """Return a new model with its normalization layers rewritten by ``policy``.

    ``model`` is a ``torch.nn.Module`` (the result is a new module, usually a ``torch.fx.GraphModule``
    or the module with layers swapped; nothing is shared with the input) or an ONNX model
    (``onnx.ModelProto`` or a path; the result is a new ``ModelProto``). ``policy`` is a step
    (``"fuse"``, ``"frozen"``, ``"name:key=value"``), a list of steps, or a mapping of module-name
    globs to steps (first match wins). ``example_inputs`` fixes shapes where a rule needs them,
    ``data`` feeds rules that measure statistics (``feed(model, batch)`` says how a batch is fed;
    ``recompute_stats`` calls it ``forward``); a mapping from step names to data gives each step its own
    (``data={"unfuse": source_batches, "adaptive": target_batches}``),
    ``strict=True`` raises
    :class:`~normfx.errors.RewriteError` when any targeted layer is skipped, and keyword ``options``
    fill in step options. :func:`explain` tells what this call would do.
    """
    result, _ = rewrite_with_report(
        model, policy, example_inputs=example_inputs, data=data, strict=strict, feed=feed, **options
    )
    return result


def explain(model: Any, policy: Any, *, example_inputs: Any = None, data: Any = None, feed: Any = None,
            **options: Any) -> Report:
    """Report, for every normalization layer, the rule the policy gives it and whether it would apply.

    Runs the same matching code as :func:`rewrite` (on a private copy) without applying anything
    costly; the caller's model is untouched.
    """
    _, report = _run(model, policy, example_inputs=example_inputs, data=data, options=options, dry_run=True,
                     feed=feed)
    return report
