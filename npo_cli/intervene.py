"""`npo intervene`: branch a run at step A and train it with a near-future guide G.

Both of the paper's interventions are this one call: bootstrapping (`--at 0 --guide <scout step>`)
and plateau breakthrough (`--at <plateau start> --guide <post-plateau step>`). The branch
(default `npo-A-gG`) starts at RUN@A with that checkpoint's recipe, data position and RNG; it trains
with npo.source=npo from A until U (default: G's step, i.e. it replays the stretch A..G), then plain
GRPO up to the run's train.steps. Every checkpoint of the branch names the guide (manifest `guide`),
and its first one carries an `intervene` event.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from npo_cli import dist
from npo_cli.branching import check_trainable, fork_branch, npo_recipe
from npo_cli.errors import NpoError
from npo_cli.lease import npo_command
from npo_cli.manifest import Event
from npo_cli.objects import check_name
from npo_cli.recipe import Recipe, build_recipe
from npo_cli.store import Store


class Plan(BaseModel):
    """An intervention, checked and worked out before anything is written."""

    model_config = ConfigDict(extra="forbid")
    run: str
    branch: str
    fork: str = Field(description="Checkpoint id of RUN@A.")
    at: int
    guide: str = Field(description="Checkpoint id of the guide.")
    guide_ref: str
    guide_step: int
    until: int
    steps: int = Field(description="The branch trains to this step (the run's train.steps).")
    gate: float
    same_lineage: bool
    recipe: Recipe = Field(exclude=True, description="The branch's recipe: the fork's, NPO on.")


def _pick_run(store, at: int, guide: str) -> str:
    runs = store.runs()
    if len(runs) == 1:
        return runs[0]
    if not runs:
        raise NpoError(f"the store {store.url} holds no runs")
    # several runs (e.g. a warm-start 'base' and the run itself): the one that has both steps
    fits = []
    for r in runs:
        try:
            store.resolve(f"{r}@{at}")
            if guide.isdigit():
                store.resolve(f"{r}@{guide}")
            fits.append(r)
        except NpoError:
            pass
    if len(fits) == 1:
        return fits[0]
    raise NpoError(f"the store holds several runs ({', '.join(runs[:10])}); name one with --run")


def plan(store: Store, *, run: str | None, at: int, guide: str, until: int | None = None, gate: float | None = None,
         branch: str | None = None, overrides: list[str] = (), allow_any_guide: bool = False) -> Plan:
    """Check everything and work out the branch, before anything is written."""
    if at < 0:
        raise NpoError(f"--at must be a step >= 0, not {at}")
    if gate is not None and not 0.0 <= gate <= 1.0:
        raise NpoError(f"--gate must be in [0, 1] (an on-policy accuracy), not {gate}")
    guide = str(guide)
    run = run or _pick_run(store, at, guide)
    run_name = run.split("/", 1)[0]
    fork = store.manifest(store.resolve(f"{run}@{at}"))
    g = store.manifest(store.resolve(f"{run}@{guide}" if guide.isdigit() else guide))
    check_trainable(store, fork)
    store.check_not_pruned(g.id)
    # walked lazily: a damaged manifest older than the fork is never reached
    same_lineage = any(m.id == fork.id for m in store.walk(g.id))
    at_or_before = not same_lineage and any(m.id == g.id for m in store.walk(fork.id))  # an ancestor of the fork
    if at_or_before or (same_lineage and g.step <= at):
        raise NpoError(f"the guide ({g.run}/{g.branch}@{g.step}) must come after --at {at}: "
                       "NPO learns from a near-future checkpoint of the same run")
    if not same_lineage and not allow_any_guide:
        raise NpoError(f"guide {g.run}/{g.branch}@{g.step} is not a later checkpoint of {run}@{at}'s "
                       "lineage; pick a later step of the same run, or pass --allow-any-guide")
    if fork.recipe is None:
        raise NpoError(f"checkpoint {run}@{at} has no stored recipe; cannot branch it")
    stored = store.get_json(fork.recipe)
    if until is None:
        until = g.step if g.step > at else None
        if until is None:
            raise NpoError(f"the guide's step {g.step} is not after {at}; give --until")
    if until <= at:
        raise NpoError(f"--until {until} must be after --at {at}")
    name = f"npo-{at}-g{g.step}" if branch is None else branch  # "" is refused below, not defaulted
    check_name("branch", name)
    recipe = npo_recipe(build_recipe(stored, list(overrides)), g.id, at, until, gate)
    if recipe.name != run_name:
        raise NpoError(f"--set name cannot rename run '{run_name}'")
    total = recipe.train.steps
    if until > total:
        raise NpoError(f"--until {until} is past the run's train.steps={total}; "
                       f"lower --until or extend with --set train.steps=N")
    if at >= total:
        raise NpoError(f"--at {at} is at or past the run's train.steps={total}; extend with --set train.steps=N")
    if name in store.branches(run_name):
        raise NpoError(f"branch {run_name}/{name} already exists; continue it with "
                       f"{npo_command('run', '--resume', f'{run_name}/{name}', store=store.url)}, "
                       "or pick another name with --branch")
    return Plan(run=run_name, branch=name, fork=fork.id, at=at, guide=g.id, guide_ref=f"{g.run}/{g.branch}@{g.step}",
                guide_step=g.step, until=until, steps=total, gate=recipe.npo.gate, same_lineage=same_lineage,
                recipe=recipe)


def train_branch(store: Store, p: Plan, console=None, progress: bool = True, force: bool = False) -> dict:
    """Make the planned branch (`branching.fork_branch`) and train it; the trainer's summary plus the plan."""
    event = Event(kind="intervene", at=p.at, fork=p.fork, guide=p.guide, until=p.until, gate=p.gate,
                  same_lineage=p.same_lineage)
    trainer = fork_branch(store, store.manifest(p.fork), p.recipe, p.branch, event, console=console, force=force)
    res = trainer.train(progress=progress and trainer.recipe.logging.progress)
    dist.finish()
    return {**res, "plan": p.model_dump()}
