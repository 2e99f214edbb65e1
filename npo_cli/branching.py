"""How a trainer comes to stand on a branch: a new run, the resume of a branch head, or a new branch forked
at a checkpoint with a guide. The one place that hands a trainer its off-policy source.

`fork_branch` is the one way to make an NPO branch; `npo intervene` and AutoNPO's rollback both call it:
the branch's recipe is the fork's with NPO switched on (`npo_recipe`, a typed update), the trainer is
restored from the fork, and the branch's first checkpoint (the fork's weights, objects shared, under the
NPO recipe, with the event that made it) is written under the branch lease. A branch stopped before its
first step therefore resumes as NPO, never as the fork's plain GRPO.
"""

from __future__ import annotations

from contextlib import nullcontext

from npo_cli import dist
from npo_cli.errors import NpoError
from npo_cli.lease import npo_command
from npo_cli.manifest import Event, Manifest
from npo_cli.recipe import Recipe, build_recipe
from npo_cli.sources import make_source
from npo_cli.store import Store, weights_only
from npo_cli.trainer import Trainer


def new_trainer(recipe: Recipe, store: Store, trainer_cls: type[Trainer] = Trainer, **kw) -> Trainer:
    """A trainer for a new run (refused when a run of that name exists)."""
    if recipe.name in store.runs():
        raise NpoError(f"run '{recipe.name}' already exists in the store; continue it with "
                       f"{npo_command('run', '--resume', recipe.name, store=store.url)} or pick a new name "
                       "with --set name=...")
    return trainer_cls(recipe, store, source=make_source(recipe, store), **kw)


def head_with_recipe(store: Store, run: str, branch: str) -> tuple[Manifest, dict]:
    """The head checkpoint of RUN/BRANCH and the recipe stored with it: what a resume continues."""
    head = store.head(run, branch)
    if head is None:
        raise NpoError(f"no branch '{run}/{branch}' in the store (see npo ls)")
    man = store.manifest(head)
    if man.recipe is None:
        raise NpoError(f"checkpoint {head[:12]} has no stored recipe; cannot resume it")
    return man, store.get_json(man.recipe)


def check_trainable(store: Store, man: Manifest) -> None:
    """NpoError unless training can go on exactly from `man`: it is not pruned, and holds its optimizer state
    (a weights-only checkpoint of train.save_optimizer_every, say a crash's last save, names the last full one)."""
    store.check_not_pruned(man.id)
    if not weights_only(man):
        return
    pruned = store.pruned()
    full = next((m for m in store.readable_lineage(man.id)[0] if not weights_only(m) and m.id not in pruned), None)
    fix = (f"make a branch at the last one that has it, {npo_command('rewind', f'{full.run}/{full.branch}@{full.step}', store=store.url)}, "
           "and continue that branch" if full else "no checkpoint of its lineage has it")
    raise NpoError(f"checkpoint {man.run}/{man.branch}@{man.step} holds weights only (train.save_optimizer_every), "
                   f"so training cannot go on from it exactly; {fix}")


def resume_trainer(store: Store, ref: str, overrides: list[str] = (), trainer_cls: type[Trainer] = Trainer,
                   **kw) -> Trainer:
    """Continue the head of RUN or RUN/BRANCH with the recipe stored in it (plus `--set` overrides)."""
    if "@" in ref:
        raise NpoError(f"--resume takes RUN or RUN/BRANCH (a branch head), not '{ref}'; "
                       "to train from an older step make a branch first (npo rewind)")
    run, _, branch = ref.partition("/")
    branch = branch or "main"
    man, stored = head_with_recipe(store, run, branch)
    check_trainable(store, man)
    recipe = build_recipe(stored, list(overrides))
    if recipe.name != man.run:
        raise NpoError(f"--set name cannot rename run '{man.run}' on resume")
    if man.step >= recipe.train.steps:
        raise NpoError(f"{run}/{branch} is already at step {man.step} "
                       f"(train.steps={recipe.train.steps}); extend it with --set train.steps=N")
    return trainer_cls(recipe, store, branch=branch, init=man, source=make_source(recipe, store), **kw)


def npo_recipe(base: Recipe, guide: str, start: int, until: int, gate: float | None = None) -> Recipe:
    """`base` with NPO on from step `start` to `until`, guided by checkpoint `guide` (an id); validated."""
    npo = {**base.npo.model_dump(), "source": "npo", "guide": guide, "start": start, "until": until}
    if gate is not None:
        npo["gate"] = gate
    return Recipe.model_validate({**base.model_dump(), "npo": npo})


def fork_branch(store: Store, fork: Manifest, recipe: Recipe, branch: str, event: Event, *,
                trainer_cls: type[Trainer] = Trainer, prepare=None, console=None, force: bool = False) -> Trainer:
    """Make branch `branch` of recipe.name at checkpoint `fork`, trained under `recipe`; returns its trainer
    after the branch's first checkpoint is written. prepare(trainer): work before that checkpoint whose
    result it must hold (AutoNPO carries its controller over and pre-fills the guide cache). force: break
    the dead lease of a process killed while it made this branch."""
    dist.barrier()  # torchrun: every rank has checked the branch is free before rank 0 writes it
    trainer = trainer_cls(recipe, store, branch=branch, init=fork, source=make_source(recipe, store),
                          console=console)
    if prepare is not None:
        prepare(trainer)
    trainer.events.append(event)
    with store.lease(recipe.name, branch, force=force) if dist.is_main() else nullcontext():
        trainer.save(parent=fork.id)
        trainer.wait_saved()  # written under the lease
    return trainer
