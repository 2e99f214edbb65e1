"""GRPO loss, advantages and chunked log-probs on hand-computed examples, plus parity with TRL 1.16."""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from npo_cli.grpo import OffPolicy, group_advantages, grpo_loss, token_logprobs
from npo_cli.tiny import tiny_config

CLIP = {"clip_low": 0.2, "clip_high": 0.28}


def one_token(ratio, adv, **kw):
    """Loss and d loss / d logp for one token with the given ratio pi/pi_old and advantage."""
    logp = torch.tensor([[math.log(0.5)]], requires_grad=True)
    old = logp.detach() - math.log(ratio)
    loss, stats = grpo_loss(logp, old, torch.tensor([adv]), torch.ones(1, 1), **CLIP, **kw)
    loss.backward()
    return loss.item(), logp.grad.item(), stats


# ---------- advantages ----------

def test_advantages_std_scaled_unbiased():
    # r = [1,0,0,0]: mean .25; deviations .75, -.25 x3; sum sq = .5625 + 3*.0625 = .75;
    # unbiased var = .75 / 3 = .25 -> std .5 (TRL's nanstd is unbiased)
    adv = group_advantages(torch.tensor([[1.0, 0, 0, 0]]), scale_std=True, eps=1e-4)
    assert torch.allclose(adv, torch.tensor([[0.75, -0.25, -0.25, -0.25]]) / 0.5001)


def test_advantages_dr_grpo_unscaled():
    adv = group_advantages(torch.tensor([[1.0, 0, 0, 0], [2.0, 1, 0, 1]]), scale_std=False, eps=1e-4)
    assert torch.allclose(adv, torch.tensor([[0.75, -0.25, -0.25, -0.25], [1.0, 0, -1, 0]]))


def test_equal_rewards_zero_advantage_and_zero_gradient():
    adv = group_advantages(torch.tensor([[0.1] * 8, [1.0] * 8, [0.0] * 8]), scale_std=True, eps=1e-4)
    assert torch.equal(adv, torch.zeros(3, 8))  # exactly 0, also for 0.1 where the mean has float residue
    logp = torch.randn(24, 5, requires_grad=True)
    loss, _ = grpo_loss(logp, logp.detach() + 0.3, adv.reshape(-1), torch.ones(24, 5), **CLIP)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logp.grad, torch.zeros(24, 5))


# ---------- clipping ----------

def test_clip_upper_edge_positive_advantage_no_gradient():
    # ratio 1.5 > 1.28, A = +1: -min(1.5, 1.28) = -1.28, the clipped branch is constant -> grad 0
    loss, grad, stats = one_token(1.5, 1.0)
    assert loss == pytest.approx(-1.28) and grad == 0.0
    assert stats["clip_frac_high"] == 1.0 and stats["clip_frac"] == 1.0 and stats["clip_frac_low"] == 0.0


def test_clip_lower_edge_negative_advantage_no_gradient():
    # ratio 0.5 < 0.8, A = -1: -min(-0.5, -0.8) = 0.8, constant -> grad 0
    loss, grad, stats = one_token(0.5, -1.0)
    assert loss == pytest.approx(0.8) and grad == 0.0
    assert stats["clip_frac_low"] == 1.0 and stats["clip_frac_high"] == 0.0


def test_unclipped_sides_keep_gradient():
    # inside the band: loss -rho*A, d/dlogp = -rho*A
    loss, grad, _ = one_token(1.1, 1.0)
    assert loss == pytest.approx(-1.1) and grad == pytest.approx(-1.1)
    # ratio 0.5 with A > 0: min(0.5, 0.8) = 0.5 (unclipped branch) -> grad -0.5
    loss, grad, st = one_token(0.5, 1.0)
    assert loss == pytest.approx(-0.5) and grad == pytest.approx(-0.5) and st["clip_frac"] == 0.0
    # ratio 1.5 with A < 0: -min(-1.5, -1.28) = 1.5 -> grad +1.5 (pessimistic side is never clipped)
    loss, grad, st = one_token(1.5, -1.0)
    assert loss == pytest.approx(1.5) and grad == pytest.approx(1.5) and st["clip_frac"] == 0.0


