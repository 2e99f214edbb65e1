#!/usr/bin/env bash
# Every GPU measurement in one run (logs and JSON in $OUT), most important first, all inside BUDGET
# seconds (default 570):
#   1. benchmarks/gpu.sh: npo vs TRL 1.16 GRPOTrainer at the Qwen2-0.5B shape (step time, MFU)
#   2. benchmarks/cuda_smoke.py: train / intervene / eval on cuda (npo's compiled decoding included)
#   3. benchmarks/decode_bench.py: generation alone, HF generate's static cache vs npo's decoding (+ profile)
#   4. the same head-to-head as 1 with npo's grpo.compile on (gpu_bench_compile.json)
#   5. benchmarks/gpu_train_variants.py: npo's update alone under recipe variants (+ profile of one)
#   6. benchmarks/logprob_chunk.py on cuda: recomputed LM-head chunks vs auto vs compiled at vocab 152k
# Each step runs even if an earlier one failed; the exit status is the number of failed or skipped steps.
# .whl/ (optional) holds TRL 1.16 and its needs, and transformers 5.19 (the version the CPU tests run),
# for a GPU machine whose Python lacks them (see DEVELOPERS.md).
#     bash benchmarks/gpu_session.sh        # results in $OUT (default /tmp/npo-gpu)
set -uo pipefail
# Every log and JSON goes to a work folder; after each step its JSON files and one tarball of everything are
# copied to $OUT, so a run stopped part-way still leaves the finished steps' results there.
RESULTS=${OUT:-/tmp/npo-gpu}
export OUT=/tmp/npo-gpu-work
mkdir -p "$OUT" "$RESULTS"
save() { cp "$OUT"/*.json "$RESULTS"/ 2>/dev/null; tar -czf "$RESULTS/gpu_session.tar.gz" -C "$OUT" .; }
END=$((SECONDS + ${BUDGET:-570}))
fails=0
step() {  # step NAME CAP_SECONDS COMMAND...: runs under min(CAP, time left), log in $OUT/NAME.log
  local name=$1 cap=$2 left=$((END - SECONDS))
  shift 2
  if [ "$left" -lt 30 ]; then echo "== $name: skipped (BUDGET spent)"; fails=$((fails + 1)); return; fi
  echo "== $name: $*"
  timeout $((left < cap ? left : cap)) "$@" 2>&1 | tee "$OUT/$name.log" || fails=$((fails + 1))
  save
}
step gpu_bench 240 bash benchmarks/gpu.sh --no-trl-gc
# gpu.sh installed the wheels of .whl/ (TRL, transformers, pydantic, ...), if any, in /tmp/site
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
step cuda_smoke 120 python3 benchmarks/cuda_smoke.py
step decode_bench 120 python3 benchmarks/decode_bench.py
step gpu_bench_compile 200 python3 benchmarks/gpu_bench.py --compile --no-trl-gc --json "$OUT/gpu_bench_compile.json"
step gpu_train_variants 200 python3 benchmarks/gpu_train_variants.py --steps 2 --profile "default, compiled"
step logprob_chunk 90 python3 benchmarks/logprob_chunk.py --device cuda --rows 32 --tokens 256
echo "failed steps: $fails"
exit "$fails"
