"""task.dataset: any `datasets.load_dataset` source, offline; a record's other columns travel with its problem."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import yaml
from conftest import run_main

from npo_cli.errors import NpoError
from npo_cli.recipe import build_recipe, load_recipe
from npo_cli.tasks import Problem, load_problems

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [{"q": f"{i}+1=", "a": str(i + 1), "difficulty": i % 3, "id": f"t{i}"} for i in range(30)]
TEST = [{"q": f"{i}+2=", "a": str(i + 2), "difficulty": 1, "id": f"e{i}"} for i in range(5)]
FIELDS = {"prompt_field": "q", "answer_field": "a"}


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """The datasets cache (arrow copies of what load_dataset read) in the test's folder, not the home folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    return tmp_path / "hf"


def write_parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(str(path))


def task(**dataset):
    return build_recipe({"task": {"dataset": dataset, **FIELDS, "eval_size": 3}}).task


def test_parquet_splits_keep_their_columns_and_train(tmp_path, monkeypatch, capsys):
    write_parquet(tmp_path / "data" / "train.parquet", TRAIN)
    write_parquet(tmp_path / "data" / "test.parquet", TEST)
    recipe = {"name": "d", "model": {"path": "tiny"},
              "task": {"dataset": {"path": "parquet", "split": "train", "eval_split": "test",
                                   "data_files": {"train": "data/train.parquet", "test": "data/test.parquet"}},
                       **FIELDS, "eval_size": 3},
              "rollout": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 3},
              "train": {"steps": 2, "save_every": 2, "eval_every": 2}, "logging": {"progress": False}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # data_files are read beside the recipe
    t = load_recipe(tmp_path / "r.yaml").task
    assert t.kind == "dataset" and t.dataset.data_files["train"] == str(tmp_path / "data" / "train.parquet")
    train, held_out = load_problems(t, "train", 0), load_problems(t, "eval", 0)
    assert [p.prompt for p in train] == [r["q"] for r in TRAIN]  # the whole train split: test is held out
    assert [p.prompt for p in held_out] == [r["q"] for r in TEST[:3]]
    assert train[4].answer == "5" and train[4].columns == {"difficulty": 1, "id": "t4"}
    code, out, err = run_main(["run", str(tmp_path / "r.yaml"), "--json", "--store", str(tmp_path / "store")],
                              monkeypatch, capsys)
    assert code == 0, err
    assert json.loads(out)["step"] == 2


def test_folder_without_eval_split_uses_the_hash_split(tmp_path):
    write_parquet(tmp_path / "data" / "train.parquet", TRAIN)
    t = task(path=str(tmp_path / "data"))
    train, held_out = load_problems(t, "train", 0), load_problems(t, "eval", 0)
    assert len(train) + len(held_out) == len(TRAIN) and not {p.key for p in train} & {p.key for p in held_out}
    assert all(p.columns.keys() == {"difficulty", "id"} for p in train)


def test_save_to_disk_folder(tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_list(TRAIN),
                          "test": datasets.Dataset.from_list(TEST)}).save_to_disk(str(tmp_path / "saved"))
    t = task(path=str(tmp_path / "saved"), eval_split="test")
    assert len(load_problems(t, "train", 0)) == 30 and load_problems(t, "eval", 0)[0].columns["id"] == "e0"
    with pytest.raises(NpoError, match=r"no split 'validation' \(splits: train, test\)"):
        load_problems(task(path=str(tmp_path / "saved"), eval_split="validation"), "eval", 0)


def test_bad_records_are_all_reported_at_once(tmp_path):
    rows = [*TRAIN[:4], {"q": "", "a": "1", "difficulty": 0, "id": "x"}, {"q": "7+1=", "a": None, "difficulty": 0,
                                                                         "id": "y"}, *TRAIN[4:6]]
    write_parquet(tmp_path / "bad" / "train.parquet", rows)
    with pytest.raises(NpoError) as e:
        load_problems(task(path=str(tmp_path / "bad")), "train", 0)
    msg = str(e.value)
    assert "\n" not in msg and "split 'train': 2 of 8 records cannot be used" in msg
    assert "record 5: field 'q' must be text" in msg and "record 6: field 'a' is empty" in msg
    with pytest.raises(NpoError, match=r"has no column 'question' \(columns: q, a, difficulty, id\)"):
        load_problems(build_recipe({"task": {"dataset": {"path": str(tmp_path / "bad")},
                                             "prompt_field": "question", "answer_field": "a"}}).task, "train", 0)
    with pytest.raises(NpoError, match="cannot load dataset .* split 'nope': Unknown split"):
        load_problems(task(path=str(tmp_path / "bad"), split="nope"), "train", 0)


