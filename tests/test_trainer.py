"""The GRPO engine end to end: reward climbs, checkpoints land, resume is bitwise, Ctrl-C is clean."""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import copy_store, open_store

from npo_cli.batch import NoController
from npo_cli.branching import new_trainer, resume_trainer
from npo_cli.commands import run_recipe
from npo_cli.errors import NpoError
from npo_cli.metrics import TIMING_KEYS, store_tag
from npo_cli.recipe import build_recipe
from npo_cli.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
NPO = str(ROOT / ".venv" / "bin" / "npo")

# 1-digit sums: the quick SFT below reaches ~40% sampled accuracy, where 30 GRPO steps visibly help.
TASK = {"arithmetic": {"digits": 1}, "eval_size": 16}


def sft_base(store_dir: Path, steps: int = 200, lr: float = 3e-3) -> None:
    """A warm start in a few seconds (~40% sampled accuracy on 1-digit sums), saved as run 'base' step 0."""
    from npo_cli.example import quick_warm_start
    from npo_cli.store import Store

    quick_warm_start(Store.open(str(store_dir)), steps=steps, task=TASK, lr=lr)


@pytest.fixture(scope="module")
def base_store(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("base") / "store"
    sft_base(d)
    return d


@pytest.fixture
def store_dir(base_store, tmp_path, monkeypatch) -> Path:
    return copy_store(base_store, tmp_path, monkeypatch)


def recipe_dict(**over) -> dict:
    d = {
        "name": "r", "seed": 0, "model": {"path": "base@0"}, "task": TASK,
        "rollout": {"prompts_per_step": 16, "group_size": 8, "max_new_tokens": 4},
        "grpo": {"lr": 5e-4},
        "train": {"steps": 30, "save_every": 10, "eval_every": 15},
        "logging": {"progress": False},
    }
    for k, v in over.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    return d


def strip(ms: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS and not k.startswith("eval/")} for m in ms]


