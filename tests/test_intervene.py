"""`npo intervene`: branch at A with guide G, NPO until U, then GRPO; `npo ls` shows fork and guide."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import copy_store, dead_lease, open_store, run_main

from npo_cli.branching import new_trainer
from npo_cli.errors import NpoError
from npo_cli.intervene import plan
from npo_cli.recipe import build_recipe
from npo_cli.trainer import Trainer

TASK = {"arithmetic": {"digits": 1}, "eval_size": 8}


@pytest.fixture(scope="module")
def run_store(npo_base_store, tmp_path_factory) -> Path:
    """'base' plus run 'r': 8 GRPO steps of 4 prompts x 4, checkpoints every 2 steps."""
    from npo_cli.store import Store

    d = tmp_path_factory.mktemp("intervene") / "store"
    shutil.copytree(npo_base_store, d)
    recipe = build_recipe({
        "name": "r", "seed": 0, "model": {"path": "base@0"}, "task": TASK,
        "rollout": {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 4}, "grpo": {"lr": 1e-3},
        "train": {"steps": 8, "save_every": 2, "eval_every": 4},
        "logging": {"progress": False, "metrics_jsonl": str(d.parent / "runs/{run}/{branch}/metrics.jsonl")},
    })
    new_trainer(recipe, Store.open(str(d))).train()
    return d


@pytest.fixture
def store_dir(run_store, tmp_path, monkeypatch) -> Path:
    return copy_store(run_store, tmp_path, monkeypatch)


def test_intervene_end_to_end(store_dir, monkeypatch, capsys):
    # --run left out: the store holds 'base' (step 0 only) and 'r'; only 'r' has steps 2 and 6
    code, out, err = run_main(["intervene", "--at", "2", "--guide", "6", "--json"], monkeypatch, capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["branch"] == "npo-2-g6" and res["step"] == 8 and res["plan"]["until"] == 6
    store = open_store(store_dir)
    guide = store.resolve("r@6")
    own = [m for m in store.lineage("r/npo-2-g6") if m.branch == "npo-2-g6"]
    assert [m.step for m in own] == [8, 6, 4, 2]  # 2: the fork's weights under the NPO recipe
    assert all(m.guide == guide for m in own)
    assert own[-1].model == store.manifest("r@2").model  # the same tensor objects: nothing re-written
    assert own[-1].parent == store.resolve("r@2")
    assert own[-1].events[-1].kind == "intervene" and own[-1].events[-1].guide == guide
    rows = [json.loads(line) for line in Path(res["metrics_jsonl"]).read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 4, 5, 6, 7, 8]
    npo_rows = [r for r in rows if "npo/active" in r]
    assert [r["step"] for r in npo_rows] == [3, 4, 5, 6]  # NPO for steps 2..5, then plain GRPO
    assert all(k in r for r in npo_rows for k in ("npo/gated_frac", "npo/hit_rate", "npo/guide_tokens"))
    assert any("npo/Q" in r for r in npo_rows) and any("npo/V" in r for r in npo_rows)
    assert any("npo/S" in r for r in npo_rows)
    code, out, err = run_main(["ls", "--store", str(store_dir)], monkeypatch, capsys)
    assert code == 0, err
    line = next(x for x in out.splitlines() if "npo-2-g6" in x)
    assert "from main@2" in line and "guide main@6" in line
    # a second intervention with the same default name is refused
    code, _, err = run_main(["intervene", "--at", "2", "--guide", "6"], monkeypatch, capsys)
    assert code == 1 and "already exists" in err and len(err.strip().splitlines()) == 1


def test_intervention_stopped_before_its_first_step_resumes_as_npo(store_dir, monkeypatch, capsys):
    """A branch killed before it trained a step is already NPO: its ref was first written pointing at a
    checkpoint with the NPO recipe (before, it pointed at the fork, whose recipe is plain GRPO, and a
    resume trained GRPO under the NPO branch's name)."""
    def killed(self, *a, **kw):
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(Trainer, "train", killed)
        with pytest.raises(KeyboardInterrupt):
            from npo_cli.commands import intervene

            intervene(str(store_dir), run="r", at=2, guide="6", progress=False)
    store = open_store(store_dir)
    head = store.manifest("r/npo-2-g6")
    assert head.step == 2 and head.guide == store.resolve("r@6") and head.parent == store.resolve("r@2")
    code, _, err = run_main(["intervene", "--run", "r", "--at", "2", "--guide", "6"], monkeypatch, capsys)
    assert code == 1 and "npo run --resume r/npo-2-g6" in err
    code, out, err = run_main(["run", "--resume", "r/npo-2-g6", "--set", "train.steps=4", "--json"],
                              monkeypatch, capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in Path(json.loads(out)["metrics_jsonl"]).read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 4] and all("npo/active" in r for r in rows)


def test_intervene_killed_in_its_first_save_is_rerun(store_dir, monkeypatch, capsys):
    """The dead lease of an intervene killed before the branch ref: before, no command could break it
    (intervene had no --force) until it expired; now the same command takes it over."""

    dead_lease(open_store(store_dir), "r", "npo-2-g6")
    argv = ["intervene", "--run", "r", "--at", "2", "--guide", "6", "--until", "3", "--set", "train.steps=3"]
    code, _, err = run_main(argv, monkeypatch, capsys)
    assert code == 0, err
    assert open_store(store_dir).manifest("r/npo-2-g6").step == 3


@pytest.mark.parametrize("argv, expect", [
    (["--at", "4", "--guide", "4"], "must come after --at 4"),
    (["--at", "4", "--guide", "2"], "must come after --at 4"),
    (["--at", "3", "--guide", "6"], "no checkpoint at step 3"),
    (["--at", "2", "--guide", "7"], "no checkpoint at step 7"),
    (["--at", "2", "--guide", "6", "--gate", "1.5"], "--gate must be in [0, 1]"),
    (["--at", "2", "--guide", "6", "--gate", "-0.1"], "--gate must be in [0, 1]"),
    (["--at", "2", "--guide", "base@0"], "--allow-any-guide"),
    (["--at", "2", "--guide", "6", "--until", "2"], "--until 2 must be after"),
    (["--at", "2", "--guide", "6", "--until", "9"], "past the run's train.steps=8"),
    (["--at", "2", "--guide", "6", "--run", "ghost"], "unknown run"),
    (["--at", "ghost@2", "--guide", "6"], "unknown run"),
    (["--at", "r@x", "--guide", "6"], "--at takes a step or RUN[/BRANCH]@STEP"),
    (["--at", "r@2", "--guide", "6", "--run", "q"], "with a run other than --run q"),
    (["--at", "2", "--guide", "6", "--branch", ""], "empty branch name"),
])
def test_intervene_errors(store_dir, monkeypatch, capsys, argv, expect):
    code, _, err = run_main(["intervene", *argv] if "--run" in argv or "@" in argv[1] else
                            ["intervene", "--run", "r", *argv], monkeypatch, capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and expect in err, err
    assert set(open_store(store_dir).branches("r")) == {"main"}  # nothing written


def test_plan_other_guides(store_dir):
    store = open_store(store_dir)
    p = plan(store, run="r", at=2, guide="base@0", until=6, allow_any_guide=True)
    assert p.guide == store.resolve("base@0") and not p.same_lineage and p.until == 6
    with pytest.raises(NpoError, match="give --until"):
        plan(store, run="r", at=2, guide="base@0", allow_any_guide=True)
    p = plan(store, run="r", at=0, guide="8", gate=0.25, branch="boot")
    assert (p.branch, p.until, p.gate, p.steps) == ("boot", 8, 0.25, 8)


def test_intervention_is_reproducible_across_runs(store_dir):
    """The same experiment re-run (new run name, new checkpoint ids, same weights) samples the same
    guide trajectories and ends with the same parameters: guide seeds come from the weights."""
    import torch

    from npo_cli.commands import intervene

    store = open_store(store_dir)
    r = build_recipe({**store.get_json(store.manifest("r@0").recipe), "name": "r2"})
    new_trainer(r, store).train()
    assert store.resolve("r2@6") != store.resolve("r@6")
    for run in ("r", "r2"):
        intervene(str(store_dir), run=run, at=2, guide="6", until=6, progress=False,
                  overrides=["train.steps=6"])
    from npo_cli.checkpoint import load_model

    (a, _, ma), (b, _, mb) = (load_model(store, f"{run}/npo-2-g6") for run in ("r", "r2"))
    assert ma.step == mb.step == 6
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_intervene_and_auto_rollback_make_the_same_branch(store_dir):
    """`npo intervene --at 2 --guide 6` and an AutoNPO rollback to step 2 with the step-6 checkpoint as
    guide both go through branching.fork_branch: their branches' first checkpoints agree in every field
    that describes the branch (fork, guide, weights, optimizer, data position, the NPO window), and differ
    only in the name, the event that made them, and AutoNPO's own controller state."""
    from npo_cli.auto import AutoController, rollback
    from npo_cli.intervene import train_branch
    from npo_cli.manifest import Event

    store = open_store(store_dir)
    fork, guide = store.manifest("r@2"), store.resolve("r@6")
    train_branch(store, plan(store, run="r", at=2, guide="6", branch="by-hand"), progress=False)
    live = build_recipe(store.get_json(store.manifest("r@6").recipe))
    prev = AutoController(live.auto, store)
    prev.decision = Event(kind="auto", k=1, step=6, fork=fork.id, fork_step=2, until=6, delta=4, branch="by-auto")
    rollback(store, live, "main", prev, guide)

    a, b = store.manifest("r/by-hand@2"), store.manifest("r/by-auto")
    assert a.id != b.id and (a.branch, b.branch) == ("by-hand", "by-auto")
    same = ("run", "step", "parent", "guide", "model", "optimizer", "optimizer_groups", "state_tensors",
            "model_config_oid", "tokenizer")
    assert {k: getattr(a, k) for k in same} == {k: getattr(b, k) for k in same}
    assert (a.parent, a.guide, a.step) == (fork.id, guide, 2)
    ra, rb = store.get_json(a.recipe), store.get_json(b.recipe)
    assert ra["npo"] == rb["npo"] and ra["npo"]["source"] == "npo" and ra["npo"]["guide"] == guide
    assert (ra["npo"]["start"], ra["npo"]["until"]) == (2, 6)
    assert {k: v for k, v in ra.items() if k != "npo"} == {k: v for k, v in rb.items() if k != "npo"}
    keep = ("step", "epoch", "pos", "train_sha", "samples_seen", "tokens_generated", "last_eval", "source")
    assert a.state.model_dump(include=set(keep)) == b.state.model_dump(include=set(keep))
    assert [e.kind for e in a.events] == ["intervene"] and [e.kind for e in b.events] == ["auto-branch"]
    assert (a.events[0].fork, a.events[0].guide, a.events[0].until) == (b.events[0].fork, b.events[0].guide,
                                                                         b.events[0].until)
