"""model.path as a Hugging Face Hub id (ORG/NAME), read offline from a Hugging Face cache built here."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import open_store, run_main
from test_run_cli import TINY

from npo_cli.checkpoint import load_model
from npo_cli.errors import NpoError
from npo_cli.model import load_policy
from npo_cli.recipe import ModelConfig

MAIN, OTHER = "a" * 40, "b" * 40  # commits of the cached model: refs/main -> MAIN, refs/v1 -> OTHER


def _cache_model(cache, repo_id: str, commit: str, seed: int) -> dict[str, torch.Tensor]:
    """A tiny model saved as the snapshot `commit` of `repo_id` in the cache layout; its weights."""
    from transformers import AutoModelForCausalLM

    from npo_cli.tiny import char_tokenizer, tiny_config

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config())
    folder = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _ref(cache, repo_id: str, name: str, commit: str) -> None:
    refs = cache / f"models--{repo_id.replace('/', '--')}" / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / name).write_text(commit)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline Hugging Face cache holding org/tiny at two commits (main, and the tag v1); its weights."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    weights = {MAIN: _cache_model(cache, "org/tiny", MAIN, seed=1), OTHER: _cache_model(cache, "org/tiny", OTHER, seed=2)}
    _ref(cache, "org/tiny", "main", MAIN)
    _ref(cache, "org/tiny", "v1", OTHER)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads both at import, which already happened in this process
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return weights


def _same(model, weights) -> bool:
    return all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_hub_id_trains_and_first_checkpoint_records_commit(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NPO_STORE", str(tmp_path / "store"))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**TINY, "model": {"path": "org/tiny"}}))
    code, _, err = run_main(["run", "r.yaml"], monkeypatch, capsys)
    assert code == 0, err
    store = open_store(tmp_path / "store")
    first = store.manifest("t@0")
    start = next(e for e in first.events if e.kind == "start")
    assert (start.model, start.revision, start.checkpoint) == ("org/tiny", MAIN, None)
    assert _same(load_model(store, "t@0")[0], hub[MAIN])  # the cached weights, not a fresh init
    code, out, err = run_main(["show", "t@0"], monkeypatch, capsys)
    assert code == 0, err
    assert f"org/tiny @ {MAIN}" in out


@pytest.mark.parametrize("revision, commit", [(OTHER, OTHER), ("v1", OTHER), ("main", MAIN)])
def test_hub_revision_pins_the_commit(hub, tmp_path, revision, commit):
    cfg = ModelConfig(path="org/tiny", revision=revision, device="cpu")
    model, _, start = load_policy(cfg, open_store(tmp_path / "store"))
    assert start.revision == commit and _same(model, hub[commit])


@pytest.mark.parametrize("model, expect", [
    ({"path": "org/missing"}, ["'org/missing' is neither a run in the store nor in the Hugging Face cache",
                               "`hf download org/missing`", "unset HF_HUB_OFFLINE"]),
    ({"path": "org/tiny", "revision": "v2"}, ["'org/tiny' at revision v2 is neither", "`hf download org/tiny --revision v2`"]),
    ({"path": "tiny", "revision": "v1"}, ["model.revision is for a Hugging Face Hub id"]),
])
def test_hub_id_errors_are_one_line(hub, tmp_path, monkeypatch, capsys, model, expect):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NPO_STORE", str(tmp_path / "store"))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**TINY, "model": model}))
    code, _, err = run_main(["run", "r.yaml"], monkeypatch, capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert all(s in err for s in expect), err
    assert not (tmp_path / "store" / "runs").exists()  # nothing written


def test_store_run_named_like_the_org_is_a_ref(hub, tmp_path):
    """ORG/NAME is a store ref RUN/BRANCH when the store has run ORG, even with ORG/NAME in the HF cache."""
    from npo_cli.example import quick_warm_start

    store = open_store(tmp_path / "store")
    quick_warm_start(store, run="org", steps=0)  # run 'org', branch main: the tiny model's init
    for name in ("main", "nosuch"):
        _cache_model(tmp_path / "hub", f"org/{name}", MAIN, seed=3)
        _ref(tmp_path / "hub", f"org/{name}", "main", MAIN)
    model, _, start = load_policy(ModelConfig(path="org/main", device="cpu"), store)
    assert start.checkpoint == store.resolve("org/main") and start.revision is None
    assert _same(model, load_model(store, "org/main")[0].state_dict())
    with pytest.raises(NpoError, match="read as a store ref, not a Hub id, as the store has a run 'org'"):
        load_policy(ModelConfig(path="org/nosuch", device="cpu"), store)
    with pytest.raises(NpoError, match="model.path 'org/main' is read as a store ref"):
        load_policy(ModelConfig(path="org/main", revision="v1", device="cpu"), store)
