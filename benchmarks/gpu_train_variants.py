"""Training-phase variants of npo's update on the Qwen2-0.5B shape (GPU): the same 128 x 256-token
batch with random advantages, timed through `Trainer.update` under different recipe settings, next to a
plain full-logits HF step in pure bf16 (the shape of TRL's update). No generation: the rollouts are
random token ids, so every variant trains on identical data.

    python3 benchmarks/gpu_train_variants.py [--small] [--json out.json]   # --small: CPU smoke test

Results: one line per variant on stdout and $OUT/gpu_train_variants.json when $OUT is set (else --json PATH).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import QWEN2_05B, SMALL
from grpo_bench import H100_BF16_DENSE, make_model_dir

VARIANTS = {  # (fixed 2048-token chunks: benchmarks/results/gpu_train_variants_h100.json)
    "fp32 master, auto chunk, uncompiled": ["grpo.compile=false"],
    "default (fp32 master, auto chunk, compiled on CUDA)": [],
    "pure bf16, auto chunk, uncompiled": ["model.master_fp32=false", "grpo.compile=false"],
    "pure bf16, compiled": ["model.master_fp32=false", "grpo.compile=true"],
    "pure bf16, compiled, micro 128": ["model.master_fp32=false", "grpo.compile=true", "grpo.micro_batch_size=128"],
}


def sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--only", help="variants whose name contains this (e.g. compiled)")
    ap.add_argument("--profile", metavar="TEXT", help="print the top CUDA kernels of one update of the variants "
                    "whose name contains TEXT")
    ap.add_argument("--json", metavar="PATH",
                    help="results file (default $OUT/gpu_train_variants.json when $OUT is set)")
    a = ap.parse_args()
    cfg = SMALL if a.small else QWEN2_05B
    dev = "cuda" if cfg.device.startswith("cuda") else "cpu"
    from npo_cli.branching import new_trainer
    from npo_cli.recipe import build_recipe
    from npo_cli.rollout import Rollout
    from npo_cli.store import Store

    rows_n, P, C = cfg.prompts * cfg.group, 8, cfg.new_tokens
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (rows_n, P + C), generator=g).tolist()
    rows = [Rollout(prompt_ids=r[:P], completion_ids=r[P:], logprobs=[-1.0] * C, text="", finished=False)
            for r in ids]
    adv = torch.randn(rows_n, generator=g)
    tokens = rows_n * (P + C)
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        path, n_params = make_model_dir(cfg, tmp)
        for name, sets in VARIANTS.items():
            if a.only and a.only not in name:
                continue
            recipe = build_recipe({
                "name": "v", "model": {"path": path, "dtype": cfg.dtype, "device": dev},
                "rollout": {"prompts_per_step": cfg.prompts, "group_size": cfg.group, "max_new_tokens": C},
                "grpo": {"micro_batch_size": cfg.micro_batch, "logprob_chunk": cfg.logprob_chunk, "lr": 1e-6},
                "logging": {"progress": False, "metrics_jsonl": None},
            }, sets)
            try:
                t = new_trainer(recipe, Store.open(f"memory://v-{os.getpid()}-{time.time_ns()}"))
                times = []
                warm = 2 if "compiled" in name else 1  # compiled: the first two calls may compile
                for _ in range(warm + a.steps):
                    sync(dev)
                    t0 = time.perf_counter()
                    t.update(rows, adv)
                    sync(dev)
                    times.append(time.perf_counter() - t0)
                med = sorted(times[warm:])[len(times[warm:]) // 2]
                res[name] = {"train_s": med, "all": [round(x, 4) for x in times],
                             "mfu": 6 * n_params * tokens / med / H100_BF16_DENSE if dev == "cuda" else None}
                if a.profile and a.profile in name and dev == "cuda":  # where the update's time goes
                    from torch.profiler import ProfilerActivity, profile

                    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                        t.update(rows, adv)
                        sync(dev)
                    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20), flush=True)
                del t
            except Exception as e:  # noqa: BLE001  (one shot on the GPU: report, go on)
                res[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            if dev == "cuda":
                res[name]["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            print(name, json.dumps(res[name]), flush=True)

        # plain HF step, pure bf16, full logits (what TRL's update does per micro-batch)
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cfg.dtype)).to(dev)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-6, fused=dev == "cuda")
        x = torch.tensor(ids, device=dev)
        times = []
        for _ in range(1 + a.steps):
            sync(dev)
            t0 = time.perf_counter()
            for s in range(0, rows_n, cfg.micro_batch):
                xb = x[s : s + cfg.micro_batch]
                logits = m(input_ids=xb).logits[:, P - 1 : -1].float()
                lp = torch.log_softmax(logits, -1).gather(-1, xb[:, P:, None]).squeeze(-1)
                (-(lp * adv[s : s + cfg.micro_batch, None].to(dev)).mean()).backward()
                del logits, lp
            opt.step()
            opt.zero_grad()
            sync(dev)
            times.append(time.perf_counter() - t0)
        med = sorted(times[1:])[len(times[1:]) // 2]
        res["plain HF, pure bf16, full logits"] = {
            "train_s": med, "all": [round(x, 4) for x in times],
            "mfu": 6 * n_params * tokens / med / H100_BF16_DENSE if dev == "cuda" else None}
        print("plain HF", json.dumps(res["plain HF, pure bf16, full logits"]), flush=True)
    env_out = os.environ.get("OUT")
    out = a.json or (str(Path(env_out) / "gpu_train_variants.json") if env_out else None)
    if out:
        Path(out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
