"""`npo run` / `npo eval` through the command line: bad input gives one line on stderr and exit != 0."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml
from conftest import dead_lease
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npo_cli import cli, gc
from npo_cli.errors import NpoError
from npo_cli.recipe import Recipe, load_recipe, schema_rows

ROOT = Path(__file__).resolve().parents[1]
NPO = str(ROOT / ".venv" / "bin" / "npo")
TINY = {"name": "t", "model": {"path": "tiny"}, "task": {"arithmetic": {"digits": 1}, "eval_size": 4},
        "rollout": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 3},
        "train": {"steps": 2, "save_every": 1, "eval_every": 2}, "logging": {"progress": False}}


def npo(*args, cwd, timeout=120):
    return subprocess.run([NPO, *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={"PATH": "/usr/bin:/bin", "NPO_STORE": str(Path(cwd) / "store"),
                               "TOKENIZERS_PARALLELISM": "false"})


def one_line_error(res) -> str:
    assert res.returncode != 0, res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
    return lines[0]


def test_console_script_runs_tiny_and_evals(tmp_path):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(TINY))
    res = npo("run", "r.yaml", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["step"] == 2 and out["run"] == "t" and "eval/accuracy" in out["summary"]
    assert (tmp_path / out["metrics_jsonl"]).is_file() and out["metrics_jsonl"].startswith("runs/store-")
    res = npo("eval", "t@1", "--samples", "2", "--task-set", "eval_size=3", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "pass@2" in res.stdout
    # the same name again is refused with a hint
    assert "--resume t" in one_line_error(npo("run", "r.yaml", cwd=tmp_path))


@pytest.mark.parametrize("recipe, override, expect", [
    (None, [], "recipe file not found"),
    ({"train": {"stepz": 3}}, [], "unknown recipe key 'train.stepz'"),
    ({"train": {"steps": "many"}}, [], "train.steps"),
    ({**TINY, "task": {"verifier": "no_such_module_xyz:score"}}, [], "verifier 'no_such_module_xyz:score'"),
    ({**TINY, "model": {"path": "./no/such/folder"}}, [], "model folder not found"),
])
def test_bad_recipes_through_console_script(tmp_path, recipe, override, expect):
    if recipe is not None:
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    line = one_line_error(npo("run", "r.yaml", *override, cwd=tmp_path))
    assert expect in line


def run_main(argv, monkeypatch, capsys) -> tuple[int, str, str]:
    from npo_cli import cli

    monkeypatch.setattr(sys, "argv", ["npo", *argv])
    with pytest.raises(SystemExit) as e:
        cli.main()
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.mark.parametrize("text, args, expect", [
    ("train: [1, 2\n", [], "not valid YAML"),
    ("- a\n- b\n", [], "must be a YAML mapping"),
    ("grpo:\n  agg: median\n", [], "grpo.agg"),
    ("rollout:\n  group_size: 1\n", [], "rollout.group_size"),
    ("{}", ["--set", "train.steps"], "--set needs KEY=VALUE"),
    ("{}", ["--set", "nope.x=1"], "unknown recipe key 'nope'"),
    ("task:\n  kind: file\n  train_path: ./missing.jsonl\n", [], "prompt file not found"),
    ("model:\n  path: nosuchrun@3\n", [], "model.path 'nosuchrun@3'"),
    ("npo:\n  source: npo\n", [], "npo.source"),
    # vLLM cannot report the pre-top-p log-prob at T != 1 (the HF backend can)
    ("rollout:\n  backend: vllm\n  temperature: 0.7\n  top_p: 0.9\n", [],
     "recipe key 'rollout': backend vllm reports log-probs before the top-p cut only at temperature 1"),
])
def test_bad_recipes_in_process(tmp_path, monkeypatch, capsys, text, args, expect):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NPO_STORE", str(tmp_path / "store"))
    (tmp_path / "r.yaml").write_text(text)
    code, _, err = run_main(["run", "r.yaml", *args], monkeypatch, capsys)
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and expect in err, err


@pytest.mark.parametrize("argv, expect", [
    (["run"], "give a recipe file"),
    (["run", "--resume", "ghost"], "no branch 'ghost/main'"),
    (["run", "--resume", "ghost@3"], "branch head"),
    (["eval", "ghost@3"], "ghost"),
    (["eval", "ghost@3", "--samples", "0"], "--samples must be >= 1"),  # 0 used to mean the recipe's default
    (["eval", "ghost@3", "--samples", "-2"], "--samples must be >= 1"),
])
def test_bad_run_and_eval_arguments(tmp_path, monkeypatch, capsys, argv, expect):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NPO_STORE", str(tmp_path / "store"))
    (tmp_path / "store").mkdir()  # an empty store: eval names the missing ref, not the missing store
    code, _, err = run_main(argv, monkeypatch, capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and expect in err, err


def _commands(group, path=()):
    for name, cmd in group.commands.items():
        yield [*path, name]
        if hasattr(cmd, "commands"):  # a sub-app such as `npo recipe`
            yield from _commands(cmd, [*path, name])


COMMANDS = [[], *_commands(typer.main.get_command(cli.app))]


def test_command_list_is_complete():
    assert len(COMMANDS) > 12 and ["intervene"] in COMMANDS and ["recipe", "schema"] in COMMANDS


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: " ".join(a) or "npo")
def test_every_command_has_help(monkeypatch, capsys, argv):
    """Help text is Rich markup: a stray [/X] crashed `npo intervene --help` with a MarkupError."""
    code, out, err = run_main([*argv, "--help"], monkeypatch, capsys)
    assert code == 0 and err == "", err
    # in-process the program name is pytest's ("python -m pytest.npo"); the console script's is "npo"
    assert "Usage:" in out and " ".join(["npo", *argv, "[OPTIONS]"]) in out and len(out.splitlines()) > 3


@pytest.mark.parametrize("argv, expect, cmd", [
    (["import", "some_dir"], "error: Missing option '--run'. Try '", "npo import"),
    (["ls", "--bogus"], "error: No such option: --bogus. Try '", "npo ls"),
    (["eval", "r@1", "--samples", "many"], "error: Invalid value for '--samples'", "npo eval"),
    (["compare", "r", "--threshold", "high"], "error: Invalid value for '--threshold'", "npo compare"),
    (["nosuchcommand"], "error: No such command 'nosuchcommand'. Try '", "npo"),
    (["recipe", "nosuch"], "error: No such command 'nosuch'. Try '", "npo recipe"),
])
def test_usage_errors_are_one_line_exit_2(tmp_path, monkeypatch, capsys, argv, expect, cmd):
    """Usage errors keep click's exit code 2 but print one line, not a multi-line Rich box."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(argv, monkeypatch, capsys)
    assert code == 2 and out == "", out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expect) and lines[0].endswith(f"{cmd} --help'."), err


