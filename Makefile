# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv (Python 3.11) and install the package into it.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
CONSTRAINTS := requirements/constraints.txt

.PHONY: demo test lint readme clean

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
	$(BIN)/blockzoo compare --kind conv --kind attention $(DEMO_SIZE) --format markdown \
		--save reports/compare.md --plot reports/compare.png

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check src tests benchmarks

test: lint
	$(BIN)/python -m pytest -n auto -q

# Regenerate README's block table from the registry (a test checks it is current).
readme: $(VENV)/.base-installed
	$(BIN)/python -m blockzoo.tools.readme README.md

clean:
	rm -rf $(VENV) reports .pytest_cache
