"""AutoNPO: the warning on synthetic metric streams, D* on synthetic tables, an end-to-end auto run
(rollback branch, guide, replay, events in ls/show), and exact resume in the middle of a replay."""

from __future__ import annotations

import json
import random
import shutil
import signal
from pathlib import Path

import pytest
from conftest import copy_store, dead_lease, open_store, run_main

from npo_cli.auto import AutoController, members, select_delta, spread, warning
from npo_cli.errors import NpoError
from npo_cli.metrics import TIMING_KEYS
from npo_cli.recipe import AutoConfig, build_recipe

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
    cfg = AutoConfig(window=5, slope_eps=1.0, entropy_drop=-1.0)
    assert warning([[0.5, 1.0]] * 5, cfg)[0] is False
    assert warning([[0.5, 1.0]] * 6, cfg)[0] is True


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


# --------------------------------------------------------------------------- end to end


FORCE = {"enabled": True, "window": 3, "deltas": [2], "slope_eps": 1.0, "entropy_drop": -1.0, "patience": 1, "min_gap": 0,
         "max_interventions": 1, "min_score": 0.0, "probe_size": 8, "probe_samples": 4}


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

    dead_lease(store, "a", "auto-1")  # killed while it made the branch: --force breaks that lease
    with pytest.raises(NpoError, match="that process is gone; pass --force"):
        commands.auto_run(None, [], str(d), "a", progress=False)
    res = commands.auto_run(None, [], str(d), "a", progress=False, force=True)
    assert res["branch"] == "auto-1" and res["step"] == 8


def test_bootstrap_then_rejected_probes(store_dir, monkeypatch, capsys):
    """auto.bootstrap: scout to step 2, restart from 0 with the scout as guide; then every probe is
    rejected (min_score out of reach): decisions are recorded, no branch is made."""
    data = auto_recipe(store_dir)
    data["auto"] = {**FORCE, "bootstrap": True, "scout_steps": 2, "min_score": 10.0, "min_gap": 2, "deltas": None}
    data["train"]["steps"] = 7
    code, out, err = run_main(["auto", write_recipe(store_dir, data), "--store", str(store_dir), "--json"],
                              monkeypatch, capsys)
    assert code == 0, err
    res = json.loads(out)
    a = res["auto"]
    assert a["chain"] == ["main", "auto-boot"] and res["step"] == 7 and a["interventions"] == 0
    kinds = [e["kind"] for e in a["events"]]
    assert kinds[:2] == ["auto-bootstrap", "auto-branch"] and "auto-probe" in kinds and "auto" not in kinds
    probe = next(e for e in a["events"] if e["kind"] == "auto-probe")
    assert probe["step"] >= 2 + 2 and "min_score" in probe["reason"]
    assert all(c["step"] >= 2 for c in probe["candidates"])  # nothing before the end of the last replay
    store = open_store(store_dir)
    first = [m for m in store.lineage("a/auto-boot") if m.branch == "auto-boot"][-1]
    assert first.step == 0 and first.guide == store.resolve("a/main@2")
    rows = [json.loads(x) for x in Path(res["metrics_jsonl"]).read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("npo/active")] == [1, 2]
    code, out, err = run_main(["ls", "a", "--store", str(store_dir)], monkeypatch, capsys)
    assert "AutoNPO bootstrap" in out and "main -> auto-boot" in out


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
