# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv (Python 3.11) and install the package into it.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
CONSTRAINTS := requirements/constraints.txt

.PHONY: demo test test-fast lint readme clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.base-installed: $(BIN)/python pyproject.toml $(CONSTRAINTS)
	$(PIP) install -q -c $(CONSTRAINTS) -e .
	touch $@

$(VENV)/.dev-installed: $(VENV)/.base-installed
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[dev]'
	touch $@

# The main job: compare every conv-kind and attention block against a plain 3x3 conv on CPU.
DEMO_SIZE ?= --size 32 --batch 4
demo: $(VENV)/.base-installed
	$(BIN)/blockzoo compare --kind conv --kind attention $(DEMO_SIZE) --budget 3 \
		--format markdown --save reports/compare.md --plot reports/compare.png

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check src tests benchmarks

test: lint
	$(BIN)/python -m pytest -n auto -q

# The inner loop: everything but torch.compile, ONNX export and other slow tests.
test-fast: lint
	$(BIN)/python -m pytest -n auto -q -m "not compile and not export and not slow"

# Regenerate README's block table and demo sample (a real run of the demo's comparison) and
# docs/models.md's model table (tests check the tables and the sample's FLOPs are current).
readme: $(VENV)/.base-installed
	$(BIN)/python -m blockzoo.tools.readme README.md
	$(BIN)/python -m blockzoo.models.table docs/models.md

clean:
	rm -rf $(VENV) reports .pytest_cache
