"""What ``fuse`` leaves behind in torch eager: the fused model vs the no-BN bound, interleaved in one run.

Contenders, per zoo model (torch eager CPU, batch 1 by default):
- ``original``: the zoo model;
- ``fused``: ``normfx.rewrite(model, "fuse")``;
- ``bound``: the original with every BN call deleted (a BN+activation module replaced by its activation), a bias
  on every conv/linear (as folded ones have), traced, and every Identity / Dropout-in-eval call deleted — not
  equivalent; what zero BN calls and zero wrapper calls cost. The target is ``fused / bound`` ≈ 1.

Prints a summary and writes JSON to ``out/benchmarks/leftovers.json`` (``--out benchmarks/results`` for the committed file).

    python benchmarks/bench_leftovers.py [--models efficientnet_b0,trap_bn_act] [--runs 200] [--batch 1] [--size 160]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
from _results import add_out_argument, ratio_summary, report, result_path
from torch import fx, nn

import normfx
from normfx import models
from normfx.layers import is_batchnorm

# What this benchmark measures: a change to any of these paths makes benchmarks/results/leftovers.json stale.
MEASURES = ["benchmarks/bench_leftovers.py", "normfx/passes/fx", "normfx/fold.py", "normfx/affine.py",
            "normfx/layers", "normfx/models"]


def _no_bn(model: nn.Module) -> nn.Module:
    """The original with its BN calls deleted and a (zero) bias on every conv/linear without one — the work a
    complete fold leaves: folded convs carry the BN shift as their bias."""
    bound = copy.deepcopy(model)
    for name, module in list(bound.named_modules()):
        if name and is_batchnorm(module):
            children = [child for _, child in module.named_children()]
            bound.set_submodule(name, children[0] if len(children) == 1 else nn.Identity())
        elif isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and module.bias is None:
            channels = module.out_channels if isinstance(module, nn.modules.conv._ConvNd) else module.out_features
            module.bias = nn.Parameter(torch.zeros(channels))
    gm = fx.symbolic_trace(bound)
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            target = gm.get_submodule(node.target)
            if type(target) is nn.Identity or (isinstance(target, nn.modules.dropout._DropoutNd) and not target.training):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
    gm.recompile()
    return gm


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(name: str, runs: int, batch: int, size: int | None) -> dict:
    model = models.create(name)
    x = models.example_input(name, batch=batch)
    if size:
        x = torch.randn(batch, x.shape[1], size, size, generator=torch.Generator().manual_seed(0))
    contenders = {"original": model, "fused": normfx.rewrite(model, "fuse"), "bound": _no_bn(model)}
    samples: dict[str, list[float]] = {k: [] for k in contenders}
    with torch.no_grad():
        for module in contenders.values():
            for _ in range(5):
                module(x)
        for i in range(runs):
            for label in (list(contenders) if i % 2 == 0 else list(reversed(contenders))):
                samples[label].append(_timed(lambda: contenders[label](x)))
    ms = {k: 1e3 * statistics.median(v) for k, v in samples.items()}
    return {"model": name, "batch": batch, "input": list(x.shape), **{f"{k}_ms": v for k, v in ms.items()},
            "fused_over_bound": ms["fused"] / ms["bound"], "fused_over_original": ms["fused"] / ms["original"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="efficientnet_b0,trap_bn_act")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=0, help="square input size (0: the zoo's input shape)")
    add_out_argument(parser, "leftovers.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [bench(name, args.runs, args.batch, args.size or None) for name in args.models.split(",")]
    for row in rows:
        print(f"{row['model']:<18} fused {row['fused_ms']:.3f} ms  bound {row['bound_ms']:.3f} ms  "
              f"original {row['original_ms']:.3f} ms  fused/bound {row['fused_over_bound']:.3f}")
    report({"torch_threads": 1, **ratio_summary(rows, "fused_over_bound", "fused_over_original")}, rows,
           result_path(args.out, "leftovers.json"), measures=MEASURES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
