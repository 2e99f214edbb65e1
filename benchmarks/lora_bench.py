"""LoRA (model.lora, r=16, all-linear) vs full fine-tuning, side by side: store bytes and memory.

The policy is the tiny Qwen2 scaled up (hidden 512, 8 layers, intermediate 1376: 25M parameters) with the
char tokenizer, saved once as a Hugging Face folder that both arms' `model.path` names. Each arm runs in a
fresh subprocess, so its peak RSS is its own:

- run: 4 GRPO steps, save_every 1, on a fresh local store. Per save: the bytes of the objects that appeared in
  the store (the first save, step 0, holds the initial weights: for LoRA, the frozen base it stores once).
- branch (another fresh subprocess on that store): `npo rewind` to step 2, then 2 more steps at another
  sampling temperature (with the run's own recipe a resume replays the same rollouts and every tensor would
  dedup; a changed learning rate alone leaves the first step's optimizer state as it was). Its bytes: the
  objects the rewind and both saves added.

An untrained policy earns no reward from the exact verifier, so its gradient would be zero and nothing would
change between saves; the reward here is the share of digits in the completion (`digit_reward`), which
varies within a group from the first step. Writes go to the page cache (no fsync), as in store_bench.py.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lora_bench.py [--json-out benchmarks/results/lora.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPE = {"hidden_size": 512, "num_hidden_layers": 8, "intermediate_size": 1376,
         "num_attention_heads": 8, "num_key_value_heads": 8}
LORA = {"r": 16, "alpha": 32.0, "dropout": 0.0, "target_modules": "all-linear"}
RUN = "bench"
FORK = 2  # the branch starts here and trains to the run's last step
BRANCH_SET = ["rollout.temperature=0.8"]


def digit_reward(prompts, completions, **kwargs) -> list[float]:
    """The share of digits in each completion: a reward an untrained policy's samples already differ in."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def recipe(arm: str, model_dir: str, steps: int) -> dict:
    return {
        "name": RUN, "seed": 0,
        "model": {"path": model_dir, **({"lora": LORA} if arm == "lora" else {})},
        "task": {"arithmetic": {"digits": 1}, "eval_size": 4,
                 "rewards": [{"function": "lora_bench:digit_reward"}], "correct": "verifier"},
        "rollout": {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 16},
        "grpo": {"lr": 2e-4},
        "train": {"steps": steps, "save_every": 1, "eval_every": 0},
        "logging": {"progress": False, "metrics_jsonl": None},
    }


def build_model(model_dir: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from npo_cli.tiny import char_tokenizer, tiny_config

    fields = tiny_config().to_dict()
    fields.pop("layer_types", None)  # one per layer: derived again for the new depth
    config = AutoConfig.for_model(**{**fields, **SHAPE})
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)


# ------------------------------------------------------------------ one arm, in its own process


def measured_trainer(store, seen: dict[str, int], save_bytes: list[int]):
    """A Trainer that appends to save_bytes, after each save is written, the bytes of the objects that appeared."""
    from npo_cli.trainer import Trainer

    class Measured(Trainer):
        def save(self, *args, **kw) -> None:
            super().save(*args, **kw)
            self.wait_saved()
            now = store.objects()
            save_bytes.append(sum(size for oid, size in now.items() if oid not in seen))
            seen.update(now)

    return Measured


