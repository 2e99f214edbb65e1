"""Cost of chunking the LM head in backward: token_logprobs forward + backward at a 152k vocabulary,
recomputed chunks (grpo.logprob_chunk=N) vs auto (0: one chunk when the logits fit, nothing recomputed),
and auto with the torch.compile'd head (grpo.compile; its compile is excluded).

    .venv/bin/python benchmarks/logprob_chunk.py [--chunk 256] [--rows 16] [--tokens 64] [--device cpu|cuda]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from npo_cli.grpo import token_logprobs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", metavar="PATH", help="also write the timings here")
    a = ap.parse_args()
    torch.set_num_threads(1)
    cfg = Qwen2Config(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=512, vocab_size=151_936, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg).to(a.device)
    ids = torch.randint(0, cfg.vocab_size, (a.rows, a.tokens + 8), device=a.device)
    am = torch.ones_like(ids)
    variants = {f"chunk {a.chunk} (recomputed)": (a.chunk, False), "auto": (0, False), "auto, compiled": (0, True)}
    lp, _ = token_logprobs(model, ids, am, a.tokens, 0, with_entropy=False, compiled=True)  # compile it
    lp.sum().backward()
    best = {}
    for name, (chunk, compiled) in list(variants.items()) * 2:  # interleaved, best of 3 each
        for _ in range(3):
            if a.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            lp, _ = token_logprobs(model, ids, am, a.tokens, chunk, with_entropy=False, compiled=compiled)
            lp.sum().backward()
            if a.device == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
    first = next(iter(best.values()))
    print(f"{a.rows * a.tokens} tokens, vocab {cfg.vocab_size}, {a.device}, forward + backward (best of 6): "
          + ", ".join(f"{k} {v:.3f} s ({v / first:.2f}x)" for k, v in best.items()))
    if a.json:
        conf = {k: v for k, v in vars(a).items() if k != "json"}
        Path(a.json).write_text(json.dumps({
            "config": {**conf, "vocab": cfg.vocab_size, "torch": torch.__version__, "threads": 1},
            "best_s": best, "ratio_to_first": {k: v / first for k, v in best.items()}}, indent=1))


if __name__ == "__main__":
    main()