def test_bare_npo_prints_help(monkeypatch, capsys):
    code, out, err = run_main([], monkeypatch, capsys)
    assert code == 2 and "Usage:" in out and "npo [OPTIONS] COMMAND" in out and err == ""


def test_recipe_schema_lists_choices_and_real_defaults(monkeypatch, capsys):
    """A choice showed as just 'Literal' (npo.source's luffy, exgrpo and rlep could not be found), and --json
    gave each default as JSON text inside a string ("\\"run\\"")."""
    code, out, err = run_main(["recipe", "schema", "--json"], monkeypatch, capsys)
    assert code == 0, err
    rows = {r["key"]: r for r in json.loads(out)}
    assert rows["npo.source"]["type"] == "Literal['none', 'npo', 'luffy', 'exgrpo', 'rlep']"
    for key in ("grpo.agg", "npo.guide_clip", "auto.bucket", "train.parallel", "model.dtype"):
        assert rows[key]["type"].startswith("Literal['"), rows[key]
    assert rows["rollout.vllm_max_model_len"]["type"] == "int | None" and rows["seed"]["type"] == "int"
    defaults = Recipe().model_dump(mode="json")
    for key, row in rows.items():
        value = defaults
        for part in key.split("."):
            value = value[part]
        assert row["default"] == value, key
    assert rows["name"]["default"] == "run" and rows["grpo.betas"]["default"] == [0.9, 0.999]
    code, out, err = run_main(["recipe", "schema"], monkeypatch, capsys)
    assert code == 0 and "'exgrpo'" in out, err


