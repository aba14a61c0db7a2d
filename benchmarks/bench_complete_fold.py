"""Leave no BatchNorm behind: normfx ``fuse`` against the bound of a complete fold, interleaved in one run.

For each model and batch size (1 and 8), three variants timed side by side, run by run:
  (a) the original — for ORT exported plainly (torch.onnx, every BatchNormalization kept; ORT optimizes it);
  (b) normfx's deployed model — ``normfx.export(model, x, None, policy="fuse")`` for ORT, ``normfx.rewrite(model,
      "fuse")`` for torch eager;
  (c) the bound — multi-branch models (zoo tag ``multi_branch``): a hand-written reference reparameterization
      (the RepVGG paper's formulas, in this file, independent of ``normfx.merge``); pre-activation models
      (``preact_resnet``, ``densenet`` and, when the zoo has them, ``dualpath``, ``mixconv``): the original with
      every BN deleted (not equivalent: what zero BN ops would cost).
ORT CPU runs with its optimizations fully on (ORT_ENABLE_ALL); torch eager on the CPU. Ratios of medians:
(b)/(c) (target <= 1.02) and (b)/(a), summarized over all rows and apart for the models folded to zero BN ops and
those keeping BNs (``bn_left``: each kept with its reason, which the inexact "BN deleted" bound simply drops).

Pass-time linearity: ``fuse`` on a RepVGG-like model and on one 10× deeper, torch.fx route and ONNX route
(medians of interleaved repetitions); the ratio of times (target <= 12×) next to the ratio of graph sizes.

    python benchmarks/bench_complete_fold.py [--quick] [--models repvgg,preact_resnet] [--runs 100] [--threads 1]
                                             [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from _results import add_out_argument, ratio_summary, report, result_path
from torch import nn

import normfx
from normfx import models
from normfx.export import export_onnx
from normfx.models.reparam import MobileOneBlock, RepVGG, RepVGGBlock
from normfx.runtime import make_session, time_sessions

PREACT = ("preact_resnet", "densenet", "dualpath", "mixconv")

# What this benchmark measures: a change to any of these paths makes benchmarks/results/complete_fold.json stale.
MEASURES = ["benchmarks/bench_complete_fold.py", "normfx/passes", "normfx/fold.py", "normfx/merge.py",
            "normfx/preact.py", "normfx/slices.py", "normfx/affine.py", "normfx/export.py", "normfx/runtime.py",
            "normfx/models"]


# ---- (c) for multi-branch models: the RepVGG paper's reparameterization, written out by hand ------------------


def _fuse_conv_bn(weight: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """RepVGG eq. (3): W' = (γ/σ) W, b' = β − μγ/σ, in float64."""
    std = (bn.running_var.double() + bn.eps).sqrt()
    t = bn.weight.double() / std
    return weight.double() * t.reshape(-1, 1, 1, 1), bn.bias.double() - bn.running_mean.double() * t


def _identity_weight(channels: int, groups: int, kernel: int) -> torch.Tensor:
    """The identity as a kernel×kernel conv: a 1 at the centre tap of input channel c (within its group)."""
    per_group = channels // groups
    w = torch.zeros(channels, per_group, kernel, kernel, dtype=torch.float64)
    for c in range(channels):
        w[c, c % per_group, kernel // 2, kernel // 2] = 1.0
    return w


def _branch(seq: nn.Sequential, kernel: int) -> tuple[torch.Tensor, torch.Tensor]:
    conv, bn = seq[0], seq[1]
    w, b = _fuse_conv_bn(conv.weight, bn)
    pad = (kernel - conv.kernel_size[0]) // 2
    return F.pad(w, [pad] * 4), b


class _Deployed(nn.Module):
    def __init__(self, conv: nn.Conv2d, act: nn.Module) -> None:
        super().__init__()
        self.conv, self.act = conv, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


def _reparameterize_block(block: nn.Module) -> nn.Module:
    branches = list(block.conv_kxk) if isinstance(block, MobileOneBlock) else [block.conv_kxk]
    scale = block.conv_scale if isinstance(block, MobileOneBlock) else block.conv_1x1
    first = branches[0][0]
    kernel, groups = first.kernel_size[0], first.groups
    parts = [_branch(seq, kernel) for seq in branches]
    if scale is not None:
        parts.append(_branch(scale, kernel))
    if block.identity is not None:
        parts.append(_fuse_conv_bn(_identity_weight(first.in_channels, groups, kernel), block.identity))
    conv = nn.Conv2d(first.in_channels, first.out_channels, kernel, first.stride, kernel // 2, groups=groups)
    with torch.no_grad():
        conv.weight.copy_(sum(w for w, _ in parts))
        conv.bias.copy_(sum(b for _, b in parts))
    return _Deployed(conv, block.act)


def reference_reparameterization(model: nn.Module) -> nn.Module:
    """A deployed copy of a zoo multi-branch model: every RepVGG/MobileOne block is one conv + its ReLU."""
    deployed = copy.deepcopy(model)
    for name, module in list(deployed.named_modules()):
        if isinstance(module, (RepVGGBlock, MobileOneBlock)):
            deployed.set_submodule(name, _reparameterize_block(module))
    return deployed.eval()


# ---- (c) for pre-activation models: every BN deleted ----------------------------------------------------------


def without_bn(model: nn.Module) -> nn.Module:
    stripped = copy.deepcopy(model)
    for name, module in list(stripped.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            stripped.set_submodule(name, nn.Identity())
    return stripped.eval()


# ---- measurements ---------------------------------------------------------------------------------------------


def rel_error(reference: torch.Tensor, candidate) -> float:
    candidate = torch.as_tensor(candidate).double()
    return float((reference.double() - candidate).abs().max() / reference.double().abs().max())


def time_eager(variants: dict[str, nn.Module], x: torch.Tensor, runs: int, warmup: int = 3) -> dict[str, float]:
    """Median ms per forward, interleaved run by run (order alternating)."""
    samples: dict[str, list[float]] = {k: [] for k in variants}
    labels = list(variants)
    with torch.no_grad():
        for _ in range(warmup):
            for m in variants.values():
                m(x)
        for i in range(runs):
            for label in labels if i % 2 == 0 else reversed(labels):
                start = time.perf_counter()
                variants[label](x)
                samples[label].append((time.perf_counter() - start) * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def bench_model(name: str, args) -> list[dict]:
    model = models.create(name)
    multi = "multi_branch" in models.info(name).tags
    bound = reference_reparameterization(model) if multi else without_bn(model)
    x1 = models.example_input(name, batch=1)
    fx_model = normfx.rewrite(model, "fuse", example_inputs=x1)
    deployed = normfx.export(model, x1, None, policy="fuse")
    onnx = {"a": export_onnx(model, (x1,)), "b": deployed.model, "c": export_onnx(bound, (x1,))}
    sessions = {k: make_session(v, optimization="all", threads=args.threads) for k, v in onnx.items()}
    rows = []
    for batch in args.batches:
        x = models.example_input(name, batch=batch, seed=1)
        with torch.no_grad():
            y = model(x)
            bound_error = rel_error(y, bound(x))
        ort = time_sessions(sessions, [x.numpy()], runs=args.runs, warmup=5)
        eager = time_eager({"a": model, "b": fx_model, "c": bound}, x, args.eager_runs)
        b_out = sessions["b"].run(None, {sessions["b"].get_inputs()[0].name: x.numpy()})[0]
        row = {
            "model": name, "batch": batch, "bound": "reference reparameterization" if multi else "BN deleted",
            "ort_ms": {k: t.median_ms for k, t in ort.items()}, "eager_ms": eager,
            "ort_b_over_c": ort["b"].median_ms / ort["c"].median_ms,
            "ort_b_over_a": ort["b"].median_ms / ort["a"].median_ms,
            "eager_b_over_c": eager["b"] / eager["c"], "eager_b_over_a": eager["b"] / eager["a"],
            "normfx_rel_error": rel_error(y, b_out),
            "bound_rel_error": bound_error,  # ~0 for the reference reparameterization; large for "BN deleted"
            # BNs normfx keeps (each with its reason): the bound, which deletes them, cannot be reached exactly
            "bn_left": sum(1 for n in deployed.model.graph.node if n.op_type == "BatchNormalization"),
            "ops": {k: {op: sum(1 for n in v.graph.node if n.op_type == op) for op in ("Conv", "BatchNormalization",
                                                                                      "Add", "Mul")}
                    for k, v in onnx.items()},
        }
        rows.append(row)
        print(f"{name:>14} b{batch}: ORT (b)/(c) {row['ort_b_over_c']:.3f} (b)/(a) {row['ort_b_over_a']:.3f} | "
              f"eager (b)/(c) {row['eager_b_over_c']:.3f} (b)/(a) {row['eager_b_over_a']:.3f} | "
              f"err {row['normfx_rel_error']:.1e}", file=sys.stderr)
    return rows


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def pass_time_linearity(args) -> dict:
    """fuse on a RepVGG-like model and on one 10× deeper (torch.fx and ONNX routes)."""
    depth = args.linear_depth
    shallow = RepVGG(widths=(8, 8, 8, 8), depths=(depth,) * 4).eval()
    deep = RepVGG(widths=(8, 8, 8, 8), depths=(10 * depth,) * 4).eval()
    x = torch.randn(1, 3, 32, 32)
    for m in (shallow, deep):
        models.randomize_batchnorm(m, 0)
    protos = {"shallow": export_onnx(shallow, (x,)), "deep": export_onnx(deep, (x,))}
    torch_models = {"shallow": shallow, "deep": deep}
    times: dict[str, dict[str, list[float]]] = {"fx": {"shallow": [], "deep": []}, "onnx": {"shallow": [], "deep": []}}
    normfx.rewrite(shallow, "fuse", example_inputs=x)  # warm-up: imports and first-call costs are not pass time
    normfx.rewrite(protos["shallow"], "fuse")
    for i in range(args.repeats):
        for size in ("shallow", "deep") if i % 2 == 0 else ("deep", "shallow"):
            times["fx"][size].append(_median_time(
                lambda: normfx.rewrite(torch_models[size], "fuse", example_inputs=x), 1))
            times["onnx"][size].append(_median_time(lambda: normfx.rewrite(protos[size], "fuse"), 1))
    nodes = {k: len(v.graph.node) for k, v in protos.items()}
    out = {"blocks": {"shallow": 1 + 4 * depth, "deep": 1 + 40 * depth},
           "onnx_nodes": nodes, "size_ratio": nodes["deep"] / nodes["shallow"]}
    for route in ("fx", "onnx"):
        med = {k: statistics.median(v) for k, v in times[route].items()}
        out[f"{route}_pass_s"] = med
        out[f"{route}_time_ratio"] = med["deep"] / med["shallow"]
    print(f"pass time 10× deeper: fx {out['fx_time_ratio']:.2f}×, onnx {out['onnx_time_ratio']:.2f}× "
          f"(graph {out['size_ratio']:.2f}× larger)", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma-separated zoo names (default: multi-branch + pre-activation)")
    parser.add_argument("--runs", type=int, default=300, help="ORT timed runs per variant")
    parser.add_argument("--eager-runs", type=int, default=100, help="torch eager timed runs per variant")
    parser.add_argument("--repeats", type=int, default=15, help="repetitions of each pass-time measurement")
    parser.add_argument("--linear-depth", type=int, default=2, help="blocks per stage of the shallow model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 models, batch 1, few runs")
    add_out_argument(parser, "complete_fold.json")
    args = parser.parse_args(argv)
    names = [n for n in models.names() if "multi_branch" in models.info(n).tags] + [n for n in PREACT
                                                                                  if n in models.names()]
    if args.models:
        names = [n.strip() for n in args.models.split(",") if n.strip()]
    args.batches = [1, 8]
    if args.quick:
        names = names if args.models else ["repvgg", "preact_resnet"]
        args.batches, args.runs, args.eager_runs, args.repeats, args.linear_depth = [1], 5, 3, 1, 1
    torch.set_num_threads(args.threads)
    rows = [row for name in names for row in bench_model(name, args)]
    summary = {
        "models": names, "batches": args.batches, "threads": args.threads, "runs": args.runs,
        **ratio_summary(rows, "ort_b_over_c", "ort_b_over_a", "eager_b_over_c", "eager_b_over_a", "normfx_rel_error"),
        "folded_to_zero_bn": ratio_summary([r for r in rows if r["bn_left"] == 0], "ort_b_over_c", "eager_b_over_c"),
        "keeping_bn": ratio_summary([r for r in rows if r["bn_left"] > 0], "ort_b_over_c", "eager_b_over_c"),
        "pass_time": pass_time_linearity(args),
    }
    report(summary, rows, result_path(args.out, "complete_fold.json"), measures=MEASURES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
