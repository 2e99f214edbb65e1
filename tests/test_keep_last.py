"""Checkpoints that stay small: train.keep_last prunes older checkpoints' tensors (not their manifests), npo tag
keeps one whole, train.save_optimizer_every writes weights-only checkpoints between full ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import copy_store, open_store, run_main

from npo_cli.branching import new_trainer
from npo_cli.gc import collect, verify
from npo_cli.recipe import build_recipe
from npo_cli.store import Store, weights_only

TASK = {"arithmetic": {"digits": 1}, "eval_size": 4}


def _recipe(d: Path, name: str, **train) -> dict:
    return {"name": name, "seed": 0, "model": {"path": "base@0"}, "task": TASK,
            "rollout": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 4}, "grpo": {"lr": 1e-3},
            "train": {"save_every": 1, "eval_every": 0, **train},
            "logging": {"progress": False, "metrics_jsonl": str(d.parent / "runs/{run}/{branch}/metrics.jsonl")}}


def _npo(argv, monkeypatch, capsys):
    code, out, err = run_main(argv, monkeypatch, capsys)
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def pruned_store(npo_base_store, tmp_path_factory) -> Path:
    """Run 'r' with keep_last=2, save_every=1: main to step 2, branch b1 made at step 1, main to 3, an
    intervention at 1 guided by step 3, main on to step 6."""
    d = tmp_path_factory.mktemp("keep_last") / "store"
    shutil.copytree(npo_base_store, d)
    store = Store.open(str(d))
    new_trainer(build_recipe(_recipe(d, "r", steps=2, keep_last=2)), store).train()
    mp = pytest.MonkeyPatch()
    try:
        from npo_cli import cli

        for argv in (["rewind", "r@1", "--branch", "b1"], ["run", "--resume", "r", "--set", "train.steps=3"],
                     ["intervene", "--run", "r", "--at", "1", "--guide", "3", "--until", "2", "--branch", "g",
                      "--set", "train.steps=2"],
                     ["run", "--resume", "r", "--set", "train.steps=6"]):
            mp.setattr("sys.argv", ["npo", *argv, "--store", str(d)])
            with pytest.raises(SystemExit) as e:
                cli.main()
            assert e.value.code in (0, None), argv
    finally:
        mp.undo()
    return d


@pytest.fixture
def store_dir(pruned_store, tmp_path, monkeypatch) -> Path:
    return copy_store(pruned_store, tmp_path, monkeypatch)


def _has_tensors(store: Store, ref: str) -> bool:
    """Every tensor of the checkpoint is in the store (step 0's weights are base@0's, kept by that run)."""
    m = store.manifest(ref)
    return all(store.has(oid) for d in (m.model, m.optimizer, m.state_tensors) for e in d.values() for oid in e.oids())


def test_keep_last_prunes_all_but_what_is_needed_and_gc_frees_it(store_dir, monkeypatch, capsys):
    store = open_store(store_dir)
    ids = {s: store.resolve(f"r/main@{s}") for s in range(7)}
    # the last 2, the fork point of b1 and g (step 1) and g's guide (step 3) stay whole; 0, 2 and 4 are pruned
    assert {s for s, cid in ids.items() if cid in store.pruned()} == {0, 2, 4}
    before = verify(store)
    assert before["ok"], before["problems"]
    rep = collect(store, keep_recent=0)
    assert rep["objects"] > 0 and not rep["failed"]
    after = verify(store)
    assert after["ok"], after["problems"]  # pruned tensors are not "missing objects"
    assert after["bytes"] < before["bytes"] - rep["bytes"] // 2 and rep["bytes"] > 0
    for s in (1, 3, 5, 6):
        assert _has_tensors(store, f"r/main@{s}"), s
    for s in (0, 2, 4):
        assert not _has_tensors(store, f"r/main@{s}"), s
        m = store.manifest(ids[s])  # the manifest, its metrics and recipe stay
        assert m.recipe and store.get_json(m.recipe)["name"] == "r" and store.has(m.metrics)
    assert [m.step for m in store.lineage("r")] == [6, 5, 4, 3, 2, 1, 0]
    data = json.loads(_npo(["ls", "r", "--json"], monkeypatch, capsys))
    main = next(b for b in data["runs"][0]["branches"] if b["branch"] == "main")
    assert [c["step"] for c in main["checkpoints"] if c["pruned"]] == [0, 2, 4]
    text = _npo(["ls", "r"], monkeypatch, capsys)
    assert sum("pruned" in line for line in text.splitlines() if "step" in line) >= 3
    # the resume of the head goes on as before
    _npo(["run", "--resume", "r", "--set", "train.steps=7"], monkeypatch, capsys)
    assert open_store(store_dir).manifest("r").step == 7


@pytest.mark.parametrize("argv", [
    ["rewind", "r@2", "--branch", "x"],
    ["intervene", "--run", "r", "--at", "1", "--guide", "4", "--branch", "x"],
    ["intervene", "--run", "r", "--at", "2", "--guide", "5", "--branch", "x"],
    ["export", "r@4", "out"],
    ["eval", "r@0"],
])
def test_a_pruned_checkpoint_is_a_one_line_error(store_dir, argv, monkeypatch, capsys):
    code, _, err = run_main(argv, monkeypatch, capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "was pruned by train.keep_last; its tensors are gone" in err
    assert "x" not in open_store(store_dir).branches("r") and not Path("out").exists()


def test_a_tag_keeps_a_checkpoint_whole(store_dir, monkeypatch, capsys):
    store = open_store(store_dir)
    # a pruned checkpoint whose tensors gc has not freed yet is taken back by a tag
    assert "-> r/main@2" in _npo(["tag", "r@2", "best"], monkeypatch, capsys)
    assert store.resolve("r@2") not in store.pruned()
    collect(store, keep_recent=0)
    assert _has_tensors(store, "r@2") and not _has_tensors(store, "r@4")
    assert verify(store)["ok"]
    _npo(["rewind", "r@2", "--branch", "from-tag"], monkeypatch, capsys)  # usable again
    assert "best  r/main@2" in _npo(["tag"], monkeypatch, capsys)
    main = next(b for b in json.loads(_npo(["ls", "--json"], monkeypatch, capsys))["runs"][1]["branches"]
                if b["branch"] == "main")
    assert next(c for c in main["checkpoints"] if c["step"] == 2)["tags"] == ["best"]
    # once freed, a tag cannot bring the tensors back: one line, nothing written
    code, _, err = run_main(["tag", "r@4", "late"], monkeypatch, capsys)
    assert code == 1 and "was pruned by train.keep_last" in err and "late" not in store.tags()
    code, _, err = run_main(["tag", "r@5", "best"], monkeypatch, capsys)
    assert code == 1 and "tag best already exists" in err
    _npo(["tag", "--delete", "best"], monkeypatch, capsys)
    assert store.tags() == {}


def test_save_optimizer_every_writes_weights_only_checkpoints(npo_base_store, tmp_path, monkeypatch, capsys):
    d = copy_store(npo_base_store, tmp_path, monkeypatch)
    store = open_store(d)
    new_trainer(build_recipe(_recipe(d, "w", steps=4, save_optimizer_every=2)), store).train()
    lin = {m.step: m for m in store.lineage("w")}
    assert [s for s, m in sorted(lin.items()) if weights_only(m)] == [1, 3]
    assert not lin[1].optimizer and not lin[3].optimizer and lin[2].optimizer and lin[4].optimizer  # the end
    assert lin[1].tensor_bytes() < lin[2].tensor_bytes()
    # a head left weights-only (a crash after such a save): the resume refuses and names the last full one
    _npo(["rewind", "w@3", "--branch", "crashed"], monkeypatch, capsys)
    code, _, err = run_main(["run", "--resume", "w/crashed", "--set", "train.steps=5"], monkeypatch, capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "holds weights only" in err, err
    assert "npo rewind w/main@2" in err
    code, _, err = run_main(["intervene", "--run", "w", "--at", "1", "--guide", "3"], monkeypatch, capsys)
    assert code == 1 and "holds weights only" in err


def test_keep_last_keeps_the_newest_full_checkpoint(npo_base_store, tmp_path, monkeypatch, capsys):
    d = copy_store(npo_base_store, tmp_path, monkeypatch)
    store = open_store(d)
    trainer = new_trainer(build_recipe(_recipe(d, "v", steps=1, keep_last=1, save_optimizer_every=2)), store)
    trainer.train()
    for step in (2, 3):  # weights-only saves, the last one a crash's
        trainer.step_num = step
        trainer.save(with_optimizer=False)
        trainer.wait_saved()
    pruned = {m.step for m in store.lineage("v") if m.id in store.pruned()}
    assert pruned == {0, 2}  # 1, the newest with optimizer state, is what the resume goes back to
    code, _, err = run_main(["run", "--resume", "v", "--set", "train.steps=5"], monkeypatch, capsys)
    assert code == 1 and "npo rewind v/main@1" in err, err
    _npo(["rewind", "v@1", "--branch", "back"], monkeypatch, capsys)
    _npo(["run", "--resume", "v/back", "--set", "train.steps=2"], monkeypatch, capsys)
    assert open_store(d).manifest("v/back").step == 2


def test_keep_last_is_refused_with_auto():
    from npo_cli.errors import NpoError

    with pytest.raises(NpoError, match="cannot be used with auto.enabled"):
        build_recipe({"train": {"keep_last": 2}, "auto": {"enabled": True}})
