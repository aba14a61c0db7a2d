"""Shared by the benchmark scripts: ratio summaries, where results go, and the JSON results file.

Results go to ``out/benchmarks/`` (git-ignored) unless ``--out benchmarks/results`` (the committed folder) or
``--out FILE.json`` is given. Every results file records the commit it ran on (``commit``), the repository
paths whose change invalidates it (``measures``, declared by each script) and which of those had uncommitted
changes when it ran (``dirty``); ``tests/test_results_fresh.py`` fails when a committed result is older than
the last change to what it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any, Sequence

from normfx.io_utils import atomic_write_text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DIR = os.path.join("out", "benchmarks")
COMMITTED_DIR = os.path.join("benchmarks", "results")


def ratio_summary(rows: list[dict[str, Any]], *keys: str, label: str = "model") -> dict[str, Any]:
    """Median and max of each ratio column (rows without it are left out), and the row (``label``) of the max."""
    summary: dict[str, Any] = {}
    for key in keys:
        values = [r for r in rows if r.get(key) is not None]
        worst = max(values, key=lambda r: r[key]) if values else None
        summary[f"{key}_median"] = statistics.median(r[key] for r in values) if values else None
        summary[f"{key}_max"] = worst[key] if worst else None
        summary[f"{key}_max_{label}"] = worst.get(label) if worst else None
    return summary


def add_out_argument(parser: argparse.ArgumentParser, filename: str) -> None:
    """``--out DIR`` (default ``out/benchmarks``; ``benchmarks/results`` updates the committed file) or ``--out
    FILE.json``; ``--out ''`` writes nothing."""
    parser.add_argument(
        "--out", default=DEFAULT_DIR,
        help=f"folder for {filename} (default: %(default)s, git-ignored; give {COMMITTED_DIR} to update the committed "
             "results), or a .json path; '' writes nothing",
    )


def result_path(out: str | None, filename: str) -> str | None:
    """Where ``--out`` puts ``filename``: a folder gets ``filename`` inside it, a ``.json`` path is used as is."""
    if not out:
        return None
    return out if out.lower().endswith(".json") else os.path.join(out, filename)


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.rstrip() if done.returncode == 0 else None  # keep porcelain's leading column


def provenance(measures: Sequence[str] | None) -> dict[str, Any]:
    """``commit`` (git HEAD, None outside a git checkout), ``measures`` and ``dirty`` (measured paths with
    uncommitted changes: the result then belongs to no commit)."""
    paths = sorted(measures) if measures else None
    commit = (_git("rev-parse", "HEAD") or "").strip() or None
    dirty = None
    if commit and paths:
        changed = _git("status", "--porcelain", "--", *paths)
        dirty = sorted({line[3:] for line in changed.splitlines() if line.strip()}) if changed else []
    return {"commit": commit, "measures": paths, "dirty": dirty}


def report(summary: dict[str, Any], rows: list[dict[str, Any]], out: str | None, *,
           measures: Sequence[str] | None = None) -> None:
    """Print the summary; write provenance, summary and rows as JSON to ``out`` (atomically, folders created)
    unless it is empty. ``measures``: the repository paths (files or folders) whose change invalidates the result."""
    print(json.dumps(summary, indent=2))
    if out and not out.lower().endswith(".json"):  # a folder: the script's own name (bench_onnx.py -> onnx.json)
        script = os.path.splitext(os.path.basename(sys.argv[0]))[0]
        out = os.path.join(out, script.removeprefix("bench_") + ".json")
    if out:
        stamp = provenance(measures)
        atomic_write_text(out, json.dumps({**stamp, "summary": summary, "rows": rows}, indent=2) + "\n")
        print(f"wrote {out} (commit {stamp['commit'] or 'unknown'}"
              f"{', uncommitted changes in ' + ', '.join(stamp['dirty']) if stamp['dirty'] else ''})")