# ---------- aggregation ----------

RAGGED = torch.tensor([[1.0, 1, 1], [1, 0, 0]])


@pytest.mark.parametrize("agg, want", [
    ("token-mean", (-3 + 2) / 4),        # per-token loss -A: row0 = -1 x3, row1 = +2 x1; 4 tokens
    ("seq-mean", (-3 / 3 + 2 / 1) / 2),  # mean per row, then over 2 rows = 0.5
    ("constant", (-3 + 2) / (2 * 4)),    # Dr.GRPO: sum / (B * max_len), max_len = 4
])
def test_aggregation_modes_ragged(agg, want):
    logp = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -2.0])
    loss, stats = grpo_loss(logp, logp, adv, RAGGED, agg=agg, max_len=4, **CLIP)
    assert float(loss) == pytest.approx(want)
    assert stats["tokens"] == 4 and stats["ratio_mean"] == 1.0
    # micro-batches with the full batch's normalisers sum to the full-batch loss
    parts = [grpo_loss(logp[i : i + 1], logp[i : i + 1], adv[i : i + 1], RAGGED[i : i + 1], agg=agg, max_len=4,
                       num_tokens=4, num_seqs=2, **CLIP)[0] for i in range(2)]
    assert float(sum(parts)) == pytest.approx(want)


def test_kl_term_k3():
    # logp = log .5, ref = log .25: d = ref - logp = log .5; k3 = e^d - d - 1 = .5 + .693147 - 1 = .193147
    logp = torch.full((1, 2), math.log(0.5))
    ref = torch.full((1, 2), math.log(0.25))
    k3 = 0.5 + math.log(2) - 1
    loss, stats = grpo_loss(logp, logp, torch.zeros(1), torch.ones(1, 2), ref_logp=ref, kl_coef=0.1, **CLIP)
    assert float(loss) == pytest.approx(0.1 * k3, rel=1e-6) and stats["kl"] == pytest.approx(k3, rel=1e-6)


# ---------- off-policy slots ----------

def off_batch(mode, adv=(1.0, 1.0), ratio=1.5, **kw):
    """Row 0 on-policy, row 1 off-policy, both with ratio `ratio`; returns loss, grads, stats."""
    logp = torch.full((2, 1), math.log(0.3), requires_grad=True)
    old = logp.detach() - math.log(ratio)
    op = OffPolicy(rows=torch.tensor([False, True]), mode=mode, **kw)
    loss, stats = grpo_loss(logp, old, torch.tensor(adv), torch.ones(2, 1), agg="seq-mean", **CLIP, offpolicy=op)
    loss.backward()
    return loss.item(), logp.grad.reshape(-1).tolist(), stats


def test_offpolicy_same_clip_and_stats():
    # both rows: ratio 1.5 clipped to 1.28 (A > 0) -> no gradient; seq-mean loss = -(1.28 + 1.28) / 2
    loss, grads, st = off_batch("same")
    assert loss == pytest.approx(-1.28) and grads == [0.0, 0.0]
    assert st["off/clip_frac"] == 1.0 and st["off/clip_frac_high"] == 1.0 and st["clip_frac"] == 1.0
    assert st["off/ratio_mean"] == pytest.approx(1.5) and st["off/outside"] == 1.0
    assert st["off/rows"] == 1 and st["off/pos_adv_share"] == pytest.approx(0.5)
    # k3 KL(behaviour || theta) with r = 1.5: r - 1 - log r
    assert st["off/kl"] == pytest.approx(0.5 - math.log(1.5), rel=1e-5)


def test_offpolicy_wide_upper_bound():
    # off row bound 1 + 1.0 = 2: ratio 1.5 unclipped -> loss -1.5/2, grad -1.5 * A / 2 (seq-mean over 2 rows)
    loss, grads, st = off_batch("wide", clip_high=1.0)
    assert loss == pytest.approx((-1.28 - 1.5) / 2)
    assert grads[0] == 0.0 and grads[1] == pytest.approx(-0.75)
    assert st["off/clip_frac"] == 0.0 and st["clip_frac"] == 1.0
    with pytest.raises(ValueError):
        off_batch("wide")


