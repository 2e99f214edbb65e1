"""Checkpoints written in a background thread (train.background_save): the same checkpoints as a save the loop
waits for, an error that stops the run in one line with the last checkpoint intact, kill -9 mid-write; W&B
continues a branch's run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import copy_store, open_store

from npo_cli.batch import NoController
from npo_cli.branching import fork_branch, new_trainer, resume_trainer
from npo_cli.errors import NpoError
from npo_cli.gc import verify
from npo_cli.manifest import Event
from npo_cli.metrics import store_tag, wandb_id
from npo_cli.recipe import build_recipe

NPO = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "npo")
# what a checkpoint holds, less what names the run (its recipe) or depends on the clock (metrics)
CONTENT = ("step", "model", "optimizer", "optimizer_extra", "optimizer_groups", "state", "state_tensors",
           "summary", "tokenizer", "model_config", "extra_objects", "events")


def recipe(name: str = "r", **over) -> dict:
    d = {"name": name, "seed": 0, "model": {"path": "base@0"}, "task": {"arithmetic": {"digits": 1}, "eval_size": 4},
         "rollout": {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 4},
         "train": {"steps": 4, "save_every": 1, "eval_every": 0}, "logging": {"progress": False}}
    for k, v in over.items():
        d[k] = {**d[k], **v} if isinstance(d.get(k), dict) else v
    return d


@pytest.fixture
def store_dir(npo_base_store, tmp_path, monkeypatch) -> Path:
    return copy_store(npo_base_store, tmp_path, monkeypatch)


def content(m) -> dict:
    return {k: getattr(m, k) for k in CONTENT}


def test_background_save_writes_what_a_synchronous_save_writes(store_dir):
    store = open_store(store_dir)
    heads = {}
    for name, background in (("bg", True), ("sync", False)):
        train = {"steps": 3, "background_save": background, "record_successes": True}
        heads[name] = new_trainer(build_recipe(recipe(name, train=train)), store).train()["checkpoint"]
    bg, sync = store.lineage("bg"), store.lineage("sync")
    assert heads == {"bg": bg[0].id, "sync": sync[0].id}  # the summary names the written head
    assert [m.step for m in bg] == [3, 2, 1, 0]
    assert any(m.state.successes for m in bg)  # recorded successes are written with their checkpoint
    assert [content(m) for m in bg] == [content(m) for m in sync]


class BreakStoreAt(NoController):
    """At `step`, once the last checkpoint is written: the store's tmp/ folder becomes a file, so no new
    object can be written (a real OSError, as from a full or read-only disk)."""

    def __init__(self, step: int):
        self.step = step

    def after_step(self, trainer, metrics) -> bool:
        if trainer.step_num == self.step:
            trainer.wait_saved()
            tmp = Path(trainer.store.url) / "tmp"
            tmp.mkdir(exist_ok=True)
            tmp.rmdir()
            tmp.write_text("not a folder")
        return False


def test_a_failed_background_write_stops_the_run_in_one_line(store_dir):
    store = open_store(store_dir)
    t = new_trainer(build_recipe(recipe()), store, controller=BreakStoreAt(2))
    with pytest.raises(NpoError) as e:
        t.train()
    msg = str(e.value)
    assert msg.startswith("the checkpoint of step 2 was not written: cannot use store") and "\n" not in msg
    assert t.step_num == 3  # it stopped at the next wait: step 3's save
    (store_dir / "tmp").unlink()
    assert store.manifest("r").step == 1  # the checkpoint before it is intact, and the store valid
    assert verify(store)["problems"] == []
    assert resume_trainer(store, "r").train()["step"] == 4


def big_model(folder: Path) -> None:
    """An 8M-parameter Qwen2 (the tiny one, wider): a save of it and its optimizer takes a while to write."""
    from transformers import AutoModelForCausalLM

    from npo_cli.tiny import char_tokenizer, tiny_config

    cfg = tiny_config()
    cfg.hidden_size, cfg.intermediate_size = 384, 1536
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)


@pytest.mark.skipif(sys.platform == "win32", reason="posix signals")
def test_kill_9_during_a_background_write_keeps_the_store_valid_and_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    big_model(tmp_path / "model")
    d = recipe("r", model={"path": str(tmp_path / "model")},
               rollout={"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 2})
    Path("r.yaml").write_text(yaml.safe_dump(d))
    store_dir = tmp_path / "store"
    env = {**os.environ, "NPO_STORE": str(store_dir)}
    p = subprocess.Popen([NPO, "run", "r.yaml"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    jsonl = tmp_path / "runs" / store_tag(str(store_dir)) / "r" / "main" / "metrics.jsonl"
    deadline, caught = time.time() + 120, False
    # a file in the store's tmp/ once step 2 is logged (step 1's save has started): the background writer is
    # writing an object
    while time.time() < deadline and p.poll() is None and not caught:
        time.sleep(0.0005)
        rows = len(jsonl.read_text().splitlines()) if jsonl.exists() else 0
        caught = rows >= 2 and bool(os.listdir(store_dir / "tmp"))
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert caught, (p.returncode, rows, p.stderr.read().decode()[-2000:])
    store = open_store(store_dir)
    assert verify(store)["problems"] == []
    assert store.manifest("r").step < 4  # a save was in flight: the run stands at the one before it
    resume_trainer(store, "r").train()  # its dead lease is taken over
    new_trainer(build_recipe({**d, "name": "straight"}), store).train()
    resumed, straight = store.manifest("r"), store.manifest("straight")
    assert (resumed.step, resumed.model, resumed.optimizer, resumed.state_tensors, resumed.state) == \
        (straight.step, straight.model, straight.optimizer, straight.state_tensors, straight.state)


def wandb_runs(root: Path) -> dict[str, list[bytes]]:
    """W&B offline runs under WANDB_DIR: id -> the records of each process that logged to it."""
    out: dict[str, list[bytes]] = {}
    for f in sorted(root.glob("wandb/offline-run-*/run-*.wandb")):
        out.setdefault(f.stem.removeprefix("run-"), []).append(f.read_bytes())
    return out


def test_wandb_continues_a_branch_across_resumes(store_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for k, v in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
                 "WANDB_CONSOLE": "off"}.items():
        monkeypatch.setenv(k, v)
    store = open_store(store_dir)
    d = recipe("w", train={"steps": 1}, logging={"wandb": "npo-test"})
    new_trainer(build_recipe(d), store).train()
    resume_trainer(store, "w", ["train.steps=2"]).train()
    fork = store.manifest("w@1")
    fork_branch(store, fork, build_recipe({**d, "train": {**d["train"], "steps": 2}}), "alt",
                Event(kind="branch", fork=fork.id, fork_step=1)).train()
    import wandb
    wandb.teardown()  # finish() can return before W&B's service has written a run's records to disk
    main, alt = wandb_id(str(store_dir), "w", "main"), wandb_id(str(store_dir), "w", "alt")
    runs = wandb_runs(tmp_path)
    assert main != alt and set(runs) == {main, alt}  # the resume logged to main's W&B run
    assert all(b'"parent":null' in r for r in runs[main])
    assert b'"parent":"w/main@1"' in runs[alt][0] and b'"fork_step":1' in runs[alt][0]
    assert f'"parent_checkpoint":"{fork.id}"'.encode() in runs[alt][0]
