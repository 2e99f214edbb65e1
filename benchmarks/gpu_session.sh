#!/usr/bin/env bash
# Every GPU measurement of issue 7 in one device call (about 7 min on an H100; logs and JSON in $OUT),
# most important first, all inside BUDGET seconds (default 560: the device's per-call limit is 600):
#   1. benchmarks/gpu.sh: npo vs TRL 1.16 GRPOTrainer at the Qwen2-0.5B shape (step time, MFU)
#   2. the same head-to-head with npo's grpo.compile on (gpu_bench_compile.json)
#   3. benchmarks/gpu_train_variants.py: npo's update alone under recipe variants (auto chunk, bf16, compile)
#   4. benchmarks/cuda_smoke.py: train / intervene / eval on cuda
#   5. benchmarks/logprob_chunk.py on cuda: recomputed LM-head chunks vs auto vs compiled at vocab 152k
# Each step runs even if an earlier one failed; the exit status is the number of failed or skipped steps.
#     bash benchmarks/gpu_session.sh
set -uo pipefail
OUT=${OUT:-/tmp/npo-gpu}
mkdir -p "$OUT"
END=$((SECONDS + ${BUDGET:-560}))
fails=0
step() {  # step NAME CAP_SECONDS COMMAND...: runs under min(CAP, time left), log in $OUT/NAME.log
  local name=$1 cap=$2 left=$((END - SECONDS))
  shift 2
  if [ "$left" -lt 30 ]; then echo "== $name: skipped (budget spent)"; fails=$((fails + 1)); return; fi
  echo "== $name: $*"
  timeout $((left < cap ? left : cap)) "$@" 2>&1 | tee "$OUT/$name.log" || fails=$((fails + 1))
}
step gpu_bench 300 bash benchmarks/gpu.sh --no-trl-gc
# gpu.sh put the carried wheels (TRL, pydantic, ...) in /tmp/site
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
step gpu_bench_compile 200 python3 benchmarks/gpu_bench.py --compile --no-trl-gc --json "$OUT/gpu_bench_compile.json"
step gpu_train_variants 200 python3 benchmarks/gpu_train_variants.py
step cuda_smoke 90 python3 benchmarks/cuda_smoke.py
step logprob_chunk 90 python3 benchmarks/logprob_chunk.py --device cuda --rows 32 --tokens 256
echo "failed steps: $fails"
exit "$fails"
