"""The command line: parse, validate, call, print. No logic lives here."""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import shlex
import sys
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from npo_cli import __version__, commands, dist
from npo_cli.errors import NpoError, one_line, os_reason
from npo_cli.history import human_bytes
from npo_cli.lease import LeaseHeldElsewhere, npo_command
from npo_cli.manifest import Event
from npo_cli.recipe import schema_rows

try:  # Typer >= 0.2x carries its own copy of click; its exceptions are the ones raised
    from typer._click.exceptions import ClickException
except ImportError:
    from click.exceptions import ClickException

app = typer.Typer(
    help="npo: RLVR with GRPO, a content-addressed checkpoint store, and Near-Future Policy Optimization.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
recipe_app = typer.Typer(help="Inspect recipe settings.", no_args_is_help=True,
                         context_settings={"help_option_names": ["-h", "--help"]})
app.add_typer(recipe_app, name="recipe")
# the type column of --help: a flag takes no value, and an argument's name (REF, RECIPE) says what it is;
# Typer >= 0.2x printed <bool> and <str> there (older Typer has no such method and prints neither)
if hasattr(typer.core.TyperOption, "display_type_rich"):
    _option_type = typer.core.TyperOption.display_type_rich
    typer.core.TyperOption.display_type_rich = lambda self, ctx: (None if self.is_flag
                                                                   else _option_type(self, ctx))
    typer.core.TyperArgument.display_type_rich = lambda self, ctx: None


def _console(stderr: bool = False) -> Console:
    """A terminal wraps at its width; a pipe or a file gets whole lines: no table cell cut at 80 columns, and
    a status line stays one line in a log."""
    tty = (sys.stderr if stderr else sys.stdout).isatty()
    return Console(soft_wrap=True, stderr=stderr, width=None if tty else 100_000)


console = _console()
# with --json, stdout is the JSON alone: status lines and warnings of long commands go to stderr
json_console = _console(stderr=True)

StoreOpt = typer.Option(None, "--store", metavar="URL",
                        help="Store URL (default: $NPO_STORE, else ./checkpoints).")
JsonOpt = typer.Option(False, "--json", help="Machine-readable output.")


def _version(value: bool):
    if value:
        print(f"npo {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool | None = typer.Option(None, "--version", callback=_version, is_eager=True,
                                           help="Print the version and exit."),
):
    pass


@recipe_app.command("schema")
def recipe_schema(as_json: bool = JsonOpt):
    """Every recipe setting with its type (a choice lists its allowed values), default and description."""
    rows = schema_rows()
    if as_json:  # the default as a JSON value, not JSON text inside a string
        print(json.dumps([{"key": k, "type": t, "default": json.loads(d), "description": s} for k, t, d, s in rows],
                         indent=1))
        return
    table = Table("key", "type", "default", "description")
    for r in rows:
        table.add_row(*r)
    console.print(table)


RecipeArg = typer.Argument(None, metavar="RECIPE", help="Recipe YAML (leave out with --resume).")
SetOpt = typer.Option([], "--set", metavar="KEY=VALUE",
                      help="Override a recipe key: --set train.steps=40 (repeatable).")
ResumeOpt = typer.Option(None, "--resume", metavar="RUN[/BRANCH]",
                         help="Continue RUN or RUN/BRANCH from its head.")
RefArg = typer.Argument(..., metavar="REF",
                        help="Checkpoint: RUN, RUN@STEP, RUN/BRANCH, RUN/BRANCH@STEP or an id prefix.")
SamplesOpt = typer.Option(None, "--samples", metavar="K", help="Sampled completions per problem (pass@k).")
TaskSetOpt = typer.Option([], "--task-set", metavar="KEY=VALUE",
                          help="Override a task key: --task-set eval_size=64 (repeatable).")


@app.command("run")
def run_cmd(
    recipe: str | None = RecipeArg,
    sets: list[str] = SetOpt,
    store: str | None = StoreOpt,
    resume: str | None = ResumeOpt,
    force: bool = typer.Option(False, "--force", help="Break a dead or expired lease on the branch."),
    as_json: bool = JsonOpt,
):
    """Train with GRPO: a new run from RECIPE, or continue one with --resume."""
    res = commands.run_recipe(recipe, sets, store, resume, console=json_console if as_json else console,
                     progress=not as_json, force=force)
    if as_json:
        print(json.dumps(res, indent=1))
    else:
        s, med = res["summary"], res["median_step_s"]
        table = Table("", "", title=f"npo run {res['run']}/{res['branch']}", show_header=False)
        rows = [("step", str(res["step"])), ("checkpoint", (res["checkpoint"] or "-")[:12])]
        rows += [(k, f"{s[k]:.3f}") for k in ("reward", "accuracy", "eval/accuracy", "eval/greedy_accuracy")
                 if k in s]
        rows += [("wall time", f"{res['wall_s']:.1f} s"), ("median step", f"{med:.3f} s" if med else "-")]
        if res["metrics_jsonl"]:
            rows.append(("metrics", res["metrics_jsonl"]))
        for row in rows:
            table.add_row(*row)
        console.print(table)
        if res["stopped_by"]:
            hint = npo_command("run", "--resume", f"{res['run']}/{res['branch']}", store=res["store"])
            console.print(f"stopped by {res['stopped_by']} at step {res['step']}; continue with {hint}",
                          markup=False, highlight=False)
    if res["stopped_by"] in ("SIGINT", "SIGTERM"):
        raise typer.Exit(130)


