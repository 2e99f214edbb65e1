"""NPO mixing, the guide-rollout generator and its cache, and each slot source end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import copy_store, open_store

from npo_cli import gc
from npo_cli.batch import Group, NoController, StepContext, collate
from npo_cli.branching import new_trainer, resume_trainer
from npo_cli.errors import NpoError
from npo_cli.grpo import OffPolicy, group_advantages, grpo_loss
from npo_cli.guide import cache_entries, cache_get, cache_put
from npo_cli.metrics import TIMING_KEYS
from npo_cli.recipe import build_recipe
from npo_cli.rollout import Rollout
from npo_cli.sources import SlotSource, make_source, put_slot
from npo_cli.tasks import Problem
from npo_cli.verifiers import make_verifier

TASK = {"arithmetic": {"digits": 1}, "eval_size": 8}
GUIDE_LP = [-0.3, -0.2]


# ---------------------------------------------------------------- hand-built groups


def context(step: int = 0) -> StepContext:
    reward = make_verifier(build_recipe({}).task)
    return StepContext(step=step, judge=reward, reward_fn=reward, tokenizer=None, backend=None)


class FixedSource(SlotSource):
    """Offers the same trajectory (right or wrong) for every gated group."""

    name = "npo"

    def __init__(self, recipe, text: str = "3"):
        super().__init__(recipe, store=None)
        self.text, self.asked = text, []

    def trajectories(self, trainer, groups):
        self.asked.append(len(groups))
        return [Rollout(prompt_ids=[5, 6], completion_ids=[20, 1], logprobs=list(GUIDE_LP), text=self.text,
                        finished=True, source="npo") for _ in groups]


def group(n_correct: int, n: int = 4) -> Group:
    ros = [Rollout(prompt_ids=[5, 6], completion_ids=[20 if i < n_correct else 21, 1], logprobs=[-1.0, -0.5],
                   text="3" if i < n_correct else "4", finished=True) for i in range(n)]
    return Group(problem=Problem("1+2=", "3"), prompt="1+2=", rollouts=ros,
                 rewards=[1.0 if i < n_correct else 0.0 for i in range(n)], correct=[i < n_correct for i in range(n)])


def mixed(groups: list[Group]) -> list[bool]:
    return [any(r.source == "npo" for r in g.rollouts) for g in groups]


@pytest.mark.parametrize("gate, expect", [
    (0.5, [True, True, True, False, False]),  # p̂ == gate mixes; above does not
    (0.0, [True, False, False, False, False]),
    (1.0, [True] * 4 + [False]),  # everything is gated, but an all-correct group has no wrong slot
])
def test_gate_edges(gate, expect):
    src = FixedSource(build_recipe({"npo": {"gate": gate}}))
    gs = [group(k) for k in range(5)]
    src.mix(context(), gs)
    assert mixed(gs) == expect


def test_gate_exact_fraction_and_one_slot():
    src = FixedSource(build_recipe({"npo": {"gate": 0.6}}))
    g = group(3, n=5)  # p̂ = 3/5 == 0.6
    before = list(g.rollouts)
    src.mix(context(), [g])
    assert g.rollouts[:-1] == before[:-1] and all(r.source == "policy" for r in g.rollouts[:-1])
    assert g.rollouts[-1].source == "npo" and g.rewards[-1] == 1.0 and g.correct[-1]
    assert sum(r.source != "policy" for r in g.rollouts) == 1
    assert g.info["offpolicy_slot"] == "npo"


def test_slot_replaces_the_last_wrong_sample():
    g = group(2)
    g.rollouts, g.correct = [g.rollouts[i] for i in (2, 0, 3, 1)], [False, True, False, True]
    g.rewards = [0.0, 1.0, 0.0, 1.0]
    before = list(g.rollouts)
    FixedSource(build_recipe({"npo": {"gate": 0.5}})).mix(context(), [g])
    assert g.rollouts[2].source == "npo" and g.correct == [False, True, True, True] and g.rewards[2] == 1.0
    assert [g.rollouts[i] for i in (0, 1, 3)] == [before[i] for i in (0, 1, 3)]  # the last, correct, stays
    full = group(4)
    assert not put_slot(context(), full, g.rollouts[2]) and mixed([full]) == [False]  # no wrong sample


def test_advantages_over_the_mixed_group_and_metrics():
    src = FixedSource(build_recipe({"npo": {"gate": 0.6}}))
    gs = [group(0), group(1), group(4)]
    src.mix(context(), gs)
    r = torch.tensor([g.rewards for g in gs])
    assert r.tolist() == [[0, 0, 0, 1], [1, 0, 0, 1], [1, 1, 1, 1]]
    adv = group_advantages(r, scale_std=True, eps=1e-4)
    want = (torch.tensor([0, 0, 0, 1.0]) - 0.25) / (torch.tensor([0, 0, 0, 1.0]).std() + 1e-4)
    assert torch.allclose(adv[0], want) and adv[0, -1] > 0 and (adv[2] == 0).all()
    m = src.metrics({"off/kl": 0.1, "off/clip_frac": 0.25, "off/outside": 0.5, "off/pos_adv_share": 0.6})
    assert m["npo/gated_frac"] == pytest.approx(2 / 3) and m["npo/hit_rate"] == 1.0 and m["npo/Q"] == 1.0
    assert m["npo/kl"] == 0.1 and m["npo/V"] == pytest.approx(math.exp(0.1))
    assert m["npo/S"] == pytest.approx(1 / math.exp(0.1)) and m["npo/guide_clip_frac"] == 0.25
    assert m["npo/guide_pos_adv_share"] == 0.6


def test_ratio_uses_guide_logprobs_and_importance_switch():
    g = group(0)
    FixedSource(build_recipe({"npo": {"gate": 0.6}})).mix(context(), [g])
    b = collate(g.rollouts, pad_id=0, device="cpu")
    assert b["offpolicy"].tolist() == [False, False, False, True]
    assert b["old_logp"][-1].tolist() == pytest.approx(GUIDE_LP)  # the guide's, not the policy's
    adv = group_advantages(torch.tensor([g.rewards]), True, 1e-4).reshape(-1)
    cur = torch.tensor([[-1.0, -0.5]] * 3 + [[-0.25, -0.3]])  # current policy log-probs
    for is_on in (True, False):
        npo = build_recipe({"npo": {"source": "npo", "importance_sampling": is_on}}).npo
        logp = cur.clone().requires_grad_(True)
        old = torch.where(b["offpolicy"][:, None], b["old_logp"], logp.detach())  # as Trainer.update does
        loss, st = grpo_loss(logp, old, adv, b["mask"], clip_low=0.2, clip_high=0.28,
                             offpolicy=OffPolicy.from_config(b["offpolicy"], npo))
        loss.backward()
        ratio = torch.exp(cur[-1] - torch.tensor(GUIDE_LP))
        assert st["off/ratio_mean"] == pytest.approx(float(ratio.mean()), rel=1e-5)
        # d loss / d logp of a guide token: -A * ratio / tokens (in the clip band), ratio 1 with IS off
        want = -adv[-1] * (ratio if is_on else torch.ones(2)) / 8
        assert torch.allclose(logp.grad[-1], want, rtol=1e-5), (is_on, logp.grad[-1], want)


def test_wrong_guide_answer_never_enters_and_window():
    src = FixedSource(build_recipe({"npo": {"gate": 1.0}}), text="5")
    gs = [group(0), group(2)]
    src.mix(context(), gs)
    assert mixed(gs) == [False, False] and [g.rewards for g in gs] == [[0] * 4, [1, 1, 0, 0]]
    assert src.metrics()["npo/hit_rate"] == 0.0
    assert not put_slot(context(), gs[0], gs[1].rollouts[-1])  # a wrong rollout: refused
    src = FixedSource(build_recipe({"npo": {"start": 2, "until": 4}}))
    for step, on in [(1, False), (2, True), (3, True), (4, False)]:
        gs = [group(0)]
        src.mix(context(step), gs)
        assert mixed(gs) == [on] and bool(src.metrics()) == on


# ---------------------------------------------------------------- the guide generator and its cache


@pytest.fixture
def store_dir(npo_base_store, tmp_path, monkeypatch) -> Path:
    return copy_store(npo_base_store, tmp_path, monkeypatch)


def second_guide(store) -> str:
    """Run 'g2' step 0: the base model with perturbed weights (another guide checkpoint)."""
    from npo_cli.checkpoint import load_model, save_checkpoint

    model, tok, _ = load_model(store, "base@0")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return save_checkpoint(store, run="g2", branch="main", step=0, model=model, tokenizer=tok)


def test_guide_cache_keyed_by_guide_and_hits(store_dir):
    from npo_cli.guide import GuideGenerator
    from npo_cli.tasks import load_problems

    store = open_store(store_dir)
    g2 = second_guide(store)
    recipe = build_recipe({"task": TASK, "rollout": {"max_new_tokens": 4}, "npo": {"max_tries": 6}})
    items = [(p.prompt, p) for p in load_problems(recipe.task, "train", 0)[:6]]
    a, b = GuideGenerator(store, "base@0", recipe), GuideGenerator(store, "g2", recipe)
    rng = torch.get_rng_state()
    ea = a.get(items, seed=1)
    eb = b.get(items, seed=1)
    assert torch.equal(rng, torch.get_rng_state())  # the caller's RNG stream is untouched
    assert a.stats.sampled == 6 and a.stats.samples >= 6 and a.stats.tokens > 0 and a.stats.seconds > 0
    assert any(e is not None for e in ea) and any(e is not None for e in eb)
    ka, kb = cache_entries(store, a.guide_id), cache_entries(store, g2)
    assert len(ka) == len(kb) == 6 and not set(ka) & set(kb)  # separate entries per guide
    for e in ea:
        if e is not None:
            assert e["guide"] == a.guide_id and e["tries"] <= 6 and len(e["logprobs"]) == len(e["completion_ids"])
            assert a.correct(e["text"], next(p for q, p in items if q == e["prompt"]))
    again = GuideGenerator(store, "base@0", recipe)  # a fresh process: all hits, nothing sampled
    assert again.get(items, seed=99) == ea and again.stats.hits == 6 and again.stats.sampled == 0
    # entries survive gc while the guide is reachable, and verify sees them
    gc.collect(store)
    assert GuideGenerator(store, g2, recipe).get(items, seed=5) == eb
    assert gc.verify(store)["ok"]
    # other sampling settings are other keys
    other = GuideGenerator(store, "base@0", build_recipe({**recipe.model_dump(), "rollout": {"max_new_tokens": 5}}))
    prompt, problem = items[0]
    assert other.key(prompt, problem.answer) != a.key(prompt, problem.answer)
    # once the guide is unreachable, gc drops its cache (refs and objects); other guides keep theirs
    (store_dir / "runs" / "g2" / "branches" / "main").unlink()
    rep = gc.collect(store, keep_recent=0)
    assert rep["objects"] > 0 and cache_entries(store, g2) == {} and len(cache_entries(store, a.guide_id)) == 6
    assert gc.verify(store)["ok"]


def test_guide_never_returns_a_wrong_answer(store_dir):
    from npo_cli.guide import CACHE_FORMAT, GuideGenerator

    store = open_store(store_dir)
    recipe = build_recipe({"task": TASK, "rollout": {"max_new_tokens": 4}, "npo": {"max_tries": 3}})
    gen = GuideGenerator(store, "base@0", recipe)
    impossible = [("1+2=", Problem("1+2=", "zzz"))]
    assert gen.get(impossible, seed=0) == [None]
    oid = cache_get(store, gen.guide_id, gen.key("1+2=", "zzz"))
    entry = store.get_json(oid)
    assert entry["found"] is False and entry["tries"] == 3
    assert gen.get(impossible, seed=0) == [None] and gen.stats.hits == 1 and gen.stats.sampled == 1
    # a tampered entry claiming a wrong answer is ignored (and resampled)
    bad = {"format": CACHE_FORMAT, "guide": gen.guide_id, "prompt": "1+2=", "answer": "3", "found": True,
           "tries": 1, "prompt_ids": [1], "completion_ids": [9, 1], "logprobs": [0.0, 0.0], "text": "9",
           "finished": True}
    cache_put(store, gen.guide_id, gen.key("1+2=", "3"), store.put_json(bad))
    assert gen.lookup("1+2=", Problem("1+2=", "3")) is None


# ---------------------------------------------------------------- each source end to end


def recipe_dict(**over) -> dict:
    d = {"name": "r", "seed": 0, "model": {"path": "base@0"}, "task": TASK,
         "rollout": {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 4},
         "grpo": {"lr": 1e-3}, "train": {"steps": 4, "save_every": 2, "eval_every": 100},
         "logging": {"progress": False}}
    for k, v in over.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    return d


def strip(ms: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS and not k.startswith(("eval/", "npo/guide_tokens"))}
            for m in ms]


class StopAt(NoController):
    def __init__(self, step: int):
        self.at = step

    def after_step(self, trainer, metrics) -> bool:
        return trainer.step_num == self.at


@pytest.fixture
def finished_run(store_dir):
    """Run 'r': 4 plain GRPO steps (checkpoints 0, 2, 4) that record their successes."""
    store = open_store(store_dir)
    new_trainer(build_recipe(recipe_dict(train={"record_successes": True})), store).train()
    return store


def stored_successes(store, ref: str) -> list[dict]:
    """The successes recorded on the lineage of `ref`, as its checkpoints stored them, oldest first."""
    out = []
    for m in reversed(store.lineage(ref)):
        if m.state.successes:
            assert m.state.successes in m.extra_objects
            obj = store.get_json(m.state.successes)
            assert obj["format"] == "npo-successes/1"
            out += obj["items"]
    return out


def test_npo_source_cold_and_warm_cache_train_identically(finished_run):
    store = finished_run
    d = recipe_dict(name="n", npo={"source": "npo", "guide": "r@4", "gate": 0.75})
    a = new_trainer(build_recipe(d), store)
    a.train()
    b = new_trainer(build_recipe({**d, "name": "n2"}), store)  # same prompts: every guide lookup hits
    b.train()
    assert sum(m.get("npo/slots", 0) for m in a.history) > 0
    assert all("npo/gated_frac" in m and "npo/hit_rate" in m for m in a.history)
    assert any("npo/kl" in m and "npo/V" in m for m in a.history)
    assert sum(m["npo/guide_tokens"] for m in a.history) > 0 and sum(m["npo/guide_tokens"] for m in b.history) == 0
    assert strip(a.history) == strip(b.history)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    assert {m.guide for m in store.lineage("n") if m.step > 0} == {store.resolve("r@4")}


def test_exgrpo_replays_and_its_buffer_survives_resume(store_dir):
    store = open_store(store_dir)
    d = recipe_dict(name="x", npo={"source": "exgrpo", "replay_ratio": 0.5, "gate": 0.75},
                    train={"steps": 5, "save_every": 2})
    a = new_trainer(build_recipe(d), store)
    a.train()
    assert sum(m.get("npo/replay_prompts", 0) for m in a.history) > 0
    assert sum(m.get("npo/slots", 0) for m in a.history) > 0 and any("npo/V" in m for m in a.history)
    b = new_trainer(build_recipe({**d, "name": "x2"}), store, controller=StopAt(3))
    b.train()
    head = store.manifest("x2")
    assert head.step == 3 and head.state.source["replay"] in head.extra_objects
    gc.collect(store)  # the buffer objects are reachable from the checkpoint
    c = resume_trainer(store, "x2")
    assert c.source.buffer == b.source.buffer
    c.train()
    assert strip(a.history) == strip(b.history + c.history)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), c.model.parameters()))


def test_luffy_teacher_file(store_dir, tmp_path):
    from npo_cli.tasks import load_problems

    store = open_store(store_dir)
    teacher = tmp_path / "teacher.jsonl"
    probs = load_problems(build_recipe({"task": TASK}).task, "train", 0)
    teacher.write_text("".join(json.dumps({"prompt": p.prompt, "completion": p.answer}) + "\n" for p in probs))
    t = new_trainer(build_recipe(recipe_dict(name="l", npo={"source": "luffy", "teacher_path": str(teacher)})),
                    store)
    t.train()
    assert all(m["npo/hit_rate"] == 1.0 for m in t.history if m["npo/gated_frac"] > 0)
    assert sum(m["off/rows"] for m in t.history if "off/rows" in m) > 0
    assert not any("npo/kl" in m for m in t.history)  # teacher log-probs unknown: no V / S
    with pytest.raises(NpoError, match="teacher_path"):
        make_source(build_recipe(recipe_dict(npo={"source": "luffy"})), store)


def test_exgrpo_samples_as_many_rollouts_as_grpo(store_dir):
    store = open_store(store_dir)
    t = new_trainer(build_recipe(recipe_dict(name="xb", npo={"source": "exgrpo", "gate": 0.75},
                                             train={"steps": 5, "save_every": 5})), store)
    batches = []  # the prompts of each step's rollout
    real = t.backend.generate

    def generate(prompts, n, greedy=False):
        if n == 4 and not greedy:  # not the eval's
            batches.append(list(prompts))
        return real(prompts, n, greedy)

    t.backend.generate = generate
    t.train()
    assert [len(b) for b in batches] == [4] * 5 and t.samples_seen == 5 * 4 * 4
    assert t.epoch * len(t.train_problems) + t.pos == 5 * 4  # the displaced fresh prompts are skipped
    replayed = [int(m.get("npo/replay_prompts", 0)) for m in t.history]
    assert sum(replayed) > 0 and max(replayed) <= 2  # round(0.5 * 4): the default ratio, ExGRPO's rho
    for i, (batch, k) in enumerate(zip(batches, replayed)):  # experience prompts take the last places
        assert all(any(p in b for b in batches[:i]) for p in batch[len(batch) - k :])
    for m, k in zip(t.history, replayed):  # the fresh prompts' accuracy leaves the experience prompts out
        if k == 0:
            assert m["npo/fresh_accuracy"] == pytest.approx(m["accuracy"])
    assert any(m["npo/fresh_accuracy"] != pytest.approx(m["accuracy"]) for m, k in zip(t.history, replayed) if k)


def test_record_successes(finished_run):
    from npo_cli.checkpoint import load_metrics

    store = finished_run
    lineage = list(reversed(store.lineage("r")))
    assert [m.step for m in lineage] == [0, 2, 4] and lineage[0].state.successes is None
    items = stored_successes(store, "r")
    # every step's verified on-policy successes, as many as its accuracy says
    acc = [row["accuracy"] for m in lineage for row in load_metrics(store, m)]
    assert [sum(it["step"] == s for it in items) for s in range(4)] == [round(a * 16) for a in acc] and items
    judge = make_verifier(build_recipe({"task": TASK}).task)
    for it in items:
        assert judge(it["problem"]["prompt"], it["text"], it["problem"]["answer"]) >= 1.0
        assert len(it["logprobs"]) == len(it["completion_ids"]) > 0 and it["prompt_ids"]
    # a stop and a resume record the same successes, none lost or twice
    d = recipe_dict(name="r2", train={"record_successes": True})
    new_trainer(build_recipe(d), store, controller=StopAt(3)).train()
    resume_trainer(store, "r2").train()
    assert [m.step for m in store.lineage("r2")] == [4, 3, 2, 0] and stored_successes(store, "r2") == items
    gc.collect(store, keep_recent=0)
    assert all(store.has(m.state.successes) for m in lineage[1:]) and gc.verify(store)["ok"]


def test_rlep_replays_recorded_trajectories(finished_run, store_dir):
    store = finished_run
    recorded: dict[str, list[dict]] = {}
    for it in stored_successes(store, "r"):
        recorded.setdefault(it["prompt"], []).append(it)
    t = new_trainer(build_recipe(recipe_dict(name="p", npo={"source": "rlep", "replay_from": "r"})), store)
    slots = []  # (prompt, rollout) of every slot the source filled
    mix = t.source.mix

    def spy(ctx, groups):
        out = mix(ctx, groups)
        slots.extend((g.prompt, ro) for g in out for ro in g.rollouts if ro.source == "rlep")
        return out

    t.source.mix = spy
    t.train()
    assert slots and sum(m["npo/slots"] for m in t.history) == len(slots) and "npo/active" in t.history[0]
    keys = ("prompt_ids", "completion_ids", "logprobs", "text")
    for prompt, ro in slots:  # the recorded run's own tokens and behaviour log-probs, nothing sampled
        assert any([getattr(ro, k) for k in keys] == [it[k] for k in keys] for it in recorded[prompt])
    assert sum(m["npo/guide_tokens"] for m in t.history) == 0 and any("npo/kl" in m for m in t.history)
    assert store.manifest("p").guide == store.resolve("r")
    # the replayed run's successes stay while the replaying run links it, even without its own ref
    r4 = store.resolve("r")
    (store_dir / "runs" / "r" / "branches" / "main").unlink()
    gc.collect(store, keep_recent=0)
    assert gc.verify(store)["ok"]
    src = make_source(build_recipe(recipe_dict(npo={"source": "rlep", "replay_from": r4})), store)
    assert src.table == recorded
    # the slot's prompt must be the policy's own tokens
    it = next(iter(recorded.values()))[0]
    other = Rollout(prompt_ids=[1, 2], completion_ids=[3], logprobs=[-1.0], text="x", finished=True)
    g = Group(problem=Problem.from_json(it["problem"]), prompt=it["prompt"], rollouts=[other], rewards=[0.0],
              correct=[False])
    with pytest.raises(NpoError, match="same tokenizer"):
        src.trajectories(context(), [g])
    with pytest.raises(NpoError, match="replay_from"):
        make_source(build_recipe(recipe_dict(npo={"source": "rlep"})), store)
    with pytest.raises(NpoError, match="recorded no successes.*train.record_successes=true"):
        make_source(build_recipe(recipe_dict(npo={"source": "rlep", "replay_from": "base"})), store)


def test_luffy_teacher_checkpoint(finished_run):
    """LUFFY with a teacher checkpoint instead of a file: its own ids and log-probs, LUFFY shaping."""
    store = finished_run
    t = new_trainer(build_recipe(recipe_dict(name="lc", npo={"source": "luffy", "guide": "r@4"},
                                             train={"steps": 2})), store)
    t.train()
    assert sum(m.get("npo/slots", 0) for m in t.history) > 0 and store.manifest("lc").guide == store.resolve("r@4")


def test_exgrpo_prefers_medium_difficulty():
    from npo_cli.sources import ExGRPOSource

    src = ExGRPOSource(build_recipe({"npo": {"source": "exgrpo"}}), store=None)
    traj = {"completion_ids": [1], "logprobs": [-1.0], "text": "", "finished": True, "step": 0}
    src.buffer = {p: {"acc": acc, "trajs": [traj]} for p, acc in [("easy", 0.875), ("mid", 0.5), ("hard", 0.125)]}
    counts = {"easy": 0, "mid": 0, "hard": 0}
    for step in range(300):
        counts[next(iter(src.pick(1, set(), step)))] += 1
    assert counts["mid"] > 2 * max(counts["easy"], counts["hard"]) and min(counts.values()) > 0
    assert set(src.pick(3, {"mid"}, 0)) == {"easy", "hard"}  # prompts of this batch are not replayed


def test_npo_guide_cli_prefills(finished_run, store_dir):
    from typer.testing import CliRunner

    from npo_cli.cli import app

    out = CliRunner().invoke(app, ["guide", "--guide", "r@4", "--limit", "8", "--store", str(store_dir), "--json"])
    assert out.exit_code == 0, out.output
    res = json.loads(out.output)
    assert res["prompts"] == 8 and res["sampled"] == 8 and res["cache_hits"] == 0
    assert len(cache_entries(finished_run, res["guide"])) == 8
    out = CliRunner().invoke(app, ["guide", "--guide", "r@4", "--limit", "8", "--store", str(store_dir), "--json"])
    assert json.loads(out.output)["cache_hits"] == 8
