"""The commands, wired: each opens the store, builds the recipe, the trainer with its source and controller,
and returns plain data for npo_cli/cli.py to print (or dump with --json). The checks that need no store
come first, so bad input fails before any work."""

from __future__ import annotations

import os
import sys

import torch

from npo_cli import auto, dist
from npo_cli.branching import new_trainer, resume_trainer
from npo_cli.checkpoint import DTYPES, export, import_hf, load_model
from npo_cli.compare import compare, plot
from npo_cli.errors import NpoError
from npo_cli.gc import collect, verify
from npo_cli.guide import prefill
from npo_cli.history import ls_data, show_data
from npo_cli.intervene import plan, train_branch
from npo_cli.model import resolve_device
from npo_cli.objects import check_name
from npo_cli.recipe import Recipe, build_recipe, read_recipe
from npo_cli.seeds import eval_seed
from npo_cli.store import Store
from npo_cli.tasks import load_problems
from npo_cli.trainer import evaluate


def open_store(url: str | None, recipe: Recipe | None = None, must_exist: bool = False) -> Store:
    """--store beats the recipe's store, which beats $NPO_STORE / ./checkpoints. must_exist: for commands
    that continue something already in the store (a mistyped local folder is not an empty store)."""
    return Store.open(url or (recipe.store if recipe else None), must_exist=must_exist)


# --------------------------------------------------------------------------- training


def load_recipe(path: str, overrides: list[str]) -> Recipe:
    """The recipe file plus `--set` overrides. Under torchrun rank 0 reads the file and the other ranks
    build from its copy: no rank can train under other settings (a file edited while the ranks start,
    another copy on another node), which would hang them at mismatched collectives, and only rank 0's
    node needs the file."""
    data = dist.broadcast_json(read_recipe(path) if dist.is_main() else None)  # one process: it reads
    return build_recipe(data, list(overrides))


def _recipe_or_resume(recipe_path: str | None, resume: str | None, command: str) -> None:
    if resume and recipe_path:
        raise NpoError("--resume takes the recipe stored in the checkpoint; drop RECIPE and pass changes with --set")
    if not resume and not recipe_path:
        raise NpoError(f"give a recipe file (npo {command} RECIPE) or --resume RUN[/BRANCH]")


def run_recipe(recipe_path: str | None, overrides: list[str], store_url: str | None, resume: str | None,
               console=None, progress: bool = True, force: bool = False) -> dict:
    """`npo run`: a new run from a recipe file, or --resume RUN[/BRANCH] from its head. An AutoNPO run (a
    recipe with auto.enabled, or a resume of one) goes on as `npo auto` would."""
    dist.init(console)  # torchrun --nproc-per-node N -m npo_cli run ...: data-parallel (no-op in one process)
    _recipe_or_resume(recipe_path, resume, "run")
    if resume:
        store = open_store(store_url, must_exist=True)
        if auto.is_auto(store, resume):  # it continues with its controller (and its rollbacks)
            return _drive(store, auto.resume(store, resume, list(overrides), console=console, force=force),
                          console, progress, force)
        trainer = resume_trainer(store, resume, overrides, console=console)
    else:
        recipe = load_recipe(recipe_path, overrides)
        if recipe.auto.enabled:
            return _new_auto(recipe, store_url, console, progress, force)
        trainer = new_trainer(recipe, open_store(store_url, recipe), console=console)
    res = trainer.train(progress=progress and trainer.recipe.logging.progress, force=force)
    dist.finish()
    return res


def auto_run(recipe_path: str | None, overrides: list[str], store_url: str | None, resume: str | None,
             console=None, progress: bool = True, force: bool = False) -> dict:
    """`npo auto`: a new AutoNPO run from a recipe file, or --resume RUN (its live branch) or RUN/BRANCH."""
    dist.init(console)  # torchrun ... -m npo_cli auto ...: data-parallel (no-op in one process)
    _recipe_or_resume(recipe_path, resume, "auto")
    if resume:
        store = open_store(store_url, must_exist=True)
        return _drive(store, auto.resume(store, resume, list(overrides), console=console, force=force),
                      console, progress, force)
    recipe = load_recipe(recipe_path, overrides)
    recipe = Recipe.model_validate({**recipe.model_dump(), "auto": {**recipe.auto.model_dump(), "enabled": True}})
    return _new_auto(recipe, store_url, console, progress, force)


