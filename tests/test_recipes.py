"""The shipped recipes load, their warm starts exist, and the real-model (GPU) recipe's loading path works.

The GPU recipe (recipes/qwen-gsm8k.yaml) is exercised on CPU with small local stand-ins: a Hugging Face
folder made from the tiny model with a chat template, and a 10-line GSM8K-style JSONL.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from npo_cli.recipe import build_recipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
EXAMPLE = ROOT / "checkpoints.example"
GSM8K_TINY = ROOT / "tests" / "data" / "gsm8k_tiny.jsonl"
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_recipes_present():
    names = {p.name for p in RECIPES}
    assert {"quickstart.yaml", "sparse.yaml", "plateau.yaml", "qwen-gsm8k.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads(path):
    r = load_recipe(path)
    assert r.name == path.stem
    # every key in the file is a real setting (load_recipe rejects unknown keys; this checks the values stuck)
    raw = yaml.safe_load(path.read_text())
    assert r.model.path == raw["model"]["path"]


@pytest.mark.skipif(not (EXAMPLE / "runs").is_dir(), reason="checkpoints.example/ not built (make example)")
@pytest.mark.parametrize("path", [p for p in RECIPES if "checkpoints.example" in p.read_text()],
                         ids=lambda p: p.name)
def test_example_recipes_start_from_the_example_store(path):
    from npo_cli.store import Store

    r = load_recipe(path)
    assert r.model.store == "checkpoints.example" and r.model.path.startswith("base/")
    store = Store.open(str(EXAMPLE))
    man = store.manifest(r.model.path)  # base/weak, base/moderate resolve
    assert man.run == "base" and not man.optimizer  # no optimizer state: the store stays small


def _hf_folder(tmp_path: Path) -> Path:
    """A local HF model folder (what `huggingface-cli download` gives) made from the tiny model."""
    import torch
    from transformers import AutoModelForCausalLM

    from npo_cli.tiny import char_tokenizer, tiny_config

    torch.manual_seed(0)
    folder = tmp_path / "hf-model"
    AutoModelForCausalLM.from_config(tiny_config()).save_pretrained(folder)
    tok = char_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    return folder


def test_gpu_recipe_loading_path_on_cpu(tmp_path):
    """qwen-gsm8k.yaml, pointed at local stand-ins: folder model, chat template, JSONL prompts, math verifier."""
    from npo_cli.batch import format_prompt
    from npo_cli.branching import new_trainer
    from npo_cli.store import Store
    from npo_cli.tasks import load_problems

    folder = _hf_folder(tmp_path)
    data = yaml.safe_load((ROOT / "recipes" / "qwen-gsm8k.yaml").read_text())
    recipe = build_recipe(data, [
        f"model.path={folder}", "model.device=cpu", "model.dtype=float32",
        f"task.train_path={GSM8K_TINY}", f"task.eval_path={GSM8K_TINY}", "task.eval_size=2",
        "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=6", "rollout.batch_size=8",
        "grpo.micro_batch_size=2", "grpo.warmup_steps=0", "train.steps=2", "train.save_every=1",
        "train.eval_every=2", "logging.progress=false", f"logging.metrics_jsonl={tmp_path / 'm.jsonl'}",
    ])
    assert recipe.task.verifier == "math" and recipe.task.chat_template and recipe.model.gradient_checkpointing
    problems = load_problems(recipe.task, "train", recipe.seed)
    assert len(problems) == 10 and problems[0].answer == "12"

    store = Store.open(str(tmp_path / "store"))
    trainer = new_trainer(recipe, store)
    wrapped = format_prompt(recipe, trainer.tokenizer, problems[0])
    assert wrapped.startswith("<|user|>") and wrapped.endswith("<|assistant|>") and "\\boxed{}" in wrapped
    res = trainer.train(progress=False)
    assert res["step"] == 2
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward" in r] == [1, 2]
    man = store.manifest("qwen-gsm8k")
    assert man.step == 2 and "tokenizer_config.json" in man.tokenizer
    # the chat template travels with the checkpoint, so `npo export` gives a folder that chats the same way
    tok_cfg = store.get_bytes(man.tokenizer["tokenizer_config.json"]).decode()
    assert "chat_template" in tok_cfg or "chat_template.jinja" in man.tokenizer


@pytest.mark.parametrize("item, key, value", [
    ("task.template=Question: {prompt}", "template", "Question: {prompt}"),  # YAML read it as a mapping
    ("name=2024", "name", "2024"), ("name=on", "name", "on"), ("model.path=007", "path", "007"),
    ("model.path='base@0'", "path", "base@0"),  # quoted YAML text stays YAML's
    ("model.store=null", "store", None),  # and null is still None for an optional key
])
def test_set_gives_text_keys_the_text_as_typed(item, key, value):
    """--set reads values as YAML (3, 1e-4, true, [1, 2]); a key that holds text takes the typed text
    when YAML made something else of it (before: 'recipe key task.template: Input should be a valid string')."""
    from npo_cli.recipe import build_recipe

    r = build_recipe({}, [item])
    section = r if item.startswith("name") else getattr(r, item.split(".")[0])
    assert getattr(section, key) == value


@pytest.mark.parametrize("item, expect", [
    ("task.template=Q:", "task.template must contain {prompt}"),  # every problem would get one prompt
    ("npo.until=-3", "recipe key 'npo.until'"),
    ("npo.guide=base@0", "npo.guide is set but npo.source is none"),  # would train plain GRPO, silently
    ("npo.teacher_path=t.jsonl", "npo.teacher_path is set but npo.source is none"),
    ("npo.replay_from=r", "npo.replay_from is set but npo.source is none"),
])
def test_settings_that_would_be_ignored_are_refused(item, expect):
    from npo_cli.errors import NpoError
    from npo_cli.recipe import build_recipe

    with pytest.raises(NpoError, match=re.escape(expect)):
        build_recipe({}, [item])


@pytest.mark.heavy
def test_committed_example_store_is_what_make_example_builds(tmp_path):
    """checkpoints.example/ equals a fresh `make example` (about 4 minutes on one core) in all but creation
    and wall times: per branch the same step, tensors, recipe, summary and metrics. Its recipes had gone stale
    (logprob_chunk 2048 after the default became 0) with nothing to notice it."""
    from npo_cli.example import build
    from npo_cli.metrics import TIMING_KEYS
    from npo_cli.store import Store

    build(str(tmp_path / "fresh"))
    old, new = Store.open(str(EXAMPLE)), Store.open(str(tmp_path / "fresh"))
    branches = {"main", "moderate", "weak", "primed"}
    assert set(old.branches("base")) == set(new.branches("base")) == branches

    def untimed(rows: list[dict]) -> list[dict]:  # base/primed's GRPO steps record their wall times
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]

    for branch in branches:
        a, b = old.manifest(f"base/{branch}"), new.manifest(f"base/{branch}")
        assert (a.step, a.model, a.summary) == (b.step, b.model, b.summary), branch  # tensor entries: object ids
        assert old.get_json(a.recipe) == new.get_json(b.recipe), branch
        assert untimed(old.get_json(a.metrics)) == untimed(new.get_json(b.metrics)), branch
