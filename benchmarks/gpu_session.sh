#!/usr/bin/env bash
# Every GPU measurement in one run (logs and JSON in $OUT), most important first, all inside BUDGET
# seconds (default 570):
#   1. npo vs TRL 1.16 GRPOTrainer, forced shape (128 x 256 tokens), each TRL transformers path (dynamic
#      cache, static cache, continuous batching), npo at its CUDA defaults, + the top kernels of an npo step
#   2. the same on the reasoning shape (up to 1,024 tokens, natural EOS, geometric lengths with mean 256)
#   3. benchmarks/decode_bench.py, reasoning shape: npo's decoding loop dropping ended rows vs keeping them
#   4. benchmarks/cuda_smoke.py: train / intervene / eval on cuda at the defaults, dropped rows checked
#   5. benchmarks/gpu_train_variants.py: npo's update alone under recipe variants (+ profile of the default)
#   6. benchmarks/logprob_chunk.py on cuda: recomputed LM-head chunks vs auto vs compiled at vocab 152k
# Steps 1 and 2 should take about 9 minutes on an H200 (estimated: the TRL steps at 1,024 tokens dominate), so
# with the default budget the later steps are skipped: FROM=3 starts at step 3 (a second run).
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
n=0
step() {  # step NAME CAP_SECONDS COMMAND...: runs under min(CAP, time left), log in $OUT/NAME.log
  local name=$1 cap=$2 left=$((END - SECONDS))
  shift 2
  n=$((n + 1))
  if [ "$n" -lt "${FROM:-1}" ]; then return; fi
  if [ "$left" -lt 30 ]; then echo "== $name: skipped (BUDGET spent)"; fails=$((fails + 1)); return; fi
  echo "== $name: $*"
  timeout $((left < cap ? left : cap)) "$@" 2>&1 | tee "$OUT/$name.log" || fails=$((fails + 1))
  save
}
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ -d .whl ]; then  # the wheels the GPU image lacks (TRL, transformers 5.19, pydantic, ...), as gpu.sh does
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  python3 -c "import transformers, trl" 2>/dev/null || { echo ".whl/ transformers does not import: using the installed one"; rm -rf /tmp/site/transformers /tmp/site/transformers-*; }
fi
step gpu_bench_forced 250 python3 benchmarks/gpu_bench.py --shape forced --profile --json "$OUT/gpu_bench_forced.json"
step gpu_bench_reasoning 320 python3 benchmarks/gpu_bench.py --shape reasoning --json "$OUT/gpu_bench_reasoning.json"
step decode_bench 240 python3 benchmarks/decode_bench.py --shape reasoning --calls 1 \
  --variants npo-every-row,npo,static,continuous
step cuda_smoke 150 python3 benchmarks/cuda_smoke.py
step gpu_train_variants 200 python3 benchmarks/gpu_train_variants.py --steps 2 --profile "default ("
step logprob_chunk 90 python3 benchmarks/logprob_chunk.py --device cuda --rows 32 --tokens 256
echo "failed steps: $fails"
exit "$fails"
