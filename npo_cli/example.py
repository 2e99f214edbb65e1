"""`make example` (python -m npo_cli.example OUT_STORE): rebuild the example store's warm starts.

One plain supervised run (teacher forcing on prompt + answer + EOS, loss on the answer tokens
only) trains the built-in tiny model (npo_cli.tiny) on a 50/50 mix of 2-digit and 3-digit sums.
It learns both at once, abruptly, after ~1300 steps; during that onset two snapshots become run
`base` of OUT_STORE, each on base's main branch (the SFT lineage) and under its own branch name:

  base/moderate  first snapshot with >= 20% sampled accuracy on 2-digit sums (step 1340: 0.26)
                 -> recipes/quickstart.yaml, recipes/plateau.yaml
  base/weak      first snapshot with >= 4% on 3-digit sums (step 1400: 0.034 over 4 samples)
                 -> recipes/stall.yaml (GRPO from it is flat for ~200 steps, then takes off)
  base/primed    base/weak after PRIME_STEPS steps of GRPO on 3-digit sums (recipes/stall.yaml's settings,
                 seed 0): still a sparse start (~5% correct, most groups all-wrong), but one GRPO leaves
                 within ~50-100 steps -> recipes/sparse.yaml

Later SFT snapshots do not give such a start (one at 6.5% on 3-digit sums stayed flat under GRPO for
175 steps): the stall is broken by what GRPO itself learns, so the primed start is GRPO's own.
Snapshots from before the onset (2-digit accuracy stuck near 8% from guessing the magnitude) do not
improve under GRPO at all; snapshots from inside it do, which is why the thresholds are met there.
Accuracy is sampled at temperature 1 on the regime's held-out split. Each checkpoint stores its
regime's recipe, so `npo eval base/weak` scores 3-digit sums. No optimizer state (GRPO starts its
own), so the store stays ~13 MB.

Deterministic: fixed seeds, one thread, a fixed data order, evals with fixed sampling seeds. Two
builds give identical tensors, metrics (base/primed's step timings aside) and recipes; checkpoint ids
differ only by the save time.
Wall time: ~4 minutes on one core.
"""

from __future__ import annotations

import random
import sys
import time

import torch

from npo_cli.batch import format_prompt
from npo_cli.checkpoint import save_checkpoint
from npo_cli.errors import NpoError
from npo_cli.manifest import TrainerState
from npo_cli.recipe import Recipe, build_recipe
from npo_cli.rollout import HFBackend
from npo_cli.store import Store
from npo_cli.tasks import load_problems
from npo_cli.tiny import char_tokenizer, tiny_config
from npo_cli.trainer import Trainer, evaluate
from npo_cli.verifiers import make_verifier

SEED = 0
SFT_TASK = {"digits": 2, "hard_digits": 3, "hard_fraction": 0.5}
BATCH, LR, MAX_STEPS, EVAL_EVERY = 64, 1e-3, 4000, 20
PRIME_STEPS = 175  # GRPO steps from base/weak to base/primed
# branch -> (task.arithmetic of the regime that starts from it, sampled accuracy that picks it, held-out
# problems it is measured on: 512 keep a 4% target clear of the ~1% before the onset)
TARGETS = {
    "weak": ({"digits": 2, "hard_digits": 3, "hard_fraction": 1.0}, 0.04, 512),
    "moderate": ({"digits": 2, "hard_digits": 3, "hard_fraction": 0.0}, 0.20, 256),
}


def regime_recipe(arithmetic: dict) -> Recipe:
    return build_recipe({"name": "base", "seed": SEED, "model": {"path": "tiny"},
                         "task": {"arithmetic": arithmetic}})