@app.command("eval")
def eval_cmd(
    ref: str = RefArg,
    samples: int | None = SamplesOpt,
    task_sets: list[str] = TaskSetOpt,
    store: str | None = StoreOpt,
    as_json: bool = JsonOpt,
):
    """Held-out accuracy (sampled and greedy) and pass@k of a checkpoint on its task's eval split."""
    res = commands.eval_command(store, ref, samples, task_sets)
    if as_json:
        print(json.dumps(res, indent=1))
        return
    table = Table("checkpoint", "step", "problems", "accuracy", "greedy", f"pass@{res['samples']}",
                  title="npo eval")
    passk = res.get(f"eval/pass@{res['samples']}", res["eval/accuracy"])
    table.add_row(f"{res['run']}/{res['branch']} {res['checkpoint'][:12]}", str(res["step"]),
                  str(res["problems"]), f"{res['eval/accuracy']:.3f}", f"{res['eval/greedy_accuracy']:.3f}",
                  f"{passk:.3f}")
    console.print(table)


# ------------------------------------------------------------------ store commands

StoreRefArg = typer.Argument(..., metavar="REF",
                             help="Checkpoint: RUN, RUN@STEP, RUN/BRANCH, RUN/BRANCH@STEP or an id prefix.")


def _fmt(v) -> str:
    """A table cell: whole numbers as integers (steps, token counts), small ones (lr) in 3 significant digits."""
    if v is None:
        return "-"
    if not isinstance(v, float) or not math.isfinite(v):
        return str(v)
    if v.is_integer():
        return str(int(v))
    return f"{v:.3g}" if abs(v) < 0.01 else f"{v:.3f}"


@app.command("ls")
def ls_cmd(
    run: str | None = typer.Argument(None, metavar="RUN", help="Only this run."),
    store: str | None = StoreOpt,
    as_json: bool = JsonOpt,
):
    """Runs, branches (fork point, guide, writer lease) and checkpoints (step, reward, eval accuracy, size).
    Exit 1 after the listing when a checkpoint manifest or a ref is damaged (the listing marks it)."""
    data = commands.ls(store, run)
    if as_json:
        print(json.dumps(data, indent=1))
    elif not data["runs"]:
        console.print(f"no runs in {data['store']}")
    else:
        _print_ls(data)
    # after the listing, which marks each damaged checkpoint and each run it cannot list
    ids = list(dict.fromkeys(f"{d['id'][:12]} ({d['run']}/{d['branch']})" for d in data["damaged"]))
    unlisted = [r["run"] for r in data["runs"] if r.get("error")]
    if ids or unlisted:
        what = [f"{len(ids)} damaged checkpoint(s): {', '.join(ids)}"] if ids else []
        what += [f"run(s) that cannot be listed: {', '.join(unlisted)}"] if unlisted else []
        raise NpoError(f"{'; '.join(what)}; history older than a damaged checkpoint cannot be read through it "
                       "(npo verify lists every damaged object)")


def _lease_text(w: dict) -> str:
    """A branch's writer lease, as `npo ls` shows it."""
    if w["state"] == "live":
        return f"writer: pid {w['pid']} on {w['host']} (live)"
    if w["state"] == "dead":
        return f"[red]dead lease (pid {w['pid']} gone)[/]"
    return f"[yellow]expired lease (pid {w['pid']} on {w['host']})[/]"


