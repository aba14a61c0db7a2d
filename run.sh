#!/usr/bin/env bash
# normfx set-up and jobs without anything but bash and Python 3.11 (make is optional: the Makefile calls this).
#   ./run.sh setup   create .venv with the pinned versions of constraints.txt (torch 2.13.0, CPU build)
#   ./run.sh demo    the main job: fold, export, verify and time the default zoo model (writes out/)
#   ./run.sh test    the test suite
#   ./run.sh bench   the benchmarks (tables on stdout, JSON in benchmarks/results/)
#   ./run.sh lint    ruff
set -euo pipefail
cd "$(dirname "$0")"
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
        for script in benchmarks/bench_*.py; do "$BIN/python" "$script"; done ;;
    lint)
        setup
        "$BIN/ruff" check normfx tests benchmarks ;;
    *)
        echo "usage: ./run.sh setup|demo|test|bench|lint" >&2
        exit 2 ;;
esac