def _new_auto(recipe: Recipe, store_url: str | None, console, progress: bool, force: bool) -> dict:
    auto.check_new(recipe)
    store = open_store(store_url, recipe)
    return _drive(store, new_trainer(recipe, store, auto.AutoTrainer, console=console), console, progress, force)


def _drive(store: Store, trainer: auto.AutoTrainer, console, progress: bool, force: bool) -> dict:
    res = auto.drive(store, trainer, console=console, progress=progress, force=force)
    dist.finish()
    return res


def intervene(store_url: str | None, *, run: str | None, at: int, guide: str, until: int | None = None,
              gate: float | None = None, branch: str | None = None, overrides: list[str] = (),
              allow_any_guide: bool = False, console=None, progress: bool = True, force: bool = False) -> dict:
    """`npo intervene`: plan, make the branch, train it; the trainer's summary plus the plan."""
    dist.init(console)  # torchrun ... -m npo_cli intervene ...: the branch trains data-parallel
    store = open_store(store_url, must_exist=True)
    p = plan(store, run=run, at=at, guide=guide, until=until, gate=gate, branch=branch, overrides=overrides,
             allow_any_guide=allow_any_guide)
    return train_branch(store, p, console=console, progress=progress, force=force)


def guide(store_url: str | None, guide_ref: str, prompts: str | None = None, split: str = "train",
          limit: int | None = None, from_step: int = 0, overrides: list[str] = (), console=None,
          progress: bool = True) -> dict:
    """`npo guide`: pre-fill a guide checkpoint's cache."""
    return prefill(open_store(store_url, must_exist=True), guide_ref, prompts, split, limit, from_step,
                   overrides, console=console, progress=progress)


def eval_command(store_url: str | None, ref: str, samples: int | None, task_overrides: list[str]) -> dict:
    store = open_store(store_url, must_exist=True)  # a mistyped --store says so, not "unknown run"
    note_live_branch(store, ref)
    return eval_checkpoint(store, ref, samples, task_overrides)


def eval_checkpoint(store: Store, ref: str, samples: int | None = None, task_overrides: list[str] = ()) -> dict:
    """`npo eval`: held-out accuracy, greedy accuracy and pass@k of any checkpoint."""
    if samples is not None and samples < 1:  # before any work; 0 is not "the recipe's default"
        raise NpoError("--samples must be >= 1")
    man = store.manifest(ref)
    stored = store.get_json(man.recipe) if man.recipe else {}
    recipe = build_recipe(stored, [f"task.{kv}" for kv in task_overrides])
    device = resolve_device(recipe.model)
    if device == "cpu":
        torch.set_num_threads(recipe.model.threads)
    model, tokenizer, _ = load_model(store, man.id, dtype=DTYPES[recipe.model.dtype], device=device)
    problems = load_problems(recipe.task, "eval", recipe.seed)[: recipe.task.eval_size]
    if not problems:
        raise NpoError("the task's eval split is empty")
    k = recipe.train.eval_samples if samples is None else samples
    res = evaluate(model, tokenizer, recipe, problems, k, seed=eval_seed(recipe.seed, man.step))
    return {"checkpoint": man.id, "run": man.run, "branch": man.branch, "step": man.step,
            "problems": len(problems), "samples": k, **res}


# --------------------------------------------------------------------------- the store


def note_live_branch(store: Store, ref: str) -> None:
    """RUN names RUN/main, but an AutoNPO run's result lives on its chain's last branch: say so (stderr)."""
    if "/" in ref or "@" in ref or ref not in store.runs():
        return
    try:
        live = auto.auto_chain(store, ref)[-1]
    except NpoError:  # a damaged checkpoint elsewhere in the run: the command itself says what it can
        return
    if live != "main":
        print(f"note: {ref} is {ref}/main; its AutoNPO chain goes on in {ref}/{live}", file=sys.stderr)


