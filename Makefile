PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test test-heavy test-vllm example bench lint clean

install:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'

test:
	$(BIN)/python -m pytest -q

test-heavy:
	$(BIN)/python -m pytest -q -m heavy

lint:
	$(BIN)/ruff check npo_cli tests benchmarks

example:
	$(BIN)/python -m npo_cli.example checkpoints.example

bench:
	$(BIN)/python benchmarks/store_bench.py

clean:
	rm -rf $(VENV) checkpoints
