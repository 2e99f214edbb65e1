"""A damaged checkpoint manifest stays local: the intact head resumes exactly, `npo ls` / `npo show` /
`npo compare` show what is readable and name what is not; `npo ls` shows each branch's writer lease."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
from conftest import copy_store, dead_lease, open_store, run_main

from npo_cli.branching import new_trainer
from npo_cli.intervene import plan, train_branch
from npo_cli.recipe import build_recipe

TINY = {"name": "t", "model": {"path": "tiny"}, "task": {"arithmetic": {"digits": 1}, "eval_size": 4},
        "rollout": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 3},
        "npo": {"max_tries": 2, "guide_round": 2},
        "train": {"steps": 4, "save_every": 1, "eval_every": 2}, "logging": {"progress": False}}


@pytest.fixture(scope="module")
def run_store(tmp_path_factory) -> Path:
    """Run 't': main at steps 0..4, and NPO branch npo-1-g3 (fork main@1, guide main@3, NPO to step 3, then
    GRPO to step 4)."""
    from npo_cli.store import Store

    root = tmp_path_factory.mktemp("damage")
    d = root / "store"
    cwd = os.getcwd()
    os.chdir(root)  # metrics.jsonl files land here
    try:
        store = Store.open(str(d))
        new_trainer(build_recipe(TINY), store).train()
        train_branch(store, plan(store, run="t", at=1, guide="3"), progress=False)
    finally:
        os.chdir(cwd)
    return d


@pytest.fixture
def store_dir(run_store, tmp_path, monkeypatch) -> Path:
    return copy_store(run_store, tmp_path, monkeypatch)


def damage(store_dir: Path, ref: str) -> str:
    """Flip one byte in the middle of checkpoint `ref`'s manifest object; its id."""
    cid = open_store(store_dir).resolve(ref)
    path = store_dir / "objects" / cid[:2] / cid[2:]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(data)
    return cid


def tensors(store_dir: Path, ref: str) -> tuple:
    """The object ids of a checkpoint's tensors: equal ids are bitwise-equal tensors."""
    m = open_store(store_dir).manifest(ref)
    return m.step, m.model, m.optimizer, m.state_tensors


