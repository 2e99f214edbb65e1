"""Generation alone at the GPU benchmark's shapes (Qwen2-0.5B from a config, bf16, 16 prompts x 8 = 128 rows),
both rollout shapes of benchmarks/gpu_bench.py:

- forced: 256 new tokens, EOS outside the logits, so every row runs to the end;
- reasoning: up to 1,024 new tokens ending at a natural EOS, lengths geometric with mean 256 (a stop set of
  1 in 256 vocabulary ids; see grpo_bench.py): from a few tokens to the limit, as in reasoning RL.

Each shape is sampled by, all through npo's HF backend (so each records the behaviour log-probs):
- "HF generate, dynamic cache": what TRL's GRPOTrainer runs by default;
- "HF generate, static cache": HF generate with cache_implementation="static" (its compiled forward);
- "npo decoding, every row to the end": rollout.static_cache's own loop as it was, every row decoded until
  all have ended (checked every 32 tokens);
- "npo decoding": the same loop dropping the rows that have ended every 32 tokens (the default).
Prints and writes the time per call (median after warm-up calls, which compile), useful tokens per second
(completion tokens up to and including EOS, no padding), the before/after ratio of npo's loop, and on CUDA a
profile of one npo call's top kernels.

    python3 benchmarks/decode_bench.py [--small] [--shape forced|reasoning|both] [--json PATH]
    # --small: the same at a tiny shape on CPU
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
from gpu_bench import QWEN2_05B, QWEN2_05B_REASONING, SMALL, SMALL_REASONING
from grpo_bench import make_model_dir, sync

# name -> (rollout.static_cache, npo's own loop, drop ended rows, warm-up calls)
VARIANTS = {
    "HF generate, dynamic cache": (False, False, False, 1),
    "HF generate, static cache": (True, False, False, 2),
    "npo decoding, every row to the end": (True, True, False, 2),
    "npo decoding": (True, True, True, 2),
}


def time_shape(cfg, calls: int, variants: list[str], log=print) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from npo_cli.model import DTYPES
    from npo_cli.recipe import RolloutConfig
    from npo_cli.rollout import HFBackend

    rows, C = cfg.prompts * cfg.group, cfg.new_tokens
    prompts = [f"{i % 10}+{(i * 7) % 10}=" for i in range(cfg.prompts)]
    res: dict = {"config": {"rows": rows, "new_tokens": C, "forced_length": cfg.force_length,
                            "mean_length": cfg.mean_length, "dtype": cfg.dtype, "device": cfg.device,
                            "gpu": torch.cuda.get_device_name() if cfg.device == "cuda" else None}}
    with tempfile.TemporaryDirectory() as tmp:
        path, _ = make_model_dir(cfg, tmp)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[cfg.dtype]).to(cfg.device)
        tok = AutoTokenizer.from_pretrained(path)
        tok.padding_side = "left"
        for name in variants:
            static, own, drop, warmup = VARIANTS[name]
            rollout = RolloutConfig(max_new_tokens=C, batch_size=rows, static_cache=static, temperature=1.0)
            backend = HFBackend(model, tok, rollout)
            backend.own_decoding = backend.own_decoding and own
            backend.drop_finished = drop
            times, useful = [], []
            torch.manual_seed(cfg.seed)  # every variant samples from the same seed
            try:
                for _ in range(warmup + calls):
                    sync(cfg.device)
                    t0 = time.perf_counter()
                    out = [r for g in backend.generate(prompts, cfg.group) for r in g]
                    sync(cfg.device)
                    times.append(time.perf_counter() - t0)
                    useful.append(sum(len(r.completion_ids) for r in out))
                    if cfg.force_length:
                        assert all(len(r.completion_ids) == C for r in out), "EOS is outside the logits"
                s, u = statistics.median(times[warmup:]), statistics.median(useful[warmup:])
                res[name] = {"s": s, "all": [round(t, 3) for t in times], "warmup_calls": warmup,
                             "useful_tokens": u, "mean_completion_len": u / rows,
                             "useful_tokens_per_s": u / s, "own_decoding": backend.own_decoding,
                             "drop_finished": drop, "compile_error": backend.compile_error}
            except Exception as e:  # noqa: BLE001  (one shot on the GPU: report, go on)
                res[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}", "all": times}
            log(f"  {name}: {json.dumps(res[name])}")
            if name == "npo decoding" and cfg.device == "cuda" and "error" not in res[name]:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    backend.generate(prompts, cfg.group)
                    sync(cfg.device)
                log(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
            del backend
            if cfg.device == "cuda":
                torch.cuda.empty_cache()
    ok = {k: v["s"] for k, v in res.items() if isinstance(v, dict) and "s" in v}
    if "npo decoding" in ok and "npo decoding, every row to the end" in ok:
        res["npo_drop_speedup"] = ok["npo decoding, every row to the end"] / ok["npo decoding"]
    for ref in ("HF generate, dynamic cache", "HF generate, static cache"):
        if "npo decoding" in ok and ref in ok:
            res[f"npo_over_{'hf_dynamic' if 'dynamic' in ref else 'hf_static'}"] = ok["npo decoding"] / ok[ref]
    return res


def table(res: dict) -> str:
    c = res["config"]
    shape = (f"{c['rows']} rows, {c['new_tokens']} new tokens forced" if c["forced_length"] else
             f"{c['rows']} rows, up to {c['new_tokens']} new tokens, natural EOS (mean length {c['mean_length']})")
    lines = [f"{shape}, {c['dtype']} on {c['gpu'] or c['device']}",
             f"{'':38s}{'s/call':>9s}{'mean len':>10s}{'useful tok/s':>14s}"]
    for name in VARIANTS:
        v = res.get(name)
        if v is None:
            continue
        if "error" in v:
            lines.append(f"{name:38s}  failed: {v['error'][:80]}")
        else:
            lines.append(f"{name:38s}{v['s']:9.3f}{v['mean_completion_len']:10.1f}{v['useful_tokens_per_s']:14.0f}")
    for key, label in (("npo_drop_speedup", "npo decoding: every row to the end / dropping ended rows"),
                       ("npo_over_hf_static", "npo decoding / HF generate (static cache)"),
                       ("npo_over_hf_dynamic", "npo decoding / HF generate (dynamic cache)")):
        if key in res:
            lines.append(f"{label}: {res[key]:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes on CPU (smoke test of this script)")
    ap.add_argument("--shape", choices=("forced", "reasoning", "both"), default="both")
    ap.add_argument("--calls", type=int, default=2, help="timed calls of each variant (after its warm-up calls)")
    ap.add_argument("--variants", help="comma-separated subset of: " + ", ".join(VARIANTS))
    ap.add_argument("--json", metavar="PATH", help="results file (default $OUT/decode_bench.json when $OUT is set)")
    a = ap.parse_args(argv)
    shapes = {"forced": SMALL if a.small else QWEN2_05B,
              "reasoning": SMALL_REASONING if a.small else QWEN2_05B_REASONING}
    if a.shape != "both":
        shapes = {a.shape: shapes[a.shape]}
    variants = [v.strip() for v in a.variants.split(",")] if a.variants else list(VARIANTS)
    if unknown := [v for v in variants if v not in VARIANTS]:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if not a.small and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --small for the CPU smoke test")
    if a.small:
        torch.set_num_threads(1)
    out: dict = {}
    for shape, cfg in shapes.items():
        print(f"== {shape}", flush=True)
        out[shape] = time_shape(cfg, a.calls, variants, log=lambda s: print(s, flush=True))
        print(table(out[shape]), flush=True)
    path = a.json or (str(Path(os.environ["OUT"]) / "decode_bench.json") if os.environ.get("OUT") else None)
    if path:
        Path(path).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
