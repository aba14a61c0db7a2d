"""Cost and accuracy of precise-BN statistics: normfx vs fvcore vs torch.optim.swa_utils, side by side.

On a resnet18 of torchvision's architecture (widths 64..512, 11.7M parameters; built from the zoo's
``ResNet`` class since torchvision is not installable here) and on the zoo's reduced-width
``resnet18``, over N batches of B×3×S×S random images, interleaved in rotating order each round:

* ``plain``: N no-grad forwards of the model in eval mode (the baseline, ratio 1.00);
* ``normfx pass``: the statistics pass in place on a private copy (what ``rewrite(..., "precise")``
  runs after its copy; comparable to fvcore/swa_utils, which work in place);
* ``recompute_stats``: the public function end to end, including its deep copy of the model;
* ``fvcore``: ``fvcore.nn.precise_bn.update_bn_stats`` (BN layers in train mode, as it requires);
* ``swa_utils``: ``torch.optim.swa_utils.update_bn`` (whole model in train mode, momentum=None).

Plus the per-forward overhead of normfx's hooks measured batch by batch: inside a real pass, each
hooked forward is timed next to a plain forward of the same batch (steadier on a shared machine).

Times are medians over the rounds; ratios are median / median of ``plain``, fastest / fastest ``plain``
(robust to a noisy machine: interference only adds time), and the median over rounds of the ratio
to ``plain`` in the same round. Accuracy is measured
in separate untimed runs: an observer hook records, in float64, the moments of every input each
BN sees in that method's own pass; each method's stored statistics are compared with (a) the
float64 value of the estimator it implements (numerical error: normfx and fvcore estimate the
population mean/variance — normfx stores the unbiased, fvcore the biased one; swa_utils averages
per-batch means and unbiased variances with equal weights) and (b) the float64 population
statistics (unbiased variance, PyTorch's convention). Errors: mean as max |Δμ|/σ, variance as max
|Δvar|/var, over channels and layers.

    python benchmarks/bench_stats.py [--batches 10] [--batch-size 16] [--size 112] [--rounds 7]
                                     [--models tv_resnet18,resnet18] [--out out/benchmarks|benchmarks/results]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from typing import Any, Callable

import torch
from _results import add_out_argument, provenance, result_path
from torch import nn

from normfx import models
from normfx.io_utils import atomic_write_text
from normfx.models.resnet import BasicBlock, ResNet
from normfx.stats import recompute_stats
from normfx.stats.collect import collect_stats
from normfx.stats.moments import Moments, merge
from normfx.stats.recompute import apply_stats, select_layers

BN = nn.modules.batchnorm._BatchNorm


def tv_resnet18() -> nn.Module:
    """torchvision's resnet18 architecture (BasicBlock ×[2,2,2,2], widths 64..512, 1000 classes)."""
    torch.manual_seed(0)
    model = ResNet(BasicBlock, [2, 2, 2, 2], widths=(64, 128, 256, 512), num_classes=1000)
    models.randomize_batchnorm(model, 0)
    return model.eval()


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "tv_resnet18": tv_resnet18,
    "resnet18": lambda: models.create("resnet18", seed=0),
}


# --- the methods (each gets its own model copy, prepared outside the timing) ------------------------