def test_grpo_run_end_to_end(store_dir, tmp_path):
    from typer.testing import CliRunner

    from npo_cli.checkpoint import load_metrics
    from npo_cli.cli import app

    recipe = build_recipe(recipe_dict())
    store = open_store(store_dir)
    t0 = time.perf_counter()
    res = new_trainer(recipe, store).train()
    wall = time.perf_counter() - t0
    assert res["step"] == 30 and res["stopped_by"] is None
    # reward climbs (seed 0 is known to work; the margin is ~3x the noise of a 10-step mean)
    rows = [json.loads(line) for line in Path(res["metrics_jsonl"]).read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    first = statistics.mean(r["reward"] for r in rows[:10])
    last = statistics.mean(r["reward"] for r in rows[-10:])
    assert last > first + 0.04, (first, last)
    for key in ("reward", "reward_std", "accuracy", "zero_adv_frac", "entropy", "clip_frac", "response_length",
                "grad_norm", "lr", "step_time", "tokens_per_s"):
        assert key in rows[0], key
    assert all("loss" in r and "tokens" in r for r in rows)  # 0 on a step whose groups all have advantage 0
    assert all(r["tokens"] == 0 for r in rows if r["zero_adv_frac"] == 1) and 0 < rows[0]["reward_std"] <= 0.6
    assert "eval/accuracy" in rows[14] and "eval/greedy_accuracy" in rows[29]
    # checkpoints: 0 (initial policy), 10, 20, 30; their metrics objects hold every step once
    lineage = store.lineage("r")
    assert [m.step for m in lineage] == [30, 20, 10, 0]
    assert [m["step"] for man in reversed(lineage) for m in load_metrics(store, man)] == list(range(1, 31))
    assert "eval/accuracy" in lineage[0].summary and "reward" in lineage[0].summary
    assert json.loads(json.dumps(store.get_json(lineage[0].recipe)))["name"] == "r"
    print(f"30 steps of 16x8 in {wall:.1f}s, median step {res['median_step_s']:.3f}s")

    runner = CliRunner()
    out = runner.invoke(app, ["ls", "--store", str(store_dir)])
    assert out.exit_code == 0, out.output
    assert "r" in out.output and "base" in out.output
    out = runner.invoke(app, ["eval", "r@30", "--samples", "2", "--store", str(store_dir), "--json"])
    assert out.exit_code == 0, out.output
    ev = json.loads(out.output)
    assert ev["step"] == 30 and ev["problems"] >= 5 and 0 <= ev["eval/accuracy"] <= ev["eval/pass@2"] <= 1
    assert 0 <= ev["eval/greedy_accuracy"] <= 1


class StopAt(NoController):
    def __init__(self, step: int):
        self.at = step

    def after_step(self, trainer, metrics) -> bool:
        return trainer.step_num == self.at


def test_resume_is_bitwise(store_dir):
    """N steps in one go == k steps, stop, resume to N: parameters and per-step metrics (CPU)."""
    d = recipe_dict(
        rollout={"prompts_per_step": 4, "group_size": 4},
        grpo={"lr": 1e-3, "micro_batch_size": 5, "updates_per_batch": 2, "kl_coef": 0.05,
              "schedule": "cosine", "warmup_steps": 2},
        train={"steps": 6, "save_every": 4, "eval_every": 2},
    )
    store = open_store(store_dir)
    logs = {run: Path("runs", store_tag(str(store_dir)), run, "main", "metrics.jsonl") for run in ("r", "r2")}
    logs["r"].parent.mkdir(parents=True)
    logs["r"].write_text('{"step": 1, "reward": -1}\n{"step": 9, "reward": -1}\n')  # rows an earlier run of this name left
    a = new_trainer(build_recipe(d), store)
    a.train()
    b = new_trainer(build_recipe({**d, "name": "r2"}), store, controller=StopAt(3))
    assert b.train()["stopped_by"] == "controller"
    assert store.manifest("r2").step == 3
    with logs["r2"].open("a") as f:  # a killed process logged steps past its last checkpoint (3)
        f.write('{"step": 4, "reward": -1}\n')
    c = resume_trainer(store, "r2")
    c.train()
    with pytest.raises(NpoError, match="samples >= 1"):  # 0 is an error, not "the recipe's default"
        c.evaluate(samples=0)
    for log in logs.values():  # a new run starts its file afresh; a resume re-logs what it re-runs
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and all(r["reward"] >= 0 for r in rows)
    pa, pc = dict(a.model.named_parameters()), dict(c.model.named_parameters())
    assert all(torch.equal(pa[k], pc[k]) for k in pa)
    assert strip(a.history) == strip(b.history + c.history)
    assert [m["eval/accuracy"] for m in a.history if "eval/accuracy" in m] == \
        [m["eval/accuracy"] for m in b.history + c.history if "eval/accuracy" in m]


def test_resume_is_bitwise_with_own_decoding(store_dir):
    """rollout.static_cache (npo's decoding loop, its own sampling): a resumed run equals a straight one."""
    d = recipe_dict(rollout={"prompts_per_step": 4, "group_size": 4, "static_cache": True},
                    train={"steps": 4, "save_every": 2, "eval_every": 100})
    store = open_store(store_dir)
    a = new_trainer(build_recipe(d), store)
    a.train()
    b = new_trainer(build_recipe({**d, "name": "r2"}), store, controller=StopAt(2))
    b.train()
    c = resume_trainer(store, "r2")
    c.train()
    assert a.backend.own_decoding and c.backend.own_decoding
    assert strip(a.history) == strip(b.history + c.history)
    pa, pc = dict(a.model.named_parameters()), dict(c.model.named_parameters())
    assert all(torch.equal(pa[k], pc[k]) for k in pa)


def train_recording_grads(store, recipes: list[dict]) -> tuple[list[Trainer], list[torch.Tensor]]:
    """Train each recipe as a new run, keeping the flat gradient at every optimizer step (in run order)."""
    runs, grads = [], []
    for d in recipes:
        t = new_trainer(build_recipe(d), store)
        step = t.optimizer.step

        def record(*a, _step=step, _t=t, **k):
            grads.append(torch.cat([p.grad.reshape(-1).clone() for p in _t.model.parameters()]))
            return _step(*a, **k)

        t.optimizer.step = record
        t.train()
        runs.append(t)
    return runs, grads


def test_skipping_zero_advantage_rows_is_exact(store_dir):
    """Rows of all-equal groups add 0 to the gradient: skipping them changes the gradient only by
    float noise. (Parameters are not compared: AdamW turns noise on near-zero gradients, e.g. of
    rare-token embedding rows where the group's advantages cancel, into lr-sized steps.)"""
    d = recipe_dict(rollout={"prompts_per_step": 6, "group_size": 4},
                    grpo={"lr": 1e-3, "micro_batch_size": 5}, train={"steps": 1, "save_every": 4, "eval_every": 100})
    runs, grads = train_recording_grads(open_store(store_dir), [
        {**d, "name": f"skip{int(skip)}", "grpo": {**d["grpo"], "skip_zero_adv": skip}} for skip in (True, False)])
    assert runs[0].history[0]["zero_adv_frac"] > 0  # the skip path really ran
    assert runs[0].history[0]["loss"] == pytest.approx(runs[1].history[0]["loss"], abs=1e-6)
    scale = float(grads[1].abs().max())
    assert scale > 0 and float((grads[0] - grads[1]).abs().max()) <= 1e-5 * scale


def test_mask_truncated_trains_only_finished_completions(store_dir):
    """grpo.mask_truncated (TRL's mask_truncated_completions): a completion without EOS trains nothing and
    leaves the normaliser; the advantages are still the whole group's."""
    store = open_store(store_dir)
    d = recipe_dict(rollout={"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 2}, grpo={"lr": 1e-3})
    masked = new_trainer(build_recipe({**d, "name": "m", "grpo": {**d["grpo"], "mask_truncated": True}}), store)
    plain = new_trainer(build_recipe({**d, "name": "p"}), store)
    torch.manual_seed(0)
    prompts = ["1+1=", "2+3=", "9+8=", "7+6="]  # 17 and 13 need 3 tokens with EOS: cut at 2
    rows = [ro for g in masked.backend.generate(prompts, 4) for ro in g]
    adv = torch.tensor([1.0, -1.0] * 8)
    done = [i for i, ro in enumerate(rows) if ro.finished]
    assert 0 < len(done) < len(rows)  # both kinds in the batch
    a = masked.update(rows, adv)
    b = plain.update([rows[i] for i in done], adv[done])
    assert a["tokens"] == b["tokens"] == sum(len(rows[i].completion_ids) for i in done)
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-7)


def test_compiled_training_matches_eager(store_dir):
    """grpo.compile: the same rollouts, losses and gradients as eager (float noise), layers really compiled,
    and the checkpoint keeps the model's own parameter names (a resume loads it)."""
    import torch._dynamo

    d = recipe_dict(rollout={"prompts_per_step": 6, "group_size": 4},
                    grpo={"lr": 1e-3, "micro_batch_size": 16}, train={"steps": 2, "save_every": 2, "eval_every": 100})
    store = open_store(store_dir)
    torch._dynamo.reset()
    runs, grads = train_recording_grads(store, [
        {**d, "name": f"c{int(c)}", "grpo": {**d["grpo"], "compile": c}} for c in (False, True)])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # a layer graph and the head's
    assert all(layer._compiled_call_impl is not None for layer in runs[1].model.model.layers)
    assert runs[1].backend.model is not runs[1].model  # sampling runs on an uncompiled copy
    for a, b in zip(runs[0].history, runs[1].history):
        assert a["reward"] == b["reward"] and a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    for g_eager, g_comp in zip(grads[:2], grads[2:]):
        assert float((g_eager - g_comp).abs().max()) <= 1e-4 * float(g_eager.abs().max())
    resumed = resume_trainer(store, "c1", ["train.steps=3"])
    assert resumed.step_num == 2
    for (name, p), q in zip(resumed.model.named_parameters(), runs[1].model.parameters()):
        assert torch.equal(p, q), name


def test_out_of_memory_halves_the_micro_batch(store_dir, monkeypatch):
    """A CUDA out-of-memory error in a pass (here injected at its second micro-batch, after one backward
    has accumulated) restarts the pass with half the micro-batch, kept for later steps: the gradients
    equal a run at that size from the start. At one sequence it stops with a one-line error."""
    from npo_cli import trainer

    real = trainer.token_logprobs
    calls = {"n": 0, "raised": 0, "always": False}

    def flaky(model, ids, *a, **k):
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["always"] or (calls["n"] == 2 and not calls["raised"]):
                calls["raised"] += 1
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(model, ids, *a, **k)

    monkeypatch.setattr(trainer, "token_logprobs", flaky)
    d = recipe_dict(rollout={"prompts_per_step": 8, "group_size": 4},
                    grpo={"lr": 1e-3, "micro_batch_size": 8}, train={"steps": 2, "save_every": 2, "eval_every": 100})
    store = open_store(store_dir)
    runs, grads = train_recording_grads(store, [{**d, "name": "oom"},
                                                {**d, "name": "mb4", "grpo": {**d["grpo"], "micro_batch_size": 4}}])
    assert calls["raised"] == 1 and runs[0].micro_batch == 4 and runs[1].micro_batch == 4
    assert len(grads) == 4 and all(torch.equal(a, b) for a, b in zip(grads[:2], grads[2:]))
    assert [m["loss"] for m in runs[0].history] == [m["loss"] for m in runs[1].history]

    calls["always"] = True
    with pytest.raises(NpoError, match="out of GPU memory at grpo.micro_batch_size=1; lower"):
        new_trainer(build_recipe({**d, "name": "never"}), store).train()
    assert [m.step for m in store.lineage("oom")] == [2, 0]  # the store keeps what it had


def test_resume_extends_steps_via_cli_entry(store_dir):
    """`npo run` k steps, then `npo run --resume RUN --set train.steps=N` == N steps in one go."""
    d = recipe_dict(rollout={"prompts_per_step": 4, "group_size": 4}, train={"steps": 4, "save_every": 10})
    Path("a.yaml").write_text(yaml.safe_dump(d))
    Path("b.yaml").write_text(yaml.safe_dump({**d, "name": "b"}))
    a = run_recipe("a.yaml", [], None, None)
    run_recipe("b.yaml", ["train.steps=2"], None, None)
    c = run_recipe(None, ["train.steps=4"], None, "b")
    assert c["step"] == 4
    store = open_store(store_dir)
    from npo_cli.checkpoint import load_metrics

    ms_a = [m for man in reversed(store.lineage("r")) for m in load_metrics(store, man)]
    ms_b = [m for man in reversed(store.lineage("b")) for m in load_metrics(store, man)]
    assert strip(ms_a) == strip(ms_b)
    ta = open_store(store_dir).manifest(a["checkpoint"]).model
    tb = open_store(store_dir).manifest(c["checkpoint"]).model
    assert {k: e.oid for k, e in ta.items()} == {k: e.oid for k, e in tb.items()}  # same bytes


def test_run_refusals(store_dir):
    store = open_store(store_dir)
    with pytest.raises(NpoError, match="already exists.*--resume"):
        new_trainer(build_recipe(recipe_dict(name="base")), store)
    with pytest.raises(NpoError, match="branch head"):
        resume_trainer(store, "base@0")
    with pytest.raises(NpoError, match="no branch"):
        resume_trainer(store, "base/nope")
    with pytest.raises(NpoError, match="already at step"):
        resume_trainer(store, "base", ["train.steps=0"])
    with pytest.raises(NpoError, match="drop RECIPE"):
        run_recipe("x.yaml", [], None, "base")
    with pytest.raises(NpoError, match="needs npo.guide"):  # an NPO source needs its guide
        new_trainer(build_recipe(recipe_dict(npo={"source": "npo"})), store)


def test_sigint_writes_final_checkpoint_and_resumes(store_dir, tmp_path):
    d = recipe_dict(rollout={"prompts_per_step": 4, "group_size": 4},
                    train={"steps": 10_000, "save_every": 1000, "eval_every": 1000})
    Path("long.yaml").write_text(yaml.safe_dump(d))
    env = {**os.environ, "NPO_STORE": str(store_dir)}
    p = subprocess.Popen([NPO, "run", "long.yaml"], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    jsonl = tmp_path / "runs" / store_tag(str(store_dir)) / "r" / "main" / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not jsonl.exists() or len(jsonl.read_text().splitlines()) < 3):
        time.sleep(0.1)
    assert p.poll() is None, p.communicate()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, (out, err)
    assert "--resume r/main" in out
    store = open_store(store_dir)
    head = store.manifest("r")
    done = len(jsonl.read_text().splitlines())
    assert head.step == done >= 3
    res = subprocess.run([NPO, "run", "--resume", "r", "--set", f"train.steps={done + 2}", "--json"],
                         check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["step"] == done + 2
    assert store.lineage("r")[0].step == done + 2 and store.lineage("r")[1].id == head.id


@pytest.mark.skipif(sys.platform == "win32", reason="posix signals")
def test_two_new_runs_of_one_name_never_interleave(store_dir):
    """The second started before the first wrote its first ref: it used to write its step 0 on top of the
    first's last checkpoint (ls: 0, 1, 2, 0, 3), whether it was made before or after that ref appeared."""
    d = recipe_dict(rollout={"prompts_per_step": 2, "group_size": 2}, train={"steps": 2, "save_every": 1})
    store = open_store(store_dir)
    first, second = new_trainer(build_recipe(d), store), new_trainer(build_recipe({**d, "seed": 1}), store)
    first.train()
    third = Trainer(build_recipe({**d, "seed": 2}), store)  # Trainer.new's check ran before first's ref existed
    for late in (second, third):
        with pytest.raises(NpoError, match="branch r/main is at .*not where this process left it .no such branch."):
            late.train()
    assert [m.step for m in store.lineage("r")] == [2, 1, 0] and store.head("r", "main") == first.head


def test_second_run_on_same_branch_is_refused(store_dir):
    store = open_store(store_dir)
    with store.lease("base", "main"), pytest.raises(NpoError, match="base/main"):
        resume_trainer(store, "base", ["train.steps=1"]).train()


@pytest.mark.parametrize("static_cache", [False, True], ids=["generate", "own-decoding"])
def test_rollout_eos_grouping_and_logprobs(base_store, static_cache):
    """Completions stop at (and keep) EOS; groups keep prompt order across generate batches; the stored
    behaviour log-probs equal the policy's log-probs at the sampling temperature. Both HF backends:
    model.generate, and npo's own decoding loop over a static cache (rollout.static_cache)."""
    from npo_cli.batch import collate
    from npo_cli.checkpoint import load_model
    from npo_cli.grpo import token_logprobs
    from npo_cli.recipe import RolloutConfig
    from npo_cli.rollout import HFBackend

    model, tok, _ = load_model(open_store(base_store), "base@0")
    cfg = RolloutConfig(max_new_tokens=5, temperature=0.7, top_p=0.95, batch_size=3, static_cache=static_cache)
    backend = HFBackend(model, tok, cfg)
    assert backend.own_decoding == static_cache
    torch.manual_seed(0)
    prompts = ["1+2=", "7+8=", "4+4="]
    groups = backend.generate(prompts, 4)
    assert [len(g) for g in groups] == [4, 4, 4]
    eos = tok.eos_token_id
    for p, g in zip(prompts, groups):
        for r in g:
            assert r.prompt_ids == tok(p)["input_ids"]
            assert len(r.completion_ids) == len(r.logprobs) <= 5
            assert eos not in r.completion_ids[:-1]
            assert r.finished == (r.completion_ids[-1] == eos)
            assert r.text == tok.decode(r.completion_ids, skip_special_tokens=True)
    assert any(r.finished for g in groups for r in g)  # the warm start has learned to stop
    rows = [r for g in groups for r in g]
    b = collate(rows, tok.pad_token_id, "cpu")
    with torch.no_grad():
        lp, _ = token_logprobs(model, b["input_ids"], b["attention_mask"], b["n_completion"], 16,
                               with_entropy=False, temperature=0.7)
    assert float(((lp - b["old_logp"]).abs() * b["mask"]).max()) < 1e-4
    # the same seed gives the same samples; greedy ignores it
    torch.manual_seed(0)
    again = backend.generate(prompts, 4)
    assert [[r.completion_ids for r in g] for g in again] == [[r.completion_ids for r in g] for g in groups]
    greedy = backend.generate(prompts, 2, greedy=True)
    assert all(g[0].completion_ids == g[1].completion_ids for g in greedy)


def test_own_decoding_matches_generate(base_store):
    """rollout.static_cache's decoding loop gives HF generate's greedy tokens and log-probs, with prompts of
    mixed lengths across the 64-token padding bucket, and stops early once every row has ended."""
    from npo_cli.checkpoint import load_model
    from npo_cli.recipe import RolloutConfig
    from npo_cli.rollout import HFBackend, _decode_step

    model, tok, _ = load_model(open_store(base_store), "base@0")
    prompts = ["1+2=", "7+8=", "9" * 70 + "+1=", "12+3="]  # 4 to 73 tokens: the batch pads to 128
    cfg = {"max_new_tokens": 40, "temperature": 0.7, "batch_size": 8}
    hf = HFBackend(model, tok, RolloutConfig(**cfg))
    own = HFBackend(model, tok, RolloutConfig(**cfg, static_cache=True))
    assert own._step is None  # set at the first call: compiled on CUDA, eager here
    calls = []

    def counted_step(*args):
        calls.append(1)
        return _decode_step(*args)

    own._step = counted_step
    want, got = hf.generate(prompts, 2, greedy=True), own.generate(prompts, 2, greedy=True)
    for g_want, g_got in zip(want, got):
        for a, b in zip(g_want, g_got):
            assert (a.completion_ids, a.finished, a.text) == (b.completion_ids, b.finished, b.text)
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5
    assert all(r.finished for g in got for r in g)  # the warm start stops within a few tokens ...
    assert len(calls) < 39  # ... so the loop ended before max_new_tokens (checked every 32 tokens)

    def broken_compile(*args):
        raise RuntimeError("inductor: unsupported op (injected)")

    own._step = broken_compile  # a compiled step that fails: HF generate's static cache takes over, once
    assert [[r.completion_ids for r in g] for g in own.generate(prompts, 2, greedy=True)] == \
        [[r.completion_ids for r in g] for g in want]
    assert not own.own_decoding and own.compile_error == "RuntimeError: inductor: unsupported op (injected)"


def test_sampling_by_exponential_race_draws_from_softmax():
    """_pick samples each token with its softmax probability (at the temperature), never outside the top-p
    nucleus, and returns log p(token) before the nucleus cut."""
    from npo_cli.rollout import _pick

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]]).repeat(40000, 1)
    torch.manual_seed(0)
    tok, lp = _pick(logits, 0.8, 1.0, greedy=False)
    p = torch.softmax(logits[0] / 0.8, -1)
    freq = torch.bincount(tok, minlength=5).float() / len(tok)
    assert float((freq - p).abs().max()) < 0.01
    assert torch.allclose(lp, p.log()[tok])
    tok, lp = _pick(logits, 1.0, 0.8, greedy=False)  # nucleus of 0.8: the first two tokens (0.665 + 0.245)
    assert set(tok.tolist()) == {0, 1}
    assert torch.allclose(lp, torch.log_softmax(logits[0], -1)[tok])
    assert _pick(logits[:2], 1.0, 1.0, greedy=True)[0].tolist() == [0, 0]