def test_unusable_store_folder_is_one_line(tmp_path, monkeypatch, capsys):
    """A store the OS refuses (here: a folder under a file) names the store and says what to change,
    not 'error: NotADirectoryError: [Errno 20] ... (set NPO_DEBUG=1 ...)'."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(TINY))
    (tmp_path / "afile").write_text("x")
    store = tmp_path / "afile" / "sub"
    code, _, err = run_main(["run", "r.yaml", "--store", str(store)], monkeypatch, capsys)
    assert code == 1 and err == (f"error: cannot use store {store}: not a directory; pick a writable folder "
                                 "with --store or NPO_STORE\n"), err


def test_a_first_step_that_fails_leaves_no_run_or_branch(tmp_path, monkeypatch, capsys):
    """A verifier (or data, or memory) that fails at the first step: before, the step-0 checkpoint stayed,
    `npo ls` listed a dead run, and rerunning the fixed command said the run already exists."""
    from npo_cli.store import Store

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NPO_STORE", str(tmp_path / "store"))
    (tmp_path / "first_step_rewards.py").write_text(
        "def bad(prompt, completion, answer):\n    raise ValueError('oops')\n\n"
        "def good(prompt, completion, answer):\n    return float(completion.strip() == answer)\n")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**TINY, "task": {**TINY["task"],
                                                                      "verifier": "first_step_rewards:bad"}}))
    code, _, err = run_main(["run", "r.yaml"], monkeypatch, capsys)
    assert code == 1 and err == ("error: verifier 'first_step_rewards:bad' failed: ValueError: oops (on 4 of 4 calls, "
                                 "more than task.verifier_max_failures=0.1; fix the verifier or raise that share)\n"), err
    store = Store.open(str(tmp_path / "store"))
    assert store.runs() == []
    good = ["--set", "task.verifier=first_step_rewards:good"]
    assert run_main(["run", "r.yaml", *good], monkeypatch, capsys)[0] == 0  # the same name is free
    assert store.runs() == ["t"]
    # the same for an intervene branch; the run it forks from is untouched
    heads = store.branches("t")
    code, _, err = run_main(["intervene", "--at", "t@0", "--guide", "t@2", "--set",
                             "task.verifier=first_step_rewards:bad"], monkeypatch, capsys)
    assert code == 1 and "first_step_rewards:bad" in err and store.branches("t") == heads
    assert run_main(["intervene", "--at", "t@0", "--guide", "t@2", *good], monkeypatch, capsys)[0] == 0
    assert set(store.branches("t")) == {"main", "npo-0-g2"} and gc.verify(store)["ok"]


def test_s3_endpoint_lost_mid_run_is_one_line_and_resumes(tmp_path, monkeypatch, capsys):
    """The endpoint goes away during a run: before, aiohttp tracebacks, then the lease release's error
    (hiding the save's) with 'set NPO_DEBUG=1'. Moto keeps its buckets in the process: a new server on the
    same port is the endpoint coming back."""
    import boto3
    from moto.server import ThreadedMotoServer

    from npo_cli.store import Store
    from npo_cli.trainer import Trainer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "NPO_S3_ENDPOINT": endpoint}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="npo-lost")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**TINY, "train": {"steps": 4, "save_every": 1,
                                                                          "eval_every": 100}}))
    step = Trainer.step

    def then_lost(self):
        m = step(self)
        if self.step_num == 2:
            server.stop()
        return m

    monkeypatch.setattr(Trainer, "step", then_lost)
    code, _, err = run_main(["run", "r.yaml", "--store", "s3://npo-lost/x"], monkeypatch, capsys)
    monkeypatch.setattr(Trainer, "step", step)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: Could not connect to the endpoint URL"), err
    hint = "then continue with npo run --resume t/main --store s3://npo-lost/x"
    assert err.strip().endswith(hint), err
    again = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    again.start()
    try:
        store = Store.open("s3://npo-lost/x")
        dead_lease(store, "t", "main")  # what the failed run's lease is once its process has exited
        code, _, err = run_main(shlex.split(hint)[4:], monkeypatch, capsys)  # the command as printed
        assert code == 0, err
        assert [m.step for m in store.lineage("t")] == [4, 3, 2, 1, 0] and gc.verify(store)["ok"]
    finally:
        again.stop()


# ---------------------------------------------------------------- fuzzing the recipe boundary

KEYS = [row[0] for row in schema_rows()]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.lists(st.integers(-3, 3), max_size=3))


def nested(pairs) -> dict:
    out: dict = {}
    for key, value in pairs:
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                break
            node = nxt
        else:
            node[parts[-1]] = value
    return out


recipe_docs = st.lists(st.tuples(st.sampled_from(KEYS + ["bogus", "train.bogus", "model.x.y"]), scalars),
                       max_size=6).map(nested)
yaml_texts = st.one_of(recipe_docs.map(lambda d: yaml.safe_dump(d)), st.text(max_size=80))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=yaml_texts)
def test_fuzzed_recipes_validate_or_fail_in_one_line(tmp_path, text):
    p = tmp_path / "fuzz.yaml"
    p.write_text(text)
    try:
        r = load_recipe(p)
    except NpoError as e:
        msg = str(e)
        assert msg and "\n" not in msg and len(msg) < 400
    else:
        assert isinstance(r, Recipe)
        # a valid recipe survives the store's JSON round trip unchanged
        assert Recipe.model_validate(json.loads(json.dumps(r.model_dump(mode="json")))) == r


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=recipe_docs)
def test_fuzzed_invalid_recipes_through_main(tmp_path, monkeypatch, capsys, doc):
    """Whatever fails validation fails through the CLI as one stderr line and exit 1."""
    p = tmp_path / "fuzz.yaml"
    p.write_text(yaml.safe_dump(doc))
    try:
        load_recipe(p)
    except NpoError:
        code, _, err = run_main(["run", str(p)], monkeypatch, capsys)
        assert code == 1 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
