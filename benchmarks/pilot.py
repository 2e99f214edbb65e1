"""The study's pilot: Q, V and S of candidate guides for one fork point, on NPO's own scale.

For a fork checkpoint A (the policy a branch starts from) and candidate guides G (later checkpoints of the
same run):
  failing  train prompts (a fixed seeded sample) on which A's whole group of rollout.group_size samples is
           wrong: the prompts NPO's gate would hand to the guide
  Q(G)     share of them for which G finds a verified-correct completion within npo.max_tries samples (the
           guide generator itself: the entries it finds are cached in the store exactly as an NPO branch
           with guide G caches them, so the branch reuses them)
  V(G)     exp(mean per-token KL(G || A)) on G's verified trajectories (k3 estimate: they are G's samples),
           the importance-weighting cost of the slots NPO would import
  S(G)     Q / V; the paper's rule picks the guide with the largest S
The fork itself is measured as a reference row (D = 0): how often A solves its own failures with fresh
tries, the share a guide has to beat.
"""

from __future__ import annotations

import math
import random

import torch

from npo_cli.batch import collate, format_prompt
from npo_cli.checkpoint import DTYPES, load_model
from npo_cli.grpo import token_logprobs
from npo_cli.guide import GuideGenerator
from npo_cli.rollout import HFBackend, Rollout
from npo_cli.seeds import derive_seed, forked_rng
from npo_cli.tasks import load_problems
from npo_cli.verifiers import make_judge


def kl_to(model, recipe, pad_id: int, rows: list[Rollout]) -> float:
    """Mean per-token KL(behaviour || model) on rows sampled by the behaviour policy (k3 estimator)."""
    tot = n = 0.0
    model.eval()
    with torch.no_grad():
        for s in range(0, len(rows), 256):
            b = collate(rows[s : s + 256], pad_id, "cpu")
            lp = token_logprobs(model, b["input_ids"], b["attention_mask"], b["n_completion"],
                                recipe.grpo.logprob_chunk, with_entropy=False,
                                temperature=recipe.rollout.temperature)[0].float()
            lr = (lp - b["old_logp"]).clamp(-20.0, 20.0)  # log model / behaviour on the behaviour's tokens
            tot += float(((lr.exp() - 1 - lr) * b["mask"]).sum())
            n += float(b["mask"].sum())
    return tot / max(n, 1.0)


def pilot(store, recipe, fork: str, candidates: dict[int, str], seed: int, n_prompts: int = 256) -> dict:
    """Q, V, S of every candidate guide (step -> checkpoint ref) for the branch that starts at `fork`.
    Returns the table, the chosen guide (argmax S, ties: the earlier) and the tokens the choice sampled (the
    fork's groups and the candidates' tries; the reference row's are in its own `tokens`)."""
    fork_m = store.manifest(fork)
    model, tok, _ = load_model(store, fork_m.id, dtype=DTYPES[recipe.model.dtype], device="cpu")
    tok.padding_side = "left"
    judge = make_judge(recipe.task)
    problems = load_problems(recipe.task, "train", recipe.seed)
    problems = random.Random(derive_seed(seed, "pilot")).sample(problems, min(n_prompts, len(problems)))
    prompts = [format_prompt(recipe, tok, p) for p in problems]
    with forked_rng(derive_seed(seed, "pilot", fork_m.step)):
        groups = HFBackend(model, tok, recipe.rollout).generate(prompts, recipe.rollout.group_size)
    tokens = sum(len(ro.completion_ids) for g in groups for ro in g)
    failing = [(prompt, p) for prompt, p, g in zip(prompts, problems, groups)
               if not any(judge(p.prompt, ro.text, p.answer) >= 1.0 for ro in g)]
    rows = []
    for step, ref in [(fork_m.step, fork_m.id), *sorted(candidates.items())]:
        gen = GuideGenerator(store, ref, recipe)
        found = [e for e in gen.get(failing, derive_seed(seed, "pilot-guide", step)) if e is not None]
        gen.unload()
        if step != fork_m.step:  # the fork's own retries are the report's reference, not part of the choice
            tokens += gen.stats.tokens
        kl = kl_to(model, recipe, tok.pad_token_id, [
            Rollout(prompt_ids=list(e["prompt_ids"]), completion_ids=list(e["completion_ids"]),
                    logprobs=list(e["logprobs"]), text=e["text"], finished=bool(e["finished"]), source="guide")
            for e in found]) if found else None
        q = len(found) / len(failing) if failing else None
        v = math.exp(min(kl, 50.0)) if kl is not None else None
        rows.append({"step": step, "delta": step - fork_m.step, "checkpoint": gen.guide_id, "Q": q, "kl": kl,
                     "V": v, "S": q / v if q is not None and v else None, "found": len(found),
                     "tokens": gen.stats.tokens})
    scored = [r for r in rows if r["delta"] > 0 and r["S"] is not None]
    best = max(scored, key=lambda r: (r["S"], -r["delta"])) if scored else None
    return {"fork": fork_m.id, "fork_step": fork_m.step, "prompts": len(problems), "failing": len(failing),
            "rows": rows, "best": best, "tokens": tokens}