def ls(store_url: str | None, run: str | None = None) -> dict:
    return ls_data(open_store(store_url, must_exist=True), run)


def show(store_url: str | None, ref: str) -> dict:
    store = open_store(store_url, must_exist=True)
    data = show_data(store, ref)
    note_live_branch(store, ref)
    return data


def tag(store_url: str | None, ref: str | None, name: str | None, delete: str | None) -> list[str]:
    """`npo tag`: tag REF as NAME, remove tag --delete NAME, or list the tags; the lines to print."""
    if delete is not None and (ref or name):
        raise NpoError("npo tag --delete NAME takes no REF; remove the tag, then tag another checkpoint")
    if ref is None and name is not None:
        raise NpoError("give the checkpoint to tag: npo tag REF NAME")
    store = open_store(store_url, must_exist=True)
    if delete is not None:
        return [f"removed tag {delete} ({store.describe(store.untag(delete))})"]
    if ref is None:
        return [f"{t}  {store.describe(cid)}" for t, cid in sorted(store.tags().items())] or ["no tags"]
    m = store.manifest(ref)
    name = name or f"{m.run}-{m.branch}-{m.step}"
    store.tag(m.id, name)
    return [f"tag {name} -> {store.describe(m.id)}"]


def rewind(store_url: str | None, ref: str, branch: str | None) -> tuple[str, str, int, str]:
    """A new branch at REF (one ref written, no tensor copied): (run, branch, step, checkpoint id)."""
    if branch is not None:
        check_name("branch", branch)
    store = open_store(store_url, must_exist=True)
    m = store.manifest(ref)
    name = branch or f"rewind-{m.step}"
    store.branch(m.id, name, run=m.run)
    return m.run, name, m.step, m.id


def verify_store(store_url: str | None) -> dict:
    return verify(open_store(store_url, must_exist=True))


def gc_store(store_url: str | None, dry_run: bool, force: bool, keep_recent: float) -> dict:
    return collect(open_store(store_url, must_exist=True), dry_run=dry_run, force=force, keep_recent=keep_recent)


def export_checkpoint(store_url: str | None, ref: str, out_dir: str, dtype: str, merge: bool = False) -> None:
    if "://" in out_dir:  # os paths only: s3://b/x became a local folder "s3:/b/x"
        raise NpoError(f"export writes a local folder, not {out_dir}; give a path, then copy it")
    store = open_store(store_url, must_exist=True)
    store.resolve(ref)  # a bad ref fails before the model is read
    note_live_branch(store, ref)
    export(store, ref, out_dir, dtype, merge)


def import_model(store_url: str | None, hf_dir: str, run: str) -> str:
    """A step-0 checkpoint on RUN/main from a Hugging Face model folder; its id."""
    check_name("run", run)
    if "://" in hf_dir:  # local folders only: for a URL the check below said "no config.json" though it is there
        raise NpoError(f"import reads a local folder, not {hf_dir}; copy it to a local path first")
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise NpoError(f"{hf_dir} is not a Hugging Face model folder (no config.json)")
    return import_hf(open_store(store_url), hf_dir, run)  # a new folder becomes a new store


def compare_curves(store_url: str | None, refs: list[str], metric: str, x: str, threshold: float | None,
                   plot_path: str | None) -> dict:
    """`npo compare`: curves, finals and steps to a threshold; the chart written to plot_path."""
    if plot_path:  # a bad chart path fails before the work, not after it
        folder = os.path.dirname(os.path.abspath(plot_path))
        if not os.path.isdir(folder):
            raise NpoError(f"--plot {plot_path}: folder {folder} does not exist; create it or pick another path")
        if os.path.isdir(plot_path):
            raise NpoError(f"--plot {plot_path} is a folder; give a file name, e.g. "
                           f"{os.path.join(plot_path, 'chart.png')}")
    store = open_store(store_url, must_exist=True)
    data = compare(store, refs, metric, x, threshold)
    for ref in refs:
        note_live_branch(store, ref.partition("=")[2] or ref)
    if plot_path:
        plot(data, plot_path)
        data["plot"] = plot_path
    return data
