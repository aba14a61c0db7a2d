"""The README's benchmark table, computed from the committed results (``benchmarks/results/*.json``): for every
ratio, the median over the models, the worst case with its model, and how many models are above 1×.

    python benchmarks/readme_numbers.py            # print the table
    python benchmarks/readme_numbers.py --update   # rewrite it in README.md (between the bench-table markers)

``tests/test_results_fresh.py`` checks that README.md holds exactly this table, so the README's numbers follow
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
START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"

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


def readme_block(text: str) -> str | None:
    """The table README.md holds between the markers (None without markers)."""
    if START not in text or END not in text:
        return None
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--update", action="store_true", help="rewrite the table in README.md")
    args = parser.parse_args(argv)
    generated = table()
    print(generated)
    if args.update:
        from normfx.io_utils import atomic_write_text

        with open(README) as handle:
            text = handle.read()
        if readme_block(text) is None:
            print(f"README.md has no {START} ... {END} block", file=sys.stderr)
            return 2
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
        atomic_write_text(README, f"{head}{START}\n{generated}\n{END}{tail}")
        print("updated README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
