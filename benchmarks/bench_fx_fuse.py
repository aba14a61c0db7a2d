"""normfx ``fuse`` vs ``torch.fx.experimental.optimization.fuse`` on the zoo, side by side in one run.

normfx gets a batch-1 example input (as ``normfx export`` passes it): it proves Linear inputs 2-D.

For each model: BN calls folded by each, max relative error of each against the original, pass time
(median over interleaved repetitions) and torch eager CPU latency of both fused models (interleaved),
as ratios normfx / fx fuse. Prints a table and writes JSON to ``out/benchmarks/`` (``--out benchmarks/results`` updates the committed file).

    python benchmarks/bench_fx_fuse.py [--models resnet18,unet] [--repeats 7] [--runs 30] [--out out/benchmarks|benchmarks/results]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from _results import add_out_argument, ratio_summary, report, result_path
from torch import fx
from torch.fx.experimental.optimization import fuse as fx_fuse

import normfx
from normfx import models
from normfx.inspect import batchnorm_calls


def rel_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    return float((reference.double() - candidate.double()).abs().max() / reference.double().abs().max())


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_model(name: str, repeats: int, runs: int, batch: int) -> dict:
    model = models.create(name)
    x = models.example_input(name, batch=batch)
    probe = models.example_input(name, batch=1)  # what normfx export passes: shapes, not a workload
    with torch.no_grad():
        y = model(x)
    original = batchnorm_calls(fx.symbolic_trace(model)) if "traceable" in models.info(name).tags else batchnorm_calls(model)
    row: dict = {"model": name, "bn_calls": original}
    # pass time, interleaved
    times = {"normfx": [], "fx_fuse": []}
    fused = {}
    for i in range(repeats):
        order = ["normfx", "fx_fuse"] if i % 2 == 0 else ["fx_fuse", "normfx"]
        for label in order:
            if label == "normfx":
                times[label].append(timed(lambda: fused.__setitem__(label, normfx.rewrite(model, "fuse", example_inputs=probe))))
            else:
                try:
                    times[label].append(timed(lambda: fused.__setitem__(label, fx_fuse(model))))
                except Exception as exc:  # fx fuse cannot trace some models at all
                    fused[label] = None
                    row["fx_fuse_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    for label, model_fused in fused.items():
        if model_fused is None:
            row[f"{label}_folded"] = 0
            continue
        with torch.no_grad():
            row[f"{label}_rel_error"] = rel_error(y, model_fused(x))
        row[f"{label}_folded"] = original - batchnorm_calls(model_fused)
        row[f"{label}_pass_ms"] = 1e3 * statistics.median(times[label]) if times[label] else None
    if fused.get("fx_fuse") is not None:
        row["pass_time_ratio"] = row["normfx_pass_ms"] / row["fx_fuse_pass_ms"]
    # eager latency, interleaved
    contenders = {k: v for k, v in fused.items() if v is not None}
    samples = {k: [] for k in contenders}
    with torch.no_grad():
        for module in contenders.values():
            for _ in range(3):
                module(x)
        for i in range(runs):
            for label in (list(contenders) if i % 2 == 0 else list(reversed(contenders))):
                samples[label].append(timed(lambda: contenders[label](x)))
    for label, values in samples.items():
        row[f"{label}_latency_ms"] = 1e3 * statistics.median(values)
    if "fx_fuse" in samples:
        row["latency_ratio"] = row["normfx_latency_ms"] / row["fx_fuse_latency_ms"]
    return row


# What this benchmark measures: a change to any of these paths makes benchmarks/results/fx_fuse.json stale.
MEASURES = ["benchmarks/bench_fx_fuse.py", "normfx/passes/fx", "normfx/fold.py", "normfx/engine.py",
            "normfx/builtin_policies.py", "normfx/layers", "normfx/models", "normfx/inspect.py"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(models.names()))
    parser.add_argument("--repeats", type=int, default=7, help="pass-time repetitions per tool")
    parser.add_argument("--runs", type=int, default=30, help="eager latency runs per fused model")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    add_out_argument(parser, "fx_fuse.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    header = f"{'model':<20} {'BN':>4} {'folded nfx/fx':>13} {'rel err nfx':>11} {'rel err fx':>10} {'pass ms nfx/fx':>16} {'ratio':>6} {'latency ms nfx/fx':>18} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for name in args.models.split(","):
        row = bench_model(name, args.repeats, args.runs, args.batch)
        rows.append(row)
        fx_err = f"{row['fx_fuse_rel_error']:.1e}" if "fx_fuse_rel_error" in row else "fails"
        fx_pass = f"{row['fx_fuse_pass_ms']:.1f}" if row.get("fx_fuse_pass_ms") else "-"
        fx_lat = f"{row['fx_fuse_latency_ms']:.2f}" if "fx_fuse_latency_ms" in row else "-"
        print(f"{name:<20} {row['bn_calls']:>4} {row['normfx_folded']:>6}/{row['fx_fuse_folded']:<6} "
              f"{row['normfx_rel_error']:>11.1e} {fx_err:>10} {row['normfx_pass_ms']:>8.1f}/{fx_pass:<7} "
              f"{row.get('pass_time_ratio', float('nan')):>6.2f} {row['normfx_latency_ms']:>9.2f}/{fx_lat:<8} "
              f"{row.get('latency_ratio', float('nan')):>6.2f}", flush=True)
    summary = {
        **ratio_summary(rows, "pass_time_ratio", "latency_ratio"),
        "torch": torch.__version__,
        "threads": args.threads,
        "batch": args.batch,
    }
    report(summary, rows, result_path(args.out, "fx_fuse.json"), measures=MEASURES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
