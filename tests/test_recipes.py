"""The shipped recipes load, their warm starts exist, and the real-model (GPU) recipe's loading path works.

The GPU recipe (recipes/qwen-gsm8k.yaml) is exercised on CPU with small local stand-ins: a Hugging Face
folder made from the tiny model with a chat template, and 10 GSM8K-style problems in GSM8K's layout.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from npo_cli.errors import NpoError
from npo_cli.recipe import Recipe, build_recipe, load_recipe

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
    assert r.model.path in (raw["model"]["path"], str((path.parent / raw["model"]["path"]).resolve()))


@pytest.mark.skipif(not (EXAMPLE / "runs").is_dir(), reason="checkpoints.example/ not built (make example)")
@pytest.mark.parametrize("path", [p for p in RECIPES if "checkpoints.example" in p.read_text()],
                         ids=lambda p: p.name)
def test_example_recipes_start_from_the_example_store(path):
    from npo_cli.store import Store

    r = load_recipe(path)
    assert r.model.store == str(EXAMPLE) and r.model.path.startswith("base/")  # read beside the recipe
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


def _gsm8k_saved(tmp_path: Path) -> Path:
    """openai/gsm8k's layout (train and test splits; question, answer ending '#### N') as a save_to_disk folder."""
    import datasets

    rows = [json.loads(line) for line in GSM8K_TINY.read_text().splitlines()]
    split = datasets.Dataset.from_list([{"question": r["prompt"], "answer": f"It is {r['answer']}.\n#### {r['answer']}"}
                                        for r in rows])
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(tmp_path / "gsm8k")
    return tmp_path / "gsm8k"


def test_gpu_recipe_loading_path_on_cpu(tmp_path):
    """qwen-gsm8k.yaml, pointed at local stand-ins: folder model, chat template, GSM8K split, math verifier."""
    from npo_cli.batch import format_prompt
    from npo_cli.branching import new_trainer
    from npo_cli.store import Store
    from npo_cli.tasks import load_problems

    folder = _hf_folder(tmp_path)
    data = yaml.safe_load((ROOT / "recipes" / "qwen-gsm8k.yaml").read_text())
    recipe = build_recipe(data, [
        f"model.path={folder}", "model.device=cpu", "model.dtype=float32",
        f"task.dataset.path={_gsm8k_saved(tmp_path)}", "task.eval_size=2",
        "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=6", "rollout.batch_size=8",
        "grpo.micro_batch_size=2", "grpo.warmup_steps=0", "train.steps=2", "train.save_every=1",
        "train.eval_every=2", "logging.progress=false", f"logging.metrics_jsonl={tmp_path / 'm.jsonl'}",
    ])
    assert recipe.task.verifier == "math" and recipe.task.chat_template and recipe.model.gradient_checkpointing
    problems = load_problems(recipe.task, "train", recipe.seed)
    assert len(problems) == 10 and problems[0].answer.endswith("#### 12")

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


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("text, expect", [
    ("rollout: {temperature: .inf}\n", "recipe key 'rollout.temperature': Input should be a finite number, got inf"),
    ("rollout: {temperature: inf}\n", "'rollout.temperature': Input should be a valid number, got 'inf'; write a finite"),
    ("grpo: {lr: .nan}\n", "recipe key 'grpo.lr': Input should be a finite number, got nan"),
    ("grpo: {betas: [0.9, .inf]}\n", "recipe key 'grpo.betas.1': Input should be a finite number"),
    ("train: {steps: true}\n", "recipe key 'train.steps': Input should be a valid integer, got true"),  # was 1
    ("train: {steps: 2.5}\n", "recipe key 'train.steps': Input should be a valid integer, got 2.5"),
    ("grpo: {lr: true}\n", "recipe key 'grpo.lr': Input should be a valid number, got true"),
    ("grpo: {lr: '1e-4'}\n", "'grpo.lr': Input should be a valid number, got the text '1e-4'; write a number"),
    ("logging: {progress: 'no'}\n", "got the text 'no'; write true or false without quotes"),
    ("", "is empty; write its settings"),  # trained a run named 'run' on every default
    ("# settings to come\n\n", "is empty; write its settings"),
    ("name: a\nseed: 1\nname: b\n", "key 'name' is set twice (line 1, then line 3); keep one"),  # last won
    ("grpo:\n  lr: 1.0e-4\n  clip_low: 0.2\n  lr: 1.0e-3\n", "key 'lr' is set twice (line 2, then line 4)"),
    ("train: {steps: 3, steps: 4}\n", "key 'steps' is set twice"),
    ("auto:\n  deltas: &d [10, *d]\n", "the anchor at line 2 is used inside itself (a recursive alias)"),
    (BOMB, "aliases expand to more than 10000 values"),
])
def test_loose_recipe_values_are_refused(tmp_path, text, expect):
    """Each of these was accepted (inf, true as 1, last duplicate wins, an empty file trained on defaults) or
    failed with a Python error (a recursive alias: 'ValueError: Circular reference detected')."""
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(NpoError) as e:
        load_recipe(p)
    assert expect in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("data, expect", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is not text (binary, or not UTF-8); give a YAML recipe file"),
    (b"name: caf\xe9\n", "is not text (binary, or not UTF-8)"),  # Latin-1: was UnicodeDecodeError
    (b"name: a\x00\n", "is not text"),
])
def test_binary_recipe_files_are_refused(tmp_path, data, expect):
    p = tmp_path / "r.yaml"
    p.write_bytes(data)
    with pytest.raises(NpoError, match=re.escape(f"recipe {p} {expect}")):
        load_recipe(p)


