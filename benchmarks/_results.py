"""Shared by the benchmark scripts: ratio summaries and the JSON results file."""

from __future__ import annotations

import json
import os
import statistics
from typing import Any

from normfx.io_utils import atomic_write_text


def ratio_summary(rows: list[dict[str, Any]], *keys: str) -> dict[str, float | None]:
    """Median and max of each ratio column (rows without it are left out)."""
    summary: dict[str, float | None] = {}
    for key in keys:
        values = [r[key] for r in rows if r.get(key) is not None]
        summary[f"{key}_median"] = statistics.median(values) if values else None
        summary[f"{key}_max"] = max(values) if values else None
    return summary


def report(summary: dict[str, Any], rows: list[dict[str, Any]], out: str | None) -> None:
    """Print the summary; write summary and rows as JSON to ``out`` (atomically) unless it is empty."""
    print(json.dumps(summary, indent=2))
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        atomic_write_text(out, json.dumps({"summary": summary, "rows": rows}, indent=2) + "\n")
        print(f"wrote {out}")
