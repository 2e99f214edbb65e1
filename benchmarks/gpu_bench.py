"""npo vs TRL 1.16 GRPOTrainer at the Qwen2-0.5B shape on one GPU (run through benchmarks/gpu.sh), against each of
TRL's transformers generation paths, in two rollout shapes.

Model: random init from a config (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864, vocab
151936, tied embeddings), bf16 weights on both sides (TRL also runs its bf16 autocast), 16 prompts x 8
completions, temperature 1, built-in arithmetic prompts, reward a coin flip on the completion text (--reward
hash: every group trains) or the exact-match verifier, loss dapo/token-mean, beta 0, eps 0.2/0.28, one
optimizer step per batch, the same micro batch on both sides (TRL per_device_train_batch_size x grad
accumulation = 128 rows), gradient checkpointing off on both.

Shapes (--shape, default both):
  forced     exactly 256 new tokens per completion (the tokenizer's EOS is id 151936, outside the model's
             logits, so it is never sampled): QWEN2_05B, the published figure
  reasoning  completions end naturally, lengths geometric with mean 256 cut at 1024 new tokens (the model's
             generation_config.eos_token_id is a stop set of 594 ids: see benchmarks/grpo_bench.py):
             QWEN2_05B_REASONING; here useful tokens (up to the EOS, no padding) per second matter

TRL paths (--trl-paths, default all three; grpo_bench.TRL_PATHS, the settings TRL's docs recommend):
  dynamic    TRL's default, HF generate with a dynamic KV cache
  static     HF generate with cache_implementation="static" (TRL passes disable_compile=True)
  paged      transformers continuous batching, use_cuda_graph False, max_memory_percent 0.4
One npo trainer per shape, built once, steps once after each TRL step of each path (TRL trainers built and
freed one after the other), so every TRL figure has npo's measured alongside it.

npo runs at its CUDA defaults: rollout.static_cache (npo's own decoding: a static KV cache, forward and
sampling replayed as a CUDA graph, rows that have ended dropped every 32 tokens) and grpo.compile (compiled
decoder layers and LM-head log-probs); its first steps compile, so 2 npo warm-up steps run alone first and
are printed, not timed. Log-probs with the LM head chunked to fit memory (grpo.logprob_chunk=0, auto),
micro-batching. --no-compile / --no-static-cache time npo without them; --profile adds the top kernels of
one npo step.

Reports per-step time of each, generation and training time apart, useful tokens/s, the completion length
distribution, and training MFU: 6 * N * T / train_time / 989e12 (H100 SXM / H200 bf16 dense), N = all
parameters with the tied embedding counted once (it is the LM-head matmul; the embedding lookup is free),
T = rows x (max prompt + max completion) tokens of the training batch (padding included); attention-score
FLOPs are not counted. Also printed: MFU with N + V*H (the embedding counted again, as if untied), the
convention that makes the reference figure for a plain HF training step at this shape, "0.54 s for 40,960
tokens = 29% MFU", come out (N + V*H = 630M).

    bash benchmarks/gpu.sh                                   # H100 or H200: both shapes, all TRL paths
    bash benchmarks/gpu.sh --shape forced --trl-paths dynamic
    PYTHON=.venv/bin/python bash benchmarks/gpu.sh --small   # CPU smoke test of the same script

Results: a table per shape on stdout and $OUT/gpu_bench.json ({"forced": ..., "reasoning": ...}, the shapes
run) when $OUT is set (else --json PATH).
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
from grpo_bench import TRL_PATHS, BenchConfig, describe, free, make_model_dir, run, table  # noqa: F401 (re-exported)

QWEN2_05B = BenchConfig(
    hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936,
    prompts=16, group=8, new_tokens=256, force_length=True, dtype="bfloat16", device="cuda",
    static_cache=None, compile=None, micro_batch=64, logprob_chunk=0, warmup=1, npo_warmup=2, steps=2, lr=1e-6,
    threads=1,
)  # npo at its CUDA defaults (static cache and compile on); its 2 warm-up steps alone pay the compiles
# the same model, rollouts shaped like reasoning RL: natural EOS, geometric lengths, mean 256, cut at 1024
# (a TRL dynamic-cache step at 1024 tokens takes ~30 s: one timed step per path)
QWEN2_05B_REASONING = replace(QWEN2_05B, new_tokens=1024, mean_length=256, force_length=False, steps=1)
# the same code paths on a CPU: forced at vocab 151936 (the GPU shape's LM head), and the reasoning shape at
# vocab 4096 with 8x8 rows (64 lengths per step: the mean length lands near 32)
SMALL = replace(QWEN2_05B, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=256, prompts=4, group=4,
                new_tokens=16, micro_batch=8, device="cpu", logprob_chunk=0, warmup=1, npo_warmup=1, steps=1,
                static_cache=True, compile=False)  # npo's decoding loop, eager; --compile adds grpo.compile
SMALL_REASONING = replace(SMALL, vocab=4096, prompts=8, group=8, new_tokens=128, mean_length=32, force_length=False,
                          micro_batch=16)

SHAPES = {"forced": (QWEN2_05B, SMALL), "reasoning": (QWEN2_05B_REASONING, SMALL_REASONING)}


def header(shape: str, cfg: BenchConfig) -> str:
    paths = "; ".join(f"trl {p}: {TRL_PATHS[p] or 'TRL defaults'}" for p in cfg.trl_paths)
    return f"== {shape}: {describe(cfg)}\n   TRL paths: {paths}"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes on CPU (smoke test of this script)")
    ap.add_argument("--shape", choices=("forced", "reasoning", "both"), default="both",
                    help="forced: exactly new_tokens per completion; reasoning: natural EOS, geometric lengths")
    ap.add_argument("--trl-paths", default=",".join(TRL_PATHS),
                    help=f"TRL generation paths timed against npo, in order (default {','.join(TRL_PATHS)})")
    ap.add_argument("--steps", type=int, help="timed steps per TRL path (default forced 2, reasoning 1; --small 1)")
    ap.add_argument("--warmup", type=int, help="untimed steps first per TRL path (default 1)")
    ap.add_argument("--micro-batch", type=int, help="rows per forward/backward on both sides (default 64)")
    ap.add_argument("--no-static-cache", action="store_true", help="npo without the static KV cache")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="npo with or without grpo.compile (default: npo's own default, on for CUDA)")
    ap.add_argument("--profile", action="store_true", help="on CUDA, the top kernels of one npo step after the timed ones")
    ap.add_argument("--no-trl-gc", action="store_true",
                    help="accepted for older command lines; TRL's gradient checkpointing is off anyway")
    ap.add_argument("--reward", choices=("hash", "exact"), default="hash",
                    help="hash (default): a coin flip on the completion, so every group trains; exact: the "
                    "arithmetic verifier (all-zero at random init: npo skips zero-advantage rows, TRL does not)")
    ap.add_argument("--json", metavar="PATH", help="results file (default $OUT/gpu_bench.json when $OUT is set)")
    a = ap.parse_args(argv)
    paths = tuple(p.strip() for p in a.trl_paths.split(",") if p.strip())
    if not paths or any(p not in TRL_PATHS for p in paths):
        ap.error(f"--trl-paths: a comma-separated list of {', '.join(TRL_PATHS)}")
    if not a.small and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --small for the CPU smoke test")
    shapes = ("forced", "reasoning") if a.shape == "both" else (a.shape,)
    over = {"reward": a.reward, "trl_paths": paths, "profile": a.profile}
    if a.no_static_cache:
        over["static_cache"] = False
    if a.compile is not None:
        over["compile"] = a.compile
    for k in ("steps", "warmup", "micro_batch"):
        if getattr(a, k) is not None:
            over[k] = getattr(a, k)
    out = a.json or (str(Path(os.environ["OUT"]) / "gpu_bench.json") if os.environ.get("OUT") else None)
    results: dict = {}
    t_all = time.perf_counter()
    for shape in shapes:
        cfg = replace(SHAPES[shape][1 if a.small else 0], **over)
        if cfg.device == "cpu":
            torch.set_num_threads(cfg.threads)
        t0 = time.perf_counter()
        print(header(shape, cfg), flush=True)
        res = run(cfg, log=lambda s: print(s, flush=True))
        res["wall_s"] = time.perf_counter() - t0
        res["shape"] = shape
        results[shape] = res
        print(f"\n{header(shape, cfg)}")
        print(table(res))
        print(f"npo: all step times {res['npo'].get('step_s_all')} "
              + (f"(after {cfg.npo_warmup} warm-up steps: {res.get('npo_warmup_s')})" if cfg.npo_warmup
                 else f"(first {cfg.warmup} = warm-up)"))
        for p, e in res.get("paths", {}).items():
            if e.get("trl"):
                print(f"trl {p}: all step times {e['trl']['step_s_all']} (first {cfg.warmup} = warm-up)")
            if "max_memory_gib" in e:
                print(f"trl {p}: peak GPU memory allocated (both trainers) {e['max_memory_gib']:.1f} GiB")
        if res.get("errors"):
            print("errors:", json.dumps(res["errors"]))
        print(f"N = {res['n_params'] / 1e6:.1f}M parameters; {shape} wall {res['wall_s']:.0f}s\n", flush=True)
        if out:  # after each shape: a run stopped part-way keeps the shapes it finished
            Path(out).write_text(json.dumps(results, indent=2))
        free(cfg.device)
    print(f"total wall {time.perf_counter() - t_all:.0f}s")
    if out:
        print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
