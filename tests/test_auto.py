"""AutoNPO: the warning on synthetic metric streams, D* and the scout's stop on synthetic tables, the probe's Q
on NPO's scale (stub policy), an end-to-end auto run (rollback branch, guide, replay, events in ls/show), a
bootstrap scout that takes its best check, and exact resume in the middle of a replay."""

from __future__ import annotations

import json
import random
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import copy_store, dead_lease, open_store, run_main

from npo_cli.auto import AutoController, members, scout_choice, select_delta, spread, warning
from npo_cli.metrics import TIMING_KEYS
from npo_cli.recipe import AutoConfig, build_recipe
from npo_cli.tasks import Problem

TASK = {"arithmetic": {"digits": 1}, "eval_size": 8}


# --------------------------------------------------------------------------- the trigger


class FakeTrainer:
    def __init__(self):
        self.step_num = 0


def stream_fires(rewards, entropies, cfg: AutoConfig | None = None) -> list[int]:
    """Steps at which the controller's phase would probe (warned for `patience` steps), on a metric
    stream alone (no probe: the warned count is reset as a rejected probe would)."""
    cfg = cfg or AutoConfig(enabled=True)
    c = AutoController(cfg, store=None)
    t, fires = FakeTrainer(), []
    for r, h in zip(rewards, entropies):
        t.step_num += 1
        c.observe(t, {"reward": r, "entropy": h}, 0)
        if c.phase == "warned" and c.warned >= cfg.patience:
            fires.append(t.step_num)
            c.phase, c.warned, c.quiet_until = "watching", 0, t.step_num + cfg.min_gap
    return fires


# Noise levels of the built-in task at 16 prompts x 8 (a 250-step GRPO run on 1-digit sums): the step
# reward has sd ~0.05, the step entropy ~10-15% of its level.


def plateau_stream(seed: int, n: int = 250, onset: int = 67):
    rng = random.Random(seed)
    rewards = [min(0.2 + 0.006 * i, 0.2 + 0.006 * onset) + rng.gauss(0, 0.05) for i in range(n)]
    entropies = [0.6 * 0.995 ** i * (1 + rng.gauss(0, 0.12)) for i in range(n)]  # collapsing entropy
    return rewards, entropies


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_trigger_fires_on_stagnation_with_entropy_decline(seed):
    fires = stream_fires(*plateau_stream(seed))  # learning until step 67, then flat
    assert fires and 67 + 20 <= fires[0] <= 67 + 100, fires


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_trigger_quiet_on_steady_improvement(seed):
    rng = random.Random(seed)
    n = 250
    rewards = [0.1 + 0.003 * i + rng.gauss(0, 0.05) for i in range(n)]  # +0.12 per 40-step window
    entropies = [0.6 * 0.995 ** i * (1 + rng.gauss(0, 0.12)) for i in range(n)]  # entropy falls as it learns
    assert stream_fires(rewards, entropies) == []


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_trigger_quiet_on_pure_noise(seed):
    rng = random.Random(seed)
    n = 500
    rewards = [0.5 + rng.gauss(0, 0.05) for _ in range(n)]  # a flat reward is stagnant, but...
    entropies = [0.45 * (1 + rng.gauss(0, 0.12)) for _ in range(n)]  # ...the entropy has no trend
    assert stream_fires(rewards, entropies) == []


def test_warning_needs_a_full_window():
    cfg = AutoConfig(window=5, slope_eps=1.0, entropy_drop=-1.0, min_rise=0.0)
    assert warning([[0.5, 1.0]] * 5, cfg, low=0.5)[0] is False
    assert warning([[0.5, 1.0]] * 6, cfg, low=0.5)[0] is True


