"""npo vs TRL 1.16 GRPOTrainer step time on CPU, one thread, identical config, alternating in one run.

Config (both sides): Qwen2, hidden 256, 4 layers, 4 heads / 2 KV heads, intermediate 1024, vocab = npo's
char tokenizer (99), one random init shared by both; 16 prompts x 8 completions, 32 new tokens,
temperature 1, the built-in arithmetic prompts, npo's `exact` verifier as the reward; TRL loss_type
"dapo" == npo agg token-mean, beta 0, eps 0.2 / 0.28, one optimizer step per generation batch, lr 1e-5,
AdamW, grad clip 1.0, fp32, gradient checkpointing OFF on both (TRL's default is on). Both stop a completion
at EOS (reported: mean completion length). TRL generates with its default path (HF generate, dynamic KV
cache); --trl-paths dynamic,static,paged times npo against each of TRL's transformers generation paths in turn.

    .venv/bin/python benchmarks/throughput.py [--steps 8] [--warmup 2] [--trl-paths dynamic,static]
                                              [--json out.json] [--quick]

See benchmarks/grpo_bench.py for how steps are timed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo_bench import TRL_PATHS, BenchConfig, run, table


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8, help="timed steps of each trainer")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps of each trainer first")
    ap.add_argument("--micro-batch", type=int, default=128, help="rows per forward/backward, both sides")
    ap.add_argument("--trl-paths", default="dynamic",
                    help=f"TRL generation paths timed against npo, comma-separated, of {','.join(TRL_PATHS)} "
                    "(default dynamic, TRL's default)")
    ap.add_argument("--reward", choices=["exact", "hash"], default="exact",
                    help="exact: npo's verifier (all 0 at random init, so every advantage is 0); hash: a coin "
                    "flip on the completion text, same on both sides (non-zero advantages)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 warm-up + 1 timed step each")
    ap.add_argument("--json", metavar="PATH", help="write the results here")
    a = ap.parse_args(argv)
    paths = tuple(p.strip() for p in a.trl_paths.split(",") if p.strip())
    if not paths or any(p not in TRL_PATHS for p in paths):
        ap.error(f"--trl-paths: a comma-separated list of {', '.join(TRL_PATHS)}")
    torch.set_num_threads(1)
    cfg = BenchConfig(steps=1 if a.quick else a.steps, warmup=1 if a.quick else a.warmup,
                      micro_batch=a.micro_batch, reward=a.reward, trl_paths=paths)
    print("npo vs TRL GRPOTrainer, CPU, 1 thread: hidden 256, 4 layers, 16x8, 32 new tokens, fp32; "
          f"gradient checkpointing off on both; reward {a.reward}; TRL paths {', '.join(paths)}", flush=True)
    res = run(cfg)
    print(table(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
