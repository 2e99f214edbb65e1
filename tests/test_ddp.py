"""Data-parallel training (torchrun, gloo on CPU): 2 processes == 1 process with the same global batch.

Each rank samples its own rollouts (its own RNG stream), so the single-process reference replays
exactly the rollouts the ranks sampled during training steps (keyed by step and prompt). Then
the parameters, loss and gradient norm after k steps must agree to float tolerance: that checks the
prompt sharding, the global loss normalisers, the summed gradients, the global clip norm, and that
rank 0 alone wrote the store. The recipe makes ranks differ in kept rows and micro-batches
(skip_zero_adv, micro_batch_size=3) and runs 2 optimizer passes per batch with a clipping norm.
The same check runs for an NPO branch (`intervene`), ExGRPO and `npo auto`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

RECIPE = {
    "name": "ddp", "seed": 0,
    # a dense reward from a user verifier, so an untrained tiny model has non-zero advantages
    "task": {"verifier": "ddp_reward:reward", "arithmetic": {"digits": 1}, "eval_size": 4},
    "rollout": {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 6},
    "grpo": {"lr": 1e-3, "micro_batch_size": 3, "grad_clip": 0.05, "updates_per_batch": 2},
    "train": {"steps": 3, "save_every": 1, "eval_every": 100},
    "logging": {"progress": False, "metrics_jsonl": None},
}

REWARD = '''
def reward(prompt, completion, answer):
    return sum(c.isdigit() for c in completion) / 4 + 0.1 * ("+" in completion)

def any_digit(prompt, completion, answer):  # "correct" about half the time: the guide finds some
    return 1.0 if any(c.isdigit() for c in completion) else 0.1 * ("+" in completion)
'''

WORKER = '''
import json, sys
import faulthandler  # a hung rank prints where it waits (before _run's 300 s timeout) and exits;
faulthandler.enable()  # a crashing one prints where it crashed
faulthandler.dump_traceback_later(240, exit=True)
from dataclasses import asdict
import torch
torch.set_num_threads(1)
from npo_cli import dist
from npo_cli.branching import new_trainer
from npo_cli.commands import auto_run, intervene
from npo_cli.guide import cache_get
from npo_cli.recipe import build_recipe
from npo_cli.rollout import Rollout
from npo_cli.store import Store
from npo_cli.trainer import Trainer

store_dir, out, mode, recipe, command, *args = sys.argv[1:]
recipe = json.loads(recipe)
dist.init()
rank = dist.rank()  # the commands leave the process group when they end (dist.finish)
sampled = {}  # "step|prompt" -> the policy's rollouts of each time it was sampled (auto replays steps)
if mode == "replay":
    for r in range(2):
        for k, v in json.load(open(f"{out}.rank{r}.json")).items():
            sampled.setdefault(k, []).extend(v)  # a prompt at a given step is always on the same rank
in_step = [False]

def patch(trainer):  # record (torchrun) or replay (one process) the rollouts of training steps; or plain
    real = trainer.backend.generate
    trainer.eval_problems = []

    def generate(prompts, n, greedy=False):
        if not in_step[0]:  # e.g. the AutoNPO probe: seeded, so it needs no replay
            return real(prompts, n, greedy)
        keys = [f"{trainer.step_num}|{p}" for p in prompts]
        if mode == "replay":
            return [[Rollout(**d) for d in sampled[k].pop(0)] for k in keys]
        groups = real(prompts, n, greedy)
        for k, g in zip(keys, groups):
            sampled.setdefault(k, []).append([asdict(r) for r in g])
        return groups

    trainer.backend.generate = generate

init, step = Trainer.__init__, Trainer.step
def patched_init(self, *a, **k):
    init(self, *a, **k)
    patch(self)
def patched_step(self):
    in_step[0] = True
    try:
        return step(self)
    finally:
        in_step[0] = False
Trainer.__init__, Trainer.step = patched_init, patched_step

from npo_cli.guide import GuideGenerator
sent = []  # guide-cache entries this rank handed to rank 0 (prompt, answer), in order
take = GuideGenerator.take_unwritten
def logged_take(self):
    out = take(self)
    sent.extend([e["prompt"], e["answer"]] for e in out)
    return out
GuideGenerator.take_unwritten = logged_take
unseen = []  # entries this rank handed over that the store did not show yet when share() returned
share = GuideGenerator.share
def logged_share(self):
    n = len(sent)
    share(self)
    unseen.extend(e for e in sent[n:] if cache_get(self.store, self.guide_id, self.key(*e)) is None)
GuideGenerator.share = logged_share
gets = []  # how many prompts each GuideGenerator.get of this rank asked for
get = GuideGenerator.get
def logged_get(self, items, seed, **kw):
    gets.append(len(items))
    return get(self, items, seed, **kw)
GuideGenerator.get = logged_get

if command == "intervene":  # args: branch name, then --set overrides
    intervene(store_dir, run=None, at=0, guide="2", branch=args[0], overrides=args[1:], progress=False)
elif command == "auto":
    # rank 0 reads the recipe file for every rank: the others are given a path that does not exist
    path = f"{store_dir}.recipe.json" if rank == 0 else f"{store_dir}.nowhere.json"
    if rank == 0:
        json.dump(recipe, open(path, "w"))
    auto_run(path, [], store_dir, None, progress=False)
else:
    new_trainer(build_recipe(recipe), Store.open(store_dir)).train(progress=False)
if mode == "record":
    json.dump(sampled, open(f"{out}.rank{rank}.json", "w"))
    json.dump(sent, open(f"{out}.sent.rank{rank}.json", "w"))
    json.dump(gets, open(f"{out}.gets.rank{rank}.json", "w"))
    json.dump(unseen, open(f"{out}.unseen.rank{rank}.json", "w"))
dist.finish()
dist.exit_process(0)  # as the CLI ends a torchrun rank
'''


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("NPO_STORE", None)
    return env


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]


def _run(cmd: list[str], tmp_path: Path, ok: bool = True) -> subprocess.CompletedProcess:
    """Run cmd in tmp_path (5 min at most); ok: it must exit 0."""
    p = subprocess.run(cmd, check=False, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 or not ok, p.stdout[-3000:] + p.stderr[-5000:]
    return p


def _head(store_dir: Path):
    from npo_cli.checkpoint import load_metrics, load_model
    from npo_cli.store import Store

    store = Store.open(str(store_dir))
    model, _, man = load_model(store, "ddp")
    return model.state_dict(), load_metrics(store, man)[-1], man


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "ddp_reward.py").write_text(REWARD)
    (tmp_path / "worker.py").write_text(WORKER)
    return tmp_path


# fsdp+compile: grpo.compile's layers compiled over FSDP2's sharded ones (both sides compile)
@pytest.mark.parametrize("parallel", ["ddp", "fsdp", pytest.param("fsdp+compile", marks=pytest.mark.heavy)])
def test_two_ranks_equal_one_process(workdir: Path, parallel: str):
    compiled = parallel.endswith("+compile")
    recipe = json.dumps({**RECIPE, "train": {**RECIPE["train"], "parallel": parallel.removesuffix("+compile")},
                         "grpo": {**RECIPE["grpo"], "compile": compiled}})
    out = str(workdir / "rollouts")
    _run(_torchrun("worker.py", str(workdir / "dp"), out, "record", recipe, "train"), workdir)
    _run([sys.executable, "worker.py", str(workdir / "single"), out, "replay", recipe, "train"], workdir)

    dp, dp_m, dp_man = _head(workdir / "dp")
    one, one_m, _ = _head(workdir / "single")
    assert dp_man.step == 3
    assert set(dp) == set(one)
    worst = max(float((dp[k] - one[k]).abs().max()) for k in dp)
    assert worst < 1e-5, f"parameters differ by {worst}"
    for k in ("loss", "grad_norm", "reward", "tokens", "entropy", "zero_adv_frac"):
        assert dp_m[k] == pytest.approx(one_m[k], rel=1e-4, abs=1e-6), k
    # the run trained (clipped updates moved the weights) and the ranks sampled different streams
    from npo_cli.model import load_policy
    from npo_cli.recipe import build_recipe

    init = load_policy(build_recipe(RECIPE).model, seed=0)[0].state_dict()
    assert max(float((dp[k] - init[k]).abs().max()) for k in dp) > 1e-3
    r0, r1 = (json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2))
    assert {x["text"] for gs in r0.values() for g in gs for x in g} != {x["text"] for gs in r1.values() for g in gs for x in g}
    # every rank's sampling RNG is in the checkpoint, so all ranks resume their own stream
    assert {"torch_rng", "torch_rng_rank1"} <= set(dp_man.state_tensors)


def test_npo_branch_two_ranks_equal_one_process(workdir: Path):
    """`npo intervene` under torchrun: each rank mixes guide slots into its own groups, and rank 0 alone
    writes the guide cache, the other rank's entries included. The single-process run of the same branch
    (same on-policy rollouts) then finds every guide trajectory in the cache, samples none, and ends
    with the same parameters and NPO metrics."""
    recipe = {**RECIPE, "task": {**RECIPE["task"], "verifier": "ddp_reward:any_digit"},
              "train": {**RECIPE["train"], "steps": 2}, "grpo": {**RECIPE["grpo"], "updates_per_batch": 1}}
    store, out = str(workdir / "s"), str(workdir / "rollouts")
    _run([sys.executable, "worker.py", store, out, "plain", json.dumps(recipe), "train"], workdir)  # steps 0..2
    sets = ["npo.gate=1.0", "npo.max_tries=16"]  # every group gets a slot when the guide finds one
    _run(_torchrun("worker.py", store, out, "record", "{}", "intervene", "dp", *sets), workdir)
    _run([sys.executable, "worker.py", store, out, "replay", "{}", "intervene", "one", *sets], workdir)

    from npo_cli.checkpoint import load_metrics, load_model
    from npo_cli.store import Store

    st = Store.open(store)
    (dp, _, dp_man), (one, _, one_man) = (load_model(st, f"ddp/{b}") for b in ("dp", "one"))
    dp_m, one_m = load_metrics(st, dp_man), load_metrics(st, one_man)
    assert dp_man.step == one_man.step == 2 and dp_man.guide == one_man.guide
    worst = max(float((dp.state_dict()[k] - v).abs().max()) for k, v in one.state_dict().items())
    assert worst < 1e-5, f"parameters differ by {worst}"
    for a, b in zip(dp_m, one_m):
        for k in ("loss", "grad_norm", "npo/slots", "npo/hit_rate", "npo/gated_frac", "off/kl"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    assert sum(m["npo/slots"] for m in dp_m) >= 2  # guide trajectories did enter the groups
    assert all(m["npo/guide_tokens"] > 0 for m in dp_m)  # cold cache: the ranks sampled...
    assert all(m["npo/guide_tokens"] == 0 for m in one_m)  # ...and rank 0 cached both ranks' entries
    sent = json.loads(Path(f"{out}.sent.rank1.json").read_text())
    assert sent and len(sent) == len({tuple(e) for e in sent})  # rank 1 hands each entry over once
    assert json.loads(Path(f"{out}.unseen.rank1.json").read_text()) == []  # and sees it written on return


@pytest.mark.heavy
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_cli_resume_matches_straight_run(workdir: Path, parallel: str):
    """`torchrun -m npo_cli run`: 2 steps, then --resume to 3 == 3 steps straight (params and RNG).
    fsdp: the full optimizer state saved by rank 0 is sharded again on resume."""
    (workdir / "r.yaml").write_text(yaml.safe_dump({**RECIPE, "train": {**RECIPE["train"], "parallel": parallel}}))
    _run(_torchrun("-m", "npo_cli", "run", "r.yaml", "--store", "a", "--set", "train.steps=2"), workdir)
    _run(_torchrun("-m", "npo_cli", "run", "--resume", "ddp", "--store", "a", "--set", "train.steps=3"), workdir)
    _run(_torchrun("-m", "npo_cli", "run", "r.yaml", "--store", "b"), workdir)
    a, _, man_a = _head(workdir / "a")
    b, _, man_b = _head(workdir / "b")
    assert man_a.step == man_b.step == 3
    assert all(torch.equal(a[k], b[k]) for k in a)
    for k in ("torch_rng", "torch_rng_rank1"):  # content-addressed: same object = same RNG state
        assert man_a.state_tensors[k].oid == man_b.state_tensors[k].oid
    if parallel == "ddp":  # one process resuming 2 ranks' checkpoint: it goes on, and says it is not exact
        p = _run([sys.executable, "-m", "npo_cli", "run", "--resume", "ddp", "--store", "a", "--set", "train.steps=4"],
                 workdir)
        assert "resuming a checkpoint of 2 process(es) with 1" in " ".join(p.stdout.split())


DIVERGE = '''
import json, sys
import torch
torch.set_num_threads(1)
from npo_cli import dist
from npo_cli.recipe import build_recipe
from npo_cli.branching import new_trainer
from npo_cli.store import Store

dist.init()
recipe = json.loads(sys.argv[2])
recipe["train"]["steps"] += dist.rank()  # e.g. a rank that read another copy of the recipe
new_trainer(build_recipe(recipe), Store.open(sys.argv[1]))
'''


def test_ranks_given_different_recipes_stop_with_the_reason(workdir: Path):
    """Ranks whose recipes differ would hang at mismatched collectives: every rank stops at start-up
    instead, saying which key differs, and nothing is written to the store."""
    (workdir / "diverge.py").write_text(DIVERGE)
    p = _run(_torchrun("diverge.py", str(workdir / "s"), json.dumps(RECIPE)), workdir, ok=False)
    assert p.returncode != 0
    assert "the processes were given different recipes: train.steps is 3 on rank 0 and 4 on rank 1" in p.stderr
    assert "train.steps is 4 on rank 1 and 3 on rank 0" in p.stderr  # rank 0 stops too
    assert not (workdir / "s" / "runs").exists()


def test_prompts_must_divide_over_ranks(monkeypatch, tmp_path: Path):
    from npo_cli import dist
    from npo_cli.branching import new_trainer
    from npo_cli.errors import NpoError
    from npo_cli.recipe import build_recipe
    from npo_cli.store import Store

    # a pretend world of 2 (the check runs before any collective)
    monkeypatch.setattr(dist, "on", lambda: True)
    monkeypatch.setattr(dist, "world", lambda: 2)
    monkeypatch.setattr(dist, "rank", lambda: 0)
    recipe = build_recipe({**RECIPE, "task": {"eval_size": 4}}, ["rollout.prompts_per_step=3"])
    with pytest.raises(NpoError, match=r"must be a multiple of the number of processes \(2\)"):
        new_trainer(recipe, Store.open(str(tmp_path / "s")))


def test_exgrpo_two_ranks_equal_one_process(workdir: Path):
    """ExGRPO under torchrun: every rank records every rank's groups (global order), so the replay buffer
    and its picks (the batch's last places, before the rank split) are the same everywhere. The successes
    train.record_successes keeps are gathered on rank 0 in the same global order."""
    recipe = {**RECIPE, "task": {**RECIPE["task"], "verifier": "ddp_reward:any_digit"},
              "train": {**RECIPE["train"], "steps": 4, "record_successes": True},
              "npo": {"source": "exgrpo", "replay_ratio": 0.5, "gate": 1.0}}
    out = str(workdir / "rollouts")
    _run(_torchrun("worker.py", str(workdir / "dp"), out, "record", json.dumps(recipe), "train"), workdir)
    _run([sys.executable, "worker.py", str(workdir / "single"), out, "replay", json.dumps(recipe), "train"], workdir)
    from npo_cli.checkpoint import load_metrics
    from npo_cli.store import Store

    dp, _, dp_man = _head(workdir / "dp")
    one, _, one_man = _head(workdir / "single")
    assert max(float((dp[k] - one[k]).abs().max()) for k in dp) < 1e-5
    rows = [[r for m in reversed(st.lineage(man.id)) for r in load_metrics(st, m)]
            for st, man in ((Store.open(str(workdir / "dp")), dp_man), (Store.open(str(workdir / "single")), one_man))]
    assert len(rows[0]) == 4
    for a, b in zip(*rows, strict=True):
        for k in ("loss", "grad_norm", "npo/replay_prompts", "npo/buffer_prompts", "npo/slots", "tokens"):
            assert a.get(k) == pytest.approx(b.get(k), rel=1e-4, abs=1e-6), k
    assert sum(m.get("npo/replay_prompts", 0) for m in rows[0]) >= 2 and sum(m.get("npo/slots", 0) for m in rows[0]) >= 1
    assert dp_man.state.source["replay"] == one_man.state.source["replay"]  # the same buffer object
    recorded = [[m.state.successes for m in Store.open(str(workdir / d)).lineage(man.id)]
                for d, man in (("dp", dp_man), ("single", one_man))]
    assert recorded[0] == recorded[1] and any(recorded[0])  # the same objects: the same successes, in order


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_auto_two_ranks_decide_as_one_process(npo_base_store, workdir: Path, parallel: str):
    """`npo auto` under torchrun: rank 0 reads the recipe file for all ranks (the others are given a path
    that does not exist); the ranks' mistakes merge into one pool in global prompt order, rank 0 probes
    and every rank takes its decision, rank 0 makes the branch, the ranks share the guide-cache pre-fill
    and rank 0 writes it. Up to the decision the run equals one process with the same rollouts:
    parameters, pool, probe table. (Before, every rank wrote and read one recipe file: a rank that read it
    half-written trained under the default recipe and the ranks hung at mismatched collectives.)"""
    import shutil

    from test_auto import FORCE, TASK

    recipe = json.dumps({"name": "a", "seed": 0, "model": {"path": "base@0"}, "task": TASK,
                         "rollout": {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 4},
                         "grpo": {"lr": 1e-3},
                         "train": {"steps": 8, "save_every": 2, "eval_every": 100, "parallel": parallel},
                         "logging": {"progress": False, "metrics_jsonl": None}, "auto": FORCE})
    out = str(workdir / "rollouts")
    for d in ("dp", "one"):
        shutil.copytree(npo_base_store, workdir / d)
    _run(_torchrun("worker.py", str(workdir / "dp"), out, "record", recipe, "auto"), workdir)
    _run([sys.executable, "worker.py", str(workdir / "one"), out, "replay", recipe, "auto"], workdir)

    from npo_cli.auto import auto_chain, auto_events
    from npo_cli.checkpoint import load_model
    from npo_cli.store import Store

    dp, one = Store.open(str(workdir / "dp")), Store.open(str(workdir / "one"))
    assert auto_chain(dp, "a") == auto_chain(one, "a") == ["main", "auto-1"]
    assert dp.manifest("a/auto-1").step == one.manifest("a/auto-1").step == 8
    (d1, *_), (d2, *_) = ([e for _, e in auto_events(s, "a") if e.kind == "auto"] for s in (dp, one))
    t = d1.step
    assert (t, d1.fork_step, d1.delta) == (d2.step, d2.fork_step, d2.delta)
    for c1, c2 in zip(d1.candidates, d2.candidates, strict=True):
        assert (c1["step"], c1["n"], c1["Q"]) == (c2["step"], c2["n"], c2["Q"])
        assert c1["kl"] == pytest.approx(c2["kl"], rel=1e-3, abs=1e-6)
    m1, m2 = (s.manifest(f"a/main@{t}") for s in (dp, one))
    assert m1.state.controller["pool"] == m2.state.controller["pool"]  # same JSON object: same pool
    p1, p2 = (load_model(s, f"a/main@{t}")[0].state_dict() for s in (dp, one))
    # k_proj.bias: its exact gradient is 0 (softmax ignores a shift shared by all keys), so AdamW turns
    # float noise into +-lr steps there, and the other weights follow it slightly over several steps
    worst = max(float((p1[k] - p2[k]).abs().max()) for k in p1 if not k.endswith("k_proj.bias"))
    assert worst < 1e-4, f"parameters differ by {worst}"
    ev = next(e for e in dp.manifest(dp.resolve(f"a/auto-1@{d1.fork_step}")).events if e.kind == "auto-branch")
    n = ev.prefill["prompts"]
    assert n > 1 and ev.prefill["tokens"] > 0
    # the ranks shared the pre-fill (its get is each rank's first), and rank 0 wrote every entry found
    firsts = [json.loads(Path(f"{out}.gets.rank{r}.json").read_text())[0] for r in range(2)]
    assert firsts == [n - n // 2, n // 2]
    from npo_cli.batch import format_prompt
    from npo_cli.guide import GuideGenerator
    from npo_cli.recipe import build_recipe
    from npo_cli.tasks import Problem

    branch = dp.manifest("a/auto-1")
    rec = build_recipe(dp.get_json(branch.recipe))
    gen = GuideGenerator(dp, ev.guide, rec)
    pool = [it for it in dp.get_json(m1.state.controller["pool"])["items"]
            if ev.fork_step <= it["step"] < ev.until]
    tok = load_model(dp, "a/auto-1")[1]
    hits = [gen.lookup(format_prompt(rec, tok, Problem.from_json(it)), Problem.from_json(it))
            for it in pool]
    assert len(pool) == n and all(h is not None for h in hits)
    assert sum(bool(h["found"]) for h in hits) == ev.prefill["found"]


@pytest.mark.heavy
def test_torchrun_cli_intervene_and_auto(npo_base_store, workdir: Path):
    """`torchrun -m npo_cli intervene` and `... auto`: exit 0, one table (rank 0 prints), branches made."""
    import shutil

    from test_auto import FORCE, TASK

    shutil.copytree(npo_base_store, workdir / "s")
    (workdir / "r.yaml").write_text(yaml.safe_dump({**RECIPE, "task": {**RECIPE["task"], "verifier": "ddp_reward:any_digit"},
                                                    "train": {**RECIPE["train"], "steps": 2}}))
    _run(_torchrun("-m", "npo_cli", "run", "r.yaml", "--store", "s"), workdir)
    p = _run(_torchrun("-m", "npo_cli", "intervene", "--at", "ddp@0", "--guide", "2", "--store", "s",
                       "--set", "npo.gate=1.0"), workdir)
    assert p.stdout.count("npo intervene ddp/npo-0-g2") == 1
    (workdir / "a.yaml").write_text(yaml.safe_dump({
        "name": "a", "seed": 0, "model": {"path": "base@0"}, "task": TASK,
        "rollout": {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 4}, "grpo": {"lr": 1e-3},
        "train": {"steps": 8, "save_every": 2, "eval_every": 4}, "logging": {"progress": False}, "auto": FORCE}))
    _run(_torchrun("-m", "npo_cli", "auto", "a.yaml", "--store", "s"), workdir)
    from npo_cli.auto import auto_chain
    from npo_cli.store import Store

    st = Store.open(str(workdir / "s"))
    assert st.manifest("ddp/npo-0-g2").step == 2
    assert auto_chain(st, "a") == ["main", "auto-1"] and st.manifest("a/auto-1").step == 8


def test_torchrun_rank_ends_with_os_exit(monkeypatch, capsys, tmp_path: Path):
    """Under torchrun the CLI ends through os._exit with the command's exit code (interpreter teardown
    races gloo's threads); a single process exits as usual."""
    from conftest import run_main

    exits = []
    monkeypatch.setattr(os, "_exit", lambda code: exits.append(code) or sys.exit(code))
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, out, _ = run_main(["--help"], monkeypatch, capsys)
    assert exits == [0] and code == 0 and "intervene" in out
    code, _, err = run_main(["show", "nosuch", "--store", str(tmp_path)], monkeypatch, capsys)
    assert exits == [0, 1] and code == 1 and err.startswith("error:")
    # rank 1: a command that is not data-parallel runs on rank 0 only (one listing, one gc); errors say the rank
    monkeypatch.setenv("RANK", "1")
    code, out, err = run_main(["show", "nosuch", "--store", str(tmp_path)], monkeypatch, capsys)
    assert exits == [0, 1, 0] and code == 0 and out == err == ""
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert run_main(["show", "nosuch", "--store", str(tmp_path)], monkeypatch, capsys)[0] == 1
    assert exits == [0, 1, 0]  # a single process exits as usual


def test_a_rank_whose_peer_stopped_says_so(workdir: Path):
    """torchrun where rank 0 fails at start-up (a missing recipe file): rank 1, left at a collective, says
    that another process stopped, instead of gloo's connection-reset error, whether its collective failed
    before or after torchrun's SIGTERM reached it. (Only torchrun's SIGKILL, 30 s after that SIGTERM,
    could end it before it says anything: no other line is allowed.)"""
    p = _run(_torchrun("-m", "npo_cli", "run", "nope.yaml", "--store", "s"), workdir, ok=False)
    lines = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert "error: recipe file not found: nope.yaml" in lines
    peer = "error: [rank 1] a collective failed: another process of this torchrun stopped or hung (its error says why)"
    assert set(lines) <= {"error: recipe file not found: nope.yaml", peer}, p.stderr
    assert "Unable to shutdown process" in p.stderr or len(lines) == 2, p.stderr  # said, unless SIGKILLed
    # an error every rank meets: rank 1's line names its rank
    (workdir / "r.yaml").write_text(yaml.safe_dump(RECIPE))
    p = _run(_torchrun("-m", "npo_cli", "run", "r.yaml", "--store", "s", "--set", "train.stepz=1"), workdir, ok=False)
    lines = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert sorted(lines) == ["error: [rank 1] unknown recipe key 'train.stepz'", "error: unknown recipe key 'train.stepz'"]