def test_warning_needs_progress_first():
    cfg = AutoConfig(window=10)
    entropy = [0.6 * 0.97**i for i in range(11)]  # falling by ~25% over the window
    sparse = [[0.04, h] for h in entropy]  # a sparse start: nearly every group all-wrong, reward flat
    warn, sig = warning(sparse, cfg, low=0.04)
    assert not warn and sig["reward_rise"] == 0.0
    assert sig["reward_slope"] < cfg.slope_eps and sig["entropy_drop"] >= cfg.entropy_drop  # stagnant, collapsing
    assert not warning([[0.04 + 0.9 * cfg.min_rise, h] for h in entropy], cfg, low=0.04)[0]
    warn, sig = warning([[0.1, h] for h in entropy], cfg, low=0.04)  # the same plateau after a rise
    assert warn and sig["reward_rise"] == pytest.approx(0.06)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_controller_never_warns_on_a_flat_sparse_start(seed):
    rng = random.Random(seed)
    c, t = AutoController(AutoConfig(enabled=True), store=None), FakeTrainer()
    for i in range(300):
        t.step_num += 1
        m = {"reward": max(0.0, 0.04 + rng.gauss(0, 0.03)), "entropy": 0.6 * 0.995**i * (1 + rng.gauss(0, 0.12))}
        c.observe(t, m, 0)
        assert c.phase == "watching", (i, c.signals)
        assert m["auto/reward_rise"] < c.cfg.min_rise


# --------------------------------------------------------------------------- D* on synthetic tables


def table(qs, kls, deltas=(10, 20, 40, 80)):
    import math

    return [{"delta": d, "Q": q, "V": math.exp(k)} for d, q, k in zip(deltas, qs, kls)]


def test_select_delta_interior_optimum():
    # Q grows with the distance (older mistakes, stronger guide relative to them), V grows as exp(KL)
    sel = select_delta(table([0.10, 0.30, 0.45, 0.55], [0.05, 0.2, 0.8, 1.6]), min_score=0.05)
    assert sel["confirmed"] and sel["best"]["delta"] == 20
    s = [r["S"] for r in sel["rows"]]
    assert s[1] == max(s) and s[0] < s[1] > s[2] > s[3]


def test_select_delta_edges():
    # monotone S: the largest / smallest distance
    assert select_delta(table([0.1, 0.2, 0.3, 0.4], [0, 0, 0, 0]))["best"]["delta"] == 80
    assert select_delta(table([0.4, 0.4, 0.4, 0.4], [0.0, 0.1, 0.2, 0.3]))["best"]["delta"] == 10
    # ties: the shorter replay
    assert select_delta(table([0.2, 0.2, 0.2, 0.2], [0, 0, 0, 0]))["best"]["delta"] == 10
    # candidates without probed mistakes are skipped; none at all: no decision
    sel = select_delta(table([None, 0.2, None, 0.1], [0, 0, 0, 0]))
    assert sel["best"]["delta"] == 20 and sel["rows"][0]["S"] is None
    sel = select_delta(table([None, None, None, None], [0, 0, 0, 0]))
    assert sel["best"] is None and not sel["confirmed"]
    # the guide solves nothing the old policy failed: not confirmed
    assert not select_delta(table([0.0, 0.01, 0.0, 0.0], [0, 0, 0, 0]), min_score=0.05)["confirmed"]


def scout_rows(*s_values):
    return [{"step": 2 * (i + 1), "Q": s, "V": 1.0, "S": s} for i, s in enumerate(s_values)]


