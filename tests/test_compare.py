"""`npo compare` (curves along lineages, forks, work on x, globs, PNG) and the convergence benchmark's --quick."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_main

from npo_cli.branching import new_trainer, resume_trainer
from npo_cli.recipe import build_recipe

ROOT = Path(__file__).resolve().parent.parent
TASK = {"arithmetic": {"digits": 1}, "eval_size": 8}


@pytest.fixture(scope="module")
def cmp_store(npo_base_store, tmp_path_factory) -> Path:
    """Run 'r': 8 GRPO steps (4 prompts x 4, eval every 2); 'r/rw' rewound to step 4 and trained 4 steps
    with another lr; 'r/npo' forked at 2 with guide r@6 (NPO 2..6, then GRPO to 8)."""
    from npo_cli.commands import intervene
    from npo_cli.store import Store

    d = tmp_path_factory.mktemp("compare") / "store"
    shutil.copytree(npo_base_store, d)
    store = Store.open(str(d))
    recipe = build_recipe({
        "name": "r", "seed": 0, "model": {"path": "base@0"}, "task": TASK,
        "rollout": {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 4}, "grpo": {"lr": 1e-3},
        "train": {"steps": 8, "save_every": 2, "eval_every": 2},
        "logging": {"progress": False, "metrics_jsonl": None},
    })
    new_trainer(recipe, store).train()
    store.branch(store.resolve("r@4"), "rw", run="r")
    resume_trainer(store, "r/rw", ["grpo.lr=3e-3"]).train()
    intervene(str(d), run="r", at=2, guide="6", branch="npo", progress=False)
    return d


def evals(store, ref: str) -> dict[int, float]:
    from npo_cli.checkpoint import load_metrics

    return {r["step"]: r["eval/accuracy"] for m in reversed(store.lineage(ref)) for r in load_metrics(store, m)
            if "eval/accuracy" in r}


def test_compare_json_matches_metrics(cmp_store, monkeypatch, capsys):
    from npo_cli.store import Store

    store = Store.open(str(cmp_store))
    code, out, err = run_main(["compare", "r", "r/rw", "--store", str(cmp_store), "--json"], monkeypatch, capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["metric"] == "eval/accuracy" and [c["label"] for c in data["curves"]] == ["r", "r/rw"]
    main, rw = data["curves"]
    assert {p["step"]: p["y"] for p in main["points"]} == evals(store, "r")
    assert {p["step"]: p["y"] for p in rw["points"]} == evals(store, "r/rw")
    assert [p["step"] for p in main["points"]] == [2, 4, 6, 8] and main["fork"] is None
    # the rewind continues main's curve up to its fork at 4, then its own steps
    assert [(p["step"], p["inherited"]) for p in rw["points"]] == [(2, True), (4, True), (6, False), (8, False)]
    assert [(p["x"], p["y"]) for p in rw["points"][:2]] == [(p["x"], p["y"]) for p in main["points"][:2]]
    assert rw["fork"]["step"] == 4 and rw["fork"]["y"] == main["points"][1]["y"]
    # default threshold: the first curve's final value, which main reaches at its first such step
    assert data["threshold"] == main["final"]["y"]
    first = next(p["step"] for p in main["points"] if p["y"] >= data["threshold"])
    assert main["to_threshold"]["step"] == first


def test_compare_plot_png(cmp_store, tmp_path, monkeypatch, capsys):
    import matplotlib.image as mpimg

    from npo_cli.compare import compare, plot
    from npo_cli.store import Store

    png = tmp_path / "cmp.png"
    code, out, err = run_main(["compare", "r", "r/rw", "r/npo", "--store", str(cmp_store), "--plot", str(png)],
                             monkeypatch, capsys)
    assert code == 0, err
    assert "r/rw" in out and "@4" in out and "chart:" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(png)
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 500
    # one solid line per curve, whose data are the curve's own points (after the fork)
    data = compare(Store.open(str(cmp_store)), ["r", "r/rw", "r/npo"])
    lines = plot(data, str(tmp_path / "again.png"))
    assert len(lines) == 3
    assert [ln.get_label() for ln in lines] == ["r", "r/rw (fork @4)", "r/npo (fork @2)"]
    assert list(lines[1].get_ydata()) == [data["curves"][1]["fork"]["y"]] + [
        p["y"] for p in data["curves"][1]["points"] if not p["inherited"]]


def test_compare_work_axes_count_the_guides_stretch(cmp_store):
    from npo_cli.compare import compare
    from npo_cli.store import Store

    store = Store.open(str(cmp_store))
    data = compare(store, ["r", "r/npo"], x="samples")
    main, npo = data["curves"]
    assert [p["x"] for p in main["points"]] == [32.0, 64.0, 96.0, 128.0]  # 16 completions a step
    # r/npo forks at 2 with guide r@6: main's steps 3..6 (64 samples) were spent to get the guide
    assert npo["fork"]["x"] == 32.0 and npo["fork"]["x_resume"] == 96.0
    assert [p["x"] for p in npo["points"] if not p["inherited"]] == [128.0, 160.0, 192.0]
    assert npo["work"]["samples"] == 192.0
    tok = compare(store, ["r/npo"], x="tokens")["curves"][0]
    guide_tokens = sum(r.get("npo/guide_tokens", 0.0) for m in store.lineage("r/npo") if m.branch == "npo"
                       for r in store.get_json(m.metrics))
    assert guide_tokens > 0 and tok["work"]["tokens"] > guide_tokens
    wall = compare(store, ["r"], x="wall")["curves"][0]
    assert 0 < wall["points"][0]["x"] < wall["points"][-1]["x"]


def test_compare_glob_averages(cmp_store):
    from npo_cli.compare import compare
    from npo_cli.store import Store

    store = Store.open(str(cmp_store))
    data = compare(store, ["all=r/*"], threshold=2.0)
    (c,) = data["curves"]
    assert c["label"] == "all" and c["members"] == 3 and sorted(c["refs"]) == ["r/main", "r/npo", "r/rw"]
    each = [evals(store, r) for r in ("r", "r/npo", "r/rw")]
    for p in c["points"]:
        ys = [e[p["step"]] for e in each]
        assert p["y"] == pytest.approx(statistics.mean(ys)) and p["std"] == pytest.approx(statistics.stdev(ys))
    assert c["to_threshold"] is None


@pytest.fixture(scope="module")
def seeds_store(tmp_path_factory) -> Path:
    """Seeds g0..g3 written without training: eval every 5 steps (g{i} at step s: s/100 + i/100), 2 tokens
    per completion; g3 crashed after step 10; branch g0/npo (fork at 20) evals 0.9 at 25."""
    from transformers import AutoModelForCausalLM

    from npo_cli.checkpoint import save_checkpoint
    from npo_cli.store import Store
    from npo_cli.tiny import char_tokenizer, tiny_config

    d = tmp_path_factory.mktemp("seeds") / "store"
    store, model, tok = Store.open(str(d)), AutoModelForCausalLM.from_config(tiny_config()), char_tokenizer()

    def rows(first, last, acc):
        return [{"step": s, "response_length": 2.0, **({"eval/accuracy": acc(s)} if s % 5 == 0 else {})}
                for s in range(first, last + 1)]

    for i, steps in enumerate((20, 20, 20, 10)):
        save_checkpoint(store, run=f"g{i}", branch="main", step=steps, model=model, tokenizer=tok,
                        metrics=rows(1, steps, lambda s, i=i: s / 100 + i / 100))
    store.branch("g0@20", "npo")
    save_checkpoint(store, run="g0", branch="npo", step=25, model=model, tokenizer=tok,
                    metrics=rows(21, 25, lambda s: 0.9))
    return d


def test_compare_glob_star_stays_within_a_name(seeds_store):
    """fnmatch's '*' matches '/': 'g*' pulled g0's NPO branch into the seeds' mean."""
    from npo_cli.compare import expand
    from npo_cli.store import Store

    store = Store.open(str(seeds_store))
    assert expand(store, "g*") == ["g0", "g1", "g2", "g3"]  # runs: their main branch
    assert expand(store, "g*@10") == ["g0@10", "g1@10", "g2@10", "g3@10"]
    assert expand(store, "g*/n*") == ["g0/npo"]
    assert expand(store, "g0/*") == ["g0/main", "g0/npo"]
    assert expand(store, "*/main") == [f"g{i}/main" for i in range(4)]