def test_offpolicy_luffy_shaping():
    # p = .3, gamma = .1: f = .3/.4 = .75; d f / d logp = p * gamma / (p + gamma)^2 = .03 / .16 = .1875
    # off row loss -f * A = -.75 (A = 1); seq-mean over 2 rows; the behaviour log-prob is unused
    loss, grads, st = off_batch("luffy", ratio=1e30, adv=(0.0, 1.0), gamma=0.1)
    assert loss == pytest.approx(-0.75 / 2)
    assert grads == [0.0, pytest.approx(-0.1875 / 2)]
    assert st["off/clip_frac"] == 0.0


def test_offpolicy_no_importance_sampling_ratio_one():
    # true ratio 3 would be clipped; with IS off the ratio is 1 in value, gradient d logp:
    # loss -1 * A, grad -A  (A = 2, seq-mean over 2 rows, row 0 has A = 0)
    loss, grads, st = off_batch("same", ratio=3.0, adv=(0.0, 2.0), importance_sampling=False)
    assert loss == pytest.approx(-2.0 / 2) and grads == [0.0, pytest.approx(-1.0)]
    assert st["off/clip_frac"] == 0.0 and st["off/ratio_mean"] == pytest.approx(3.0)
    assert st["off/pos_adv_share"] == 1.0


def test_offpolicy_dict_and_from_config():
    from npo_cli.recipe import NPOConfig
    logp = torch.zeros(3, 2)
    adv = torch.tensor([1.0, 0.5, -1.0])
    rows = torch.tensor([False, True, False])
    _, st = grpo_loss(logp, logp, adv, torch.ones(3, 2), **CLIP, offpolicy={"rows": rows})
    assert st["off/pos_adv_share"] == pytest.approx(0.5 / 1.5)
    op = OffPolicy.from_config(rows, NPOConfig(source="luffy", luffy_gamma=0.2))
    assert op.mode == "luffy" and op.gamma == 0.2
    op = OffPolicy.from_config(rows, NPOConfig(source="npo", guide_clip="wide", guide_clip_high=0.5))
    assert op.mode == "wide" and op.clip_high == 0.5 and op.importance_sampling
    _, st = grpo_loss(logp, logp, adv, torch.ones(3, 2), **CLIP)
    assert not any(k.startswith("off/") for k in st)


# ---------- chunked log-probs ----------

@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config())


def naive(model, ids, am, n, temperature=1.0):
    pos = (am.cumsum(-1) - 1).clamp(min=0)  # as HF generate does for left-padded prompts
    logits = model(input_ids=ids, attention_mask=am, position_ids=pos).logits.float() / temperature
    lsm = torch.log_softmax(logits[:, -n - 1 : -1], -1)
    return lsm.gather(-1, ids[:, -n:, None]).squeeze(-1), -(lsm.exp() * lsm).sum(-1)


# 0: auto (here: all 15 tokens in one chunk); compiled: the torch.compile'd head (grpo.compile), recomputed
@pytest.mark.parametrize("chunk,compiled", [(1, False), (7, False), (10_000, False), (0, False), (7, True)])
def test_token_logprobs_matches_naive(tiny, chunk, compiled):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (3, 12), generator=g)
    am = torch.ones_like(ids)
    am[0, :4] = 0  # left padding
    am[1, -2:] = 0  # right padding after an early EOS
    lp, ent = token_logprobs(tiny, ids, am, 5, chunk, temperature=0.7, compiled=compiled)
    want_lp, want_ent = naive(tiny, ids, am, 5, temperature=0.7)
    assert lp.shape == (3, 5) and torch.allclose(lp, want_lp, atol=1e-5)
    assert torch.allclose(ent, want_ent, atol=1e-5)
    # gradients through the checkpointed chunks equal the naive ones
    tiny.zero_grad()
    lp.sum().backward()
    got = [p.grad.clone() for p in tiny.parameters()]
    tiny.zero_grad()
    want_lp.sum().backward()
    for a, (name, p) in zip(got, tiny.named_parameters()):
        assert torch.allclose(a, p.grad, atol=1e-5), name
    tiny.zero_grad()
    lp2, none = token_logprobs(tiny, ids, am, 5, chunk, with_entropy=False, temperature=0.7, compiled=compiled)
    assert none is None and torch.allclose(lp2, lp)


