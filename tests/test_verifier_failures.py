"""A verifier call that raises or hangs costs that completion only (0, one warning per distinct error), until
more than task.verifier_max_failures of the calls fail; a reward that is not a number stops the run at once."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import run_main

from npo_cli import verifiers
from npo_cli.recipe import TaskConfig

DATA = str(Path(__file__).resolve().parent / "data")  # flaky_rewards.py
PROBLEMS = [("1+2=", "3"), ("2+2=", "4"), ("4+5=", "9"), ("3+3=", "6")]  # every step takes all four


@pytest.fixture
def run(tmp_path, monkeypatch, capsys):
    """`npo run` of the tiny model on PROBLEMS with verifier flaky_rewards:NAME: (exit code, stderr, rewards
    of the steps)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NPO_STORE", str(tmp_path / "store"))
    monkeypatch.syspath_prepend(DATA)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in PROBLEMS))

    def go(name: str, steps: int = 2, **task):
        recipe = {"name": "t", "model": {"path": "tiny"},
                  "task": {"kind": "file", "train_path": "p.jsonl", "eval_path": "p.jsonl", "eval_size": 4,
                           "verifier": f"flaky_rewards:{name}", **task},
                  "rollout": {"prompts_per_step": 4, "group_size": 2, "max_new_tokens": 3},
                  "train": {"steps": steps, "save_every": 1, "eval_every": steps}, "logging": {"progress": False}}
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
        code, _, err = run_main(["run", "r.yaml", "--json"], monkeypatch, capsys)
        metrics = next((tmp_path / "runs").rglob("metrics.jsonl"), None)
        lines = metrics.read_text().splitlines() if metrics else []
        return code, err, [m["reward"] for m in map(json.loads, lines) if "reward" in m]

    verifiers.new_run()  # this test's failures only
    return go


def warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning: verifier")]


def test_raising_verifier_costs_that_completion_only(run):
    """Before: the first exception stopped the run."""
    code, err, rewards = run("raise_on_45", verifier_max_failures=0.3)
    assert code == 0, err
    assert rewards == [0.75, 0.75]  # 2 of the 8 completions a step score 0, the others 1
    assert warnings(err) == [("warning: verifier 'flaky_rewards:raise_on_45' failed on prompt '4+5=': "
                              "ValueError: no reward for 4+5 (scored 0; not reported again)")], err
    assert "Traceback" not in err


def test_failures_above_the_share_stop_the_run(run):
    # step 1: 2 of 8 calls fail, not more than 10% of 20 (the fewest calls the share is judged over)
    code, err, rewards = run("raise_on_45", steps=4)
    assert code == 1 and rewards == [0.75]
    assert err.splitlines()[-1] == (
        "error: verifier 'flaky_rewards:raise_on_45' failed: ValueError: no reward for 4+5 (on 4 of 16 calls, "
        "more than task.verifier_max_failures=0.1; fix the verifier or raise that share)"), err
    assert len(warnings(err)) == 1 and len(err.splitlines()) == 2, err


def test_share_zero_stops_at_the_first_failure(run):
    code, err, _ = run("raise_on_two", verifier_max_failures=0.0)
    assert code == 1 and err.startswith("error: verifier 'flaky_rewards:raise_on_two' failed: ValueError: no "
                                        "reward for "), err
    assert len(err.splitlines()) == 1, err


@pytest.mark.timeout(120)  # a hang guard: the verifier sleeps 1000 s
def test_hanging_verifier_times_out_and_the_run_goes_on(run):
    """Before: a hung user verifier held the run (it had no timeout)."""
    code, err, rewards = run("hang_on_45", verifier_timeout=1, verifier_max_failures=0.5)
    assert code == 0, err
    assert rewards == [0.75, 0.75]
    assert warnings(err) == [("warning: verifier 'flaky_rewards:hang_on_45' failed on prompt '4+5=': "
                              "timed out after 1 s (scored 0; not reported again)")], err


def test_string_reward_is_refused_in_one_line(run):
    """Before: "1.0" was silently taken as 1.0."""
    code, err, _ = run("string_reward")
    assert code == 1 and err == ("error: verifier 'flaky_rewards:string_reward' returned a str ('1.0'); a reward "
                                 "must be a number (int, float or bool)\n"), err


def test_numpy_and_bool_rewards_are_numbers(monkeypatch):
    monkeypatch.syspath_prepend(DATA)
    v = verifiers.make_verifier(TaskConfig(verifier="flaky_rewards:numpy_rewards"))
    assert v.batch([("p", c, "a", True) for c in ("f32", "array", "bool", "int")]) == [0.5, 0.25, 1.0, 2.0]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
@pytest.mark.timeout(60)
def test_worker_dies_with_its_parent(tmp_path):
    """A verifier runs in a worker process that does not outlive the run (killed with SIGKILL)."""
    pid_file = tmp_path / "pid"
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from npo_cli import verifiers; "
              "from npo_cli.recipe import TaskConfig; "
              "verifiers.make_verifier(TaskConfig(verifier='flaky_rewards:hang_after_pid'))(sys.argv[2], 'c', 'a')")
    proc = subprocess.Popen([sys.executable, "-c", script, DATA, str(pid_file)])
    try:
        while not pid_file.exists() or not pid_file.read_text():
            assert proc.poll() is None, "the run ended before its verifier was called"
            time.sleep(0.05)
        worker = int(pid_file.read_text())
        assert worker != proc.pid and _alive(worker)  # the call runs in a worker process
    finally:
        proc.kill()
        proc.wait()
    while _alive(worker):  # (the test's timeout guards this)
        time.sleep(0.05)


def test_max_failures_is_a_share():
    assert TaskConfig(verifier_max_failures=0.5).verifier_max_failures == 0.5
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="verifier_max_failures"):
            TaskConfig(verifier_max_failures=bad)
