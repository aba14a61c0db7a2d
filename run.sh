#!/usr/bin/env bash
# normfx set-up and jobs without anything but bash and Python 3.11 (make is optional: the Makefile calls this).
#   ./run.sh setup   create .venv with the pinned versions of constraints.txt (torch 2.13.0, CPU build)
#   ./run.sh demo    the main job: fold, export, verify and time the default zoo model (writes out/)
#   ./run.sh test    the test suite
#   ./run.sh bench   the benchmarks (tables on stdout, JSON in out/benchmarks/; `./run.sh bench --commit` writes
#                    the committed benchmarks/results/ instead: do it on a quiet machine, after committing the code)
#   ./run.sh lint    ruff
#   ./run.sh normfx ARGS...   the normfx command line from .venv, run in the caller's folder (relative paths and
#                    module:factory imports resolve there), e.g. ./run.sh normfx export --model resnet18 ...
set -euo pipefail
CALLER="$PWD"
cd "$(dirname "$0")"
ROOT="$PWD"
PYTHON="${PYTHON:-python3}"
VENV=.venv
BIN="$VENV/bin"
OUT="${OUT:-out}"

setup() {
    # (re)install when the venv is missing or older than the files that pin it
    if [ ! -f "$VENV/.installed" ] || [ pyproject.toml -nt "$VENV/.installed" ] || [ constraints.txt -nt "$VENV/.installed" ]; then
        "$PYTHON" -m venv "$VENV"
        "$BIN/pip" install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
        touch "$VENV/.installed"
    fi
}

case "${1:-}" in
    setup) setup ;;
    demo)
        setup
        mkdir -p "$OUT"
        "$BIN/python" -m normfx export --model resnet18 --policy fuse \
            --out "$OUT/resnet18_fused.onnx" --report "$OUT/resnet18_report.json" ;;
    test)
        setup
        "$BIN/python" -m pytest -q -n 2 ;;
    bench)
        setup
        results="$OUT/benchmarks"
        if [ "${2:-}" = "--commit" ]; then results=benchmarks/results; fi
        for script in benchmarks/bench_*.py; do "$BIN/python" "$script" --out "$results"; done ;;
    normfx)
        setup
        shift
        cd "$CALLER"
        exec "$ROOT/$BIN/python" -m normfx "$@" ;;
    lint)
        setup
        "$BIN/ruff" check normfx tests benchmarks examples ;;
    *)
        echo "usage: ./run.sh setup|demo|test|bench [--commit]|lint|normfx ARGS..." >&2
        exit 2 ;;
esac