def run_plain(model: nn.Module, batches: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for b in batches:
            model(b)


def run_normfx_pass(model: nn.Module, batches: list[torch.Tensor]) -> None:
    layers = select_layers(model, lambda name: True, None, "precise")
    collected = collect_stats(model, batches, layers, progress=False)
    apply_stats(layers, collected, None, "precise", "precise")


def run_recompute(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    return recompute_stats(model, batches, progress=False)


def run_fvcore(model: nn.Module, batches: list[torch.Tensor]) -> None:
    from fvcore.nn.precise_bn import update_bn_stats

    update_bn_stats(model, batches, num_iters=len(batches))


def run_swa(model: nn.Module, batches: list[torch.Tensor]) -> None:
    from torch.optim.swa_utils import update_bn

    with torch.no_grad():  # update_bn is decorated with no_grad already; explicit for clarity
        update_bn(batches, model)


def prepare(method: str, base: nn.Module) -> nn.Module:
    model = copy.deepcopy(base).eval()
    if method == "fvcore":
        for m in model.modules():
            if isinstance(m, BN):
                m.train()  # fvcore recomputes the BN layers that are in training mode
    return model


METHODS: dict[str, Callable[[nn.Module, list[torch.Tensor]], Any]] = {
    "plain": run_plain,
    "normfx pass": run_normfx_pass,
    "recompute_stats": run_recompute,
    "fvcore": run_fvcore,
    "swa_utils": run_swa,
}


# --- accuracy --------------------------------------------------------------------------------------


def observe(model: nn.Module) -> tuple[dict[str, list[Moments]], list]:
    """Pre-hooks that record the exact float64 moments of every BN input, per call."""
    seen: dict[str, list[Moments]] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, BN):
            seen[name] = []

            def hook(module, args, name=name):
                x = args[0].detach().double()
                flat = x.transpose(0, 1).reshape(x.shape[1], -1)
                mean = flat.mean(1)
                seen[name].append(Moments(float(flat.shape[1]), mean, (flat - mean[:, None]).square().sum(1)))

            handles.append(m.register_forward_pre_hook(hook))
    return seen, handles


def targets(method: str, calls: list[Moments]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(estimator mean, estimator var, population mean, population unbiased var), all float64."""
    pop = merge(calls)
    if method == "swa_utils":
        means = torch.stack([c.mean for c in calls])
        variances = torch.stack([c.var_unbiased for c in calls])
        return means.mean(0), variances.mean(0), pop.mean, pop.var_unbiased
    if method == "fvcore":
        return pop.mean, pop.var_biased, pop.mean, pop.var_unbiased
    return pop.mean, pop.var_unbiased, pop.mean, pop.var_unbiased


def accuracy(method: str, base: nn.Module, batches: list[torch.Tensor]) -> dict[str, Any]:
    model = prepare(method, base)
    seen, handles = observe(model)
    if method == "recompute_stats":
        result = recompute_stats(model, batches, progress=False)  # the copy inherits the observers
    else:
        METHODS[method](model, batches)
        result = model
    for h in handles:
        h.remove()
    modules = dict(result.named_modules())
    worst = {"mean_err": 0.0, "var_err": 0.0, "var_err_layer": "", "mean_vs_pop": 0.0, "var_vs_pop": 0.0}
    for name, calls in seen.items():
        if not calls:
            continue
        est_mean, est_var, pop_mean, pop_var = targets(method, calls)
        bn = modules[name]
        mean, var = bn.running_mean.double(), bn.running_var.double()
        sigma = pop_var.sqrt()
        mean_err = float(((mean - est_mean).abs() / sigma).max())
        var_err = float(((var - est_var).abs() / est_var).max())
        if var_err > worst["var_err"]:
            worst["var_err_layer"] = name
        worst["mean_err"] = max(worst["mean_err"], mean_err)
        worst["var_err"] = max(worst["var_err"], var_err)
        worst["mean_vs_pop"] = max(worst["mean_vs_pop"], float(((mean - pop_mean).abs() / sigma).max()))
        worst["var_vs_pop"] = max(worst["var_vs_pop"], float(((var - pop_var).abs() / pop_var).max()))
    return worst


# --- per-forward overhead, alternating batch by batch ------------------------------------------------


def alternating(base: nn.Module, batches: list[torch.Tensor], repeats: int) -> dict[str, Any]:
    """Each batch's forward with normfx's hooks (inside a real ``collect_stats`` pass, via ``forward=``)
    timed right next to a plain no-grad forward of the same batch on a hook-free copy, alternating
    which goes first. Interference on a shared machine lasts longer than one forward, so the
    per-batch ratio is far steadier than ratios of whole runs."""
    work, plain = prepare("normfx pass", base), prepare("plain", base)
    ratios: list[float] = []
    state = {"i": 0}

    def timed_forward(model: nn.Module, batch: torch.Tensor) -> None:
        first_plain = state["i"] % 2 == 0
        state["i"] += 1
        if first_plain:
            t0 = time.perf_counter(); plain(batch); t1 = time.perf_counter()  # noqa: E702
            model(batch); t2 = time.perf_counter()  # noqa: E702
            ratios.append((t2 - t1) / (t1 - t0))
        else:
            t0 = time.perf_counter(); model(batch); t1 = time.perf_counter()  # noqa: E702
            plain(batch); t2 = time.perf_counter()  # noqa: E702
            ratios.append((t1 - t0) / (t2 - t1))

    layers = select_layers(work, lambda name: True, None, "precise")
    with torch.no_grad():
        collect_stats(work, batches[:1], layers, forward=timed_forward, progress=False)  # warm-up
        ratios.clear()
        for _ in range(repeats):
            collect_stats(work, batches, layers, forward=timed_forward, progress=False)
    ratios.sort()
    return {
        "forwards": len(ratios),
        "median_ratio": statistics.median(ratios),
        "p25_ratio": ratios[len(ratios) // 4],
        "p75_ratio": ratios[(3 * len(ratios)) // 4],
    }


# --- the run ---------------------------------------------------------------------------------------


def bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    base = BUILDERS[name]()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(args.batch_size, 3, args.size, args.size, generator=g) for _ in range(args.batches)]
    prepared = {m: prepare(m, base) for m in METHODS}
    for method, fn in METHODS.items():  # warm-up
        fn(prepared[method], batches)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    order = list(METHODS)
    for r in range(args.rounds):
        rotated = order[r % len(order):] + order[: r % len(order)]
        for method in rotated:
            start = time.perf_counter()
            METHODS[method](prepared[method], batches)
            times[method].append(time.perf_counter() - start)
    copy_times = []
    for _ in range(3):
        start = time.perf_counter()
        copy.deepcopy(base)
        copy_times.append(time.perf_counter() - start)
    plain, plain_min = statistics.median(times["plain"]), min(times["plain"])
    rows = {}
    for method in METHODS:
        median = statistics.median(times[method])
        per_round = [t / p for t, p in zip(times[method], times["plain"])]
        row = {
            "median_s": median,
            "min_s": min(times[method]),
            "ratio_to_plain": median / plain,
            "ratio_of_minima": min(times[method]) / plain_min,
            "median_round_ratio": statistics.median(per_round),
            "times_s": times[method],
        }
        if method != "plain":
            row.update(accuracy(method, base, batches))
        rows[method] = row
    return {
        "model": name,
        "alternating": alternating(base, batches, args.rounds),
        "parameters_M": sum(p.numel() for p in base.parameters()) / 1e6,
        "bn_layers": sum(isinstance(m, BN) for m in base.modules()),
        "deepcopy_s": statistics.median(copy_times),
        "methods": rows,
    }


def format_table(result: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"{result['model']}: {result['parameters_M']:.1f}M parameters, {result['bn_layers']} BN layers, "
        f"{args.batches} batches of {args.batch_size}x3x{args.size}x{args.size}, {args.rounds} interleaved rounds, "
        f"{torch.get_num_threads()} threads; deepcopy of the model {result['deepcopy_s'] * 1e3:.0f} ms",
        f"{'method':<16} {'median ms':>9} {'min ms':>8} {'x median':>8} {'x min':>6} {'x round':>7} {'mean err':>8} "
        f"{'var err':>8} {'worst var layer':<22} {'mean vs pop':>11} {'var vs pop':>10}",
    ]
    for method, row in result["methods"].items():
        head = (f"{method:<16} {row['median_s'] * 1e3:>9.1f} {row['min_s'] * 1e3:>8.1f} {row['ratio_to_plain']:>8.3f} "
                f"{row['ratio_of_minima']:>6.3f} {row['median_round_ratio']:>7.3f}")
        if method == "plain":
            lines.append(head)
            continue
        lines.append(
            f"{head} {row['mean_err']:>8.1e} {row['var_err']:>8.1e} {row['var_err_layer']:<22} "
            f"{row['mean_vs_pop']:>11.1e} {row['var_vs_pop']:>10.1e}"
        )
    lines.append("x median: median / median of plain; x min: fastest / fastest plain; x round: median over rounds "
                 "of (time / plain's time in the same round)")
    alt = result["alternating"]
    lines.append(f"per forward, hooked vs plain alternating batch by batch ({alt['forwards']} pairs): median "
                 f"{alt['median_ratio']:.3f}x (quartiles {alt['p25_ratio']:.3f}..{alt['p75_ratio']:.3f})")
    return "\n".join(lines)


# What this benchmark measures: a change to any of these paths makes benchmarks/results/stats.json stale.
MEASURES = ["benchmarks/bench_stats.py", "normfx/stats", "normfx/models"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tv_resnet18,resnet18")
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--methods", default=",".join(METHODS), help="subset of: " + ", ".join(METHODS))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    add_out_argument(parser, "stats.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = [m.strip() for m in args.methods.split(",")]
    for name in list(METHODS):
        if name != "plain" and name not in chosen:
            del METHODS[name]
    results = []
    for name in args.models.split(","):
        result = bench_model(name.strip(), args)
        results.append(result)
        print(format_table(result, args), flush=True)
        print()
    out = result_path(args.out, "stats.json")
    payload = {
        **provenance(MEASURES),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": {"batches": args.batches, "batch_size": args.batch_size, "size": args.size, "rounds": args.rounds},
        "results": results,
    }
    text = json.dumps(payload, indent=2)
    print(text)
    if out:
        atomic_write_text(out, text + "\n")
        print(f"wrote {out} (commit {payload['commit'] or 'unknown'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