def test_scout_choice():
    assert scout_choice([], 2) is None and scout_choice([], 2, last=True) is None
    # S concave in the scout's length: stop once it stayed below its best for `patience` checks
    assert scout_choice(scout_rows(0.1, 0.3, 0.2), 2) is None
    assert scout_choice(scout_rows(0.1, 0.3, 0.2, 0.25), 2)["step"] == 4
    assert scout_choice(scout_rows(0.1, 0.3, 0.2, 0.25), 3) is None
    assert scout_choice(scout_rows(0.1, 0.3, 0.2, 0.25), 3, last=True)["step"] == 4  # the longest scout
    assert scout_choice(scout_rows(0.1, 0.2), 2, last=True)["step"] == 4  # still rising at the longest
    # ties: the earlier check; a later equal S starts the count again
    assert scout_choice(scout_rows(0.3, 0.3, 0.1), 2) is None
    assert scout_choice(scout_rows(0.3, 0.3, 0.1, 0.1), 2)["step"] == 2
    # no early mistake solved (Q = 0 throughout): no guide, however long the scout
    assert scout_choice(scout_rows(0.0, 0.0, 0.0), 2) is None
    assert scout_choice(scout_rows(0.0, 0.0, 0.0), 2, last=True) is None
    # a best below min_score is no better than the stalled policy's own retries: scout on, then no guide
    assert scout_choice(scout_rows(0.1, 0.2, 0.1, 0.1), 2, min_score=0.25) is None
    assert scout_choice(scout_rows(0.1, 0.2, 0.1, 0.1), 2, last=True, min_score=0.25) is None
    assert scout_choice(scout_rows(0.1, 0.3, 0.1, 0.1), 2, min_score=0.25)["step"] == 4


def test_buckets_and_spread():
    pool = [{"prompt": f"p{s}", "answer": "0", "tags": [], "step": s} for s in range(40)]
    around = members(pool, [30, 20, 10], 40, "around", radius=5)
    assert [it["step"] for it in around[20]] == list(range(16, 26))  # 15 is as near to 10: the older wins
    assert [it["step"] for it in around[30]] == list(range(26, 36))
    assert [it["step"] for it in around[10]] == list(range(5, 16))
    stretch = members(pool, [30, 20], 40, "stretch", radius=5)
    assert [it["step"] for it in stretch[30]] == list(range(30, 40))
    assert len(stretch[20]) == 20
    picks = spread(around, 6)
    assert [it["step"] for it in picks] == [35, 25, 15, 34, 24, 14]  # round robin, newest first


# --------------------------------------------------------------------------- the probe's scale (stub policy)


class StubPolicy:
    """Sampling without a model: prompt -> its completions in order; the judge checks text == answer."""

    def __init__(self, texts: dict[str, list[str]]):
        self.texts = texts

    def generate(self, prompts: list[str], n: int) -> list[list[SimpleNamespace]]:
        out = []
        for prompt in prompts:
            texts = next(v for k, v in self.texts.items() if k in prompt)
            out.append([SimpleNamespace(text=x, completion_ids=[1, 2], finished=True) for x in texts[:n]])
        return out

    def sync(self) -> None:
        pass


def stub_trainer(texts: dict[str, list[str]], steps: list[int], step: int, **auto) -> SimpleNamespace:
    recipe = build_recipe({"npo": {"max_tries": 4}, "train": {"save_every": 2}, "auto": {"enabled": True, **auto}})
    ckpts = [SimpleNamespace(run="r", step=s, id=f"c{s}") for s in sorted(steps, reverse=True)]
    return SimpleNamespace(recipe=recipe, run="r", branch="main", step_num=step, head="h", tokenizer=None,
                           backend=StubPolicy(texts), store=SimpleNamespace(lineage=lambda head: ckpts),
                           judge=lambda prompt, text, answer: float(text == answer), events=[], console=None)


def mistake(prompt: str, step: int) -> dict:
    return {"prompt": prompt, "answer": "7", "tags": [], "step": step}


def test_probe_q_is_solved_within_max_tries(monkeypatch):
    """Q(D) is NPO's Q: a mistake pi_t solves with 1 of npo.max_tries samples counts fully (not 1/4)."""
    t = stub_trainer({"3+4": ["1", "7", "2", "0"], "5+2": ["1", "1", "2", "0"]}, [0, 4, 8], 10,
                     probe_samples=2, min_score=0.5)
    c = AutoController(t.recipe.auto, store=None)
    c.pool = [mistake("5+2", 4), mistake("3+4", 8)]
    kl_rows = []

    def kls(trainer, rows, cands):
        kl_rows.extend(rows)
        return [0.0] * len(cands)

    monkeypatch.setattr(c, "_kls", kls)
    d = c.probe(t)
    q = {r["step"]: r["Q"] for r in d.candidates}
    assert q == {8: 1.0, 4: 0.0, 0: None}
    assert d.confirmed and d.fork_step == 8 and d.S == 1.0
    assert d.probe == {"prompts": 2, "tries": 4, "tokens": 16, "solved": 0.5}
    assert len(kl_rows) == 4  # the KL forwards see probe_samples of each prompt's max_tries
    assert c.compute["probe_tokens"] == 16