def _print_ls(data: dict) -> None:
    tree = Tree(f"[bold]{data['store']}")
    for r in data["runs"]:
        rt = tree.add(f"[bold]{r['run']}" + (f"  auto chain: {' -> '.join(r['auto_chain'])} (live)"
                                             if len(r.get("auto_chain") or []) > 1 else "")
                      + (f"  [red]cannot list: {escape(r['error'])}[/]" if r.get("error") else ""))
        for b in r["branches"]:
            extra = [f"from {b['fork']['ref']}"] if b["fork"] else []
            extra += [f"guide {b['guide']['ref']}"] if b["guide"] else []
            if b.get("auto"):  # the AutoNPO intervention that made this branch
                a = b["auto"]
                extra.append(f"AutoNPO {'#' + str(a['k']) if a['k'] else 'bootstrap'}: D*={a['delta']}, "
                             f"NPO {a['fork_step']}..{a['until']}")
            extra += ["[bold green]live[/]"] if b.get("live") else []
            extra += [_lease_text(b["writer"])] if b["writer"] else []
            extra += ["no checkpoint yet"] if b["head"] is None else []
            bt = rt.add(f"[cyan]{b['branch']}[/] " + ", ".join(extra))
            if b["damaged"]:  # oldest first: what lies behind it is not listed
                d = b["damaged"]
                bt.add(f"[red]damaged: {d['id'][:12]} ({escape(d['reason'])}); older history not readable[/]")
            for c in b["checkpoints"]:
                size = "[dim]pruned[/]" if c.get("pruned") else human_bytes(c["size"])
                size += " weights only" if c.get("weights_only") else ""
                size += "".join(f"  [bold]tag {t}[/]" for t in c.get("tags", []))
                bt.add(f"step {c['step']:>5}  {c['id'][:12]}  reward {_fmt(c['reward'])}  "
                       f"eval {_fmt(c['eval_accuracy'])}  {size}")
    console.print(tree)


@app.command("show")
def show_cmd(ref: str = StoreRefArg, store: str | None = StoreOpt, as_json: bool = JsonOpt):
    """One checkpoint: manifest, metrics summary since its parent, recipe difference from the checkpoint its
    branch started from (a run's first branch: its parent), and on a guided branch its NPO figures."""
    d = commands.show(store, ref)
    if as_json:
        print(json.dumps(d, indent=1))
        return
    m = d["manifest"]
    t = Table("field", "value", title=f"{d['ref']}  {d['id'][:12]}", show_header=False)
    t.add_row("id", d["id"])
    t.add_row("parent", f"{d['parent']['ref']} ({d['parent']['id'][:12]})" if d["parent"] else "-")
    t.add_row("guide", f"{d['guide']['ref']} ({d['guide']['id'][:12]})" if d["guide"] else "-")
    t.add_row("created", f"{m['created']}  npo {m['npo_version']}")
    for e in m["events"]:  # a run's first checkpoint: the model it started from (and its Hub commit)
        if e["kind"] == "start" and e.get("model"):
            t.add_row("model", e["model"] + (f" @ {e['revision']}" if e.get("revision") else ""))
    n = d["tensors"]
    t.add_row("tensors", f"{n['model']} model, {n['optimizer']} optimizer, {n['state']} state; "
              f"{human_bytes(d['size'])}")
    for k, v in d["summary"].items():  # eval numbers may come from an earlier step: say which
        if k == "eval/step":
            continue
        at = f" (step {d['eval_step']})" if k.startswith("eval/") and d["eval_step"] is not None else ""
        t.add_row(f"summary {k}", _fmt(v) + at)
    if m["events"]:
        t.add_row("events", "; ".join(e["kind"] for e in m["events"]))
    console.print(t)
    _print_auto_events([Event.model_validate(e) for e in m["events"]])
    cols = d["metrics"]["columns"]
    if cols:
        mt = Table("metric", "first", "last", "mean", "min", "max",
                   title=f"metrics over {d['metrics']['steps']} steps since the parent")
        for k, s in cols.items():
            mt.add_row(k, *(_fmt(s[x]) for x in ("first", "last", "mean", "min", "max")))
        console.print(mt)
    npo = d["npo_metrics"]
    if npo:
        since = d["recipe_base"]["ref"] if d["recipe_base"] and d["recipe_base"]["fork"] else "its start"
        nt = Table("metric", "first", "last", "mean", "min", "max",
                   title=f"NPO figures over the branch's {npo['steps']} NPO steps since {since}")
        for k, s in npo["columns"].items():
            nt.add_row(k, *(_fmt(s[x]) for x in ("first", "last", "mean", "min", "max")))
        console.print(nt)
    base = d["recipe_base"]
    base = f"{base['ref']} (the {'checkpoint the branch started from' if base['fork'] else 'parent'})" if base else ""
    if d["recipe_diff"]:
        rt = Table("recipe key", "before", "this", title=f"recipe difference from {base}")
        for row in d["recipe_diff"]:
            rt.add_row(row["key"], json.dumps(row["parent"]), json.dumps(row["this"]))
        console.print(rt)
    else:
        console.print(f"recipe: {d['recipe_diff_note'] or 'same as ' + base}", highlight=False)
    if d["damaged"]:
        dm = d["damaged"]
        console.print(f"[red]damaged history: checkpoint {dm['id'][:12]} (parent of {dm['parent_of']}): "
                      f"{escape(dm['reason'])}[/]", highlight=False)


