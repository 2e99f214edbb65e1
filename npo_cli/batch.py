"""What one step works on: the prompts as the policy sees them, groups of scored rollouts, the padded tensors
of the update and the learning rate. Also the two seams of the loop and their plain-GRPO defaults: an
off-policy source (`NoSource`) that may put prompts in the batch and replace slots of the groups, and a
controller (`NoController`) that may stop the branch; both are handed to the trainer, with `StepContext`
as all a source sees of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from npo_cli.errors import NpoError
from npo_cli.recipe import Recipe
from npo_cli.rollout import Rollout
from npo_cli.tasks import Problem
from npo_cli.verifiers import Call, Verifier


@dataclass
class Group:
    """One prompt's n completions with their scores. Sources may swap rollouts (and scores) in place."""

    problem: Problem
    prompt: str  # the formatted text the policy saw
    rollouts: list[Rollout]
    rewards: list[float]
    correct: list[bool]
    info: dict = field(default_factory=dict)  # free space for sources (e.g. "offpolicy_slot")

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)


def score_groups(problems: list[Problem], prompts: list[str], sampled: list[list[Rollout]],
                 reward_fn: Verifier) -> list[Group]:
    """Each prompt's group with its rewards (format bonus included) and correctness (task.correct); all the
    step's completions are scored in one batch (one trip to the worker processes per function)."""
    rewards, correct = reward_fn.scores([Call.of(p, ro) for p, rollouts in zip(problems, sampled) for ro in rollouts])
    groups, at = [], 0
    for problem, prompt, rollouts in zip(problems, prompts, sampled):
        n = len(rollouts)
        groups.append(Group(problem=problem, prompt=prompt, rollouts=rollouts, rewards=rewards[at : at + n],
                            correct=correct[at : at + n]))
        at += n
    return groups


def format_prompt(recipe: Recipe, tokenizer, problem: Problem) -> str:
    """The text the model continues: task.template around the problem, then the chat template."""
    t = recipe.task
    s = t.template.replace("{prompt}", problem.prompt)
    if t.chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise NpoError("task.chat_template is true but the tokenizer has no chat template")
        turns = [{"role": role, "content": text} for role, text in problem.context]
        if t.system_prompt and not any(x["role"] == "system" for x in turns):  # a file's own system turn wins
            turns.insert(0, {"role": "system", "content": t.system_prompt})
        s = tokenizer.apply_chat_template([*turns, {"role": "user", "content": s}], tokenize=False,
                                          add_generation_prompt=True)
    return s


def lr_at(recipe: Recipe, step: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then constant or cosine to 0."""
    g, total = recipe.grpo, max(1, recipe.train.steps)
    if g.warmup_steps and step < g.warmup_steps:
        return g.lr * (step + 1) / g.warmup_steps
    if g.schedule == "cosine":
        span = max(1, total - g.warmup_steps)
        progress = min(1.0, (step - g.warmup_steps) / span)
        return g.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return g.lr


def collate(rollouts: list[Rollout], pad_id: int, device) -> dict[str, torch.Tensor]:
    """[left-padded prompt | right-padded completion] rows; masks come from lengths, not pad ids."""
    P = max(len(r.prompt_ids) for r in rollouts)
    C = max(len(r.completion_ids) for r in rollouts)
    B = len(rollouts)
    ids = torch.full((B, P + C), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + C), dtype=torch.long)
    cmask = torch.zeros((B, C), dtype=torch.float32)
    old = torch.zeros((B, C), dtype=torch.float32)
    for j, r in enumerate(rollouts):
        p, c = len(r.prompt_ids), len(r.completion_ids)
        ids[j, P - p : P] = torch.tensor(r.prompt_ids, dtype=torch.long)
        ids[j, P : P + c] = torch.tensor(r.completion_ids, dtype=torch.long)
        attn[j, P - p : P + c] = 1
        cmask[j, :c] = 1.0
        old[j, :c] = torch.tensor(r.logprobs, dtype=torch.float32)
    off = torch.tensor([r.source != "policy" for r in rollouts])
    return {"input_ids": ids.to(device), "attention_mask": attn.to(device), "mask": cmask.to(device),
            "old_logp": old.to(device), "offpolicy": off.to(device), "n_completion": C}


# --------------------------------------------------------------------------- the loop's two seams


@dataclass
class StepContext:
    """All an off-policy source sees of the trainer at one step."""

    step: int
    judge: Callable  # correctness only: a slot is filled only with a trajectory it accepts
    reward_fn: Callable  # the task's reward (format bonus included): the slot's reward
    tokenizer: Any
    backend: Any  # the policy's sampler (a guide of the same model may sample through its engine)


class NoSource:
    """Off-policy slot source of plain GRPO: leaves every group as sampled."""

    name = "none"
    guide: str | None = None  # checkpoint id of the guide, recorded in manifests when set

    def prompts(self, step: int, problems: list[Problem]) -> list[Problem]:
        """The step's problems, as many as drawn: the whole batch, before torchrun splits it between the
        ranks (so a source that puts its own prompts in, like ExGRPO's experience, decides the same on
        every rank). Plain GRPO keeps the data order's."""
        return problems

    def mix(self, ctx: StepContext, groups: list[Group]) -> list[Group]:
        return groups

    def metrics(self, stats: dict | None = None) -> dict[str, float]:
        """Per-step metrics of the source; `stats` are the loss stats of the step (off/* for its slots)."""
        return {}

    def state_dict(self) -> dict:
        """JSON state saved in every checkpoint; objects it keeps in the store are listed under "objects"."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class NoController:
    """Controller of plain training: never stops a branch early."""

    def after_step(self, trainer, metrics: dict) -> bool:
        """Return True to stop this branch after checkpointing the current step."""
        return False

    def status(self) -> str:
        """A few words for the progress line (AutoNPO's phase)."""
        return ""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
