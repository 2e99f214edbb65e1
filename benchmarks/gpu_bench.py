"""npo vs TRL 1.16 GRPOTrainer at the Qwen2-0.5B shape on one GPU (run through benchmarks/gpu.sh).

Random init from a config (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864, vocab 151936,
tied embeddings), 16 prompts x 8 completions, exactly 256 new tokens (the tokenizer's EOS is id 151936,
outside the model's logits, so it is never sampled), bf16 weights on both sides (TRL also runs its bf16
autocast), temperature 1, built-in arithmetic prompts, exact-match reward, loss dapo/token-mean, beta 0,
eps 0.2/0.28, one optimizer step per batch, same micro batch (TRL per_device_train_batch_size x grad
accumulation = 128 rows), gradient checkpointing off on both (and TRL with its default on, after).

npo's GPU path: rollout.static_cache (HF static KV cache + compiled decoding; the first call compiles,
so warm-up steps are excluded and printed), log-probs with the LM head chunked to fit memory
(grpo.logprob_chunk=0, auto), micro-batching.

Reports per-step time of each, generation and training time apart, and training MFU:
6 * N * T / train_time / 989e12 (H100 SXM / H200 bf16 dense), N = all parameters with the tied embedding
counted once (it is the LM-head matmul; the embedding lookup is free), T = rows x (max prompt + max
completion) tokens of the training batch (padding included); attention-score FLOPs are not counted.
Also printed: MFU with N + V*H (the embedding counted again, as if untied), the convention that makes
the reference figure for a plain HF training step at this shape, "0.54 s for 40,960 tokens = 29% MFU",
come out (N + V*H = 630M).

    bash benchmarks/gpu.sh                 # H100 or H200: the 0.5B shape
    PYTHON=.venv/bin/python bash benchmarks/gpu.sh --small   # CPU smoke test of the same script

Results: a table on stdout and $OUT/gpu_bench.json when $OUT is set (else --json PATH).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo_bench import BenchConfig, run, table

QWEN2_05B = BenchConfig(
    hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936,
    prompts=16, group=8, new_tokens=256, force_length=True, dtype="bfloat16", device="cuda",
    static_cache=True, micro_batch=64, logprob_chunk=0, warmup=1, steps=3, lr=1e-6, threads=1,
)
# the same code path on a CPU in well under a minute
SMALL = replace(QWEN2_05B, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=256, prompts=4, group=4,
                new_tokens=16, micro_batch=8, device="cpu", logprob_chunk=0, warmup=1, steps=1)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny shape on CPU (smoke test of this script)")
    ap.add_argument("--steps", type=int, help="timed steps of each trainer (default 3; --small 1)")
    ap.add_argument("--warmup", type=int, help="untimed steps of each trainer first (default 1)")
    ap.add_argument("--micro-batch", type=int, help="rows per forward/backward on both sides (default 64)")
    ap.add_argument("--no-static-cache", action="store_true", help="npo without the static KV cache")
    ap.add_argument("--compile", action="store_true", help="npo with grpo.compile (warm-up 2 steps: it compiles)")
    ap.add_argument("--no-trl-gc", action="store_true", help="skip timing TRL with gradient checkpointing on")
    ap.add_argument("--reward", choices=("hash", "exact"), default="hash",
                    help="hash (default): a coin flip on the completion, so every group trains; exact: the "
                    "arithmetic verifier (all-zero at random init: npo skips zero-advantage rows, TRL does not)")
    ap.add_argument("--json", metavar="PATH", help="results file (default $OUT/gpu_bench.json when $OUT is set)")
    a = ap.parse_args(argv)
    cfg = SMALL if a.small else QWEN2_05B
    if not a.small and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --small for the CPU smoke test")
    over = {"with_trl_gc": not a.no_trl_gc, "static_cache": not a.no_static_cache, "reward": a.reward,
            "compile": a.compile, **({"warmup": 2} if a.compile else {})}
    for k in ("steps", "warmup", "micro_batch"):
        if getattr(a, k) is not None:
            over[k] = getattr(a, k)
    cfg = replace(cfg, **over)
    if cfg.device == "cpu":
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    print(f"npo vs TRL GRPOTrainer: hidden {cfg.hidden}, {cfg.layers} layers, vocab {cfg.vocab}, "
          f"{cfg.prompts}x{cfg.group}, {cfg.new_tokens} new tokens (forced), {cfg.dtype}, {cfg.device}, "
          f"micro batch {cfg.micro_batch}, npo static cache {cfg.static_cache}, npo compile {cfg.compile}", flush=True)
    res = run(cfg, log=lambda s: print(s, flush=True))
    res["wall_s"] = time.perf_counter() - t0
    print(table(res))
    for side in ("npo", "trl", "trl_gc"):
        if isinstance(res.get(side), dict) and "step_s_all" in res[side]:
            print(f"{side}: all step times {res[side]['step_s_all']} (first {cfg.warmup} = warm-up)")
    if res.get("errors"):
        print("errors:", json.dumps(res["errors"]))
    if "max_memory_gib" in res:
        print(f"peak GPU memory allocated: {res['max_memory_gib']:.1f} GiB")
    print(f"N = {res['n_params'] / 1e6:.1f}M parameters; total wall {res['wall_s']:.0f}s")
    out = a.json or (str(Path(os.environ["OUT"]) / "gpu_bench.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(json.dumps(res, indent=2))
        print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
