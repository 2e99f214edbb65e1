"""The store commands: ls, show, rewind, verify, gc, export, import; bad input is one line and changes nothing."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from npo_cli import cli
from npo_cli.checkpoint import save_checkpoint
from npo_cli.store import Store
from npo_cli.tiny import char_tokenizer, tiny_config

NPO = os.path.join(os.path.dirname(sys.executable), "npo")


def tiny_model(seed: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config())


@pytest.fixture
def populated(tmp_path) -> str:
    """r1: main at steps 0, 10, 20 (recipes differ in grpo.clip_high), and rw forked at 10 with a guide."""
    url = str(tmp_path / "store")
    s = Store.open(url)
    tok = char_tokenizer()
    for step in (0, 10, 20):
        save_checkpoint(s, run="r1", branch="main", step=step, model=tiny_model(step), tokenizer=tok,
                        summary={"reward": step / 40, "eval/accuracy": step / 50},
                        metrics=[{"step": step - 1, "reward": 0.1},
                                 {"step": step, "reward": 0.3, "eval/accuracy": step / 50}],
                        recipe={"name": "r1", "grpo": {"clip_high": 0.28 if step < 20 else 0.3}})
    s.branch("r1@10", "rw")
    save_checkpoint(s, run="r1", branch="rw", step=15, model=tiny_model(15), tokenizer=tok, guide="r1@20",
                    summary={"reward": 0.9})
    return url


def npo(args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """Run the CLI in-process exactly as the console script does (npo_cli.cli.main)."""
    monkeypatch.setattr(sys, "argv", ["npo", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(root: str) -> list[tuple[str, int, int]]:
    out = []
    for r, _, files in os.walk(root):
        for f in files:
            p = os.path.join(r, f)
            st = os.stat(p)
            out.append((os.path.relpath(p, root), st.st_size, st.st_mtime_ns))
    return sorted(out)


def test_ls_tree_and_json(populated, capsys, monkeypatch):
    code, out, _ = npo(["ls", "--store", populated], capsys, monkeypatch)
    assert code == 0
    assert "r1" in out and "rw" in out and "from main@10" in out and "guide main@20" in out
    code, out, _ = npo(["ls", "r1", "--json", "--store", populated], capsys, monkeypatch)
    data = json.loads(out)
    (run,) = data["runs"]
    main, rw = run["branches"]
    assert main["branch"] == "main" and [c["step"] for c in main["checkpoints"]] == [0, 10, 20]
    assert main["checkpoints"][2]["reward"] == 0.5 and main["checkpoints"][2]["eval_accuracy"] == 0.4
    assert main["checkpoints"][0]["size"] > 0 and main["fork"] is None
    assert rw["fork"]["ref"] == "main@10" and rw["guide"]["ref"] == "main@20"
    assert [c["step"] for c in rw["checkpoints"]] == [15]


def test_ls_shows_eval_only_where_one_ran(tmp_path, capsys, monkeypatch):
    # eval_every=100, save_every=25: the trainer's summary carries step 100's eval to 125 and 150
    url = str(tmp_path / "store")
    s, model, tok = Store.open(url), tiny_model(0), char_tokenizer()
    for step in (100, 125, 150):
        row = {"step": step, "reward": 0.5, **({"eval/accuracy": 0.4} if step == 100 else {})}
        save_checkpoint(s, run="r", branch="main", step=step, model=model, tokenizer=tok,
                        summary={"reward": 0.5, "eval/accuracy": 0.4, "step": step, "lr": 2e-4}, metrics=[row])
    code, out, _ = npo(["ls", "r", "--json", "--store", url], capsys, monkeypatch)
    (run,) = json.loads(out)["runs"]
    assert code == 0 and [c["eval_accuracy"] for c in run["branches"][0]["checkpoints"]] == [0.4, None, None]
    code, out, _ = npo(["ls", "r", "--store", url], capsys, monkeypatch)
    assert code == 0 and out.count("eval 0.400") == 1 and out.count("eval -") == 2
    # `show` keeps the carried eval, labelled with the step it was measured at
    code, out, _ = npo(["show", "r@150", "--json", "--store", url], capsys, monkeypatch)
    assert code == 0 and json.loads(out)["eval_step"] == 100
    code, out, _ = npo(["show", "r@150", "--store", url], capsys, monkeypatch)
    assert code == 0 and "0.400 (step 100)" in out
    # whole numbers print as integers, a learning rate keeps its digits (not "150.000", "0.000")
    assert re.search(r"summary step\s+│ 150 ", out) and re.search(r"summary lr\s+│ 0.0002 ", out), out


def test_ls_eval_column_of_a_trained_run(tmp_path, capsys, monkeypatch):
    # through the trainer: eval at steps 2 and 4, a checkpoint every step
    from npo_cli.branching import new_trainer
    from npo_cli.recipe import build_recipe

    monkeypatch.chdir(tmp_path)  # metrics.jsonl goes under ./runs/
    url = str(tmp_path / "store")
    recipe = build_recipe({
        "name": "t", "model": {"path": "tiny"}, "task": {"arithmetic": {"digits": 1}, "eval_size": 4},
        "rollout": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 3},
        "train": {"steps": 4, "save_every": 1, "eval_every": 2}, "logging": {"progress": False}})
    new_trainer(recipe, Store.open(url)).train()
    from npo_cli import history

    reads = []
    real = history._metrics
    monkeypatch.setattr(history, "_metrics", lambda store, m: reads.append(m.step) or real(store, m))
    code, out, _ = npo(["ls", "t", "--json", "--store", url], capsys, monkeypatch)
    (run,) = json.loads(out)["runs"]
    evals = {c["step"]: c["eval_accuracy"] for c in run["branches"][0]["checkpoints"]}
    assert code == 0 and [s for s, v in evals.items() if v is not None] == [2, 4], evals
    assert reads == []  # the summaries say where their eval ran: no metrics object is read (one GET each on S3)
    code, out, _ = npo(["show", "t@3", "--store", url], capsys, monkeypatch)
    assert code == 0 and "(step 2)" in out and "eval/step" not in out


def test_show_recipe_diff_and_metrics(populated, capsys, monkeypatch):
    code, out, _ = npo(["show", "r1@20", "--json", "--store", populated], capsys, monkeypatch)
    d = json.loads(out)
    assert code == 0 and d["ref"] == "r1/main@20" and d["parent"]["ref"] == "main@10"
    assert d["recipe_diff"] == [{"key": "grpo.clip_high", "parent": 0.28, "this": 0.3}]
    assert d["metrics"]["steps"] == 2 and d["metrics"]["columns"]["reward"]["last"] == 0.3
    assert d["manifest"]["model_config"] and d["manifest"]["tokenizer"]
    code, out, _ = npo(["show", "r1@20", "--store", populated], capsys, monkeypatch)
    assert code == 0 and "grpo.clip_high" in out and "recipe difference" in out


def test_rewind_writes_one_ref(populated, capsys, monkeypatch):
    before = snapshot(populated)
    code, out, _ = npo(["rewind", "r1@10", "--store", populated], capsys, monkeypatch)
    assert code == 0
    assert "r1/rewind-10" in out and f"npo run --resume r1/rewind-10 --store {populated}" in out
    added = set(snapshot(populated)) - set(before)
    assert [a[0] for a in added] == [os.path.join("runs", "r1", "branches", "rewind-10")]
    code, out, _ = npo(["rewind", "r1/rw", "--branch", "again", "--store", populated], capsys, monkeypatch)
    assert code == 0 and "r1/again -> step 15" in out
    assert Store.open(populated).resolve("r1/again") == Store.open(populated).resolve("r1/rw")


def test_verify_and_gc(populated, capsys, monkeypatch):
    code, out, _ = npo(["verify", "--store", populated], capsys, monkeypatch)
    assert code == 0 and out.startswith("ok:")
    s = Store.open(populated)
    orphan = s.put_bytes(b"x" * 1000)
    code, out, _ = npo(["gc", "--store", populated], capsys, monkeypatch)
    assert code == 0 and "deleted 0 unreachable objects" in out and "1 of them unreachable but recent" in out
    now = ["--keep-recent", "0", "--store", populated]
    code, out, _ = npo(["gc", "--dry-run", "--json", *now], capsys, monkeypatch)
    assert json.loads(out)["objects"] == 1 and s.has(orphan)
    with s.lease("r1", "main"):
        code, _, err = npo(["gc", *now], capsys, monkeypatch)
        assert code == 1 and "being written" in err and s.has(orphan)
    code, out, _ = npo(["gc", *now], capsys, monkeypatch)
    assert code == 0 and "deleted 1 unreachable objects (1.0 KB)" in out and not s.has(orphan)
    # one flipped byte: verify lists it and exits 1
    oid = s.manifest("r1").model["model.norm.weight"].oid
    path = os.path.join(populated, "objects", oid[:2], oid[2:])
    data = bytearray(Path(path).read_bytes())
    data[-1] ^= 0xFF
    Path(path).write_bytes(data)
    code, out, _ = npo(["verify", "--store", populated], capsys, monkeypatch)
    assert code == 1 and oid[:16] in out and "corrupt" in out
    code, out, _ = npo(["verify", "--json", "--store", populated], capsys, monkeypatch)
    assert code == 1 and not json.loads(out)["ok"]
    code, _, err = npo(["export", "r1", os.path.join(populated, "..", "out"), "--store", populated],
                       capsys, monkeypatch)
    assert code == 1 and "corrupt" in err and len(err.strip().splitlines()) == 1


def test_export_then_import(populated, tmp_path, capsys, monkeypatch):
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    out_dir = str(tmp_path / "hf")
    code, out, err = npo(["export", "r1/rw", out_dir, "--store", populated], capsys, monkeypatch)
    assert code == 0 and os.path.isfile(os.path.join(out_dir, "model.safetensors"))
    assert err == ""  # no Hugging Face progress bar ("Writing model shards")
    code, out, err = npo(["import", out_dir, "--run", "back", "--store", populated], capsys, monkeypatch)
    assert code == 0 and "back/main@0" in out and err == "", err  # nor "Loading weights"
    assert hf_logging.is_progress_bar_enabled() == bars  # off for those calls only
    s = Store.open(populated)
    a, b = s.manifest("back"), s.manifest("r1/rw")
    assert {k: e.oid for k, e in a.model.items()} == {k: e.oid for k, e in b.model.items()}  # same tensors
    # import makes a store that is not there yet (the read-only commands refuse one)
    new = tmp_path / "new" / "store"
    code, out, err = npo(["import", out_dir, "--run", "fresh", "--store", str(new)], capsys, monkeypatch)
    assert code == 0 and "fresh/main@0" in out, err
    assert Store.open(str(new)).manifest("fresh").step == 0


@pytest.mark.parametrize("args, expect", [
    (["export", "r1", "s3://bkt/x"], "error: export writes a local folder, not s3://bkt/x; give a path, then copy it"),
    (["import", "s3://bkt/hf", "--run", "x"],
     "error: import reads a local folder, not s3://bkt/hf; copy it to a local path first"),
], ids=["export", "import"])
def test_export_and_import_refuse_urls(populated, tmp_path, args, expect, capsys, monkeypatch):
    """export to s3://bkt/x wrote a local folder 's3:/bkt/x' and said it exported; import of a URL said
    the folder had no config.json."""
    monkeypatch.chdir(tmp_path)
    before = snapshot(populated)
    code, out, err = npo([*args, "--store", populated], capsys, monkeypatch)
    assert code == 1 and out == "" and err == expect + "\n", err
    assert not (tmp_path / "s3:").exists() and snapshot(populated) == before


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _prefix_of_tensor(url: str) -> str:
    return Store.open(url).manifest("r1").model["model.norm.weight"].oid[:8]


BAD = [
    ["show", "r1@x"], ["show", "r1@"], ["show", "r1@99"], ["show", "nope"], ["show", "r1/nope"],
    ["show", "nope/main@1"], ["show", "../x"], ["show", "/abs"], ["show", ""], ["show", "r1/"],
    ["show", "r1/../../etc"], ["show", "@3"], ["show", "abcdef"], ["show", "TENSOR_PREFIX"],
    ["ls", "nope"], ["ls", "../x"],
    ["rewind", "r1@10", "--branch", "../evil"], ["rewind", "r1@10", "--branch", ""],
    ["rewind", "r1@10", "--branch", "/abs"], ["rewind", "r1@10", "--branch", "main"],
    ["rewind", "r1@99"], ["export", "r1@99", "OUT"], ["export", "../x", "OUT"],
    ["import", "HF", "--run", "../x"], ["import", "HF", "--run", ""], ["import", "/nonexistent", "--run", "x"],
    ["import", "HF", "--run", "r1"],
]


@pytest.mark.parametrize("args", BAD, ids=lambda a: " ".join(a) or "empty")
def test_bad_input_is_one_line_and_changes_nothing(populated, tmp_path, args, capsys, monkeypatch):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    args = [str(hf) if a == "HF" else str(tmp_path / "out") if a == "OUT" else a for a in args]
    args = [_prefix_of_tensor(populated) if a == "TENSOR_PREFIX" else a for a in args]
    before = snapshot(populated)
    code, out, err = npo([*args, "--store", populated], capsys, monkeypatch)
    assert code == 1, (out, err)
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and "NPO_DEBUG" not in err  # an NpoError, not a crash
    assert snapshot(populated) == before
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [["ls"], ["ls", "r1"], ["show", "r1"], ["rewind", "r1@10"], ["verify"], ["gc"],
                                  ["export", "r1", "OUT"], ["compare", "r1"], ["eval", "r1"],
                                  ["intervene", "--at", "2", "--guide", "4"], ["guide", "--guide", "r1@20"],
                                  ["run", "--resume", "r1"], ["auto", "--resume", "r1"]], ids=" ".join)
def test_read_only_commands_refuse_a_missing_store(tmp_path, args, capsys, monkeypatch):
    """A mistyped --store is an error (it printed 'no runs in ...' and exit 0), and nothing is created."""
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    (tmp_path / "afile").write_text("x")
    for missing in (tmp_path / "typo" / "store", tmp_path / "afile" / "sub"):
        code, out, err = npo([*args, "--store", str(missing)], capsys, monkeypatch)
        assert code == 1 and err == f"error: no store at {missing}; check --store / $NPO_STORE\n", (out, err)
    assert not (tmp_path / "typo").exists() and not (tmp_path / "out").exists()
    # the default store too ($NPO_STORE, else ./checkpoints)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NPO_STORE", raising=False)
    code, _, err = npo(args, capsys, monkeypatch)
    assert code == 1 and f"no store at {tmp_path / 'checkpoints'}" in err, err


def test_missing_store_check_leaves_remote_and_empty_stores_alone(tmp_path, capsys, monkeypatch):
    # a remote prefix exists once written: not checked; an existing empty folder is an empty store
    for url in ("memory://npo-never-written", str(tmp_path)):
        code, out, err = npo(["ls", "--store", url], capsys, monkeypatch)
        assert code == 0 and out.startswith("no runs in"), err


def test_os_error_on_a_user_path_is_one_line(populated, tmp_path, capsys, monkeypatch):
    """The OS refusing a path the user named is a message, not 'error: NotADirectoryError: [Errno 20] ...
    (set NPO_DEBUG=1 for the traceback)'; NPO_DEBUG=1 still shows the traceback."""
    (tmp_path / "afile").write_text("x")
    out_dir = tmp_path / "afile" / "hf"
    code, _, err = npo(["export", "r1", str(out_dir), "--store", populated], capsys, monkeypatch)
    assert code == 1 and err == f"error: cannot use {out_dir}: not a directory; check the path and its permissions\n"
    monkeypatch.setenv("NPO_DEBUG", "1")
    with pytest.raises(NotADirectoryError):
        npo(["export", "r1", str(out_dir), "--store", populated], capsys, monkeypatch)