def test_scout_state_round_trips(tmp_path):
    """Mid-scout: the early mistakes (apart from the pool, which drops old items), the scout's checks and
    the reward low survive a checkpoint; a state written before them loads."""
    store = open_store(tmp_path / "store")
    cfg = AutoConfig(enabled=True, bootstrap=True, pool_size=2, probe_size=2)
    c = AutoController(cfg, store)
    for i, early in enumerate([True, True, True, False, False]):
        c.note_mistake(Problem.from_json(mistake(f"{i}+1", i)), i, early)
    assert [it["prompt"] for it in c.early] == ["0+1", "1+1"]  # the first probe_size of the early steps
    assert [it["prompt"] for it in c.pool] == ["3+1", "4+1"]
    c.scout, c.low = [{"step": 2, "n": 2, "Q": 0.5, "kl": 0.1, "V": 1.1, "S": 0.45, "tokens": 9}], 0.03
    st = json.loads(json.dumps(c.state_dict()))  # as a manifest stores it
    back = AutoController.from_state(cfg, store, st)
    assert (back.phase, back.early, back.pool, back.scout, back.low) == ("scouting", c.early, c.pool, c.scout, 0.03)
    old = {k: v for k, v in st.items() if k not in ("low", "scout")}
    old["pool"] = store.put_json({"format": "npo-auto-pool/1", "items": c.pool})
    back = AutoController.from_state(cfg, store, old)
    assert back.early == [] and back.scout == [] and back.low is None and back.pool == c.pool


# --------------------------------------------------------------------------- end to end


FORCE = {"enabled": True, "window": 3, "deltas": [2], "slope_eps": 1.0, "entropy_drop": -1.0, "min_rise": 0.0,
         "patience": 1, "min_gap": 0, "max_interventions": 1, "min_score": 0.0, "probe_size": 8, "probe_samples": 4}


def auto_recipe(d: Path, name: str = "a") -> dict:
    return {"name": name, "seed": 0, "model": {"path": "base@0"}, "task": TASK,
            "rollout": {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 4}, "grpo": {"lr": 1e-3},
            "train": {"steps": 8, "save_every": 2, "eval_every": 4},
            "logging": {"progress": False, "metrics_jsonl": str(d.parent / "runs/{run}/{branch}/metrics.jsonl")},
            "auto": FORCE}


@pytest.fixture
def store_dir(npo_base_store, tmp_path, monkeypatch) -> Path:
    return copy_store(npo_base_store, tmp_path, monkeypatch)


def write_recipe(d: Path, data: dict) -> str:
    p = d.parent / "auto.yaml"
    p.write_text(json.dumps(data))  # JSON is YAML
    return str(p)


def final_state(store, ref: str) -> tuple[dict, list[dict], dict]:
    """(model tensor oids, metrics without timings, controller state) of a branch head and its lineage."""
    from npo_cli.checkpoint import load_metrics

    head = store.manifest(ref)
    rows = [m for man in reversed(store.lineage(ref)) for m in load_metrics(store, man)]
    rows = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]
    return {k: e.oids() for k, e in head.model.items()}, rows, head.state.controller


