"""``normfx.export``: rewrite a torch model (fx route), export it with torch.onnx, rewrite the ONNX graph
(ONNX route), verify it in onnxruntime against the torch model, and write the file atomically."""

from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .engine import _normalize_inputs, rewrite_with_report
from .errors import ModelError, PolicyError, VerificationError
from .io_utils import atomic_write_bytes, check_output_path
from .noise import Baseline, measure_baseline, relative_errors
from .policy import Policy, parse_policy
from .report import Report
from .verify import VerifyResult, compare, judge, load_inputs

__all__ = ["ExportResult", "export", "export_onnx", "DEFAULT_OPSET"]

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17


@dataclass
class ExportResult:
    """What ``export`` did: the reports of both routes, the verification, and the written model."""

    path: str | None
    model: Any  # onnx.ModelProto
    torch_report: Report | None
    onnx_report: Report
    verification: VerifyResult
    extra_checks: list[VerifyResult] = field(default_factory=list)

    @property
    def batchnorm_left(self) -> int:
        return sum(1 for node in self.model.graph.node if node.op_type == "BatchNormalization")

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "batchnorm_left": self.batchnorm_left,
            "torch_report": self.torch_report.to_dict() if self.torch_report else None,
            "onnx_report": self.onnx_report.to_dict(),
            "verification": self.verification.to_dict(),
        }


def _io_names(count: int, prefix: str) -> list[str]:
    return [prefix] if count == 1 else [f"{prefix}_{i}" for i in range(count)]


def export_onnx(model: torch.nn.Module, example_inputs: Sequence[torch.Tensor], *, opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = True):
    """Export a torch module to an ``onnx.ModelProto`` with the TorchScript exporter, constant folding off:
    normfx folds BN itself and must not depend on the exporter doing it."""
    import onnx

    inputs = tuple(example_inputs)
    with torch.no_grad():
        outputs = model(*inputs)
    from .verify import flatten_outputs

    input_names = _io_names(len(inputs), "input")
    output_names = _io_names(len(flatten_outputs(outputs)), "output")
    dynamic_axes = {name: {0: "batch"} for name in input_names + output_names} if dynamic_batch else None
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, inputs, buffer, dynamo=False, opset_version=opset, do_constant_folding=False,
                input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
            )
    except Exception as exc:  # the exporter raises many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"torch.onnx.export failed: {first}") from exc
    return onnx.load_from_string(buffer.getvalue())


def _onnx_policy(policy: Any, after_torch: bool):
    """The steps of ``policy`` that have an ONNX pass (after the torch route: those that run again on the
    exported graph for what fx left, see ``PolicySpec.rerun_on_export``)."""
    parsed = parse_policy(policy)

    def runs(step) -> bool:
        return step.spec.onnx_pass is not None and (step.spec.rerun_on_export or not after_torch)

    if not any(runs(step) for step in parsed.ordered_steps()):
        return None
    rules = tuple((glob, tuple(s for s in steps if runs(s))) for glob, steps in parsed.rules)
    return type(parsed)(tuple((glob, steps) for glob, steps in rules if steps))


def _rewrite_with_reference(model: torch.nn.Module, policy: Any, inputs: tuple, strict: bool):
    """``(reference, rewritten, report)``: the steps up to the last one that changes the function on purpose
    (``proxynorm``, ``precise``, ...) give the reference the export is proven against, the exact steps after
    them (``fuse``) give the model exported. An all-exact policy is proven against the original itself."""
    parsed = parse_policy(policy)
    steps = parsed.ordered_steps()
    last = max((i for i, step in enumerate(steps) if not step.spec.exact), default=-1)
    if last < 0:
        rewritten, report = rewrite_with_report(model, parsed, example_inputs=inputs, strict=strict)
        return model, rewritten, report
    changing = set(steps[: last + 1])

    def part(keep) -> Policy:
        return Policy(tuple((glob, tuple(s for s in rule if keep(s))) for glob, rule in parsed.rules))

    reference, report = rewrite_with_report(model, part(lambda s: s in changing), example_inputs=inputs, strict=strict)
    reference.eval()
    rest = part(lambda s: s not in changing)
    if not rest.ordered_steps():
        return reference, reference, report
    rewritten, rest_report = rewrite_with_report(reference, rest, example_inputs=inputs, strict=strict)
    report.extend(rest_report)
    report.policy = str(parsed)
    return reference, rewritten, report


