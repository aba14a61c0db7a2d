"""The ONNX route side by side: normfx ``fuse`` vs onnxruntime's own optimizer vs onnxoptimizer.

For each zoo model, the unfused export (torch.onnx, constant folding off, every BatchNormalization kept):
- BN nodes left by normfx, by onnxruntime's fusions (its saved optimized graph at ORT_ENABLE_EXTENDED), and by
  onnxoptimizer's ``fuse_bn_into_conv``;
- pass time of ``normfx.rewrite(proto, "fuse")`` vs ``onnxoptimizer.optimize(proto, ["fuse_bn_into_conv"])``
  (medians of interleaved repetitions);
- ORT CPU latency of the normfx graph vs the original, both with ORT's own optimizations fully on,
  interleaved in one run (ratio of medians).

    python benchmarks/bench_onnx.py [--models resnet18,unet] [--runs 100] [--threads 1] [--out out/benchmarks|benchmarks/results]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import onnx
import onnxoptimizer
import onnxruntime as ort
from _results import add_out_argument, ratio_summary, report, result_path

import normfx
from normfx import models
from normfx.export import export_onnx
from normfx.runtime import make_session, time_sessions


def bn_nodes(model: onnx.ModelProto) -> int:
    return sum(1 for n in model.graph.node if n.op_type == "BatchNormalization")


def ort_optimized_bn(model: onnx.ModelProto) -> int:
    """BatchNormalization nodes ORT's graph fusions leave (ORT_ENABLE_EXTENDED, CPU). At ORT_ENABLE_ALL the
    CPU-specific NCHWc layout pass turns the remaining BatchNormalization ops into NCHWc convolutions
    (not a fold: still one op each), so the count is taken one level below."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "optimized.onnx")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = path
        options.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return bn_nodes(onnx.load(path))


def bench_model(name: str, args) -> dict:
    model = models.create(name)
    x = models.example_input(name, batch=args.batch)
    plain = export_onnx(model, (x,))
    times = {"normfx": [], "onnxoptimizer": []}
    results = {}
    for i in range(args.repeats):
        for label in (["normfx", "onnxoptimizer"] if i % 2 == 0 else ["onnxoptimizer", "normfx"]):
            start = time.perf_counter()
            if label == "normfx":
                results[label] = normfx.rewrite(plain, "fuse")
            else:
                results[label] = onnxoptimizer.optimize(plain, ["fuse_bn_into_conv"])
            times[label].append(time.perf_counter() - start)
    arrays = [x.numpy()]
    check = normfx.verify(plain, results["normfx"], arrays)
    sessions = {
        "ort_own": make_session(plain, optimization="all", threads=args.threads, provider=args.provider),
        "normfx": make_session(results["normfx"], optimization="all", threads=args.threads, provider=args.provider),
    }
    timings = time_sessions(sessions, arrays, runs=args.runs, warmup=5)
    row = {
        "model": name,
        "bn_nodes": bn_nodes(plain),
        "bn_left_normfx": bn_nodes(results["normfx"]),
        "bn_left_ort": ort_optimized_bn(plain),
        "bn_left_onnxoptimizer": bn_nodes(results["onnxoptimizer"]),
        "normfx_rel_error": check.max_rel_error,
        "normfx_pass_ms": 1e3 * statistics.median(times["normfx"]),
        "onnxoptimizer_pass_ms": 1e3 * statistics.median(times["onnxoptimizer"]),
        "ort_own_ms": timings["ort_own"].median_ms,
        "normfx_ms": timings["normfx"].median_ms,
    }
    row["pass_time_ratio"] = row["normfx_pass_ms"] / row["onnxoptimizer_pass_ms"]
    row["latency_ratio"] = row["normfx_ms"] / row["ort_own_ms"]
    return row


# What this benchmark measures: a change to any of these paths makes benchmarks/results/onnx.json stale.
MEASURES = ["benchmarks/bench_onnx.py", "normfx/passes/onnx", "normfx/fold.py", "normfx/engine.py",
            "normfx/builtin_policies.py", "normfx/export.py", "normfx/runtime.py", "normfx/models"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(n for n in models.names()))
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    add_out_argument(parser, "onnx.json")
    args = parser.parse_args(argv)
    header = (f"{'model':<20} {'BN':>4} {'left nfx/ort/onnxopt':>21} {'rel err':>8} {'pass ms nfx/onnxopt':>20} "
              f"{'ratio':>6} {'ORT ms own/nfx':>15} {'ratio':>6}")
    print(header)
    print("-" * len(header))
    rows = []
    for name in args.models.split(","):
        row = bench_model(name, args)
        rows.append(row)
        print(f"{name:<20} {row['bn_nodes']:>4} {row['bn_left_normfx']:>7}/{row['bn_left_ort']}/{row['bn_left_onnxoptimizer']:<9} "
              f"{row['normfx_rel_error']:>8.1e} {row['normfx_pass_ms']:>9.1f}/{row['onnxoptimizer_pass_ms']:<9.1f} "
              f"{row['pass_time_ratio']:>6.2f} {row['ort_own_ms']:>7.3f}/{row['normfx_ms']:<7.3f} {row['latency_ratio']:>6.3f}",
              flush=True)
    summary = {
        **ratio_summary(rows, "latency_ratio", "pass_time_ratio"),
        "onnxruntime": ort.__version__,
        "provider": args.provider,
        "threads": args.threads,
        "runs": args.runs,
    }
    report(summary, rows, result_path(args.out, "onnx.json"), measures=MEASURES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
