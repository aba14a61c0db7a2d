# normfx: set-up, demo, tests, benchmarks. Every target installs what it needs into .venv first,
# with the pinned versions of constraints.txt (torch 2.13.0, CPU build).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= out

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# The main job on the default zoo model.
demo: setup
	mkdir -p $(OUT)
	$(BIN)/python -m normfx rewrite --model resnet18 --policy frozen

test: setup
	$(BIN)/python -m pytest -q -n 2

bench: setup
	for script in benchmarks/bench_*.py; do $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .hypothesis
