"""A store written by the previous version (tests/data/prev_version, see make.sh there) still works: it
lists, shows and verifies, every manifest loads, gc keeps everything it reaches, and its runs resume
exactly where they stopped."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import copy_store, run_main

from npo_cli import gc
from npo_cli.checkpoint import load_tensors
from npo_cli.store import Store

FIXTURE = Path(__file__).resolve().parent / "data" / "prev_version"
MAGIC = b'{"format":"npo-checkpoint/'
GUIDE = "30f124448e837663f63cc9317da0fd18c58c01763c841e909d074441239e102e"  # r@4, guide of r/npo-2-g4
BRANCHES = {"a": ["main", "auto-boot"], "base": ["main"], "r": ["main", "cont", "npo-2-g4"], "x": ["main"]}


@pytest.fixture
def old(tmp_path, monkeypatch):
    """A copy of the old store, NPO_STORE pointing at it, the recipes' verifier module importable."""
    d = copy_store(FIXTURE / "store", tmp_path, monkeypatch)
    monkeypatch.syspath_prepend(str(FIXTURE))  # fixture_reward:any_digit
    path = [str(FIXTURE), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, path)))  # for subprocesses
    return d


def raw_manifests(d: Path) -> dict[str, dict]:
    """checkpoint id -> its manifest as the old version wrote it (plain JSON)."""
    out = {}
    for p in (d / "objects").glob("*/*"):
        data = p.read_bytes()
        if data.startswith(MAGIC):
            out[p.parent.name + p.name] = json.loads(data)
    return out


def model_bits(store: Store, ref: str) -> dict[str, torch.Tensor]:
    m = store.manifest(ref)
    return {k: t.reshape(-1).view(torch.uint8) for k, t in load_tensors(store, m.model).items()}


def test_ls_show_verify(old, monkeypatch, capsys):
    code, out, err = run_main(["ls", "--json"], monkeypatch, capsys)
    assert code == 0, err
    runs = {r["run"]: r for r in json.loads(out)["runs"]}
    assert {r: [b["branch"] for b in v["branches"]] for r, v in runs.items()} == BRANCHES
    s = Store.open(str(old))
    for r, v in runs.items():
        assert not v.get("error")
        for b in v["branches"]:
            ids = [c["id"] for c in b["checkpoints"]]
            lineage = {m.id for m in s.lineage(f"{r}/{b['branch']}")}
            assert ids and ids[-1] == s.head(r, b["branch"]) and set(ids) <= lineage
    assert runs["a"]["auto_chain"] == ["main", "auto-boot"]
    code, out, err = run_main(["ls"], monkeypatch, capsys)
    assert code == 0 and "auto chain: main -> auto-boot" in out, err
    for ref, kind in [("base", "import"), ("r@0", "start"), ("r/npo-2-g4@2", "intervene"), ("r/cont", None),
                      ("x@4", None), ("a/auto-boot@0", "auto-branch"), ("a/main@2", "auto-bootstrap")]:
        code, out, err = run_main(["show", ref, "--json"], monkeypatch, capsys)
        assert code == 0, (ref, err)
        events = json.loads(out)["manifest"]["events"]
        assert [e["kind"] for e in events] == ([kind] if kind else []), ref
        code, out, err = run_main(["show", ref], monkeypatch, capsys)
        assert code == 0 and "Traceback" not in err, (ref, err)
    code, out, err = run_main(["verify"], monkeypatch, capsys)
    assert code == 0 and out.startswith("ok: 414 objects") and "15 checkpoints" in out, out + err


def test_every_manifest_loads_and_keeps_its_listed_objects(old):
    s = Store.open(str(old))
    raw = raw_manifests(old)
    assert len(raw) == 15
    for cid, d in raw.items():
        m = s.manifest(cid)
        keys = ("run", "branch", "step", "parent", "guide")
        assert [getattr(m, k) for k in keys] == [d[k] for k in keys]
        assert m.summary == d["summary"] and [e.kind for e in m.events] == [e["kind"] for e in d["events"]]
        listed = d["state"].get("objects", [])
        assert sorted(m.extra_objects) == sorted(listed)
        assert set(listed) <= set(m.objects())
    x4 = s.manifest("x@4")
    assert len(x4.extra_objects) == 3 and x4.state.source["replay"] in x4.extra_objects
    for b in ("main", "auto-boot"):
        for m in s.lineage(f"a/{b}"):
            pool = m.state.controller["pool"]
            assert m.extra_objects == [pool] and s.has(pool)
    assert s.manifest("base").state.imported_from.endswith("/micro")  # the folder make.sh imported


def test_gc_keeps_everything_reachable(old):
    s = Store.open(str(old))
    before = s.objects()
    cache = s.list_refs(f"guides/{GUIDE}")
    assert len(cache) == 8 and all(s.has(s.read_ref(f"guides/{GUIDE}/{key}")) for key in cache)
    rep = gc.collect(s, keep_recent=0)
    assert rep["objects"] == 0 and rep["stale_cache_entries"] == 0 and s.objects() == before
    assert s.list_refs(f"guides/{GUIDE}") == cache
    assert gc.verify(s)["ok"]


def test_resume_is_exact(old, monkeypatch, capsys):
    code, _, err = run_main(["rewind", "r@4", "--branch", "again"], monkeypatch, capsys)
    assert code == 0, err
    code, _, err = run_main(["run", "--resume", "r/again", "--set", "train.steps=6"], monkeypatch, capsys)
    assert code == 0, err
    s = Store.open(str(old))
    assert [m.step for m in s.lineage("r/again")] == [6, 4, 2, 0]
    new, was = model_bits(s, "r/again@6"), model_bits(s, "r/cont@6")  # r/cont@6: the old version's resume
    assert new.keys() == was.keys() and all(torch.equal(new[k], was[k]) for k in new)


def test_resume_exgrpo_and_auto(old, monkeypatch, capsys):
    code, _, err = run_main(["run", "--resume", "x", "--set", "train.steps=6"], monkeypatch, capsys)
    assert code == 0, err
    code, _, err = run_main(["auto", "--resume", "a", "--set", "train.steps=6"], monkeypatch, capsys)
    assert code == 0, err
    s = Store.open(str(old))
    assert s.manifest("x").step == 6 and s.manifest("x").extra_objects
    assert max(s.manifest(c).step for c in s.branches("a").values()) == 6
    assert gc.verify(s)["ok"]