def export(
    model: Any,
    example_inputs: Any,
    path: str | os.PathLike | None,
    *,
    policy: Any = "fuse",
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    rtol: float | None = None,
    atol: float = 0.0,
    strict: bool = False,
    check_inputs: Any = None,
) -> ExportResult:
    """Rewrite, export to ONNX, rewrite the graph, verify in onnxruntime, then write ``path`` atomically.

    ``model`` is a ``torch.nn.Module`` (fx route, then torch.onnx export, then ONNX route) or an ONNX
    model/path (ONNX route only, verified ORT against ORT). Verification runs on ``example_inputs``
    and, for a dynamic batch, also at another batch size; a failed verification raises
    :class:`~normfx.errors.VerificationError` and writes nothing. ``path=None`` writes nothing.

    Verification (``rtol=None``, the default) compares the ONNX model with a float64 run of the reference
    (a float64 copy of the torch model; for an ONNX input, its graph cast to float64 in onnx's reference
    evaluator) and accepts an error up to ``max(1e-5, 2 x the reference's own float32 error,
    1.5 x the error of a plain torch.onnx export of the reference in onnxruntime)``; the last term is
    measured only when the first two do not suffice. Each check reports its error, the floors and the
    tolerance (:class:`~normfx.verify.VerifyResult`). An explicit ``rtol`` is exactly that tolerance
    against the reference's float32 outputs.
    """
    from .input_checks import check_export_arguments
    from .verify import as_runner

    check_export_arguments(model, example_inputs, opset)  # opset, never-run lazy modules, inputs that do not fit
    target = os.fspath(path) if path is not None else None
    if target is not None:
        sources = [os.fspath(model)] if isinstance(model, (str, os.PathLike)) else []
        check_output_path(target, protect=sources)
    torch_report = None
    if isinstance(model, torch.nn.Module):
        training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
        if training:
            raise ModelError(f"the model is in training mode ({training[0]}, ...): call model.eval() before exporting it for inference")
        inputs = _normalize_inputs(example_inputs)
        if inputs is None:
            raise ModelError("export needs example_inputs for a torch model")
        reference_model, rewritten, torch_report = _rewrite_with_reference(model, policy, inputs, strict)
        rewritten.eval()
        exported = export_onnx(rewritten, inputs, opset=opset, dynamic_batch=dynamic_batch)
        reference = as_runner(reference_model)[0]
    else:
        from .passes.onnx.io import load_model_proto

        torch_only = [s.name for s in parse_policy(policy).ordered_steps() if s.spec.onnx_pass is None]
        if torch_only:
            raise PolicyError(f"policy {', '.join(torch_only)} works on torch models only, not on an ONNX graph")
        exported = load_model_proto(model)
        inputs = example_inputs
        reference = as_runner(exported)[0]
    onnx_policy = _onnx_policy(policy, after_torch=isinstance(model, torch.nn.Module))
    if onnx_policy is not None:
        final, onnx_report = rewrite_with_report(exported, onnx_policy, strict=strict)
    else:
        final, onnx_report = exported, Report(policy="(no ONNX step)", model="onnx")
    arrays = _inputs_for(final, inputs)
    candidate, names = as_runner(final)
    if isinstance(model, torch.nn.Module):
        source = reference_model
        plain = _PlainExport(lambda: export_onnx(source, inputs, opset=opset, dynamic_batch=dynamic_batch))
    else:
        source, plain = exported, None
    check = _Judge(source, reference, candidate, names, rtol=rtol, atol=atol, plain_export=plain)
    verification = check(arrays)
    extra = []
    if dynamic_batch and isinstance(model, torch.nn.Module):
        extra.append(check(_one_more_sample(arrays)))
    if check_inputs is not None:
        extra.append(check(load_inputs(check_inputs)))
    failed = [v for v in [verification, *extra] if not v.ok]
    result = ExportResult(target, final, torch_report, onnx_report, verification, extra)
    if failed:
        raise VerificationError(f"the exported model is not equivalent to the original: {failed[0]}; nothing was written")
    if target is not None:
        atomic_write_bytes(target, final.SerializeToString(), protect=[os.fspath(model)] if isinstance(model, (str, os.PathLike)) else [])
        log.info("wrote %s", target)
    return result


class _PlainExport:
    """The reference exported as torch.onnx gives it (BN kept), built on first use: its own error in
    onnxruntime against float64 is the floor of deploying without normfx."""

    def __init__(self, build: Callable[[], Any]) -> None:
        self._build, self._runner = build, None

    def floors(self, baseline: Baseline, arrays: Any) -> list[float] | None:
        from .verify import as_runner

        try:
            if self._runner is None:
                self._runner = as_runner(self._build())[0]
            return relative_errors(baseline.outputs, self._runner(arrays))
        except Exception as exc:  # the plain export is a second opinion only: without it, k x floor decides
            log.info("no plain-export floor: %s: %s", type(exc).__name__, exc)
            return None


class _Judge:
    """Runs the reference and the exported model on one set of inputs and judges them (see ``export``)."""

    def __init__(self, source: Any, reference: Callable, candidate: Callable, names: Any, *, rtol: float | None,
                 atol: float, plain_export: _PlainExport | None) -> None:
        self.source, self.reference, self.candidate, self.names = source, reference, candidate, names
        self.rtol, self.atol, self.plain_export = rtol, atol, plain_export

    def __call__(self, arrays: Any) -> VerifyResult:
        ref_out, cand_out = self.reference(arrays), self.candidate(arrays)
        if self.rtol is not None:
            return compare(ref_out, cand_out, rtol=self.rtol, atol=self.atol, names=self.names)
        compare(ref_out, cand_out, rtol=0.0, atol=0.0, names=self.names)  # output count and shapes first
        baseline = measure_baseline(self.source, self.reference, arrays, ref_out)
        result = judge(baseline, cand_out, atol=self.atol, names=self.names)
        if not result.ok and self.plain_export is not None and baseline.versus == "float64":
            floors = self.plain_export.floors(baseline, arrays)
            if floors is not None:
                result = judge(baseline, cand_out, atol=self.atol, names=self.names, plain_export_floors=floors)
        return result


def _one_more_sample(arrays: Any) -> Any:
    """The same inputs with their first sample repeated once more: another batch size to check."""
    if isinstance(arrays, dict):
        return {k: np.concatenate([a, a[:1]], axis=0) for k, a in arrays.items()}
    return [np.concatenate([a, a[:1]], axis=0) for a in arrays]


def _inputs_for(model_proto: Any, inputs: Any) -> Any:
    if inputs is not None:
        return load_inputs(inputs)
    from .runtime import random_inputs

    return random_inputs(model_proto)
