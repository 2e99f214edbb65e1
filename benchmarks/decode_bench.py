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
- "npo decoding": the same loop dropping the rows that have ended every 32 tokens (the default);
- "HF continuous batching": transformers' `generate_batch` (paged attention, finished rows replaced as they
  end; log-probs returned), the engine behind TRL's use_transformers_continuous_batching, with TRL's
  recommended config on CUDA (use_cuda_graph False, max_memory_percent 0.4) and on CPU a fixed 64-block
  cache (sized from free memory it takes ~10 s per call to allocate on CPU).
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
from grpo_bench import free, make_model_dir, sync

# name -> (rollout.static_cache, npo's own loop, drop ended rows, warm-up calls)
VARIANTS = {
    "HF generate, dynamic cache": (False, False, False, 1),
    "HF generate, static cache": (True, False, False, 2),
    "npo decoding, every row to the end": (True, True, False, 2),
    "npo decoding": (True, True, True, 2),
    "HF continuous batching": (None, False, False, 1),
}
SHORT = {"dynamic": "HF generate, dynamic cache", "static": "HF generate, static cache",
         "npo-every-row": "npo decoding, every row to the end", "npo": "npo decoding",
         "continuous": "HF continuous batching"}  # --variants names


class ContinuousBatching:
    """generate(prompts, n) through transformers' continuous batching, returning what the backends return."""

    def __init__(self, model, tok, max_new_tokens: int):
        from transformers import GenerationConfig
        from transformers.generation import ContinuousBatchingConfig

        from npo_cli.rollout import Rollout, eos_ids

        self.model, self.tok, self.rollout = model, tok, Rollout
        self.gen = GenerationConfig(do_sample=True, max_new_tokens=max_new_tokens, eos_token_id=eos_ids(model, tok),
                                    pad_token_id=tok.pad_token_id, temperature=1.0, top_k=0, top_p=1.0)
        on_gpu = next(model.parameters()).device.type == "cuda"
        memory = {"max_memory_percent": 0.4} if on_gpu else {"num_blocks": 64, "max_batch_tokens": 512}
        self.cb = ContinuousBatchingConfig(use_cuda_graph=False, return_logprobs=True, **memory)
        self.own_decoding, self.compile_error = False, None

    def generate(self, prompts: list[str], n: int):
        ids = [self.tok(p)["input_ids"] for p in prompts for _ in range(n)]
        out = self.model.generate_batch(ids, generation_config=self.gen, continuous_batching_config=self.cb,
                                        progress_bar=False)
        done = [o for o in out.values() if o.error is None]  # in input order
        if len(done) != len(ids):
            raise RuntimeError(f"continuous batching returned {len(done)} of {len(ids)} completions")
        eos = set(self.gen.eos_token_id)
        rows = [self.rollout(prompt_ids=o.prompt_ids, completion_ids=list(o.generated_tokens),
                             logprobs=list(o.logprobs or []), text="",
                             finished=bool(o.generated_tokens) and o.generated_tokens[-1] in eos) for o in done]
        return [rows[i * n:(i + 1) * n] for i in range(len(prompts))]


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
        # The work each call does, whatever the clock says: the tokens through the model's forward (prompts
        # included; a forward that bypasses the module call, as a compiled one may, is not seen)
        forwarded: list[int] = []
        model.register_forward_pre_hook(lambda m, args, kw: forwarded.append(
            (kw.get("input_ids") if kw.get("input_ids") is not None else args[0]).numel()), with_kwargs=True)
        for name in variants:
            static, own, drop, warmup = VARIANTS[name]
            if static is None:
                backend = ContinuousBatching(model, tok, C)
            else:
                rollout = RolloutConfig(max_new_tokens=C, batch_size=rows, static_cache=static, temperature=1.0)
                backend = HFBackend(model, tok, rollout)
                backend.own_decoding = backend.own_decoding and own
                backend.drop_finished = drop
            times, useful, fed = [], [], []
            torch.manual_seed(cfg.seed)  # every variant samples from the same seed
            try:
                for _ in range(warmup + calls):
                    sync(cfg.device)
                    t0 = time.perf_counter()
                    forwarded.clear()
                    out = [r for g in backend.generate(prompts, cfg.group) for r in g]
                    sync(cfg.device)
                    times.append(time.perf_counter() - t0)
                    useful.append(sum(len(r.completion_ids) for r in out))
                    fed.append(sum(forwarded))
                    if cfg.force_length:
                        assert all(len(r.completion_ids) == C for r in out), "EOS is outside the logits"
                s, u = statistics.median(times[warmup:]), statistics.median(useful[warmup:])
                res[name] = {"s": s, "all": [round(t, 3) for t in times], "warmup_calls": warmup,
                             "useful_tokens": u, "mean_completion_len": u / rows,
                             "forwarded_tokens": statistics.median(fed[warmup:]) or None,
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
            free(cfg.device)
    ok = {k: v["s"] for k, v in res.items() if isinstance(v, dict) and "s" in v}
    if "npo decoding" in ok and "npo decoding, every row to the end" in ok:
        res["npo_drop_speedup"] = ok["npo decoding, every row to the end"] / ok["npo decoding"]
    for ref, key in (("HF generate, dynamic cache", "hf_dynamic"), ("HF generate, static cache", "hf_static"),
                     ("HF continuous batching", "hf_continuous_batching")):
        if "npo decoding" in ok and ref in ok:
            res[f"npo_over_{key}"] = ok["npo decoding"] / ok[ref]
    return res


def table(res: dict) -> str:
    c = res["config"]
    shape = (f"{c['rows']} rows, {c['new_tokens']} new tokens forced" if c["forced_length"] else
             f"{c['rows']} rows, up to {c['new_tokens']} new tokens, natural EOS (mean length {c['mean_length']})")
    lines = [f"{shape}, {c['dtype']} on {c['gpu'] or c['device']}",
             f"{'':38s}{'s/call':>9s}{'mean len':>10s}{'useful tok/s':>14s}{'tokens forwarded':>18s}"]
    for name in VARIANTS:
        v = res.get(name)
        if v is None:
            continue
        if "error" in v:
            lines.append(f"{name:38s}  failed: {v['error'][:80]}")
        else:
            fwd = f"{v['forwarded_tokens']:18.0f}" if v.get("forwarded_tokens") else f"{'-':>18s}"
            lines.append(f"{name:38s}{v['s']:9.3f}{v['mean_completion_len']:10.1f}{v['useful_tokens_per_s']:14.0f}{fwd}")
    for key, label in (("npo_drop_speedup", "npo decoding: every row to the end / dropping ended rows"),
                       ("npo_over_hf_static", "npo decoding / HF generate (static cache)"),
                       ("npo_over_hf_dynamic", "npo decoding / HF generate (dynamic cache)"),
                       ("npo_over_hf_continuous_batching", "npo decoding / HF continuous batching")):
        if key in res:
            lines.append(f"{label}: {res[key]:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes on CPU (smoke test of this script)")
    ap.add_argument("--shape", choices=("forced", "reasoning", "both"), default="both")
    ap.add_argument("--calls", type=int, default=2, help="timed calls of each variant (after its warm-up calls)")
    ap.add_argument("--variants", help="comma-separated subset of: " + ",".join(SHORT) + " (default all)")
    ap.add_argument("--json", metavar="PATH", help="results file (default $OUT/decode_bench.json when $OUT is set)")
    a = ap.parse_args(argv)
    shapes = {"forced": SMALL if a.small else QWEN2_05B,
              "reasoning": SMALL_REASONING if a.small else QWEN2_05B_REASONING}
    if a.shape != "both":
        shapes = {a.shape: shapes[a.shape]}
    names = [v.strip() for v in a.variants.split(",")] if a.variants else list(SHORT)
    if unknown := [v for v in names if v not in SHORT]:
        raise SystemExit(f"unknown variants {unknown}; choose from {','.join(SHORT)}")
    variants = [SHORT[v] for v in names]
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