def test_auto_end_to_end(store_dir, monkeypatch, capsys):
    data = auto_recipe(store_dir)
    data["logging"]["progress"] = True  # its status lines go to stderr under --json: stdout is the JSON alone
    recipe = write_recipe(store_dir, data)
    code, out, err = run_main(["auto", recipe, "--store", str(store_dir), "--json"], monkeypatch, capsys)
    assert code == 0, err
    assert "-> roll back to step" in err
    res = json.loads(out)
    a = res["auto"]
    assert a["chain"] == ["main", "auto-1"] and res["branch"] == "auto-1" and res["step"] == 8
    assert a["interventions"] == 1 and a["phase"] == "watching"
    dec = next(e for e in a["events"] if e["kind"] == "auto")
    t, fork = dec["step"], dec["fork_step"]
    assert dec["confirmed"] and dec["delta"] == t - fork and {c["delta"] for c in dec["candidates"]} >= {dec["delta"]}
    assert all({"Q", "V", "S", "kl", "n"} <= set(c) for c in dec["candidates"])
    store = open_store(store_dir)
    # the decision is stored with main@t, which is the guide of the replay branch
    guide = store.resolve(f"a/main@{t}")
    assert any(e.kind == "auto" for e in store.manifest(guide).events)
    own = [m for m in store.lineage("a/auto-1") if m.branch == "auto-1"]
    first = own[-1]
    assert first.step == fork and first.parent == store.resolve(f"a/main@{fork}")
    ev = next(e for e in first.events if e.kind == "auto-branch")
    assert ev.guide == guide and ev.until == t and ev.from_branch == "main"
    assert all(m.guide == guide for m in own)
    # the replay ran with NPO from fork to t, then plain GRPO
    rows = [json.loads(x) for x in Path(res["metrics_jsonl"]).read_text().splitlines()]
    npo_steps = [r["step"] for r in rows if r.get("npo/active")]
    assert npo_steps == list(range(fork + 1, t + 1))
    assert rows[-1]["step"] == 8 and "auto/reward_ema" in rows[-1]
    assert a["compute"]["steps"] == t + (8 - fork) and a["compute"]["probe_tokens"] > 0

    code, out, err = run_main(["ls", "a", "--store", str(store_dir)], monkeypatch, capsys)
    assert code == 0, err
    assert "auto chain: main -> auto-1" in out and "live" in out and "AutoNPO #1" in out
    code, out, err = run_main(["show", f"a/main@{t}", "--store", str(store_dir)], monkeypatch, capsys)
    assert code == 0, err
    assert "rollback candidates" in out and f"roll back D*={dec['delta']}" in out
    # the bare run name is its main branch, which the chain left: a note points at the live branch
    code, out, err = run_main(["show", "a", "--store", str(store_dir)], monkeypatch, capsys)
    assert code == 0 and err == "note: a is a/main; its AutoNPO chain goes on in a/auto-1\n"
    code, out, err = run_main(["ls", "a", "--store", str(store_dir), "--json"], monkeypatch, capsys)
    br = {b["branch"]: b for b in json.loads(out)["runs"][0]["branches"]}
    assert br["auto-1"]["live"] and not br["main"]["live"] and br["auto-1"]["auto"]["k"] == 1


def test_auto_resume_mid_replay_is_exact(npo_base_store, tmp_path, monkeypatch):
    """Ctrl-C one step into the replay, then `npo run --resume RUN` == the same auto run in one go
    (two stores: guide sampling is seeded from the guide's weights, not its checkpoint id)."""
    from npo_cli.commands import auto_run, run_recipe

    monkeypatch.chdir(tmp_path)
    orig = AutoController.after_step

    def interrupt(self, trainer, m):  # a Ctrl-C after the first replayed step
        if self.phase == "replaying" and trainer.step_num == self.replay["start"] + 1:
            trainer._stop_signal = signal.SIGINT
        return orig(self, trainer, m)

    results = {}
    for mode in ("straight", "resumed"):
        d = tmp_path / mode / "store"
        shutil.copytree(npo_base_store, d)
        recipe = write_recipe(d, auto_recipe(d))
        if mode == "resumed":
            monkeypatch.setattr(AutoController, "after_step", interrupt)
            res = auto_run(recipe, [], str(d), None, progress=False)
            monkeypatch.setattr(AutoController, "after_step", orig)
            assert res["stopped_by"] == "SIGINT" and res["branch"] == "auto-1"
            assert res["auto"]["phase"] == "replaying" and res["step"] < res["auto"]["events"][0]["step"]
            res = run_recipe(None, [], str(d), "a", progress=False)  # npo run --resume: the auto driver
        else:
            res = auto_run(recipe, [], str(d), None, progress=False)
        assert res["step"] == 8 and res["auto"]["chain"] == ["main", "auto-1"]
        results[mode] = final_state(open_store(d), "a/auto-1")
    assert results["straight"] == results["resumed"]