def test_own_decoding_compiles_into_one_graph(base_store):
    """The decoding step (forward, sampling, log-prob) traces into one graph without breaks, as the CUDA
    path compiles it (here inductor on CPU): the same greedy tokens as eager, and sampled log-probs that
    equal the policy's own. Compiled, batches are padded to 64 rows: 4 and 8 rows share one graph."""
    import torch._dynamo

    from npo_cli.batch import collate
    from npo_cli.checkpoint import load_model
    from npo_cli.grpo import token_logprobs
    from npo_cli.recipe import RolloutConfig
    from npo_cli.rollout import HFBackend, _decode_step

    model, tok, _ = load_model(open_store(base_store), "base@0")
    cfg = RolloutConfig(max_new_tokens=6, temperature=0.7, top_p=0.9, batch_size=8, static_cache=True)
    eager, compiled = HFBackend(model, tok, cfg), HFBackend(model, tok, cfg)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # graphs compiled by earlier tests
    compiled._step = torch.compile(_decode_step, fullgraph=True, dynamic=False)
    prompts = ["1+2=", "17+38="]
    assert ([[r.completion_ids for r in g] for g in compiled.generate(prompts, 2, greedy=True)]
            == [[r.completion_ids for r in g] for g in eager.generate(prompts, 2, greedy=True)])
    rows = [r for g in compiled.generate(prompts, 4) for r in g]
    b = collate(rows, tok.pad_token_id, "cpu")
    with torch.no_grad():
        lp, _ = token_logprobs(model, b["input_ids"], b["attention_mask"], b["n_completion"], 16,
                               with_entropy=False, temperature=0.7)
    assert float(((lp - b["old_logp"]).abs() * b["mask"]).max()) < 1e-4
    assert len(compiled.generate(prompts, 1, greedy=True)) == 2  # 2 rows: the greedy graph of 4 rows
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # greedy and sampled
    assert list(compiled._caches) == [(64, 64 + 6)]