def test_compare_checks_the_plot_folder_first(populated, tmp_path, capsys, monkeypatch):
    """A --plot into a missing folder failed with FileNotFoundError after all the work."""
    monkeypatch.setattr("npo_cli.compare.compare", lambda *a, **k: pytest.fail("computed before the check"))
    png = tmp_path / "no" / "dir" / "x.png"
    code, out, err = npo(["compare", "r1", "r1/rw", "--plot", str(png), "--store", populated], capsys, monkeypatch)
    assert code == 1 and out == "" and err == (f"error: --plot {png}: folder {png.parent} does not exist; "
                                               "create it or pick another path\n"), err
    code, _, err = npo(["compare", "r1", "--plot", str(tmp_path), "--store", populated], capsys, monkeypatch)
    assert code == 1 and "is a folder; give a file name" in err, err
    assert not (tmp_path / "no").exists()


def test_ambiguous_prefix_cli(populated, capsys, monkeypatch):
    from test_store import _colliding_manifests

    s = Store.open(populated)
    a, b = _colliding_manifests()
    ida = s.put_bytes(a)
    s.put_bytes(b)
    before = snapshot(populated)
    code, _, err = npo(["show", ida[:6], "--store", populated], capsys, monkeypatch)
    assert code == 1 and "ambiguous" in err and len(err.strip().splitlines()) == 1
    assert snapshot(populated) == before


