"""Training-time cost of the BatchNorm variants against BatchNorm: time and memory ratios, train mode.

For each variant (``ghost`` v=4 and v=2, ``virtual`` R=batch and R=batch/4 (recent inputs), ``renorm``,
``separate`` K=2, ``sync`` in one process) and for BatchNorm itself (``bn``: the A/A noise floor):

* ``layer`` rows: one layer on an (N, C, H, W) tensor, forward + backward;
* ``model`` rows: a zoo model (default resnet18) with every BN swapped by the policy, forward + backward of
  the sum of its output.

Time: the variant and BatchNorm run interleaved, round by round (order alternating), torch eager CPU; the ratio
of medians over ``--rounds`` rounds after ``--warmup`` rounds. Memory: the bytes autograd keeps for the backward
pass (every tensor saved by a forward, storages counted once, through ``torch.autograd.graph.saved_tensors_hooks``)
plus the layers' own buffers (Virtual BN's reference), variant over BatchNorm — deterministic, independent of
the allocator. Sync BN in one process is BatchNorm plus a check (its multi-process cost is the all-reduce, not
measured here).

    python benchmarks/bench_bn_variants.py [--models resnet18] [--batch 32] [--layer-shape 32,64,32,32]
        [--rounds 30] [--warmup 3] [--threads 1] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

import torch
from _results import add_out_argument, ratio_summary, report, result_path
from torch import nn

import normfx
from normfx import models

MEASURES = ["benchmarks/bench_bn_variants.py", "normfx/layers/_batch_stats.py", "normfx/layers/ghost.py",
            "normfx/layers/renorm.py", "normfx/layers/separate.py", "normfx/layers/sync.py",
            "normfx/layers/virtual.py", "normfx/passes/fx/bn_variants.py"]


def variants(batch: int) -> dict[str, str]:
    return {
        "bn": "keep",
        "ghost(v=4)": "ghost:virtual_batch_size=4",
        "ghost(v=2)": "ghost:virtual_batch_size=2",
        f"virtual(R={batch})": f"virtual:reference_size={batch}",
        f"virtual(R={max(1, batch // 4)})": f"virtual:reference_size={max(1, batch // 4)}",
        "renorm": "renorm",
        "separate(K=2)": "separate:num_domains=2",
        "sync(1 process)": "sync",
    }


def saved_bytes(step: Callable[[], torch.Tensor], module: nn.Module) -> int:
    """Bytes autograd saves during one forward (storages counted once) plus the module's buffers."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
    del out
    buffers = {b.untyped_storage().data_ptr(): b.untyped_storage().nbytes() for b in module.buffers() if b.numel()}
    return sum(seen.values()) + sum(buffers.values())


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(make: Callable[[str], nn.Module], x: torch.Tensor, policies: dict[str, str], rounds: int,
            warmup: int) -> dict[str, dict]:
    baseline = make("keep")
    results = {}
    for label, policy in policies.items():
        variant = make(policy)
        pair = {"bn": baseline, "variant": variant}
        for module in pair.values():
            module(x)  # fill Virtual BN's recent-input buffer as training would
        memory = {k: saved_bytes(lambda m=m: m(x).sum(), m) for k, m in pair.items()}

        def step(m: nn.Module) -> None:
            m.zero_grad(set_to_none=True)
            m(x).sum().backward()

        times: dict[str, list[float]] = {"bn": [], "variant": []}
        for r in range(warmup + rounds):
            order = ("bn", "variant") if r % 2 == 0 else ("variant", "bn")
            for key in order:
                t = timed(lambda key=key: step(pair[key]))
                if r >= warmup:
                    times[key].append(t)
        bn_ms, var_ms = (1e3 * statistics.median(times[k]) for k in ("bn", "variant"))
        results[label] = {"bn_ms": bn_ms, "variant_ms": var_ms, "time_ratio": var_ms / bn_ms,
                          "bn_saved_mb": memory["bn"] / 2**20, "variant_saved_mb": memory["variant"] / 2**20,
                          "memory_ratio": memory["variant"] / memory["bn"]}
    return results


def layer_rows(shape: tuple[int, ...], rounds: int, warmup: int, batch: int) -> list[dict]:
    torch.manual_seed(0)
    x = (torch.randn(shape) * 1.5 + 0.3).requires_grad_()
    bn = nn.Sequential(nn.BatchNorm2d(shape[1]))
    models.randomize_batchnorm(bn, 0)

    def make(policy: str) -> nn.Module:
        return normfx.rewrite(bn, policy).train()

    found = measure(make, x, variants(batch), rounds, warmup)
    return [{"level": "layer", "model": f"BatchNorm2d {list(shape)}", "variant": k, **v} for k, v in found.items()]


def model_rows(name: str, batch: int, rounds: int, warmup: int) -> list[dict]:
    base = models.create(name, seed=0)
    x = models.example_input(name, batch=batch, seed=1)

    def make(policy: str) -> nn.Module:
        return normfx.rewrite(base, policy).train()

    found = measure(make, x, variants(batch), rounds, warmup)
    return [{"level": "model", "model": name, "variant": k, **v} for k, v in found.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18", help="zoo models, comma-separated ('' for layers only)")
    parser.add_argument("--batch", type=int, default=32, help="batch of the model rows")
    parser.add_argument("--layer-shape", default="32,64,32,32", help="N,C,H,W of the layer rows ('' to skip)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    add_out_argument(parser, "bn_variants.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    if args.layer_shape:
        shape = tuple(int(s) for s in args.layer_shape.split(","))
        rows += layer_rows(shape, args.rounds, args.warmup, shape[0])
    for name in filter(None, args.models.split(",")):
        rows += model_rows(name, args.batch, args.rounds, args.warmup)
    print(f"{'level':<6} {'model':<28} {'variant':<16} {'BN ms':>8} {'variant ms':>10} {'time x':>7} "
          f"{'BN MB':>8} {'variant MB':>10} {'memory x':>8}")
    for r in rows:
        print(f"{r['level']:<6} {r['model']:<28} {r['variant']:<16} {r['bn_ms']:>8.2f} {r['variant_ms']:>10.2f} "
              f"{r['time_ratio']:>7.2f} {r['bn_saved_mb']:>8.2f} {r['variant_saved_mb']:>10.2f} {r['memory_ratio']:>8.2f}")
    summary = {"torch": torch.__version__, "threads": args.threads, "rounds": args.rounds, "batch": args.batch,
               "layer_shape": args.layer_shape, "models": args.models, "per_variant": {}}
    for label in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == label]
        summary["per_variant"][label] = ratio_summary(mine, "time_ratio", "memory_ratio")
    report(summary, rows, result_path(args.out, "bn_variants.json"), measures=MEASURES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