def test_generation_out_of_memory_halves_the_batch(base_store):
    """A generate call that runs out of GPU memory is retried at half the batch (kept); the groups come
    back whole and in prompt order. At one sequence it stops with a one-line error."""
    from npo_cli.checkpoint import load_model
    from npo_cli.recipe import RolloutConfig
    from npo_cli.rollout import HFBackend
    from npo_cli.store import Store

    model, tok, _ = load_model(Store.open(str(base_store)), "base@0")
    backend = HFBackend(model, tok, RolloutConfig(max_new_tokens=3, batch_size=16))
    real, sizes = backend._generate_batch, []

    def small_memory(ids, greedy, limit=5):
        sizes.append(len(ids))
        if len(ids) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(ids, greedy)

    backend._generate_batch = small_memory
    prompts = ["1+2=", "3+4=", "5+0="]
    groups = backend.generate(prompts, 4, greedy=True)
    assert sizes == [12, 6, 3, 3, 3, 3] and backend.batch_size == 3
    want = [tok.decode(tok(p)["input_ids"]) for p in prompts]
    assert [len(g) for g in groups] == [4, 4, 4]
    assert [[tok.decode(r.prompt_ids) for r in g] for g in groups] == [[w] * 4 for w in want]
    backend._generate_batch = lambda ids, greedy: small_memory(ids, greedy, limit=0)
    with pytest.raises(NpoError, match="out of GPU memory generating one sequence"):
        backend.generate(prompts, 4)


