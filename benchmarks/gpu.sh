#!/usr/bin/env bash
# The GPU benchmark: npo vs TRL 1.16 GRPOTrainer's three transformers generation paths at the Qwen2-0.5B
# shape, forced and reasoning-shaped rollouts (benchmarks/gpu_bench.py; its arguments pass through).
# On a GPU machine with torch (trl, datasets, pydantic, transformers 5.19... installed, or as wheels in .whl/):
#     bash benchmarks/gpu.sh                      # est. ~9 min on an H200; results in $OUT/gpu_bench.json
#     bash benchmarks/gpu.sh --shape forced       # est. ~4 min
# Locally, the same script at a tiny shape on CPU (no .whl/ needed: uses the active environment):
#     PYTHON=.venv/bin/python bash benchmarks/gpu.sh --small
if [ -d .whl ] && [ -z "${PYTHON:-}" ]; then  # wheels to install first (PYTHON set = a local run)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
  # the .whl/ transformers (the CPU tests' version) over the installed one; if it cannot import, the installed one
  python3 -c "import transformers, trl" || { echo ".whl/ transformers does not import: using the installed one"; rm -rf /tmp/site/transformers /tmp/site/transformers-*; }
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
set -uo pipefail
PY=${PYTHON:-python3}
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# what is importable (a missing TRL dependency makes the benchmark time npo alone, not crash)
"$PY" - <<'PYEOF'
import importlib, sys
for m in ("torch", "transformers", "trl", "datasets", "pyarrow", "pydantic", "yaml", "fsspec", "npo_cli.trainer"):
    try:
        mod = importlib.import_module(m)
        print(f"  {m} {getattr(mod, '__version__', '')}")
    except Exception as e:  # noqa: BLE001
        print(f"  {m}: NOT importable ({type(e).__name__}: {e})")
import torch
print("  cuda:", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
bad = [m for m in ("math_verify", "s3fs", "boto3") if m in sys.modules]
print("  heavy optional modules imported by npo_cli.trainer:", bad or "none")
PYEOF
exec "$PY" benchmarks/gpu_bench.py "$@"