@app.command("rewind")
def rewind_cmd(
    ref: str = StoreRefArg,
    branch: str | None = typer.Option(None, "--branch", metavar="NAME",
                                      help="New branch name (default rewind-STEP)."),
    store: str | None = StoreOpt,
):
    """A new branch at REF (one ref written, no tensor copied), to continue training from there."""
    run, name, step, cid = commands.rewind(store, ref, branch)
    print(f"branch {run}/{name} -> step {step} ({cid[:12]})")
    print(f"continue it with: {npo_command('run', '--resume', f'{run}/{name}', store=store)}")


@app.command("tag")
def tag_cmd(
    ref: str | None = typer.Argument(None, metavar="REF", help="Checkpoint to keep whole (leave out to list tags)."),
    name: str | None = typer.Argument(None, metavar="NAME", help="Tag name (default RUN-BRANCH-STEP)."),
    delete: str | None = typer.Option(None, "--delete", metavar="NAME", help="Remove this tag."),
    store: str | None = StoreOpt,
):
    """Tag a checkpoint: gc and train.keep_last keep it whole, like a branch head. A pruned checkpoint whose
    tensors npo gc has not freed yet is taken back. With no REF, list the tags."""
    for line in commands.tag(store, ref, name, delete):
        print(line)


@app.command("verify")
def verify_cmd(store: str | None = StoreOpt, as_json: bool = JsonOpt):
    """Re-hash every object and check every checkpoint's references; exit 1 on problems."""
    rep = commands.verify_store(store)
    if as_json:
        print(json.dumps(rep, indent=1))
    elif rep["ok"]:
        print(f"ok: {rep['objects']} objects ({human_bytes(rep['bytes'])}), {rep['checkpoints']} checkpoints")
    else:
        print(f"{len(rep['problems'])} problem(s) in {rep['objects']} objects:")
        for p in rep["problems"]:
            print(f"  {p}")
    if not rep["ok"]:
        raise typer.Exit(1)


@app.command("gc")
def gc_cmd(
    dry_run: bool = typer.Option(False, "--dry-run", help="Only report what would be deleted."),
    force: bool = typer.Option(False, "--force", help="Run even while a branch lease is live."),
    keep_recent: float = typer.Option(
        3600.0, "--keep-recent", min=0, metavar="SECONDS", help="Keep unreachable objects younger than this: "
        "a writer without a lease (import, guide) may not have written what reaches them yet. 0: delete them "
        "all now."),
    store: str | None = StoreOpt,
    as_json: bool = JsonOpt,
):
    """Delete objects that no branch reaches (through parents and guides); report bytes freed."""
    rep = commands.gc_store(store, dry_run=dry_run, force=force, keep_recent=keep_recent)
    if as_json:
        print(json.dumps(rep, indent=1))
    else:
        verb = "would delete" if dry_run else "deleted"
        recent = f", {rep['recent_objects']} of them unreachable but recent" if rep["recent_objects"] else ""
        strays = f"; left {rep['stray_files']} stray files (see npo verify)" if rep["stray_files"] else ""
        print(f"{verb} {rep['objects']} unreachable objects ({human_bytes(rep['bytes'])}); "
              f"kept {rep['kept_objects']} ({human_bytes(rep['kept_bytes'])}{recent}){strays}")
    if rep["failed"]:
        sys.stderr.write(f"error: could not delete {len(rep['failed'])} unreachable objects ({rep['failed'][0]}); "
                         "fix that and run npo gc again\n")
        raise typer.Exit(1)


@contextlib.contextmanager
def _no_hf_progress():
    """Hugging Face's progress bars ("Loading weights", "Writing model shards") off for one call: export and
    import print one line."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


@app.command("export")
def export_cmd(
    ref: str = StoreRefArg,
    out_dir: str = typer.Argument(..., metavar="DIR", help="New folder for the Hugging Face model."),
    dtype: str = typer.Option("auto", "--dtype", metavar="DTYPE",
                              help="auto (the run's model.dtype), float32, bfloat16 or float16."),
    merge: bool = typer.Option(False, "--merge", help="LoRA checkpoint: the adapter merged into the base weights "
                               "(a plain model folder) instead of the adapter folder."),
    store: str | None = StoreOpt,
):
    """Write a checkpoint as a plain Hugging Face model folder (from_pretrained loads it); a LoRA checkpoint
    as peft's adapter folder (PeftModel.from_pretrained loads it), or merged with --merge."""
    with _no_hf_progress():
        commands.export_checkpoint(store, ref, out_dir, dtype, merge)
    print(f"exported {ref} to {out_dir}")