def sft_batches(tokenizer, recipe: Recipe):
    """Endless fixed-order batches of right-padded prompt+answer+EOS rows; labels only on answer+EOS."""
    problems = load_problems(recipe.task, "train", SEED)
    rng, order = random.Random(SEED), []
    while True:
        if len(order) < BATCH:
            order += rng.sample(range(len(problems)), len(problems))
        batch, order = [problems[i] for i in order[:BATCH]], order[BATCH:]
        rows = []
        for p in batch:
            prompt = tokenizer(format_prompt(recipe, tokenizer, p))["input_ids"]
            answer = tokenizer(p.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            rows.append((prompt, answer))
        width = max(len(a) + len(b) for a, b in rows)
        ids = torch.full((BATCH, width), tokenizer.pad_token_id)
        labels = torch.full((BATCH, width), -100)  # -100: no loss (prompt and padding)
        mask = torch.zeros((BATCH, width), dtype=torch.long)
        for j, (a, b) in enumerate(rows):
            ids[j, : len(a) + len(b)] = torch.tensor(a + b)
            labels[j, len(a) : len(a) + len(b)] = torch.tensor(b)
            mask[j, : len(a) + len(b)] = 1
        yield ids, mask, labels


class Judge:
    """Sampled (temperature 1) accuracy on one regime's held-out problems, with a fixed seed."""

    def __init__(self, model, tokenizer, recipe: Recipe, size: int):
        self.problems = load_problems(recipe.task.model_copy(update={"eval_size": size}), "eval", SEED)
        self.prompts = [format_prompt(recipe, tokenizer, p) for p in self.problems]
        self.backend, self.verify = HFBackend(model, tokenizer, recipe.rollout), make_verifier(recipe.task)

    def accuracy(self, seed: int) -> float:
        torch.manual_seed(seed)  # SFT itself draws nothing from torch's RNG, so this changes nothing else
        groups = self.backend.generate(self.prompts, 1)
        return sum(self.verify(p.prompt, g[0].text, p.answer) >= 1.0
                   for p, g in zip(self.problems, groups)) / len(self.problems)


def build(out: str) -> dict[str, tuple[int, str]]:
    """Run the SFT, save the snapshots into store `out`; returns branch -> (step, checkpoint id)."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    store = Store.open(out)
    if "base" in store.runs():
        raise NpoError(f"store {out} already has a run 'base'; delete it first (make example does)")
    torch.manual_seed(SEED)
    model, tokenizer = AutoModelForCausalLM.from_config(tiny_config()), char_tokenizer()
    recipes = {name: regime_recipe(arith) for name, (arith, _, _) in TARGETS.items()}
    judges = {name: Judge(model, tokenizer, recipes[name], size) for name, (_, _, size) in TARGETS.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    picked: dict[str, tuple[int, str]] = {}
    losses: list[dict] = []
    t0 = time.perf_counter()
    with store.lease("base", "main"):
        for step, (ids, mask, labels) in enumerate(sft_batches(tokenizer, regime_recipe(SFT_TASK)), 1):
            model.train()
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append({"step": step, "sft_loss": loss.item()})
            if step % EVAL_EVERY:
                continue
            hits = [n for n, (_, target, _) in TARGETS.items()
                    if n not in picked and judges[n].accuracy(seed=step) >= target]
            if hits:  # targets met at the same step share one checkpoint (it stores the first's recipe)
                r = recipes[hits[0]]
                summary = evaluate(model, tokenizer, r, judges[hits[0]].problems, 4, seed=SEED)
                # eval/step: `npo ls` shows an eval measured at the checkpoint's own step
                summary = ({k: v for k, v in summary.items() if k != "eval/time"}
                           | {"sft_loss": loss.item(), "eval/step": step})
                cid = save_checkpoint(store, run="base", branch="main", step=step, model=model,
                                      tokenizer=tokenizer, recipe=r.model_dump(mode="json"), summary=summary,
                                      metrics=losses, state=TrainerState(sft={"task": SFT_TASK, "batch": BATCH, "lr": LR}))
                losses = []
                picked |= {name: (step, cid) for name in hits}
                print(f"step {step}: base/{' base/'.join(hits)} = {cid[:12]} "
                      f"{ {k: round(v, 3) for k, v in summary.items()} } ({time.perf_counter() - t0:.0f} s)")
            if len(picked) == len(TARGETS):
                break
            if step >= MAX_STEPS:
                raise NpoError(f"SFT did not reach every target in {MAX_STEPS} steps (got {sorted(picked)})")
    for name, (_, cid) in picked.items():
        store.branch(cid, name, run="base")
    picked["primed"] = prime(store, picked["weak"])  # its checkpoint moves branch base/primed
    return picked


def prime(store: Store, weak: tuple[int, str]) -> tuple[int, str]:
    """base/weak plus PRIME_STEPS GRPO steps on 3-digit sums (seed 0), saved on base's `primed` lineage
    (weights only, like the SFT snapshots). Deterministic: one thread, seeded sampling and data order."""
    step0, weak_id = weak
    # the branch name, not the id: the id covers a save time, so the stored recipe would differ per build
    recipe = build_recipe({"name": "base", "seed": SEED, "model": {"path": "base/weak"},
                           "task": {"arithmetic": TARGETS["weak"][0]},
                           "rollout": {"prompts_per_step": 16, "group_size": 8, "max_new_tokens": 8,
                                       "temperature": 1.0},
                           "grpo": {"lr": 2.0e-4}, "logging": {"progress": False, "metrics_jsonl": None}})
    trainer = Trainer(recipe, store)
    t0 = time.perf_counter()
    rows = [trainer.step() for _ in range(PRIME_STEPS)]
    judge = Judge(trainer.model, trainer.tokenizer, recipe, TARGETS["weak"][2])
    summary = evaluate(trainer.model, trainer.tokenizer, recipe, judge.problems, 4, seed=SEED)
    summary = {k: v for k, v in summary.items() if k != "eval/time"} | {"eval/step": step0 + PRIME_STEPS}
    with store.lease("base", "primed"):
        cid = save_checkpoint(store, run="base", branch="primed", step=step0 + PRIME_STEPS, model=trainer.model,
                              tokenizer=trainer.tokenizer, recipe=recipe.model_dump(mode="json"), summary=summary,
                              metrics=rows, parent=weak_id,
                              state=TrainerState(grpo={"from": weak_id, "steps": PRIME_STEPS}))
    print(f"step {step0 + PRIME_STEPS}: base/primed = {cid[:12]} (GRPO from base/weak) "
          f"{ {k: round(v, 3) for k, v in summary.items()} } ({time.perf_counter() - t0:.0f} s)")
    return step0 + PRIME_STEPS, cid


def quick_warm_start(store, run: str = "base", steps: int = 150, task: dict | None = None,
                     lr: float = 3e-3) -> str:
    """Seconds of supervised training of the tiny model on 1-digit sums (~30-40% sampled accuracy, so
    groups both fail and succeed), saved as RUN@0 on main: the deterministic warm start of the test
    suite and the smoke runs (the committed example store is the real one). Returns the checkpoint id."""
    from transformers import AutoModelForCausalLM

    task = task or {"arithmetic": {"digits": 1}, "eval_size": 16}
    torch.manual_seed(0)
    model, tok = AutoModelForCausalLM.from_config(tiny_config()), char_tokenizer()
    problems = load_problems(build_recipe({"task": task}).task, "train", 0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = random.Random(0)
    for _ in range(steps):
        batch = [rng.choice(problems) for _ in range(32)]
        rows = [(tok(p.prompt)["input_ids"], tok(p.answer)["input_ids"] + [tok.eos_token_id]) for p in batch]
        L = max(len(a) + len(b) for a, b in rows)
        x = torch.tensor([a + b + [0] * (L - len(a) - len(b)) for a, b in rows])
        y = torch.tensor([[-100] * len(a) + b + [-100] * (L - len(a) - len(b)) for a, b in rows])
        model(input_ids=x, labels=y).loss.backward()
        opt.step()
        opt.zero_grad()
    return save_checkpoint(store, run=run, branch="main", step=0, model=model, tokenizer=tok,
                           recipe=Recipe(name=run, task=task).model_dump(mode="json"))


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        sys.exit("usage: python -m npo_cli.example OUT_STORE")
    try:
        build(argv[0])
    except NpoError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