def test_resume_between_decision_and_branch(npo_base_store, tmp_path, monkeypatch):
    """A driver killed after the decision checkpoint but before the branch: resume makes the branch."""
    from npo_cli import auto, commands

    monkeypatch.chdir(tmp_path)
    d = tmp_path / "store"
    shutil.copytree(npo_base_store, d)
    recipe = write_recipe(d, auto_recipe(d))

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(auto, "rollback", crash)
    with pytest.raises(KeyboardInterrupt):
        commands.auto_run(recipe, [], str(d), None, progress=False)
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    store = open_store(d)
    assert store.branches("a").keys() == {"main"}

    dead_lease(store, "a", "auto-1")  # killed while it made the branch: its lease is taken over
    res = commands.auto_run(None, [], str(d), "a", progress=False)
    assert res["branch"] == "auto-1" and res["step"] == 8


def test_bootstrap_scout_takes_its_best_check(store_dir, monkeypatch, capsys):
    """auto.bootstrap: the scout measures S at every saved step (an auto-scout event each), stops once S
    stayed below its best for scout_patience checks and restarts from step 0 with the argmax-S checkpoint
    as guide, NPO to its step; interrupted mid-scout and resumed. Then every probe is rejected (its policy
    solves nothing: S = 0 < min_score): decisions are recorded, no branch is made."""
    data = auto_recipe(store_dir)
    data["npo"] = {"max_tries": 4}
    data["auto"] = {**FORCE, "bootstrap": True, "scout_steps": 9, "scout_patience": 2, "min_score": 0.5,
                    "min_gap": 2, "deltas": None}
    data["train"]["steps"] = 10
    recipe = write_recipe(store_dir, data)
    sample, after_step = AutoController._sample, AutoController.after_step

    def staged(self, trainer, items, tag):  # pi_4 alone solves the early mistakes: the best check is not the last
        solved, rows, tokens = sample(self, trainer, items, tag)
        solved = {p: tag == "auto-scout" and trainer.step_num == 4 for p in solved}
        return solved, rows, tokens

    def interrupt(self, trainer, m):  # a Ctrl-C mid-scout, after two checks
        if trainer.step_num == 5:
            trainer._stop_signal = signal.SIGINT
        return after_step(self, trainer, m)

    monkeypatch.setattr(AutoController, "_sample", staged)
    monkeypatch.setattr(AutoController, "after_step", interrupt)
    code, out, err = run_main(["auto", recipe, "--store", str(store_dir), "--json"], monkeypatch, capsys)
    assert code == 130, err
    res = json.loads(out)
    assert res["step"] == 5 and res["auto"]["phase"] == "scouting"
    assert [e["step"] for e in res["auto"]["events"] if e["kind"] == "auto-scout"] == [2, 4]
    monkeypatch.setattr(AutoController, "after_step", after_step)
    code, out, err = run_main(["auto", "--resume", "a", "--store", str(store_dir), "--json"], monkeypatch, capsys)
    assert code == 0, err
    res = json.loads(out)
    a = res["auto"]
    assert a["chain"] == ["main", "auto-boot"] and res["step"] == 10 and a["interventions"] == 0
    assert a["compute"]["steps"] == 8 + 10 and a["compute"]["probe_tokens"] > 0
    kinds = [e["kind"] for e in a["events"] if e["kind"] != "auto-scout"]
    assert kinds[:2] == ["auto-bootstrap", "auto-branch"] and "auto-probe" in kinds and "auto" not in kinds
    scouts = [e for e in a["events"] if e["kind"] == "auto-scout"]
    assert [e["step"] for e in scouts] == [2, 4, 6, 8]  # at 8, S stayed below S(4) for 2 checks
    assert all(e["S"] == pytest.approx(e["Q"] / e["V"]) and e["probe"]["tries"] == 4 for e in scouts)
    best = max(scouts, key=lambda e: e["S"])
    store = open_store(store_dir)
    guide = store.resolve(f"a/main@{best['step']}")
    boot = next(e for e in a["events"] if e["kind"] == "auto-bootstrap")
    assert boot["step"] == 8 and best["step"] == boot["guide_step"] == boot["until"] == 4 and boot["guide"] == guide
    assert [(c["step"], c["S"]) for c in boot["candidates"]] == [(e["step"], e["S"]) for e in scouts]
    assert boot["candidates"][1]["checkpoint"] == guide
    first = [m for m in store.lineage("a/auto-boot") if m.branch == "auto-boot"][-1]
    assert first.step == 0 and first.guide == guide
    ev = next(e for e in first.events if e.kind == "auto-branch")
    assert ev.guide == guide and ev.guide_step == 4 and ev.until == 4
    rows = [json.loads(x) for x in Path(res["metrics_jsonl"]).read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("npo/active")] == [1, 2, 3, 4]
    probe = next(e for e in a["events"] if e["kind"] == "auto-probe")
    assert probe["step"] >= 4 + 2 and "min_score" in probe["reason"] and probe["probe"]["tries"] == 4
    assert all(c["step"] >= 4 for c in probe["candidates"])  # nothing before the end of the last replay
    code, out, err = run_main(["ls", "a", "--store", str(store_dir)], monkeypatch, capsys)
    assert "AutoNPO bootstrap" in out and "main -> auto-boot" in out
    code, out, err = run_main(["show", "a/main@8", "--store", str(store_dir)], monkeypatch, capsys)
    assert code == 0 and "scout checks" in out and "guide step 4" in out and "auto-scout at step 8" in out
    assert "S = Q/V = -" not in out  # Q and V are printed