def test_a_folder_is_not_a_recipe(tmp_path):
    with pytest.raises(NpoError, match="is a folder; give a recipe file"):  # was 'recipe file not found'
        load_recipe(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_recipe_is_refused(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: a\n")
    p.chmod(0)
    with pytest.raises(NpoError, match=re.escape(f"cannot read recipe {p} (Permission denied); make it a readable")):
        load_recipe(p)  # was PermissionError


def test_numbers_are_read_as_yaml_1_2_writes_them(tmp_path):
    """YAML 1.1 reads 1e-4 (no dot, or no exponent sign) as text; strict validation would then refuse the
    learning rate most recipes write. A float key takes an int."""
    p = tmp_path / "r.yaml"
    p.write_text("grpo: {lr: 1e-4, adv_eps: 1.0e5, betas: [0.9, 1]}\nrollout: {temperature: 1}\n")
    r = load_recipe(p, ["npo.luffy_gamma=2E-3", "train.steps=3"])
    assert (r.grpo.lr, r.grpo.adv_eps, r.grpo.betas, r.rollout.temperature) == (1e-4, 1e5, (0.9, 1.0), 1.0)
    assert (r.npo.luffy_gamma, r.train.steps) == (2e-3, 3)
    assert Recipe.model_validate(json.loads(json.dumps(r.model_dump(mode="json")))) == r  # the stored form
    with pytest.raises(NpoError, match="'train.steps': Input should be a valid integer, got true"):
        load_recipe(p, ["train.steps=true"])


def test_loose_recipes_fail_in_one_line_through_npo_run(tmp_path):
    npo = str(ROOT / ".venv" / "bin" / "npo")
    (tmp_path / "bin.yaml").write_bytes(bytes(range(256)))
    (tmp_path / "dup.yaml").write_text("model: {path: tiny}\ntrain:\n  steps: 2\n  steps: 3\n")
    for name, expect in (("bin.yaml", "error: recipe bin.yaml is not text"),
                         ("dup.yaml", "error: recipe dup.yaml: key 'steps' is set twice (line 3, then line 4)")):
        res = subprocess.run([npo, "run", name], check=False, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                             env={"PATH": "/usr/bin:/bin", "NPO_STORE": str(tmp_path / "store")})
        assert res.returncode == 1 and res.stderr.strip().splitlines() == [res.stderr.strip()], res.stderr
        assert res.stderr.startswith(expect) and "Error:" not in res.stderr, res.stderr
    assert not (tmp_path / "store" / "runs").exists()


def test_relative_paths_are_read_beside_the_recipe(tmp_path, monkeypatch):
    """task files, stores, teacher files and a model folder named relative to the recipe file are found from
    any working directory, and stored absolute; URLs, refs, 'tiny' and --set values are left as given."""
    sub = tmp_path / "exp"
    (sub / "model").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    p = sub / "r.yaml"
    p.write_text("store: ../runs-store\nmodel: {path: model, store: memory://base}\n"
                 "task: {kind: file, train_path: data/train.jsonl, eval_path: s3://b/eval.jsonl}\n"
                 "npo: {source: luffy, teacher_path: ./teacher.jsonl}\n")
    r = load_recipe(p, ["task.eval_path=local.jsonl"])
    assert r.store == str(tmp_path / "runs-store") and r.model.path == str(sub / "model")
    assert r.task.train_path == str(sub / "data" / "train.jsonl") and r.npo.teacher_path == str(sub / "teacher.jsonl")
    assert r.model.store == "memory://base" and r.task.eval_path == "local.jsonl"  # --set: the working directory
    for path in ("tiny", "base/weak", "base@0", "/abs/folder", "~/models/x"):
        p.write_text(f"model: {{path: '{path}'}}\n")
        assert load_recipe(p).model.path == path


@pytest.mark.skipif(not (EXAMPLE / "runs").is_dir(), reason="checkpoints.example/ not built (make example)")
def test_quickstart_runs_from_any_folder(tmp_path, monkeypatch):
    """`npo run recipes/quickstart.yaml` from outside the repository: its model.store names the example store
    beside the recipe (was: 'model.path base/moderate is not ... a checkpoint in the store')."""
    from typer.testing import CliRunner

    from npo_cli.cli import app

    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["run", str(ROOT / "recipes" / "quickstart.yaml"), "--store", "out", "--json",
                                   "--set", "train.steps=1", "--set", "task.eval_size=4",
                                   "--set", "logging.progress=false"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output[res.output.index("{"):])["step"] == 1
