"""model.lora: a peft LoRA adapter on the tiny policy. Checkpoints store the frozen base once and the adapter
(with its optimizer state) each save; resume is exact; a branch writes adapter-sized objects; export gives
peft's adapter folder or merged weights; gc keeps the base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import copy_store, open_store, run_main

from npo_cli.batch import NoController
from npo_cli.branching import new_trainer, resume_trainer
from npo_cli.checkpoint import load_model, load_tensors, lora_model
from npo_cli.errors import NpoError
from npo_cli.gc import collect, verify
from npo_cli.recipe import LoraConfig, build_recipe
from npo_cli.tiny import tiny_config

LORA = {"r": 4, "alpha": 8.0}


def recipe_dict(name: str) -> dict:
    return {
        "name": name, "seed": 0, "model": {"path": "base@0", "lora": LORA},
        "task": {"arithmetic": {"digits": 1}, "eval_size": 4},
        "rollout": {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 4}, "grpo": {"lr": 1e-2},
        "train": {"steps": 4, "save_every": 2, "eval_every": 0}, "logging": {"progress": False},
    }


class StopAt(NoController):
    def __init__(self, step: int):
        self.at = step

    def after_step(self, trainer, metrics) -> bool:
        return trainer.step_num == self.at


@pytest.fixture(scope="module")
def runs(npo_base_store, tmp_path_factory):
    """Run 'l': 4 LoRA steps in one go; run 'l2': the same, stopped at 2 and resumed. (store, trainers)"""
    d = tmp_path_factory.mktemp("lora") / "store"
    shutil.copytree(npo_base_store, d)
    store = open_store(d)
    a = new_trainer(build_recipe(recipe_dict("l")), store)
    a.train()
    b = new_trainer(build_recipe(recipe_dict("l2")), store, controller=StopAt(2))
    b.train()
    c = resume_trainer(store, "l2")
    c.train()
    return d, a, b, c


@pytest.fixture
def store_dir(runs, tmp_path, monkeypatch) -> Path:
    return copy_store(runs[0], tmp_path, monkeypatch)


def test_lora_trains_the_adapter_only_and_resumes_exactly(runs):
    d, a, b, c = runs
    store = open_store(d)
    first, last = store.manifest("l@0"), store.manifest("l@4")
    assert last.lora == LoraConfig(r=4, alpha=8.0, target_modules=sorted(last.lora.target_modules))
    assert first.model.keys() == last.model.keys() and all(".lora_" in k for k in last.model)
    assert sum(".lora_B" in k for k in last.model) == 4 * 7  # every linear layer of 4 blocks, not the LM head
    changed = [k for k in last.model if last.model[k].oid != first.model[k].oid]
    assert any(".lora_B" in k for k in changed)  # B starts at 0 and trains
    # the base: one object named by every checkpoint, the very tensors of base@0 (nothing new stored)
    assert first.base == last.base == store.manifest("l@2").base
    base = json.loads(store.get_bytes(last.base))["model"]
    base_oids = {e["oid"] for e in base.values()}
    assert base_oids <= {e.oid for e in store.manifest("base@0").model.values()}
    # the optimizer holds the adapter's state only: exp_avg and exp_avg_sq per adapter tensor, and steps
    adapter_bytes = sum(e.nbytes for e in last.model.values())
    assert sum(e.nbytes for e in last.optimizer.values()) <= 2 * adapter_bytes + 8 * len(last.model)
    assert all(e.nbytes <= 8 or e.shape in [x.shape for x in last.model.values()] for e in last.optimizer.values())
    # resume: the same parameters and metrics as the uninterrupted run
    pa, pc = dict(a.model.named_parameters()), dict(c.model.named_parameters())
    assert pa.keys() == pc.keys() and all(torch.equal(pa[k], pc[k]) for k in pa)
    keep = ("reward", "loss", "grad_norm", "entropy")
    assert [{k: m[k] for k in keep} for m in a.history] == [{k: m[k] for k in keep} for m in b.history + c.history]
    assert store.manifest("l2@4").model == last.model


def test_lora_branch_writes_adapter_sized_objects(store_dir, monkeypatch, capsys):
    """`npo intervene` from a LoRA checkpoint with a LoRA guide: its checkpoints name the same base and add
    only adapter, optimizer and small JSON objects."""
    store = open_store(store_dir)
    before = {oid: size for oid, (size, _) in store.scan()[0].items()}
    code, out, err = run_main(["intervene", "--run", "l", "--at", "2", "--guide", "4", "--json"], monkeypatch, capsys)
    assert code == 0, err
    res = json.loads(out)
    own = [m for m in store.lineage(f"l/{res['branch']}") if m.branch == res["branch"]]
    assert len(own) >= 2 and all(m.base == store.manifest("l@2").base and m.lora for m in own)
    new = {oid: size for oid, (size, _) in store.scan()[0].items() if oid not in before}
    per_checkpoint = max(m.tensor_bytes() for m in own)
    full_model = sum(e["nbytes"] for e in json.loads(store.get_bytes(own[0].base))["model"].values())
    assert per_checkpoint < full_model / 4
    assert sum(new.values()) < len(own) * (per_checkpoint + 64_000)


def test_lora_export_adapter_and_merged_load_with_peft_and_transformers(store_dir, tmp_path, monkeypatch, capsys):
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    for args, out in ((["export", "l@4"], "adapter"), (["export", "l@4", "--merge"], "merged")):
        code, _, err = run_main([*args, str(tmp_path / out)], monkeypatch, capsys)
        assert code == 0, err
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    base_dir = PeftConfig.from_pretrained(tmp_path / "adapter").base_model_name_or_path
    assert base_dir == str(tmp_path / "adapter" / "base")  # base@0 is a checkpoint: written beside the adapter
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    policy = load_model(open_store(store_dir), "l@4")[0]
    ids = torch.tensor([[5, 20, 30, 11, 40, 1]])
    with torch.no_grad():
        want = policy(input_ids=ids).logits
        assert want.abs().sum() > 0
        torch.testing.assert_close(with_adapter.eval()(input_ids=ids).logits, want, rtol=0, atol=1e-6)
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_gc_keeps_the_lora_base(store_dir):
    """With run 'base' gone, only the LoRA checkpoints' base lists name the base tensors: gc keeps them."""
    store = open_store(store_dir)
    store.drop_branch("base", "main", store.head("base", "main"))
    res = collect(store, keep_recent=0)
    assert res["objects"] > 0  # something went (base's optimizer-free step 0 has nothing else: its manifest)
    assert verify(store)["ok"]
    policy = load_model(store, "l@4")[0]
    assert sum(p.numel() for p in policy.parameters()) > 500_000


def test_lora_refusals():
    with pytest.raises(NpoError, match="rollout.backend=hf"):
        build_recipe({"model": {"lora": LORA}, "rollout": {"backend": "vllm"}})
    with pytest.raises(NpoError, match="model.lora.r"):
        build_recipe({"model": {"lora": {"alpha": 8.0}}})
    assert build_recipe({}, ["model.lora.r=2", "model.lora.alpha=4"]).model.lora.r == 2
    from transformers import AutoModelForCausalLM

    with pytest.raises(NpoError, match=r"target_modules \['nope'\].*q_proj"):
        lora_model(AutoModelForCausalLM.from_config(tiny_config()), LoraConfig(r=2, alpha=4.0, target_modules=["nope"]))


def test_lora_tensors_load_strictly(runs):
    """A LoRA manifest's `model` plus its base list are exactly the peft model's state_dict."""
    store = open_store(runs[0])
    m = store.manifest("l@4")
    assert set(load_tensors(store, m.model)) == {k for k in runs[1].model.state_dict() if ".lora_" in k}
