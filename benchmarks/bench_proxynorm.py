"""Proxy Norm at deployment and in training, side by side in one run.

For each zoo model (default: resnet18, resnet50, efficientnet_b0), from the same BN model:
- ``gn``: ``groupnorm:groups=4`` (the group count proxynorm uses by default) then ``fuse``: GroupNorm alone;
- ``gn_pn``: ``proxynorm`` (ProxyNormAct parameters randomized, as after training) then ``fuse``;
- ``gn_pn_unfused``: ``proxynorm`` without ``fuse`` (the proxy statistics in the graph), for reference.

(a) onnxruntime CPU latency of the three ONNX exports (torch.onnx, constant folding off, as ``normfx export``
    does), interleaved run by run in one process, in ``--blocks`` blocks; per block the ratio of medians
    ``gn_pn / gn`` (target <= 1.02), ``gn_pn_unfused / gn`` and ``gn / gn`` (a second session of the same GN
    model: the A/A noise floor), then the median over blocks; fresh sessions per block, created and interleaved
    in a shuffled order. The fused model is checked against the unfused one (float64 reference) first.
(b) training-time overhead of ProxyNormAct: torch eager forward + backward, train mode, of the ``proxynorm``
    model vs the ``groupnorm:groups=4`` model (GN + the plain activation), interleaved; the median of the
    per-round ratios.

    python benchmarks/bench_proxynorm.py [--models resnet18,efficientnet_b0] [--runs 100] [--blocks 15] [--train-runs 25]
        [--batch 1] [--train-batch 8] [--threads 1] [--out out/benchmarks|benchmarks/results]
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time

import onnxruntime as ort
import torch
from _results import add_out_argument, ratio_summary, report, result_path

import normfx
from normfx import models
from normfx.export import export_onnx
from normfx.layers import ProxyNormAct
from normfx.runtime import make_session, time_sessions

DEFAULT_MODELS = "resnet18,resnet50,efficientnet_b0"


def randomize_proxy_norm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """ProxyNormAct parameters as after training (gamma, beta, proxy gamma/beta away from their init)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ProxyNormAct):
                c = module.num_channels
                module.weight.copy_(torch.rand(c, generator=generator) * 1.5 + 0.25)
                module.bias.copy_(torch.randn(c, generator=generator) * 0.5)
                module.proxy_weight.copy_(torch.randn(c, generator=generator) * 0.2)
                module.proxy_bias.copy_(torch.randn(c, generator=generator) * 0.2)
    return model


def rel_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    return float((reference.double() - candidate.double()).abs().max() / reference.double().abs().max())


def count_ops(proto, *types: str) -> int:
    return sum(1 for node in proto.graph.node if node.op_type in types)


def build(name: str, batch: int) -> dict:
    base = models.create(name)
    x = models.example_input(name, batch=batch)
    gn = normfx.rewrite(base, "groupnorm:groups=4", example_inputs=x)
    pn = randomize_proxy_norm(normfx.rewrite(base, "proxynorm", example_inputs=x)).eval()
    gn_fused = normfx.rewrite(gn.eval(), "fuse", example_inputs=x)
    pn_fused, fuse_report = normfx.rewrite_with_report(pn, "fuse", example_inputs=x)
    with torch.no_grad():
        reference = copy.deepcopy(pn).double()(x.double())
        noise = rel_error(reference, pn(x))
        error = rel_error(reference, pn_fused(x))
    if error > max(1e-5, 2 * noise):
        raise RuntimeError(f"{name}: the fused model differs from the unfused one ({error:.2e}, fp32 noise {noise:.2e})")
    return {"x": x, "gn": gn, "pn": pn, "gn_fused": gn_fused, "pn_fused": pn_fused, "report": fuse_report,
            "fp32_noise": noise, "fused_error": error}


def bench_latency(name: str, built: dict, args) -> dict:
    x = built["x"]
    protos = {
        "gn": export_onnx(built["gn_fused"], (x,)),
        "gn_pn": export_onnx(built["pn_fused"], (x,)),
        "gn_pn_unfused": export_onnx(built["pn"], (x,)),
    }
    protos["gn_control"] = protos["gn"]  # the GN model again: an A/A ratio, the noise floor of this measurement
    # Blocks of interleaved runs, each with fresh sessions created and interleaved in a shuffled order (one
    # session of the same model can run a few % faster than another: memory placement, creation order); per
    # block the ratio of medians, then the median over blocks (also robust to load that comes and goes).
    rng = random.Random(args.seed)
    blocks = []
    for _ in range(args.blocks):
        order = list(protos)
        rng.shuffle(order)
        sessions = {k: make_session(protos[k], optimization="all", threads=args.threads, provider="cpu") for k in order}
        blocks.append(time_sessions(sessions, [x.numpy()], runs=args.runs, warmup=5))
    timings = {k: statistics.median(b[k].median_ms for b in blocks) for k in protos}
    ratios = [b["gn_pn"].median_ms / b["gn"].median_ms for b in blocks]
    unfused = [b["gn_pn_unfused"].median_ms / b["gn"].median_ms for b in blocks]
    control = [b["gn_control"].median_ms / b["gn"].median_ms for b in blocks]
    leftovers = [e.details.get("leftover_ops", 0) for e in built["report"].entries if "leftover_ops" in e.details]
    row = {
        "model": name,
        "proxy_norm_layers": len(leftovers),
        "proxy_norm_left": sum(isinstance(m, ProxyNormAct) for m in built["pn_fused"].modules()),
        "leftover_ops": sum(leftovers),
        "fp32_noise": built["fp32_noise"],
        "fused_rel_error": built["fused_error"],
        "onnx_nodes_gn": len(protos["gn"].graph.node),
        "onnx_nodes_gn_pn": len(protos["gn_pn"].graph.node),
        "onnx_nodes_gn_pn_unfused": len(protos["gn_pn_unfused"].graph.node),
        "gn_ms": timings["gn"],
        "gn_pn_ms": timings["gn_pn"],
        "gn_pn_unfused_ms": timings["gn_pn_unfused"],
        "latency_ratio": statistics.median(ratios),
        "latency_ratio_blocks": ratios,
        "unfused_latency_ratio": statistics.median(unfused),
        "control_ratio": statistics.median(control),
    }
    return row


