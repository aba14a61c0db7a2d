# normfx: set-up, demo, tests, benchmarks. Every target installs what it needs into .venv first,
# with the pinned versions of constraints.txt (torch 2.13.0, CPU build).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= out

.PHONY: setup demo test bench lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# The main job on the default zoo model: fold every BN, export to ONNX, verify in onnxruntime, time.
demo: setup
	mkdir -p $(OUT)
	$(BIN)/python -m normfx export --model resnet18 --policy fuse --out $(OUT)/resnet18_fused.onnx --report $(OUT)/resnet18_report.json

test: setup
	$(BIN)/python -m pytest -q -n 2

bench: setup
	for script in benchmarks/bench_*.py; do $(BIN)/python $$script || exit 1; done

lint: setup
	$(BIN)/ruff check normfx tests benchmarks

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .hypothesis