@app.command("import")
def import_cmd(
    hf_dir: str = typer.Argument(..., metavar="DIR",
                                 help="Hugging Face model folder (config.json, weights, tokenizer)."),
    run: str = typer.Option(..., "--run", metavar="NAME", help="Name of the new run."),
    store: str | None = StoreOpt,
):
    """Make a step-0 checkpoint on RUN/main from a Hugging Face model folder."""
    with _no_hf_progress():
        cid = commands.import_model(store, hf_dir, run)
    print(f"imported {hf_dir} as {run}/main@0 ({cid[:12]})")


# ------------------------------------------------------------------ NPO


@app.command("intervene")
def intervene_cmd(
    # help text is Rich markup: \\[ prints a literal [ ("[/BRANCH]" read as a closing tag crashed --help)
    at: str = typer.Option(..., "--at", metavar="[RUN@]STEP", help="Fork step A (the branch starts at RUN@A), "
                           "or RUN\\[/BRANCH]@A (the same as --run RUN, which torchrun mistakes for its own "
                           "--run-path)."),
    guide: str = typer.Option(..., "--guide", metavar="STEP|REF",
                              help="Guide: a later step G of the run, or any checkpoint ref."),
    run: str | None = typer.Option(None, "--run", metavar="RUN[/BRANCH]",
                                   help="RUN or RUN/BRANCH (optional when the store has one run)."),
    until: int | None = typer.Option(None, "--until", metavar="STEP",
                                     help="NPO stops at this step (default: the guide's step)."),
    gate: float | None = typer.Option(None, "--gate", metavar="ACC", help="Mix when on-policy group accuracy "
                                      "<= ACC (0..1; default: the recipe's npo.gate)."),
    branch: str | None = typer.Option(None, "--branch", metavar="NAME",
                                      help="Branch name (default npo-A-gG)."),
    sets: list[str] = SetOpt,
    allow_any_guide: bool = typer.Option(False, "--allow-any-guide", help="Allow a guide from another lineage."),
    force: bool = typer.Option(False, "--force", help="Break a dead or expired lease on the new branch (an "
                               "intervene killed while it made it)."),
    store: str | None = StoreOpt,
    as_json: bool = JsonOpt,
):
    """Branch RUN at step A and train it with guide G: NPO from A until U, then plain GRPO."""
    ref, _, step = at.rpartition("@")
    if not step.isdigit() or (ref and run and ref != run):
        raise NpoError(f"--at takes a step or RUN[/BRANCH]@STEP (e.g. 200 or myrun@200), not '{at}'"
                       + (f", with a run other than --run {run}" if ref and run else ""))
    run, at = run or ref or None, int(step)
    res = commands.intervene(store, run=run, at=at, guide=guide, until=until, gate=gate, branch=branch, overrides=sets,
                    allow_any_guide=allow_any_guide, console=json_console if as_json else console,
                    progress=not as_json, force=force)
    if as_json:
        print(json.dumps(res, indent=1))
        return
    p, s = res["plan"], res["summary"]
    t = Table("", "", title=f"npo intervene {p['run']}/{p['branch']}", show_header=False)
    rows = [("fork", f"{p['run']}@{p['at']} ({p['fork'][:12]})"), ("guide", f"{p['guide_ref']} ({p['guide'][:12]})"),
            ("npo window", f"steps {p['at']}..{p['until']} (gate {p['gate']})"), ("step", str(res["step"]))]
    rows += [(k, f"{s[k]:.3f}") for k in ("reward", "eval/accuracy") if k in s]
    for row in rows:
        t.add_row(*row)
    console.print(t)
    if res["stopped_by"]:
        hint = npo_command("run", "--resume", f"{p['run']}/{p['branch']}", store=res["store"])
        console.print(f"stopped by {res['stopped_by']}; continue with {hint}", markup=False, highlight=False)
    if res["stopped_by"] in ("SIGINT", "SIGTERM"):
        raise typer.Exit(130)


@app.command("guide")
def guide_cmd(
    guide: str = typer.Option(..., "--guide", metavar="REF",
                              help="Guide checkpoint (any ref), e.g. RUN@400."),
    prompts: str | None = typer.Option(None, "--prompts", metavar="FILE",
                                       help="JSONL/Parquet prompt file (fsspec URL)."),
    split: str = typer.Option("train", "--split", metavar="SPLIT",
                              help="Task split when --prompts is not given: train or eval."),
    limit: int | None = typer.Option(None, "--limit", metavar="N", help="At most N prompts."),
    from_step: int = typer.Option(0, "--from-step", metavar="STEP",
                                  help="Train split: start at the prompts of this step."),
    sets: list[str] = SetOpt,
    store: str | None = StoreOpt,
    as_json: bool = JsonOpt,
):
    """Pre-fill the guide cache: verified guide trajectories for a prompt set, written to the store."""
    res = commands.guide(store, guide, prompts, split, limit, from_step, sets,
                  console=json_console if as_json else console, progress=not as_json)
    if as_json:
        print(json.dumps(res, indent=1))
        return
    print(f"guide {res['guide_ref']} ({res['guide'][:12]}): {res['found']}/{res['prompts']} prompts with a "
          f"verified trajectory; {res['cache_hits']} from the cache, {res['sampled']} sampled "
          f"({res['samples']} samples, {res['tokens']} tokens, {res['seconds']:.1f} s)")


