"""CUDA path check (one run on a GPU machine): a warm-started tiny run trained on cuda in
bf16 at npo's CUDA defaults (static KV cache with compiled decoding, grpo.compile), `npo intervene` on it
(guide sampling on cuda), the behaviour log-probs against a fresh forward, `npo eval`, and the compiled
decoding loop dropping ended rows (CUDA graphs of 64, 32 and 16 rows) against the loop that keeps every row.
Prints one JSON line per check; exits 1 on failure.

    python3 benchmarks/cuda_smoke.py [--store DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default=None)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    from npo_cli.branching import new_trainer
    from npo_cli.commands import eval_checkpoint, intervene
    from npo_cli.example import quick_warm_start
    from npo_cli.recipe import build_recipe
    from npo_cli.store import Store

    torch.set_num_threads(4)
    root = Path(a.store or tempfile.mkdtemp())
    store_dir = root / "store"
    t0 = time.perf_counter()
    store = Store.open(str(store_dir))
    quick_warm_start(store, steps=200, task={"arithmetic": {"digits": 1}, "eval_size": 16})
    print(json.dumps({"check": "warm_start", "s": round(time.perf_counter() - t0, 1)}), flush=True)
    recipe = build_recipe({
        "name": "cuda", "model": {"path": "base@0", "device": a.device, "dtype": "bfloat16"},
        "task": {"arithmetic": {"digits": 1}, "eval_size": 64},
        "rollout": {"prompts_per_step": 16, "group_size": 8, "max_new_tokens": 4},
        "grpo": {"lr": 5e-4}, "train": {"steps": 8, "save_every": 4, "eval_every": 8},
        "logging": {"progress": False, "metrics_jsonl": None},
    })
    t = new_trainer(recipe, store)
    t0 = time.perf_counter()
    res = t.train()
    hist = t.history
    print(json.dumps({"check": "grpo_run", "s": round(time.perf_counter() - t0, 1),
                      "device": str(t.device), "dtype": str(next(t.model.parameters()).dtype),
                      "reward_first": hist[0]["reward"], "reward_last": hist[-1]["reward"],
                      "step_s": [round(m["step_time"], 3) for m in hist],
                      "eval": {k: v for k, v in hist[-1].items() if k.startswith("eval/")}}), flush=True)

    # behaviour log-probs (recorded while sampling) vs a fresh forward of the same sequences
    rows = [ro for g in t.backend.generate(["3+4=", "8+1=", "5+5="], 8) for ro in g]
    diff = max_logprob_gap(t.model, rows, t.pad_id, t.device, chunk=2048)
    print(json.dumps({"check": "logprob_match", "max_abs_diff": diff}), flush=True)

    t0 = time.perf_counter()
    out = intervene(str(store_dir), run="cuda", at=0, guide="cuda@8", until=8,
                    overrides=["logging.metrics_jsonl=null"], progress=False)
    npo_keys = {k: v for k, v in out.items() if isinstance(v, (int, float))}
    print(json.dumps({"check": "intervene", "s": round(time.perf_counter() - t0, 1), "branch": out["plan"]["branch"],
                      **npo_keys}), flush=True)
    ev = eval_checkpoint(store, f"cuda/{out['plan']['branch']}", samples=2)
    print(json.dumps({"check": "eval", **ev}), flush=True)
    drop = dropped_rows_check(a.device)
    print(json.dumps({"check": "drop_ended_rows", **drop}), flush=True)
    ok = res.get("steps", 8) and diff < 0.1 and drop["greedy_equal"] and drop["max_logprob_diff"] < 1e-3
    return 0 if ok else 1


def max_logprob_gap(model, rows, pad_id, device, chunk: int, temperature: float = 1.0) -> float:
    """The largest gap between the log-probs recorded while sampling `rows` and a fresh forward's."""
    from npo_cli.batch import collate
    from npo_cli.grpo import token_logprobs

    b = collate(rows, pad_id, device)
    with torch.no_grad():
        logp, _ = token_logprobs(model, b["input_ids"], b["attention_mask"], b["n_completion"], chunk,
                                 with_entropy=False, temperature=temperature)
    return float(((logp.float() - b["old_logp"]).abs() * b["mask"]).max())


def dropped_rows_check(device: str) -> dict:
    """A random tiny Qwen2 (fp32, weights 15x the usual init: greedy continuations end anywhere from 1 to 150
    tokens) decoded through the compiled loop: greedy tokens equal with and without dropping ended rows, and
    sampled log-probs equal a fresh forward's."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from npo_cli.recipe import RolloutConfig
    from npo_cli.rollout import HFBackend
    from npo_cli.tiny import char_tokenizer

    tok = char_tokenizer()
    config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         initializer_range=0.3)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(device).eval()
    prompts = [f"{x}+{y}=" for x in range(6) for y in range(0, 50, 7)]
    cfg = RolloutConfig(max_new_tokens=150, batch_size=64, static_cache=True, temperature=0.9)
    t0 = time.perf_counter()
    got = {}
    for drop in (False, True):
        backend = HFBackend(model, tok, cfg)
        backend.drop_finished = drop
        got[drop] = [g[0] for g in backend.generate(prompts, 1, greedy=True)]
        rows = [r for g in backend.generate(prompts[:8], 8) for r in g]
    lengths = sorted(len(r.completion_ids) for r in got[True])
    return {"s": round(time.perf_counter() - t0, 1), "lengths_min_median_max": [lengths[0], lengths[len(lengths) // 2],
                                                                                 lengths[-1]],
            "greedy_equal": [r.completion_ids for r in got[False]] == [r.completion_ids for r in got[True]],
            "max_logprob_diff": max_logprob_gap(model, rows, tok.pad_token_id, device, chunk=0, temperature=0.9),
            "caches": sorted(backend._caches), "compile_error": backend.compile_error}


if __name__ == "__main__":
    sys.exit(main())