def test_unreachable_s3_cli(capsys, monkeypatch):
    monkeypatch.setenv("NPO_S3_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    for args in (["ls"], ["show", "r1"], ["gc"], ["verify"]):
        code, _, err = npo([*args, "--store", "s3://bucket/prefix"], capsys, monkeypatch)
        assert code == 1 and "cannot reach the S3 store" in err and len(err.strip().splitlines()) == 1


def test_one_damaged_ref_or_manifest_blocks_only_its_own_run(populated, capsys, monkeypatch):
    """Before, an empty ref file made ls, verify, gc and even a new run of another name fail on it, and a
    flipped byte in one run's old manifest made `npo ls` fail for the whole store."""
    s = Store.open(populated)
    save_checkpoint(s, run="r2", branch="main", step=0, model=tiny_model(0), tokenizer=char_tokenizer())
    others = ["r2"]
    Path(populated, "runs", "r1", "branches", "main").write_text("")
    code, out, err = npo(["ls", "--json", "--store", populated], capsys, monkeypatch)
    runs = {r["run"]: r for r in json.loads(out)["runs"]}
    assert code == 1 and "run(s) that cannot be listed: r1" in err and "ref r1/main is damaged" in runs["r1"]["error"] and "deleting the ref would let" in \
        runs["r1"]["error"] and all(runs[r]["branches"] for r in others)
    code, out, _ = npo(["verify", "--json", "--store", populated], capsys, monkeypatch)
    assert code == 1 and any("ref r1/main is damaged" in p for p in json.loads(out)["problems"])
    code, _, err = npo(["gc", "--store", populated], capsys, monkeypatch)
    assert code == 1 and "refusing to gc a damaged store: ref r1/main is damaged" in err
    code, out, _ = npo(["ls", "--store", populated], capsys, monkeypatch)
    assert code == 1 and "cannot list: ref r1/main is damaged" in out


def test_s3_store_commands(s3_url, capsys, monkeypatch):
    s = Store.open(s3_url)
    save_checkpoint(s, run="r", branch="main", step=0, model=tiny_model(0), tokenizer=char_tokenizer())
    code, out, _ = npo(["rewind", "r@0", "--branch", "b", "--store", s3_url], capsys, monkeypatch)
    assert code == 0
    code, out, _ = npo(["ls", "--json", "--store", s3_url], capsys, monkeypatch)
    assert [b["branch"] for b in json.loads(out)["runs"][0]["branches"]] == ["main", "b"]
    code, out, _ = npo(["verify", "--store", s3_url], capsys, monkeypatch)
    assert code == 0 and out.startswith("ok:")


def test_console_script_subprocess(populated):
    env = {**os.environ, "NPO_STORE": populated}
    r = subprocess.run([NPO, "show", "../x"], capture_output=True, text=True, env=env, timeout=120,
                       check=False)
    assert r.returncode == 1 and r.stderr.startswith("error: malformed ref")
    assert len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([NPO, "ls", "--json"], capture_output=True, text=True, env=env, timeout=120,
                       check=False)
    assert r.returncode == 0 and json.loads(r.stdout)["runs"][0]["run"] == "r1"
    r = subprocess.run([NPO, "--help"], capture_output=True, text=True, env=env, timeout=120,
                       check=False)
    for cmd in ("ls", "show", "rewind", "verify", "gc", "export", "import"):
        assert f" {cmd} " in r.stdout
