"""CUDA path check (one run on a GPU machine): a warm-started tiny run trained on cuda in
bf16 with the static KV cache, `npo intervene` on it (guide sampling on cuda), the behaviour
log-probs against a fresh forward, and `npo eval`. Prints one JSON line per check; exits 1 on failure.

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
    from npo_cli.batch import collate
    from npo_cli.branching import new_trainer
    from npo_cli.commands import eval_checkpoint, intervene
    from npo_cli.example import quick_warm_start
    from npo_cli.grpo import token_logprobs
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
        "rollout": {"prompts_per_step": 16, "group_size": 8, "max_new_tokens": 4,
                    "static_cache": a.device == "cuda"},
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
    b = collate(rows, t.pad_id, t.device)
    with torch.no_grad():
        logp, _ = token_logprobs(t.model, b["input_ids"], b["attention_mask"], b["n_completion"], 2048,
                              with_entropy=False)
    diff = ((logp.float() - b["old_logp"]).abs() * b["mask"]).max()
    print(json.dumps({"check": "logprob_match", "max_abs_diff": float(diff)}), flush=True)

    t0 = time.perf_counter()
    out = intervene(str(store_dir), run="cuda", at=0, guide="cuda@8", until=8,
                    overrides=["logging.metrics_jsonl=null"], progress=False)
    npo_keys = {k: v for k, v in out.items() if isinstance(v, (int, float))}
    print(json.dumps({"check": "intervene", "s": round(time.perf_counter() - t0, 1), "branch": out["plan"]["branch"],
                      **npo_keys}), flush=True)
    ev = eval_checkpoint(store, f"cuda/{out['plan']['branch']}", samples=2)
    print(json.dumps({"check": "eval", **ev}), flush=True)
    ok = res.get("steps", 8) and float(diff) < 0.1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