def test_compare_glob_of_unequal_seeds_is_at_the_shared_step(seeds_store, monkeypatch, capsys):
    """g3 stopped at 10: the final value was at 10 but updates and tokens were the full runs' mean (17.5)."""
    s = ["--store", str(seeds_store)]
    code, out, err = run_main(["compare", "g*", "--x", "tokens", "--json", *s], monkeypatch, capsys)
    assert code == 0, err
    (c,) = json.loads(out)["curves"]
    assert c["members"] == 4 and c["final"]["step"] == 10
    assert c["final"]["y"] == pytest.approx(0.1 + 0.015)
    assert c["final"]["std"] == pytest.approx(statistics.stdev([0.1, 0.11, 0.12, 0.13]))
    assert c["work"]["updates"] == 10.0 and c["work"]["tokens"] == 10 * 16 * 8 * 2.0  # default 16 prompts x 8
    assert c["note"] == ("members end at steps 10, 20: final value and work are at step 10, "
                         "the last step they share")
    code, out, err = run_main(["compare", "g*", *s], monkeypatch, capsys)
    assert code == 0 and "g* (4 runs)" in out and "0.115 ± 0.013" in out, err
    assert "g*: members end at steps 10, 20: final value and work are at step 10" in out
    # members that end together: the full runs' work, no note
    (c,) = json.loads(run_main(["compare", "g[012]", "--json", *s], monkeypatch, capsys)[1])["curves"]
    assert c["final"]["step"] == 20 and c["work"]["updates"] == 20.0 and c["note"] is None