def run_arm(args) -> dict:
    import torch

    from npo_cli.branching import new_trainer, resume_trainer
    from npo_cli.commands import rewind
    from npo_cli.recipe import build_recipe
    from npo_cli.store import Store

    torch.set_num_threads(1)
    store = Store.open(args.store)
    seen, save_bytes = store.objects(), []
    cls = measured_trainer(store, dict(seen), save_bytes)
    if args.phase == "run":
        trainer = new_trainer(build_recipe(recipe(args.arm, args.model, args.steps)), store, trainer_cls=cls)
    else:
        _, branch, _, _ = rewind(args.store, f"{RUN}@{FORK}", None)
        trainer = resume_trainer(store, f"{RUN}/{branch}", BRANCH_SET, trainer_cls=cls)
    trainer.train()
    params = list(trainer.model.parameters())
    return {
        "save_bytes": save_bytes,
        "branch_bytes": sum(size for oid, size in store.objects().items() if oid not in seen)
        if args.phase == "branch" else None,
        "step_time_median_s": statistics.median(m["step_time"] for m in trainer.history),
        "reward_mean": statistics.fmean(m["reward"] for m in trainer.history),
        "params": sum(p.numel() for p in params),
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        # ru_maxrss: KiB on Linux
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def in_subprocess(arm: str, phase: str, store: Path, model_dir: Path, steps: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--arm", arm, "--phase", phase, "--store", str(store),
           "--model", str(model_dir), "--steps", str(steps)]
    out = subprocess.run(cmd, check=False, env=env, cwd=store.parent, capture_output=True, text=True, timeout=600)
    if out.returncode:
        sys.exit(f"{arm} {phase} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--dir", help="work folder (default: a temporary one, removed at the end)")
    p.add_argument("--json-out", default=str(HERE / "results" / "lora.json"))
    p.add_argument("--arm", choices=["full", "lora"], help=argparse.SUPPRESS)
    p.add_argument("--phase", choices=["run", "branch"], help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.arm:
        print(json.dumps(run_arm(args)))
        return

    work = Path(args.dir or tempfile.mkdtemp(prefix="npo-lora-bench-"))
    try:
        model_dir = work / "model"
        build_model(model_dir)
        arms = {}
        for arm in ("full", "lora"):
            store = work / arm / "store"
            store.parent.mkdir(parents=True, exist_ok=True)
            run = in_subprocess(arm, "run", store, model_dir, args.steps)
            branch = in_subprocess(arm, "branch", store, model_dir, args.steps)
            later = run["save_bytes"][1:]
            arms[arm] = {
                "params": run["params"], "trainable_params": run["trainable_params"],
                "first_save_bytes": run["save_bytes"][0],
                "save_bytes_median": statistics.median(later), "save_bytes": run["save_bytes"],
                "branch_bytes": branch["branch_bytes"], "branch_saves": len(branch["save_bytes"]),
                "peak_rss_mb": round(run["peak_rss_mb"], 1), "branch_peak_rss_mb": round(branch["peak_rss_mb"], 1),
                "step_time_median_s": round(run["step_time_median_s"], 3), "reward_mean": run["reward_mean"],
            }
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)

    full, lora = arms["full"], arms["lora"]
    rows = [("trainable params", "trainable_params", 1, "{:,.0f}"),
            ("first save (MB)", "first_save_bytes", 1e6, "{:.1f}"),
            ("each later save (MB)", "save_bytes_median", 1e6, "{:.2f}"),
            (f"branch: rewind + {args.steps - FORK} steps (MB)", "branch_bytes", 1e6, "{:.2f}"),
            ("peak RSS, run (MB)", "peak_rss_mb", 1, "{:.0f}"),
            ("peak RSS, branch (MB)", "branch_peak_rss_mb", 1, "{:.0f}"),
            ("step time median (s)", "step_time_median_s", 1, "{:.2f}")]
    print(f"{full['params'] / 1e6:.1f}M-parameter Qwen2, LoRA r={LORA['r']} all-linear, {args.steps} steps, "
          "save_every 1, 1 CPU thread")
    print(f"{'':36} {'full':>12} {'lora':>12} {'lora/full':>10}")
    for label, key, scale, fmt in rows:
        ratio = lora[key] / full[key] if full[key] else float("nan")
        print(f"{label:36} {fmt.format(full[key] / scale):>12} {fmt.format(lora[key] / scale):>12} {ratio:>10.3f}")
    result = {"model": {**SHAPE, "vocab_size": 128, "params": full["params"]}, "lora": LORA,
              "steps": args.steps, "fork_step": FORK, "branch_set": BRANCH_SET, "threads": 1, "arms": arms}
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {args.json_out}")


if __name__ == "__main__":
    main()