# ------------------------------------------------------------------ compare


CompareRefsArg = typer.Argument(..., metavar="REF", help="A branch or checkpoint (RUN, RUN/BRANCH, RUN@STEP, "
                                "id); LABEL=REF names its curve. A glob averages its matches: 'grpo-s*' (runs' "
                                "main branches), 'grpo-s*/npo-boot' ('*' never crosses '/').")


@app.command("compare")
def compare_cmd(
    refs: list[str] = CompareRefsArg,
    metric: str = typer.Option("eval/accuracy", "--metric", metavar="NAME", help="Per-step metric to plot."),
    x: str = typer.Option("step", "--x", metavar="AXIS", help="step, or the work so far (guides and replays "
                          "included): updates, samples, tokens or wall."),
    plot: str | None = typer.Option(None, "--plot", metavar="PNG", help="Write the chart to this PNG file."),
    threshold: float | None = typer.Option(None, "--threshold", metavar="VALUE",
                                           help="Target of the steps-to columns (default: the first curve's final)."),
    store: str | None = StoreOpt,
    as_json: bool = JsonOpt,
):
    """Branches' curves on one chart, their final values, and the steps to a threshold.

    A branch continues its parent's curve up to the fork. A glob's row is over its members (say, seeds) at the
    steps all of them have: the mean, ± the sample standard deviation over members (the chart's band); if
    members end at different steps (a seed crashed), the final value and the work columns are all at the last
    step they share, and a note says so. Its steps to the threshold are where the mean curve first reaches it,
    not a mean of each member's. A damaged checkpoint leaves out only what needs it (named under the table);
    exit 1 only when nothing could be compared."""
    data = commands.compare_curves(store, refs, metric, x, threshold, plot)
    if as_json:
        print(json.dumps(data, indent=1))
        return
    xs = data["x"]
    t = Table("curve", "fork", "final step", f"final {data['metric']}", f"steps to {data['threshold']:.3f}",
              *([f"{xs} to {data['threshold']:.3f}", f"{xs} total"] if xs != "step" else []),
              title=f"npo compare: {data['metric']}")
    for c in data["curves"]:
        f, hit = c["final"], c["to_threshold"]
        val = f"{f['y']:.3f}" + (f" ± {f['std']:.3f}" if f.get("std") is not None else "")
        name = c["label"] + (f" ({c['members']} runs)" if c["members"] > 1 else "")
        row = [name, f"@{c['fork']['step']:g}" if c["fork"] else "-", str(f["step"]), val,
               str(hit["step"]) if hit else "not reached"]
        if xs != "step":
            row += [f"{hit['x']:.4g}" if hit else "-", f"{c['work'][xs]:.4g}"]
        t.add_row(*row)
    console.print(t)
    for c in data["curves"]:
        if c["note"]:
            console.print(f"{c['label']}: {c['note']}")
    for u in data["unreadable"]:  # exit 0 all the same: what could be compared was
        ref = f" ({u['ref']})" if u["ref"] != u["label"] else ""
        console.print(f"not compared: {u['label']}{ref}: {u['error']}", markup=False, highlight=False)
    if plot:
        console.print(f"chart: {plot}")


# ------------------------------------------------------------------ AutoNPO