def test_intact_head_resumes_exactly_past_a_damaged_older_manifest(store_dir, tmp_path, monkeypatch, capsys):
    """Before, the resume of t (head @4) and of a branch rewound to it failed on the damaged @2."""
    clean = tmp_path / "clean"
    shutil.copytree(store_dir, clean)
    bad = damage(store_dir, "t@2")
    for ref in ("t", "t/npo-1-g3"):  # plain GRPO, and NPO whose guide (main@3) has @2 in its history
        code, _, err = run_main(["run", "--resume", ref, "--set", "train.steps=5", "--store", str(clean)],
                                monkeypatch, capsys)
        assert code == 0, err
        code, _, err = run_main(["run", "--resume", ref, "--set", "train.steps=5"], monkeypatch, capsys)
        assert code == 0, err
        assert tensors(store_dir, ref) == tensors(clean, ref) and tensors(clean, ref)[0] == 5
    # rewound to the intact @4 (made before the resume above moved t's head on): resumes the same way
    code, _, err = run_main(["rewind", "t@4", "--branch", "rw"], monkeypatch, capsys)
    assert code == 0, err
    code, _, err = run_main(["run", "--resume", "t/rw", "--set", "train.steps=5"], monkeypatch, capsys)
    assert code == 0, err
    assert tensors(store_dir, "t/rw")[1:] == tensors(clean, "t")[1:]
    # what truly needs the damaged manifest says so in one line, naming it
    code, _, err = run_main(["rewind", "t@1"], monkeypatch, capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and f"checkpoint {bad[:12]}" in err and "damaged" in err


def test_ls_marks_the_damaged_checkpoint_and_exits_1(store_dir, monkeypatch, capsys):
    """Before, ls listed run t as 'cannot list' with no branch or checkpoint, and exited 0."""
    bad = damage(store_dir, "t@2")
    code, out, err = run_main(["ls"], monkeypatch, capsys)
    assert code == 1 and f"damaged: {bad[:12]}" in out and "corrupt" in out
    assert "step     3" in out and "step     4" in out and "npo-1-g3" in out  # the rest is listed
    assert len(err.strip().splitlines()) == 1 and "1 damaged checkpoint" in err and bad[:12] in err
    code, out, err = run_main(["ls", "t", "--json"], monkeypatch, capsys)
    data = json.loads(out)
    main, npo = data["runs"][0]["branches"]
    assert code == 1 and [d["id"] for d in data["damaged"]] == [bad]
    assert main["damaged"]["id"] == bad and main["damaged"]["parent_of"] == "t/main@3"
    assert [c["step"] for c in main["checkpoints"]] == [3, 4]
    assert npo["damaged"] is None and [c["step"] for c in npo["checkpoints"]] == [1, 2, 3, 4]
    # show of a checkpoint whose parent is the damaged one: what it can, and the damage named
    code, out, err = run_main(["show", "t@3", "--json"], monkeypatch, capsys)
    d = json.loads(out)
    assert code == 0, err
    assert d["damaged"]["id"] == bad and d["recipe_diff"] is None and bad[:12] in d["recipe_diff_note"]


def test_compare_draws_what_is_readable_and_names_what_is_not(store_dir, monkeypatch, capsys):
    """Before, one damaged manifest anywhere on a curve's lineage failed the whole comparison."""
    bad = damage(store_dir, "t@2")
    code, out, err = run_main(["compare", "t", "t/npo-1-g3", bad[:10], "--metric", "reward", "--json"],
                              monkeypatch, capsys)
    assert code == 0, err
    data = json.loads(out)
    t, npo = data["curves"]
    assert [p["step"] for p in t["points"]] == [3, 4] and bad[:12] in t["note"]
    assert [p["step"] for p in npo["points"]] == [1, 2, 3, 4]  # its lineage misses @2; only work skips the guide's
    assert [(u["ref"], u["id"]) for u in data["unreadable"]] == [(bad[:10], bad)]
    code, out, _ = run_main(["compare", "t", bad[:10], "--metric", "reward"], monkeypatch, capsys)
    assert code == 0 and f"not compared: {bad[:10]}: checkpoint {bad[:12]} is damaged" in out
    # on a work axis a partial history would give wrong totals: nothing left to compare is an error
    code, _, err = run_main(["compare", "t", "--metric", "reward", "--x", "tokens"], monkeypatch, capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "nothing to compare" in err and bad[:12] in err


def test_ls_shows_live_writer_and_dead_lease(store_dir, monkeypatch, capsys):
    """Before, ls showed no lease at all: a dead one (that --force must break) was invisible."""
    store = open_store(store_dir)
    dead_lease(store, "t", "npo-1-g3")
    dead_lease(store, "t", "killed")  # killed before the branch's first checkpoint
    dead_pid = json.loads((store_dir / "runs/t/leases/killed.json").read_text())["pid"]
    with store.lease("t", "main"):
        code, out, err = run_main(["ls"], monkeypatch, capsys)
        code_j, out_j, _ = run_main(["ls", "--json"], monkeypatch, capsys)
    assert code == 0, err
    lines = {ln.split()[1]: ln for ln in out.splitlines() if ln.split()[1:2]}
    assert f"writer: pid {os.getpid()} on {socket.gethostname()} (live)" in lines["main"]
    assert "dead lease (pid" in lines["npo-1-g3"] and f"dead lease (pid {dead_pid} gone)" in lines["killed"]
    assert "no checkpoint yet" in lines["killed"]
    rows = {b["branch"]: b for b in json.loads(out_j)["runs"][0]["branches"]}
    assert code_j == 0 and rows["main"]["writer"]["state"] == "live" and rows["main"]["writer"]["pid"] == os.getpid()
    assert rows["killed"]["writer"]["state"] == "dead" and rows["killed"]["head"] is None


def test_show_of_npo_branch_head_has_its_recipe_difference_and_npo_figures(store_dir, monkeypatch, capsys):
    """Before, the head (@4, after NPO ended at 3) said 'same as the parent' and showed no NPO figures."""
    code, out, err = run_main(["show", "t/npo-1-g3", "--json"], monkeypatch, capsys)
    assert code == 0, err
    d = json.loads(out)
    diff = {r["key"]: r["this"] for r in d["recipe_diff"] or []}
    assert d["ref"] == "t/npo-1-g3@4" and diff.get("npo.source") == "npo" and diff.get("npo.until") == 3
    assert d["recipe_base"]["ref"] == "main@1" and d["recipe_base"]["fork"]
    assert d["npo_metrics"]["steps"] == 2 and "npo/gated_frac" in d["npo_metrics"]["columns"]
    assert not any(k.startswith("npo/") for k in d["metrics"]["columns"])  # the head's own step is GRPO
    code, out, _ = run_main(["show", "t/npo-1-g3"], monkeypatch, capsys)
    assert code == 0 and "recipe difference from main@1" in out and "NPO figures over the branch's 2" in out
    assert "npo/gated_frac" in out and "same as" not in out