def test_columns_travel_but_are_not_the_problem(tmp_path):
    p = Problem("1+1=", "2", columns={"id": "a", "tests": [1, 2]})
    assert p == Problem("1+1=", "2") and hash(p) == hash(Problem("1+1=", "2"))  # split, resume hash, sets
    back = Problem.from_json(json.loads(json.dumps(p.to_json())))  # mistake pool, replay buffers, successes
    assert back.columns == p.columns and "columns" not in Problem("1+1=", "2").to_json()
    # a prompt file's other columns too; values that are not JSON (a timestamp) are left out
    url = f"{tmp_path}/p.parquet"
    write_parquet(Path(url), [{"prompt": "1+1=", "answer": "2", "id": 7,
                               "when": datetime.datetime(2026, 1, 1)}] * 20)
    got = load_problems(build_recipe({"task": {"kind": "file", "train_path": url, "eval_path": url}}).task,
                        "train", 0)
    assert got[0].columns == {"id": 7}


def test_recipe_dataset_section():
    assert task(path="parquet").kind == "dataset"
    with pytest.raises(NpoError, match="task.dataset is read by task.kind=dataset, not file"):
        build_recipe({"task": {"kind": "file", "train_path": "a.jsonl", "dataset": {"path": "x"}}})
    with pytest.raises(NpoError, match="task.kind=dataset needs task.dataset"):
        build_recipe({"task": {"kind": "dataset"}})
    with pytest.raises(NpoError, match="two data sources"):
        build_recipe({"task": {"train_path": "a.jsonl", "dataset": {"path": "x"}}})


def cache_as_hub_dataset(tmp_path: Path, hf_home: Path, repo: str) -> None:
    """What loading Hub dataset `repo` once with network access leaves in the datasets cache."""
    write_parquet(tmp_path / "src" / "train.parquet", TRAIN)
    built = datasets.load_dataset("parquet", data_files={"train": str(tmp_path / "src" / "train.parquet")},
                                  cache_dir=str(tmp_path / "build"))["train"]
    src = Path(built.cache_files[0]["filename"]).parent
    owner, name = repo.split("/")
    dst = hf_home / "datasets" / f"{owner}___{name}" / "default" / "0.0.0" / src.name
    shutil.copytree(src, dst)
    for f in dst.glob("parquet-*.arrow"):
        f.rename(dst / f.name.replace("parquet-", f"{name}-"))


def test_hub_dataset_offline_from_the_cache_or_a_one_line_error(tmp_path, datasets_cache):
    cache_as_hub_dataset(tmp_path, datasets_cache, "someone/sums")
    # a fresh process: datasets reads HF_HOME / HF_HUB_OFFLINE when imported
    script = ("import json, sys; from npo_cli.recipe import build_recipe; from npo_cli.tasks import load_problems\n"
              "from npo_cli.errors import NpoError\n"
              "for path in sys.argv[1:]:\n"
              "    t = build_recipe({'task': {'dataset': {'path': path}, 'prompt_field': 'q', 'answer_field': 'a'}})"
              ".task\n"
              "    try: print(json.dumps(load_problems(t, 'train', 0)[0].to_json()))\n"
              "    except NpoError as e: print('error:', e)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_DATASETS_CACHE", "HF_HUB_CACHE")}
    env |= {"HF_HOME": str(datasets_cache), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", script, "someone/sums", "someone/missing"], check=False,
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    cached, missing = res.stdout.strip().splitlines()
    assert json.loads(cached)["columns"].keys() == {"difficulty", "id"}
    assert missing == ("error: dataset someone/missing is not in the Hugging Face cache and HF_HUB_OFFLINE (or "
                       "HF_DATASETS_OFFLINE) is set: load it once with network access to cache it, or set "
                       "task.dataset.path to a local copy")