def _print_auto_events(events: list[Event]) -> None:
    """AutoNPO decisions of a checkpoint: signals, every candidate's Q, V, S and the chosen D*."""
    for e in events:
        if e.kind == "auto-branch":
            p = e.prefill or {}
            console.print(f"auto-branch #{e.k}: {e.branch} from {e.from_branch}@{e.fork_step}, NPO to "
                          f"{e.until} with guide {e.from_branch}@{e.guide_step} ({e.guide[:12]}); "
                          f"guide cache pre-filled for {p.get('found', 0)}/{p.get('prompts', 0)} mistakes",
                          highlight=False, soft_wrap=True)
        elif e.kind == "auto-scout":
            pr = e.probe or {}
            console.print(f"auto-scout at step {e.step}: S = Q/V = {_fmt(e.Q)}/{_fmt(e.V)} = "
                          f"{_fmt(e.S)} ({pr.get('prompts', 0)} early mistakes x {pr.get('tries', 0)} tries)",
                          highlight=False, soft_wrap=True)
        elif e.kind == "auto-bootstrap":
            if e.confirmed is False:
                text = f"no restart at step {e.step}: {e.reason or ''}"
            elif e.guide_step is None:  # written before the scout measured S: its stop is the guide
                text = f"scout done at step {e.step}; restart from step 0 on {e.branch} with this checkpoint as guide"
            else:
                guide = f"{e.guide[:12]}" if e.guide else "this checkpoint"
                text = (f"scout stopped at step {e.step}; restart from step 0 on {e.branch}, NPO to {e.until} with "
                        f"guide step {e.guide_step} ({guide}, S={_fmt(e.S)})")
            console.print(f"auto-bootstrap: {text}", highlight=False, soft_wrap=True)
            if e.candidates:
                ct = Table("step", "n", "Q", "KL", "V", "S", title="scout checks")
                for c in e.candidates:
                    mark = " *" if e.confirmed and c["step"] == e.guide_step else ""
                    ct.add_row(str(c["step"]) + mark, str(c["n"]), _fmt(c["Q"]), f"{c['kl']:.4f}", f"{c['V']:.3f}",
                               _fmt(c["S"]))
                console.print(ct)
        elif e.kind in ("auto", "auto-probe"):
            sig = ", ".join(f"{k} {v:.4f}" for k, v in (e.signals or {}).items() if v is not None)
            verdict = (f"confirmed: roll back D*={e.delta} to step {e.fork_step} ({e.branch})"
                       if e.confirmed else f"not confirmed: {e.reason or ''}")
            pr = e.probe
            if pr and "solved" in pr:
                probe = f"; probe {pr['prompts']} x {pr['tries']} tries, solved {pr['solved']:.3f}"
            else:  # written when Q was a mean pass rate
                probe = f"; probe {pr['prompts']} x {pr['samples']}, pass {pr['pass']:.3f}" if pr else ""
            console.print(f"auto decision at step {e.step} (pool {e.pool or 0}{probe}): {sig}; {verdict}",
                          highlight=False, soft_wrap=True)
            if e.candidates:
                ct = Table("step", "delta", "n", "Q", "KL", "V", "S", title="rollback candidates")
                for c in e.candidates:
                    mark = " *" if e.confirmed and c["delta"] == e.delta else ""
                    ct.add_row(str(c["step"]), str(c["delta"]) + mark, str(c["n"]), _fmt(c["Q"]), f"{c['kl']:.4f}",
                               f"{c['V']:.3f}", _fmt(c["S"]))
                console.print(ct)


@app.command("auto")
def auto_cmd(
    recipe: str | None = RecipeArg,
    sets: list[str] = SetOpt,
    store: str | None = StoreOpt,
    resume: str | None = typer.Option(None, "--resume", metavar="RUN[/BRANCH]",
                                      help="Continue an AutoNPO run: RUN (its live branch) or RUN/BRANCH."),
    force: bool = typer.Option(False, "--force", help="Break a dead or expired lease on the branch."),
    as_json: bool = JsonOpt,
):
    """AutoNPO: GRPO that detects plateaus, rolls back and replays them with NPO on its own."""
    res = commands.auto_run(recipe, sets, store, resume, console=json_console if as_json else console,
                   progress=not as_json, force=force)
    if as_json:
        print(json.dumps(res, indent=1))
    else:
        a, s = res["auto"], res["summary"]
        t = Table("", "", title=f"npo auto {res['run']}", show_header=False)
        rows = [("chain", " -> ".join(a["chain"]) + " (live)"), ("step", str(res["step"])),
                ("checkpoint", (res["checkpoint"] or "-")[:12])]
        rows += [(k, f"{s[k]:.3f}") for k in ("reward", "eval/accuracy") if k in s]
        rows += [("interventions", str(a["interventions"])), ("phase", a["phase"]),
                 ("compute", f"{a['compute_tokens']} tokens ({a['compute']['steps']} steps trained)")]
        for row in rows:
            t.add_row(*row)
        console.print(t)
        for row in a["events"]:  # the decisions, each with where it was taken (BRANCH@STEP)
            e = Event.model_validate({k: v for k, v in row.items() if k != "at"})
            if e.kind == "auto-bootstrap":
                what = (f"no bootstrap ({e.reason or ''})" if e.confirmed is False
                        else "bootstrap restart from step 0" if e.guide_step is None
                        else f"bootstrap restart from step 0, guide step {e.guide_step} (S={_fmt(e.S)})")
                console.print(f"  step {e.step} on {row['at']}: {what}", highlight=False)
            elif e.kind in ("auto", "auto-probe"):
                what = (f"D*={e.delta}: {e.branch} from step {e.fork_step}" if e.confirmed
                        else f"not confirmed ({e.reason or ''})")
                console.print(f"  step {e.step} on {row['at']}: {what}", highlight=False)
        if res["stopped_by"]:
            hint = npo_command("auto", "--resume", res["run"], store=res["store"])
            console.print(f"stopped by {res['stopped_by']} at step {res['step']}; continue with {hint}",
                          markup=False, highlight=False)
    if res["stopped_by"] in ("SIGINT", "SIGTERM"):
        raise typer.Exit(130)


