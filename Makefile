# Two commands do all the set-up: `make run` (the default study) and `make test`.
# Both create .venv and install what they need into it.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch build to install when .venv has none. A CPU build by default; on a GPU
# cluster install your CUDA build into .venv first (it is then kept), or pass e.g.
# TORCH=torch to take the default build from PyPI.
TORCH ?= torch==2.13.0
CORES ?= all
CONFIG ?=
SNAKEMAKE_ARGS ?=

.PHONY: run test lint report clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

run: $(VENV)/.installed
	$(BIN)/snakemake --cores $(CORES) $(if $(CONFIG),--configfile $(CONFIG)) $(SNAKEMAKE_ARGS)


report: $(VENV)/.installed
	$(BIN)/snakemake $(if $(CONFIG),--configfile $(CONFIG)) --report results/report.html

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests workflow
	$(BIN)/ruff format --check src tests workflow
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(BIN)/snakemake --lint

clean:
	rm -rf results .snakemake
