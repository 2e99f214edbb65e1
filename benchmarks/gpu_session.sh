#!/usr/bin/env bash
# Every GPU measurement of issue 7 in one device call (about 5 min on an H100; logs and JSON in $OUT):
#   1. benchmarks/gpu.sh: npo vs TRL 1.16 GRPOTrainer at the Qwen2-0.5B shape (step time, MFU)
#   2. benchmarks/gpu_train_variants.py: npo's update alone under recipe variants (auto chunk, bf16, ...)
#   3. benchmarks/logprob_chunk.py on cuda: recomputed LM-head chunks vs auto at vocab 152k
#   4. benchmarks/cuda_smoke.py: train / intervene / eval on cuda
# Each step runs even if an earlier one failed; the exit status is the number of failed steps.
#     bash benchmarks/gpu_session.sh
set -uo pipefail
OUT=${OUT:-/tmp/npo-gpu}
mkdir -p "$OUT"
fails=0
bash benchmarks/gpu.sh --no-trl-gc 2>&1 | tee "$OUT/gpu_bench.log" || fails=$((fails + 1))
# gpu.sh put the carried wheels (TRL, pydantic, ...) in /tmp/site
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
for cmd in "benchmarks/gpu_train_variants.py" "benchmarks/logprob_chunk.py --device cuda --rows 32 --tokens 256" \
           "benchmarks/cuda_smoke.py"; do
  name=$(basename "${cmd%% *}" .py)
  echo "== $cmd"
  timeout 240 python3 $cmd 2>&1 | tee "$OUT/$name.log" || fails=$((fails + 1))
done
echo "failed steps: $fails"
exit "$fails"