def test_compare_errors(cmp_store, monkeypatch, capsys):
    s = ["--store", str(cmp_store)]
    for argv, msg in [(["compare", "r", "--metric", "nope", *s], "no 'nope' values"),
                      (["compare", "r", "--x", "flops", *s], "--x must be one of"),
                      (["compare", "zz*", *s], "matches 'zz*'"),
                      (["compare", "nosuchrun", *s], "nosuchrun")]:
        code, _, err = run_main(argv, monkeypatch, capsys)
        assert code == 1 and err.startswith("error:") and msg in err, (argv, err)
        assert "Traceback" not in err


@pytest.mark.timeout(400)
def test_convergence_quick(tmp_path):
    """The whole study (both regimes, every arm, pilot, AutoNPO, report, charts) at a few steps, one seed."""
    out = tmp_path / "conv"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, "benchmarks/convergence.py", "--quick", "--out", str(out)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=380, check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    md = (out / "convergence.md").read_text()
    for name in ("GRPO", "NPO", "LUFFY", "ExGRPO", "RLEP", "AutoNPO", "Pilot"):
        assert name in md, name
    for name in ("convergence_bootstrap.png", "convergence_stall_compute.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((out / "convergence.json").read_text())
    for regime in ("bootstrap", "stall"):
        r = res["results"][regime]
        assert r["thresholds"] and set(r["final"]) >= {"grpo", "npo", "auto"}
        pil = next(iter(r["pilot"].values()))
        assert pil["rows"][0]["delta"] == 0 and pil["tokens"] > 0 and pil["best"]["delta"] > 0
    assert set(res["results"]["bootstrap"]["final"]) == {"grpo", "npo", "auto", "luffy", "exgrpo", "rlep"}
    # the same folder under other settings is refused: its runs would be reused and mixed into the table
    p = subprocess.run([sys.executable, "benchmarks/convergence.py", "--quick", "--set", "rollout.temperature=0.9",
                        "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=110,
                       check=False)
    assert p.returncode == 1 and "holds runs made with other settings" in p.stderr, p.stderr
