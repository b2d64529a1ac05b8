PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP_FLAGS ?= -q -c constraints-cpu.txt

.PHONY: setup test demo lint bench study clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml constraints-cpu.txt | $(BIN)/python
	$(BIN)/pip install $(PIP_FLAGS) -e '.[dev,compare,models]'
	touch $@

setup: $(VENV)/.installed

# Runs the whole test suite (what CI runs).
test: setup
	$(BIN)/python -m pytest

# Trains SGD, SAM and NSO on MNIST-1D, analyzes them and writes reports/demo/.
demo: setup
	$(BIN)/python -m flatlab.demo --out reports/demo

lint: setup
	$(BIN)/ruff check flatlab tests benchmarks

bench: setup
	$(BIN)/python benchmarks/optimizer_overhead.py
	$(BIN)/python benchmarks/hessian_speed.py
	$(BIN)/python benchmarks/hessian_accuracy.py

# Regenerates reports/scratch/ (reuses every run already in its results.csv).
study: setup
	$(BIN)/python -m flatlab.study scratch

clean:
	rm -rf $(VENV) runs .pytest_cache
