"""The README's benchmark tables, computed from the committed results (``benchmarks/results/*.json``): the summary
(for every ratio, the median over the models, the worst case with its model, and how many models are above 1×)
and the per-model tables of the Proxy Norm and complete-fold benchmarks.

    python benchmarks/readme_numbers.py            # print the tables
    python benchmarks/readme_numbers.py --update   # rewrite them in README.md (between their <!-- NAME:start/end --> markers)

``tests/test_results_fresh.py`` checks that README.md holds exactly these tables, so the README's numbers follow
the committed results: after `./run.sh bench --commit`, run this with ``--update``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Any, Callable, Iterable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
README = os.path.join(REPO, "README.md")

def _no_bn_left(row: dict[str, Any]) -> bool:
    return row.get("bn_left") == 0


def _bn_left(row: dict[str, Any]) -> bool:
    return bool(row.get("bn_left"))


# (results file, ratio key in each row, what the ratio is[, which rows]). Lower is better for every ratio.
RATIOS = [
    ("fx_fuse.json", "pass_time_ratio", "pass time, normfx `fuse` / `torch.fx` fuse"),
    ("fx_fuse.json", "latency_ratio", "eager CPU latency of the result, normfx / `torch.fx` fuse"),
    ("onnx.json", "latency_ratio", "onnxruntime latency, normfx `fuse` / ORT's own optimizer"),
    ("onnx.json", "pass_time_ratio", "pass time, normfx `fuse` / onnxoptimizer `fuse_bn_into_conv`"),
    ("proxynorm.json", "latency_ratio", "onnxruntime latency, GN + Proxy Norm fused / GN alone"),
    ("proxynorm.json", "train_ratio", "training fwd+bwd, ProxyNormAct / plain activation"),
    ("complete_fold.json", "ort_b_over_c", "onnxruntime latency, normfx `fuse` / the bound (hand reparameterization or BNs deleted)"),
    ("complete_fold.json", "ort_b_over_a", "onnxruntime latency, normfx `fuse` / plain export of the multi-branch or pre-activation original"),
    ("complete_fold.json", "eager_b_over_c", "eager CPU latency, normfx `fuse` / the same bound"),
    ("complete_fold.json", "ort_b_over_c", "onnxruntime, normfx `fuse` / the bound, models left with no BN op",
     _no_bn_left),
    ("complete_fold.json", "eager_b_over_c", "eager CPU, normfx `fuse` / the bound, models left with no BN op",
     _no_bn_left),
    ("complete_fold.json", "ort_b_over_c", "onnxruntime, normfx `fuse` / the bound, models keeping reasoned BNs "
     "(which the bound deletes)", _bn_left),
    ("complete_fold.json", "eager_b_over_c", "eager CPU, normfx `fuse` / the bound, models keeping reasoned BNs",
     _bn_left),
    ("leftovers.json", "fused_over_bound", "eager CPU latency, normfx `fuse` / no-BN, no-wrapper bound"),
    ("stats.json", "recompute_stats", "precise BN, `recompute_stats` / plain forwards"),
    ("stats.json", "fvcore", "precise BN, fvcore `update_bn_stats` / plain forwards"),
    ("stats.json", "swa_utils", "precise BN, `swa_utils.update_bn` / plain forwards"),
]


def _rows(name: str) -> list[dict[str, Any]]:
    with open(os.path.join(RESULTS, name)) as handle:
        data = json.load(handle)
    if "rows" in data:
        return data["rows"]
    # bench_stats.py: one result per model, one ratio per method (median over rounds of the per-round ratio)
    return [{"model": r["model"], **{m: v["median_round_ratio"] for m, v in r["methods"].items()}} for r in data["results"]]


def ratio_line(name: str, key: str, what: str, where: Callable[[dict[str, Any]], bool] = lambda row: True) -> str:
    rows = [r for r in _rows(name) if r.get(key) is not None and where(r)]
    values = [r[key] for r in rows]
    worst = max(rows, key=lambda r: r[key])
    above = sum(v > 1.0 for v in values)
    return (f"| {what} | {statistics.median(values):.2f}× | {worst[key]:.2f}× ({worst['model']}) | "
            f"{above} of {len(values)} | `{name}` |")


def table(ratios: Iterable[tuple] = RATIOS) -> str:
    lines = ["| ratio (lower is better) | median | worst (model) | models above 1× | results |",
             "|---|---|---|---|---|"]
    lines += [ratio_line(*ratio) for ratio in ratios]
    return "\n".join(lines)


def _rows_table(name: str, columns: list[tuple[str, Callable[[dict[str, Any]], str]]]) -> str:
    """One line per row of the results file ``name``: (header, cell) per column."""
    lines = ["| " + " | ".join(header for header, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row) for _, cell in columns) + " |" for row in _rows(name)]
    return "\n".join(lines)


def _ratio(key: str, digits: int = 3) -> Callable[[dict[str, Any]], str]:
    return lambda row: f"{row[key]:.{digits}f}×"


def proxynorm_table() -> str:
    """Per model: GN + Proxy Norm after ``fuse`` against GN alone (bench_proxynorm.py)."""
    return _rows_table("proxynorm.json", [
        ("model", lambda r: r["model"]), ("PN layers", lambda r: str(r["proxy_norm_layers"])),
        ("ops left by the fold", lambda r: str(r["leftover_ops"])),
        ("latency GN+PN / GN", _ratio("latency_ratio")), ("before fold", _ratio("unfused_latency_ratio")),
        ("A/A", lambda r: f"{r['control_ratio']:.3f}"),
        ("training fwd+bwd, PN / plain act", _ratio("train_ratio", 2)),
    ])


def complete_fold_table() -> str:
    """Per model and batch: normfx ``fuse`` against the bound and the original (bench_complete_fold.py)."""
    return _rows_table("complete_fold.json", [
        ("model", lambda r: r["model"]), ("batch", lambda r: str(r["batch"])), ("BNs left", lambda r: str(r["bn_left"])),
        ("ORT: normfx / bound", _ratio("ort_b_over_c")), ("ORT: normfx / original", _ratio("ort_b_over_a")),
        ("eager: normfx / bound", _ratio("eager_b_over_c")), ("eager: normfx / original", _ratio("eager_b_over_a")),
        ("error vs original", lambda r: f"{r['normfx_rel_error']:.1e}"),
    ])


# README block name -> its generator; README.md holds each between <!-- NAME:start --> and <!-- NAME:end -->
BLOCKS: dict[str, Callable[[], str]] = {
    "bench-table": table,
    "proxynorm-table": proxynorm_table,
    "complete-fold-table": complete_fold_table,
}


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def readme_block(text: str, name: str = "bench-table") -> str | None:
    """The table README.md holds between ``name``'s markers (None without markers)."""
    start, end = _markers(name)
    if start not in text or end not in text:
        return None
    return text.split(start, 1)[1].split(end, 1)[0].strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--update", action="store_true", help="rewrite the tables in README.md")
    args = parser.parse_args(argv)
    generated = {name: make() for name, make in BLOCKS.items()}
    print("\n\n".join(generated.values()))
    if args.update:
        from normfx.io_utils import atomic_write_text

        with open(README) as handle:
            text = handle.read()
        for name, block in generated.items():
            start, end = _markers(name)
            if readme_block(text, name) is None:
                print(f"README.md has no {start} ... {end} block", file=sys.stderr)
                return 2
            head, rest = text.split(start, 1)
            text = f"{head}{start}\n{block}\n{end}{rest.split(end, 1)[1]}"
        atomic_write_text(README, text)
        print("updated README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
