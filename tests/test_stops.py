"""Stopping a run: SIGTERM / SIGINT during a step that does not finish within the grace end `npo run` without
writing the step, and the resume is exact (a step that finishes in time is checkpointed: tests/test_trainer.py); prompts that would stop a run later are all named when the task is loaded; eval_every=0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from npo_cli.branching import new_trainer, resume_trainer
from npo_cli.errors import NpoError
from npo_cli.recipe import build_recipe
from npo_cli.store import Store

# A dense reward, so every step changes the weights. While the file `slow` exists, every call is counted in
# `calls`, and a call after the first int(slow) ones sleeps: the step it belongs to is in flight until the
# signal ends it (no run waits 300 s: the hang guards below are far shorter).
REWARD = '''
import os, time

def reward(prompt, completion, answer):
    if os.path.exists("slow"):
        with open("calls", "a") as f:
            f.write("x")
        if os.path.getsize("calls") > int(open("slow").read()):
            time.sleep(300)
    return sum(c.isdigit() for c in completion) / 4 + 0.1 * ("+" in completion)
'''

RECIPE = {
    "name": "s", "seed": 0, "model": {"path": "tiny"},
    "task": {"verifier": "slow_reward:reward", "arithmetic": {"digits": 1}, "eval_size": 4, "verifier_timeout": 600},
    "rollout": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 4},
    "grpo": {"lr": 1e-3},
    "train": {"steps": 4, "save_every": 2, "eval_every": 100},
    "logging": {"progress": False, "metrics_jsonl": None},
}
CALLS_PER_STEP = 4  # prompts_per_step x group_size


@pytest.fixture
def work(tmp_path: Path, monkeypatch) -> Path:
    (tmp_path / "slow_reward.py").write_text(REWARD)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(RECIPE))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("NPO_STORE", raising=False)
    return tmp_path


def _stop_mid_step(work: Path, args: list[str], calls_before: int, sig: int) -> subprocess.CompletedProcess:
    """`npo ARGS` in a subprocess, sent `sig` once its verifier is inside the call after the first
    `calls_before`: that step is in flight, and would not end for 300 s."""
    (work / "calls").write_text("")
    (work / "slow").write_text(str(calls_before))
    env = dict(os.environ, OMP_NUM_THREADS="1", NPO_STOP_GRACE="1")  # the step in flight gets 1 s, not 5
    proc = subprocess.Popen([sys.executable, "-m", "npo_cli", *args], cwd=work, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240  # hang guard: start-up and the steps before
        while (work / "calls").stat().st_size <= calls_before:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate(timeout=5)
            time.sleep(0.05)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)  # hang guard: the step in flight would take 300 s
    finally:
        if proc.poll() is None:
            proc.kill()
        (work / "slow").unlink()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _steps(store: Store) -> list[int]:
    return sorted(m.step for m in store.lineage("s"))


def test_a_signal_mid_step_drops_the_step_and_the_resume_is_exact(work: Path):
    """Before, a signal waited for the step in flight to end (a hung step held SIGTERM for 800 s). Now the step
    is dropped: exit 130, no checkpoint of it, the hint names the last checkpoint (step 3 finished but was not
    saved: save_every=2). SIGTERM mid-step 4, then SIGINT mid-step 4 of the resume (which redid step 3), then
    a resume to the end: equal to a run that was never stopped."""
    from npo_cli.checkpoint import load_model

    for sig, args, calls_before in ((signal.SIGTERM, ["run", "r.yaml", "--store", "a"], 3 * CALLS_PER_STEP),
                                    (signal.SIGINT, ["run", "--resume", "s", "--store", "a"], CALLS_PER_STEP)):
        p = _stop_mid_step(work, args, calls_before, sig)
        assert p.returncode == 130, p.stdout[-2000:] + p.stderr[-3000:]
        assert (f"stopped by {signal.Signals(sig).name} at step 2; continue with npo run --resume s/main"
                in " ".join(p.stdout.split())), p.stdout
        assert _steps(Store.open("a")) == [0, 2]  # no checkpoint of step 3 (unsaved) or 4 (dropped)

    res = resume_trainer(Store.open("a"), "s", []).train(progress=False)
    new_trainer(build_recipe(RECIPE), Store.open("b")).train(progress=False)  # never stopped
    assert res["step"] == 4 and _steps(Store.open("a")) == [0, 2, 4]
    a, _, man_a = load_model(Store.open("a"), "s")
    b, _, man_b = load_model(Store.open("b"), "s")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert man_a.state_tensors["torch_rng"].oid == man_b.state_tensors["torch_rng"].oid


def _prompt_file(path: Path, prompts: list[str], answers: list | None = None) -> str:
    answers = answers or [str(i) for i in range(len(prompts))]
    path.write_text("\n".join(json.dumps({"prompt": q, "answer": a}) for q, a in zip(prompts, answers)))
    return str(path)


def test_prompts_too_long_for_the_model_are_all_named_before_any_step(tmp_path: Path):
    """Before, the first over-long prompt stopped the run at the step that sampled it (and again on resume)."""
    good = [f"{i}+{j}=" for i in range(6) for j in range(6)]
    prompts = good[:4] + ["1" * 300] + good[4:9] + ["2" * 280, "3" * 260, "4" * 270] + good[9:]
    task = {"kind": "file", "train_path": _prompt_file(tmp_path / "p.jsonl", prompts),
            "eval_path": _prompt_file(tmp_path / "e.jsonl", good[:3] + ["5" * 290])}
    recipe = build_recipe({**RECIPE, "task": task, "model": {"path": "tiny"}, "rollout": {"max_new_tokens": 8}})
    with pytest.raises(NpoError) as e:
        new_trainer(recipe, Store.open(str(tmp_path / "s")))
    assert str(e.value) == (
        "4 of 40 prompts are too long: record 5 (300 tokens), record 11 (280 tokens), record 12 (260 tokens), "
        "record 13 (270 tokens); a prompt may have 248 tokens at most (with rollout.max_new_tokens=8 it exceeds "
        "the model's context of 256 otherwise): shorten or drop them, or lower rollout.max_new_tokens")
    assert not (tmp_path / "s" / "runs").exists()  # no step ran, nothing was written
    ok = {**task, "train_path": _prompt_file(tmp_path / "p.jsonl", good)}
    with pytest.raises(NpoError, match=r"^1 of 4 prompts are too long: eval record 4 \(290 tokens\); a prompt"):
        new_trainer(recipe.model_copy(update={"task": recipe.task.model_copy(update=ok)}),
                    Store.open(str(tmp_path / "s")))


def test_unusable_records_are_all_named_at_once(tmp_path: Path):
    """Before, the first bad record stopped the load, and the next one the load after the fix; an empty
    answer under the exact verifier was taken (every completion scored against '')."""
    from npo_cli.tasks import load_problems

    prompts = ["1+1=", "", "2+2=", " ", "3+3=", "4+4=", "5+5="]
    answers = ["2", "0", "4", "0", "", "8", None]
    url = _prompt_file(tmp_path / "p.jsonl", prompts, answers)
    task = build_recipe({"task": {"kind": "file", "train_path": url}}).task
    with pytest.raises(NpoError) as e:
        load_problems(task, "train", 0)
    assert str(e.value) == (
        f"prompt file {url}: 4 of 7 records cannot be used: records 2, 4: field 'prompt' must be text or a list of "
        "chat messages, not empty; record 5: field 'answer' is empty and task.verifier=exact compares with it; "
        "record 7: field 'answer' is empty; fix or drop them")
    with pytest.raises(NpoError, match=r": 3 of 7 records cannot be used: records 2, 4: .*; record 7: "):
        load_problems(task.model_copy(update={"verifier": "mine:reward"}), "train", 0)  # may not need an answer


def test_eval_every_0_runs_no_eval(work: Path):
    """Before, train.eval_every=0 was refused (>= 1): eval could not be turned off. Now no step evaluates,
    not even the last (eval_every=2 evaluates steps 2 and 3 of 3)."""
    from npo_cli.checkpoint import load_metrics

    for every, evaluated in ((0, []), (2, [2, 3])):
        store = Store.open(f"s{every}")
        d = {**RECIPE, "train": {"steps": 3, "save_every": 3, "eval_every": every}}
        res = new_trainer(build_recipe(d), store).train(progress=False)
        rows = load_metrics(store, store.manifest("s"))
        assert [m["step"] for m in rows if "eval/accuracy" in m] == evaluated
        assert ("eval/accuracy" in res["summary"]) == bool(evaluated)