# Rich help keeps a docstring's line breaks (ragged at 80 columns, in `npo --help`'s list too): one line a paragraph
for _info in (*app.registered_commands, *recipe_app.registered_commands):
    _doc = _info.help or inspect.getdoc(_info.callback) or ""
    _info.help = "\n\n".join(" ".join(p.split()) for p in _doc.split("\n\n"))


DATA_PARALLEL = ("run", "intervene", "auto")  # under torchrun every rank runs these; other commands run on rank 0


def main():
    # under torchrun (WORLD_SIZE > 1): rank > 0 prefixes its errors, and skips a command that is not data-parallel
    # (`torchrun ... -m npo_cli gc` collects once, not once per rank at the same time)
    rank = int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    try:
        if rank and next((a for a in sys.argv[1:] if not a.startswith("-")), None) not in DATA_PARALLEL:
            sys.exit(0)
        _main(rank)
    except SystemExit as e:  # _main ends every command with sys.exit
        if rank is not None:  # a torchrun rank
            dist.exit_process(e.code)
        raise


def _unreachable(e: Exception) -> bool:
    """An S3 endpoint that does not answer (down, a wrong URL, no network): botocore's connection errors."""
    errors = sys.modules.get("botocore.exceptions")  # only when an S3 store was opened
    return errors is not None and isinstance(e, errors.ConnectionError)


def _lost_peer(e: Exception) -> bool:
    """A collective failed because another torchrun process stopped (gloo / NCCL connection errors)."""
    import torch.distributed as tdist

    msg = str(e)
    return isinstance(e, getattr(tdist, "DistError", ())) or any(
        s in msg for s in ("gloo", "NCCL", "Connection reset by peer", "Connection closed by peer"))


def _main(rank: int | None = None):
    """rank: this process's torchrun rank (None: not under torchrun)."""
    who = f"[rank {rank}] " if rank else ""

    def fail(msg: str, code: int = 1) -> NoReturn:
        # one write for the whole line: stderr writes through, so print's two writes (text, then newline)
        # interleave with another torchrun rank's on the shared pipe
        sys.stderr.write(f"{msg}\n")
        sys.exit(code)

    try:
        # standalone_mode=False: usage errors come to us (one line below) instead of Typer's multi-line Rich
        # box; typer.Exit(n) and --help come back as the exit code
        code = app(standalone_mode=False)
    except ClickException as e:  # usage errors (missing or unknown option, bad value): one line, exit 2
        msg = " ".join(e.format_message().split())
        if not msg:  # a bare `npo` or `npo recipe`, which printed its help already
            sys.exit(e.exit_code)
        ctx = getattr(e, "ctx", None)
        fail(f"error: {msg.rstrip('.')}." + (f" Try '{ctx.command_path} --help'." if ctx else ""), e.exit_code)
    except LeaseHeldElsewhere as e:  # the command as given, with the flag that breaks the lease
        fail(f"error: {who}{e}: {shlex.join(['npo', *sys.argv[1:], '--force'])}")
    except NpoError as e:
        fail(f"error: {who}{e}")
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except Exception as e:  # never a traceback for the user; NPO_DEBUG=1 shows it
        if os.environ.get("NPO_DEBUG"):
            raise
        if isinstance(e, OSError) and e.filename:  # the OS refused a path the user named: not a bug
            fail(f"error: {who}cannot use {e.filename}: {os_reason(e)}; check the path and its permissions")
        if _unreachable(e):  # a writer it stopped left its lease, which a resume on this host takes over
            url, run, branch = getattr(e, "npo_writing", (None, None, None))
            then = (f"continue with {npo_command('run', '--resume', f'{run}/{branch}', store=url)}" if run
                    else "run the command again")
            fail(f"error: {who}{one_line(e)}; check NPO_S3_ENDPOINT / AWS_ENDPOINT_URL and the network, then {then}")
        if rank is not None and (_lost_peer(e) or dist.terminated()):  # not this rank's fault: the other's says
            fail(f"error: {who}a collective failed: another process of this torchrun stopped or hung (its error "
                 "says why)")
        msg = str(e).splitlines()[0] if str(e) else ""
        fail(f"error: {who}{type(e).__name__}: {msg} (set NPO_DEBUG=1 for the traceback)")
    sys.exit(code if isinstance(code, int) else 0)
