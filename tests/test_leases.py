"""Leases of stopped writers, hints that run as printed, and one metrics log per store and branch."""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import dead_lease, run_main

from npo_cli import gc
from npo_cli.errors import NpoError
from npo_cli.store import Store
from npo_cli.trainer import Trainer

TINY = {"name": "t", "model": {"path": "tiny"}, "task": {"arithmetic": {"digits": 1}, "eval_size": 4},
        "rollout": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 3},
        "train": {"steps": 2, "save_every": 1, "eval_every": 100}, "logging": {"progress": False}}


def write_lease(store: Store, run: str, branch: str, **fields) -> None:
    """A lease record as a writer on this host (pid 1 unless given) leaves it, not expired."""
    rec = {"host": socket.gethostname(), "pid": 1, "since": "", "expiry": time.time() + 600, "token": "other",
           **fields}
    store.io.write(f"runs/{run}/leases/{branch}.json", [json.dumps(rec).encode()])


def rows(path) -> list[int]:
    return [json.loads(line)["step"] for line in Path(path).read_text().splitlines()]


@pytest.fixture
def work(tmp_path, monkeypatch):
    """tmp_path as the working directory with r.yaml (TINY) in it, and $NPO_STORE at another store, so that
    a command that drops --store opens the wrong one."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NPO_STORE", str(tmp_path / "elsewhere"))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(TINY))
    return tmp_path


def npo(argv, monkeypatch, capsys):
    """`npo ARGV` in-process; fails the test unless it exits 0."""
    code, out, err = run_main(argv, monkeypatch, capsys)
    assert code == 0, err
    return out


# ------------------------------------------------------------------------------------------ dead leases

def test_lease_of_a_gone_pid_is_taken_over_without_force(tmp_path):
    store = Store.open(str(tmp_path / "s"))
    dead_lease(store, "r", "main")
    assert gc.collect(store)["objects"] == 0  # it does not block gc either
    with store.lease("r", "main") as lease:
        assert store.read_lease("r", "main")["token"] == lease.token


def test_lease_of_a_reused_pid_is_taken_over_without_force(tmp_path):
    """The lease's pid now names a process that started after the lease was taken: its holder is gone. The
    same pid in a lease taken after it started is a live writer: never overridden, and gc waits for it."""
    store = Store.open(str(tmp_path / "s"))
    proc = subprocess.Popen(["sleep", "60"])
    try:
        write_lease(store, "r", "main", pid=proc.pid, since=dt.datetime.now(dt.timezone.utc).isoformat())
        with pytest.raises(NpoError, match="still running"):
            store.lease("r", "main", force=True).__enter__()
        with pytest.raises(NpoError, match="being written"):
            gc.collect(store)
        before = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)).isoformat(timespec="seconds")
        write_lease(store, "r", "main", pid=proc.pid, since=before)
        assert gc.collect(store)["objects"] == 0
        with store.lease("r", "main") as lease:
            assert store.read_lease("r", "main")["token"] == lease.token
    finally:
        proc.kill()
        proc.wait()


def test_lease_from_another_host_needs_force_and_says_the_command(work, monkeypatch, capsys):
    npo(["run", "r.yaml", "--store", "s"], monkeypatch, capsys)
    write_lease(Store.open("s"), "t", "main", host="elsewhere", pid=os.getpid())
    code, _, err = run_main(["run", "--resume", "t", "--store", "s", "--set", "train.steps=3"], monkeypatch, capsys)
    assert code == 1 and "host elsewhere" in err, err
    cmd = shlex.split(err.strip().rsplit(": ", 1)[1])
    assert cmd == ["npo", "run", "--resume", "t", "--store", "s", "--set", "train.steps=3", "--force"]
    npo(cmd[1:], monkeypatch, capsys)
    assert Store.open("s").manifest("t").step == 3


# ------------------------------------------------------------------------------------------ hints

@pytest.mark.parametrize("where", ["--store", "recipe"])
def test_stop_hint_runs_as_printed(work, monkeypatch, capsys, where):
    """SIGINT after step 1 of a run in a store that is not the default: the printed command resumes it."""
    step = Trainer.step

    def interrupted(self):
        m = step(self)
        if self.step_num == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return m

    monkeypatch.setattr(Trainer, "step", interrupted)
    if where == "recipe":
        (work / "r.yaml").write_text(yaml.safe_dump({**TINY, "store": "s"}))
    code, out, err = run_main(["run", "r.yaml", *(["--store", "s"] if where == "--store" else [])], monkeypatch,
                              capsys)
    monkeypatch.setattr(Trainer, "step", step)
    assert code == 130, err
    hint = out.strip().splitlines()[-1]
    assert hint.startswith("stopped by SIGINT at step ") and "; continue with npo " in hint, out
    cmd = shlex.split(hint.split("continue with ", 1)[1])
    npo(cmd[1:], monkeypatch, capsys)
    assert Store.open("s").manifest("t").step == 2


# ------------------------------------------------------------------------------------------ metrics.jsonl

def test_two_stores_keep_separate_logs(work, monkeypatch, capsys):
    a = json.loads(npo(["run", "r.yaml", "--store", "a", "--json"], monkeypatch, capsys))
    before = Path(a["metrics_jsonl"]).read_bytes()
    assert rows(a["metrics_jsonl"]) == [1, 2]
    b = json.loads(npo(["run", "r.yaml", "--store", "b", "--json", "--set", "train.steps=1"], monkeypatch, capsys))
    assert b["metrics_jsonl"] != a["metrics_jsonl"] and rows(b["metrics_jsonl"]) == [1]
    assert Path(a["metrics_jsonl"]).read_bytes() == before
    assert Path(a["metrics_jsonl"]).parts[1].startswith("a-") and Path(b["metrics_jsonl"]).parts[1].startswith("b-")
    out = npo(["run", "--resume", "t", "--store", "a", "--set", "train.steps=3"], monkeypatch, capsys)
    assert a["metrics_jsonl"] in out  # the summary table names the log
    assert rows(a["metrics_jsonl"]) == [1, 2, 3]


def test_writer_that_lost_its_lease_writes_no_more_rows(work, monkeypatch, capsys):
    """Another process takes the branch over while this one is paused in step 2: step 2 is not logged."""
    step = Trainer.step

    def taken_over(self):
        m = step(self)
        if self.step_num == 2:
            write_lease(self.store, "t", "main", host="elsewhere", token="newer")
        return m

    monkeypatch.setattr(Trainer, "step", taken_over)
    code, _, err = run_main(["run", "r.yaml", "--store", "s", "--set", "train.steps=3"], monkeypatch, capsys)
    assert code == 1 and "lost the lease on t/main to host elsewhere" in err, err
    (log,) = Path("runs").glob("**/t/main/metrics.jsonl")
    assert rows(log) == [1]