def bench_training(name: str, built: dict, args) -> dict:
    x = models.example_input(name, batch=args.train_batch)
    contenders = {"gn_act": copy.deepcopy(built["gn"]).train(), "gn_pn": copy.deepcopy(built["pn"]).train()}

    def step(model: torch.nn.Module) -> float:
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        return time.perf_counter() - start

    for model in contenders.values():
        for _ in range(2):
            step(model)
    samples = {k: [] for k in contenders}
    labels = list(contenders)
    for i in range(args.train_runs):
        for label in labels if i % 2 == 0 else reversed(labels):
            samples[label].append(step(contenders[label]))
    row = {f"train_{k}_ms": 1e3 * statistics.median(v) for k, v in samples.items()}
    # the median of the per-round ratios (each round times both, back to back): robust to load that comes and goes
    row["train_ratio"] = statistics.median(p / g for p, g in zip(samples["gn_pn"], samples["gn_act"]))
    return row


# What this benchmark measures: a change to any of these paths makes benchmarks/results/proxynorm.json stale.
MEASURES = ["benchmarks/bench_proxynorm.py", "normfx/layers", "normfx/passes/fx", "normfx/passes/onnx",
            "normfx/fold.py", "normfx/engine.py", "normfx/builtin_policies.py", "normfx/export.py", "normfx/runtime.py",
            "normfx/models"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--runs", type=int, default=100, help="ORT latency runs per block and model variant (interleaved)")
    parser.add_argument("--blocks", type=int, default=15, help="ORT timing blocks (the ratio is the median over blocks)")
    parser.add_argument("--seed", type=int, default=0, help="shuffles the session order of each block")
    parser.add_argument("--train-runs", type=int, default=25, help="training steps per variant (interleaved)")
    parser.add_argument("--batch", type=int, default=1, help="ORT batch")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    add_out_argument(parser, "proxynorm.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    header = (f"{'model':<16} {'PN':>3} {'left ops':>8} {'fused err':>9} {'fp32 noise':>10} "
              f"{'ORT ms gn/gn+pn/unfused':>24} {'ratio':>6} {'unfused':>7} {'A/A':>6} {'train ms gn+act/gn+pn':>22} "
              f"{'ratio':>6}")
    print(header)
    print("-" * len(header))
    rows = []
    for name in args.models.split(","):
        built = build(name, args.batch)
        row = bench_latency(name, built, args)
        row.update(bench_training(name, built, args))
        rows.append(row)
        print(f"{name:<16} {row['proxy_norm_layers']:>3} {row['leftover_ops']:>8} {row['fused_rel_error']:>9.1e} "
              f"{row['fp32_noise']:>10.1e} {row['gn_ms']:>7.3f}/{row['gn_pn_ms']:.3f}/{row['gn_pn_unfused_ms']:<8.3f} "
              f"{row['latency_ratio']:>6.3f} {row['unfused_latency_ratio']:>7.3f} {row['control_ratio']:>6.3f} "
              f"{row['train_gn_act_ms']:>10.1f}/{row['train_gn_pn_ms']:<11.1f} {row['train_ratio']:>6.3f}", flush=True)
    summary = ratio_summary(rows, "latency_ratio", "unfused_latency_ratio", "control_ratio", "train_ratio")
    for key in ("latency_ratio", "train_ratio"):
        worst = max(rows, key=lambda r: r[key])
        summary[f"{key}_worst_model"] = worst["model"]
    summary.update({"onnxruntime": ort.__version__, "torch": torch.__version__, "threads": args.threads,
                    "runs": args.runs, "blocks": args.blocks, "seed": args.seed, "batch": args.batch, "train_batch": args.train_batch,
                    "train_runs": args.train_runs})
    report(summary, rows, result_path(args.out, "proxynorm.json"), measures=MEASURES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
