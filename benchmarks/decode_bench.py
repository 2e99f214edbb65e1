"""Generation alone at the GPU benchmark's shape (Qwen2-0.5B from a config, bf16, 16 prompts x 8 = 128 rows,
256 new tokens forced): HF generate with its static cache (compiled forward) against npo's own decoding
(rollout.static_cache: forward and sampling of each token replayed as one CUDA graph), both through
npo's HF backend, so both record the behaviour log-probs. Prints and writes the time per call (median
after warm-up calls, which compile) and a profile of one npo call's top CUDA kernels.

    python3 benchmarks/decode_bench.py [--small] [--json PATH]   # --small: CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import QWEN2_05B, SMALL
from grpo_bench import make_model_dir, sync


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--calls", type=int, default=2, help="timed calls of each (after 2 warm-up calls)")
    ap.add_argument("--json", metavar="PATH", help="results file (default $OUT/decode_bench.json when $OUT is set)")
    a = ap.parse_args()
    cfg = SMALL if a.small else QWEN2_05B
    if cfg.device == "cpu":
        torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from npo_cli.model import DTYPES
    from npo_cli.recipe import RolloutConfig
    from npo_cli.rollout import HFBackend

    rows, C = cfg.prompts * cfg.group, cfg.new_tokens
    prompts = [f"{i % 10}+{(i * 7) % 10}=" for i in range(cfg.prompts)]
    res: dict = {"config": {"rows": rows, "new_tokens": C, "dtype": cfg.dtype, "device": cfg.device,
                            "gpu": torch.cuda.get_device_name() if cfg.device == "cuda" else None}}
    with tempfile.TemporaryDirectory() as tmp:
        path, _ = make_model_dir(cfg, tmp)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[cfg.dtype]).to(cfg.device)
        tok = AutoTokenizer.from_pretrained(path)
        tok.padding_side = "left"
        rollout = RolloutConfig(max_new_tokens=C, batch_size=rows, static_cache=True, temperature=1.0)
        for name, own in (("HF generate, static cache", False), ("npo decoding", True)):
            backend = HFBackend(model, tok, rollout)
            backend.own_decoding = backend.own_decoding and own
            times = []
            try:
                for _ in range(2 + a.calls):
                    sync(cfg.device)
                    t0 = time.perf_counter()
                    out = backend.generate(prompts, cfg.group)
                    sync(cfg.device)
                    times.append(time.perf_counter() - t0)
                    assert all(len(r.completion_ids) == C for g in out for r in g), "EOS is outside the logits"
                s = statistics.median(times[2:])
                res[name] = {"s": s, "all": [round(t, 3) for t in times], "tokens_per_s": rows * C / s,
                             "own_decoding": backend.own_decoding, "compile_error": backend.compile_error}
            except Exception as e:  # noqa: BLE001  (one shot on the GPU: report, go on)
                res[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}", "all": times}
            print(name, json.dumps(res[name]), flush=True)
            if own and cfg.device == "cuda" and "error" not in res[name]:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    backend.generate(prompts, cfg.group)
                    sync(cfg.device)
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15), flush=True)
    if all("s" in res.get(k, {}) for k in ("HF generate, static cache", "npo decoding")):
        res["npo_over_hf_static"] = res["npo decoding"]["s"] / res["HF generate, static cache"]["s"]
        print(f"npo decoding / HF generate (static cache): {res['npo_over_hf_static']:.3f}")
    out = a.json or (str(Path(os.environ["OUT"]) / "decode_bench.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