def test_bootstrap_without_early_mistakes_goes_on(store_dir, monkeypatch, capsys):
    """No all-wrong prompt in the scout's first save_every steps: nothing to bootstrap, the scout is the run."""
    data = auto_recipe(store_dir)
    data["auto"] = {**FORCE, "bootstrap": True, "scout_steps": 4, "max_interventions": 0}
    data["train"]["steps"] = 5
    monkeypatch.setattr(AutoController, "note_mistake", lambda self, *a: None)
    code, out, err = run_main(["auto", write_recipe(store_dir, data), "--store", str(store_dir), "--json"],
                              monkeypatch, capsys)
    assert code == 0, err
    a = json.loads(out)["auto"]
    assert a["chain"] == ["main"] and a["phase"] == "watching" and a["compute"]["probe_tokens"] == 0
    (boot,) = [e for e in a["events"] if e["kind"] == "auto-bootstrap"]
    assert boot["step"] == 2 and not boot["confirmed"] and "no all-wrong prompt" in boot["reason"]


def test_auto_bad_input(store_dir, monkeypatch, capsys):
    data = auto_recipe(store_dir)
    data["npo"] = {"source": "npo", "guide": "base@0"}
    code, _, err = run_main(["auto", write_recipe(store_dir, data), "--store", str(store_dir)], monkeypatch, capsys)
    assert code == 1 and "npo.source=none" in err
    code, _, err = run_main(["auto", "--resume", "base", "--store", str(store_dir)], monkeypatch, capsys)
    assert code == 1 and "not an AutoNPO run" in err
    code, _, err = run_main(["auto", "--resume", "nope", "--store", str(store_dir)], monkeypatch, capsys)
    assert code == 1 and "unknown run" in err


def test_recipe_defaults():
    r = build_recipe({})
    assert r.auto.window == 40 and r.auto.deltas is None and not r.auto.bootstrap