def test_hf_folder_model_and_logging_errors(base_store, tmp_path, monkeypatch):
    """model.path = a plain HF folder trains; TensorBoard asked for but missing is a clear error."""
    from npo_cli.checkpoint import export

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "hf"
    export(open_store(base_store), "base@0", str(folder))
    store = open_store(tmp_path / "s")
    d = recipe_dict(model={"path": str(folder)}, rollout={"prompts_per_step": 2, "group_size": 2},
                    train={"steps": 2, "save_every": 2, "eval_every": 2})
    res = new_trainer(build_recipe(d), store).train()
    assert res["step"] == 2 and store.manifest("r@2").step == 2
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(NpoError, match="tensorboard is not installed"):
            new_trainer(build_recipe({**d, "name": "tb", "logging": {"tensorboard": "tb"}}), store).train()
    with pytest.raises(NpoError, match="model folder not found"):
        new_trainer(build_recipe({**d, "name": "m", "model": {"path": str(tmp_path / "nope")}}), store)


def test_prompts_the_model_cannot_take_are_one_line_errors(tmp_path):
    """Before, a prompt past a learned-position model's context or holding ids past its embedding failed
    with 'IndexError: index out of range in self' (a rotary model went on silently), an empty one with
    'index -1 is out of bounds'."""
    from types import SimpleNamespace

    from npo_cli.rollout import encode_prompts
    from npo_cli.tiny import char_tokenizer

    tok, cfg = char_tokenizer(), SimpleNamespace(max_position_embeddings=20, vocab_size=128)
    assert encode_prompts(tok, ["1+2=", "x" * 12], True, cfg, 8) == [tok("1+2=")["input_ids"], [91] * 12]
    with pytest.raises(NpoError, match=r"prompt 'xxxxxxxxxxxxx'... has 13 tokens: with rollout.max_new_tokens=8 "
                                       r"it exceeds the model's context of 20; shorten or drop"):
        encode_prompts(tok, ["1+2=", "x" * 13], True, cfg, 8)
    assert encode_prompts(tok, ["x" * 13], True, cfg, 8, context=21)  # vLLM: its max_model_len
    with pytest.raises(NpoError, match="token id 91, outside the model's vocabulary of 64; use the tokenizer"):
        encode_prompts(tok, ["1+x"], True, SimpleNamespace(vocab_size=64), 8)
    with pytest.raises(NpoError, match="a prompt is empty once tokenized"):
        encode_prompts(tok, [""], True, cfg, 8)
    from npo_cli.rollout import eos_ids  # a pad (here the EOS) the tokenizer added without an embedding row

    tok.pad_token = tok.eos_token
    with pytest.raises(NpoError, match="the tokenizer's pad token id 1 is outside the model's vocabulary of 1"):
        eos_ids(SimpleNamespace(config=SimpleNamespace(vocab_size=1)), tok)
    # through a run: the tiny model's context is 256 tokens
    d = recipe_dict(model={"path": "tiny"}, rollout={"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 255})
    with pytest.raises(NpoError, match="with rollout.max_new_tokens=255 it exceeds the model's context of 256"):
        new_trainer(build_recipe(d), open_store(tmp_path / "s")).train()


def test_a_file_without_held_out_problems_says_there_is_no_eval(tmp_path, capsys):
    from npo_cli.tasks import split_of

    rows = [{"prompt": f"{i}+0=", "answer": str(i)} for i in range(10) if split_of(f"{i}+0=") == "train"][:3]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    d = recipe_dict(model={"path": "tiny"}, task={"kind": "file", "train_path": str(tmp_path / "p.jsonl")})
    t = new_trainer(build_recipe(d), open_store(tmp_path / "s"))
    assert t.eval_problems == [] and "no held-out problems, so there is no eval; set task.eval_path" in \
        capsys.readouterr().err


QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
EXAMPLE = ROOT / "checkpoints.example"


@pytest.mark.skipif(not (QUICKSTART.is_file() and (EXAMPLE / "runs").is_dir()),
                    reason="recipes/quickstart.yaml and checkpoints.example/ not built yet")
def test_quickstart_30_steps(tmp_path, monkeypatch):
    """The newcomer's path: `npo run recipes/quickstart.yaml` (30 steps here) from the example warm start."""
    from typer.testing import CliRunner

    from npo_cli.cli import app

    # as from the repository root: the recipe reads ./checkpoints.example, runs go to ./checkpoints
    shutil.copytree(EXAMPLE, tmp_path / "checkpoints.example")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NPO_STORE", raising=False)
    store = tmp_path / "checkpoints"
    res = run_recipe(str(QUICKSTART), ["train.steps=30", "train.save_every=10", "train.eval_every=30",
                                       "logging.progress=false"], None, None)
    assert res["step"] == 30
    rows = [json.loads(line) for line in Path(res["metrics_jsonl"]).read_text().splitlines()]
    first = statistics.mean(r["reward"] for r in rows[:10])
    last = statistics.mean(r["reward"] for r in rows[-10:])
    assert last > first, (first, last)
    run = res["run"]
    assert [m.step for m in open_store(store).lineage(run)][:3] == [30, 20, 10]
    out = CliRunner().invoke(app, ["ls", "--store", str(store)])
    assert out.exit_code == 0 and run in out.output
    out = CliRunner().invoke(app, ["eval", f"{run}@30", "--task-set", "eval_size=32", "--store", str(store)])
    assert out.exit_code == 0, out.output


def test_resume_refuses_other_training_prompts(tmp_path, monkeypatch):
    """A relative task.train_path is read from the working directory: a resume from another folder (or
    after the file was edited) would continue the data position in other prompts. It stops with the
    reason; pointing task.train_path at the original file with --set goes on."""
    from npo_cli.store import Store

    for folder, op in (("a", "+"), ("b", "*")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "train.jsonl").write_text("".join(
            json.dumps({"prompt": f"{i}{op}{j}=", "answer": str(i + j if op == "+" else i * j)}) + "\n"
            for i in range(10) for j in range(10)))
    store = Store.open(str(tmp_path / "store"))
    recipe = build_recipe({"name": "f", "model": {"path": "tiny"}, "task": {"kind": "file", "train_path": "train.jsonl"},
                           "rollout": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 3},
                           "train": {"steps": 1, "save_every": 1, "eval_every": 100}, "logging": {"progress": False}})
    monkeypatch.chdir(tmp_path / "a")
    new_trainer(recipe, store).train()
    assert store.manifest("f").state.train_sha
    monkeypatch.chdir(tmp_path / "b")
    with pytest.raises(NpoError, match="training prompts 'train.jsonl' differ from the ones checkpoint"):
        resume_trainer(store, "f", ["train.steps=2"])
    t = resume_trainer(store, "f", ["train.steps=2", f"task.train_path={tmp_path / 'a' / 'train.jsonl'}"])
    assert t.train()["step"] == 2
