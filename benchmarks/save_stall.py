"""How long a checkpoint stalls the training loop: train.background_save on vs off, side by side.

The policy is a 102M-parameter Qwen2 (the shapes of store_bench.py's state dict: hidden 768, 11 layers,
vocab 32000, tied embeddings) with its AdamW state: 1.2 GB per checkpoint. Each mode runs the same short
loop (save_every 1, a fresh local store) through the real `Trainer.train` and `Trainer.save`; the step is an
AdamW update from a fixed gradient (a sampled step of an untrained policy earns no reward, so its gradient
is zero and nothing would change between saves: every save would dedup). The stall of a save is the time the
loop spends in `Trainer.save` (with background saving: waiting for the save before it, then copying the
tensors to host memory); the end wait is the last write the run waits for before it ends. Writes go to the
page cache (no fsync), as in store_bench.py.

    .venv/bin/python benchmarks/save_stall.py [--steps 4] [--dir DIR] [--json-out F]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import torch

from npo_cli.branching import new_trainer
from npo_cli.recipe import build_recipe
from npo_cli.store import Store
from npo_cli.trainer import Trainer


class TimedTrainer(Trainer):
    """A trainer that records how long each save holds the loop, and the wait at the end of the run."""

    def step(self) -> dict[str, float]:
        """An update that changes every weight and every optimizer state, as a training step does."""
        t = time.perf_counter()
        for p in self.model.parameters():
            p.grad = torch.full_like(p, 1e-3)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_num += 1
        m = {"step": self.step_num, "reward": 0.0, "accuracy": 0.0, "tokens_per_s": 0.0,
             "step_time": time.perf_counter() - t}
        self.pending_metrics.append(m)
        self.history.append(m)
        return m

    def save(self, *args, **kw) -> None:
        t = time.perf_counter()
        super().save(*args, **kw)
        self.stalls.append(time.perf_counter() - t)

    def wait_saved(self):
        t = time.perf_counter()
        head = super().wait_saved()
        self.waits.append(time.perf_counter() - t)
        return head


def make_model(folder: str) -> int:
    """The 102M-parameter policy as a Hugging Face folder (with the tiny char tokenizer); its parameter count."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from npo_cli.tiny import char_tokenizer

    cfg = AutoConfig.for_model("qwen2", vocab_size=32000, hidden_size=768, intermediate_size=2048,
                               num_hidden_layers=11, num_attention_heads=12, num_key_value_heads=12,
                               max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=0,
                               eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def run(model_dir: str, store_dir: str, steps: int, background: bool) -> dict:
    recipe = build_recipe({
        "name": "stall", "seed": 0, "model": {"path": model_dir}, "task": {"arithmetic": {"digits": 1}},
        "rollout": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 2},
        "train": {"steps": steps, "save_every": 1, "eval_every": 0, "background_save": background},
        "logging": {"progress": False, "metrics_jsonl": None},
    })
    trainer = new_trainer(recipe, Store.open(store_dir), trainer_cls=TimedTrainer)
    trainer.stalls, trainer.waits = [], []
    t = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t
    # saves after the first: the step-0 save has no save before it to wait for
    stalls = trainer.stalls[1:]
    return {"stall_s": stalls, "median_stall_s": statistics.median(stalls), "end_wait_s": trainer.waits[-1],
            "first_save_s": trainer.stalls[0], "median_step_s": statistics.median(m["step_time"] for m in trainer.history),
            "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--dir", default=None, help="Scratch directory (default: a temp dir on /tmp's disk).")
    ap.add_argument("--json-out", default=None, help="Also write the JSON to this file.")
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = tempfile.mkdtemp(prefix="npo-stall-", dir=args.dir)
    try:
        params = make_model(os.path.join(base, "model"))
        res = {}
        for mode, background in (("sync", False), ("background", True)):
            res[mode] = run(os.path.join(base, "model"), os.path.join(base, f"store-{mode}"), args.steps, background)
            shutil.rmtree(os.path.join(base, f"store-{mode}"))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    out = {"params": params, "steps": args.steps, "cpus": os.cpu_count(), **res,
           "stall_ratio": res["sync"]["median_stall_s"] / res["background"]["median_stall_s"]}
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=1)
    print(f"{params / 1e6:.1f}M parameters + AdamW state, {args.steps} steps with a save after each, "
          f"{os.cpu_count()} CPUs; medians")
    print(f"{'':12}{'stall per save':>16}{'end wait':>10}{'step':>8}{'wall':>8}")
    for mode, r in res.items():
        print(f"{mode:12}{r['median_stall_s']:15.3f}s{r['end_wait_s']:9.3f}s{r['median_step_s']:7.2f}s"
              f"{r['wall_s']:7.1f}s")
    print(f"background saving stalls the loop {out['stall_ratio']:.1f}x less per save")


if __name__ == "__main__":
    main()