def test_auto_chunk_sizes_to_free_memory(monkeypatch):
    from npo_cli import grpo

    assert grpo.free_memory(torch.device("cpu")) > 0  # the real reading
    V = 151_936
    per_token = grpo.BYTES_PER_LOGIT * V
    monkeypatch.setattr(grpo, "free_memory", lambda device: 2 * 10_000 * per_token)
    assert grpo.auto_chunk(16_384, V, torch.device("cpu")) == 10_000  # half the free memory's worth
    assert grpo.auto_chunk(4_096, V, torch.device("cpu")) == 4_096  # all fit: one chunk, no recompute
    monkeypatch.setattr(grpo, "free_memory", lambda device: 0)
    assert grpo.auto_chunk(16_384, V, torch.device("cpu")) == 256  # floor: progress over a tight fit


def test_auto_chunk_recomputes_when_logits_do_not_fit(tiny, monkeypatch):
    """logprob_chunk=0 with little free memory: several checkpointed chunks, same values and gradients."""
    from npo_cli import grpo

    calls = []
    real = grpo.checkpoint
    monkeypatch.setattr(grpo, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(grpo, "auto_chunk", lambda n, v, d: 4)
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(2))
    am = torch.ones_like(ids)
    lp, _ = token_logprobs(tiny, ids, am, 6, 0)
    assert len(calls) == 3  # 12 tokens in chunks of 4
    assert torch.allclose(lp, naive(tiny, ids, am, 6)[0], atol=1e-5)


# ---------- parity with TRL 1.16 ----------

def trl_loss(loss_type, logp, old, adv, mask, ref, beta, max_len):
    """TRL's own GRPOTrainer._compute_loss on a stub trainer whose log-prob pass returns `logp`."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    B, T = logp.shape
    identity = lambda x, **_: x  # single process: gather / reduce are no-ops
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None), use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=False),
        current_gradient_accumulation_steps=1, max_completion_length=max_len, _entropy_bonus_enabled=False,
        accelerator=SimpleNamespace(num_processes=1, gather=identity, reduce=identity, gather_for_metrics=identity),
        _metrics={"eval": __import__("collections").defaultdict(list)},
    )
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask.long(), "advantages": adv,
        "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": mask.sum(),
    }
    return GRPOTrainer._compute_loss(stub, None, inputs), stub._metrics["eval"]


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("trl_type, agg", [("dapo", "token-mean"), ("grpo", "seq-mean"), ("dr_grpo", "constant")])
def test_parity_with_trl(trl_type, agg, beta):
    g = torch.Generator().manual_seed(3)
    B, T, max_len = 6, 7, 9
    base = torch.randn(B, T, generator=g) - 2
    old = base + 0.4 * torch.randn(B, T, generator=g)  # ratios spread well past both clip edges
    ref = base + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    lengths = torch.tensor([7, 3, 1, 5, 7, 2])
    mask = (torch.arange(T)[None] < lengths[:, None]).float()

    ours_lp = base.clone().requires_grad_(True)
    ours, stats = grpo_loss(ours_lp, old, adv, mask, **CLIP, agg=agg, max_len=max_len, ref_logp=ref, kl_coef=beta)
    ours.backward()
    trl_lp = base.clone().requires_grad_(True)
    theirs, metrics = trl_loss(trl_type, trl_lp, old, adv, mask, ref, beta, max_len)
    theirs.backward()

    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-7)
    assert torch.allclose(ours_lp.grad, trl_lp.grad, atol=1e-6)
    assert stats["clip_frac_low"] == pytest.approx(metrics["clip_ratio/low_mean"][0])
    assert stats["clip_frac_high"] == pytest.approx(metrics["clip_ratio/high_mean"][0])
    assert stats["clip_frac"] == pytest.approx(metrics["clip_ratio/region_mean"][0])
    assert 0 < stats["clip_frac"] < 1
    if beta:
        assert stats["kl"] == pytest.approx(metrics["kl"][0], rel=1e-5)
