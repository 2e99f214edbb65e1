"""The GRPO objective as pure functions of tensors (tiny-grpo style), plus chunked log-probs.

Conventions match TRL 1.16 (`GRPOTrainer._compute_loss`) so results are comparable:
advantages use the unbiased (Bessel) group std, per-token loss is -min(rho*A, clip(rho)*A)
(+ beta * k3 KL to the reference), and the aggregations are token-mean = TRL "dapo",
seq-mean = TRL "grpo", constant = TRL "dr_grpo".

Off-policy slots (NPO guide, LUFFY teacher, ExGRPO/RLEP replay) are rows of the same batch,
marked by `OffPolicy.rows`; their `old_logp` is the behaviour policy's (guide's) log-prob.
"""

from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass
from typing import Literal

import torch
from torch.utils.checkpoint import checkpoint

from npo_cli.errors import NpoError

Agg = Literal["token-mean", "seq-mean", "constant"]


def group_advantages(rewards: torch.Tensor, scale_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """[G, n] rewards -> [G, n] advantages (r - mean) / (std + eps), or r - mean (Dr.GRPO)."""
    rewards = rewards.float()
    adv = rewards - rewards.mean(-1, keepdim=True)
    if scale_std:
        adv = adv / (rewards.std(-1, keepdim=True, unbiased=True) + eps)  # TRL's nanstd is unbiased
    # a group whose rewards are all equal carries no signal: exactly 0 (no float residue of the mean)
    same = (rewards == rewards[..., :1]).all(-1, keepdim=True)
    return adv.masked_fill(same, 0.0)


@dataclass
class OffPolicy:
    """Which rows of the batch are off-policy slots and how their ratio is formed.

    mode: "same"  - ratio pi_theta / pi_behaviour, clipped like on-policy rows;
          "wide"  - same ratio, upper bound 1 + clip_high (lower bound unchanged);
          "luffy" - LUFFY policy shaping: objective f(pi_theta) * A, f(p) = p / (p + gamma), no clip,
                    behaviour log-probs unused (ratio is pi_theta alone).
    importance_sampling=False (same/wide): ratio is 1 in value with gradient d log pi_theta.
    """

    rows: torch.Tensor  # bool [B]
    mode: Literal["same", "wide", "luffy"] = "same"
    clip_high: float | None = None  # upper clip of off-policy rows when mode == "wide"
    importance_sampling: bool = True
    gamma: float = 0.1

    @classmethod
    def from_config(cls, rows: torch.Tensor, npo) -> OffPolicy:
        """From the recipe's `npo` section (source=luffy always uses LUFFY shaping)."""
        mode = "luffy" if npo.source == "luffy" else npo.guide_clip
        return cls(rows=rows, mode=mode, clip_high=npo.guide_clip_high,
                   importance_sampling=npo.importance_sampling, gamma=npo.luffy_gamma)


def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> float:
    return float((x * m).sum() / m.sum().clamp(min=1))


def grpo_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
    clip_low: float, clip_high: float, agg: Agg = "token-mean", max_len: int | None = None,
    ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0, offpolicy: OffPolicy | dict | None = None,
    num_tokens: float | None = None, num_seqs: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate loss over [B, T] per-token log-probs; advantages [B].

    num_tokens / num_seqs: normalisers of the whole batch when it is split into micro-batches
    (default: this call's own), so summing the micro-batch losses gives the full-batch loss.
    max_len: Dr.GRPO's constant (default: T).
    """
    if isinstance(offpolicy, dict):
        offpolicy = OffPolicy(**offpolicy)
    B, T = logp.shape
    m = mask.to(logp.dtype)
    A = advantages.to(logp.dtype).reshape(B, 1)
    off = offpolicy.rows.bool().reshape(B, 1) if offpolicy is not None else torch.zeros(B, 1, dtype=torch.bool)
    off = off.to(logp.device)
    mode = offpolicy.mode if offpolicy is not None else "same"
    # Rows whose ratio is "1 with gradient": off-policy with IS off, and LUFFY rows (their surrogate
    # branch is unused; this keeps exp() of a stale behaviour log-prob from leaking NaN gradients).
    ratio_one = mode == "luffy" or (offpolicy is not None and not offpolicy.importance_sampling)
    no_is = off if ratio_one else torch.zeros_like(off)
    ratio = torch.exp(torch.where(no_is, logp - logp.detach(), logp - old_logp))
    lo = 1.0 - clip_low
    hi = torch.full_like(A, 1.0 + clip_high)
    if mode == "wide":
        if offpolicy.clip_high is None:
            raise ValueError("OffPolicy(mode='wide') needs clip_high")
        hi = torch.where(off, 1.0 + offpolicy.clip_high, hi)
    per_tok = -torch.min(ratio * A, torch.minimum(torch.clamp(ratio, min=lo), hi) * A)
    luffy = off if mode == "luffy" else torch.zeros_like(off)
    if mode == "luffy":
        p = logp.exp()
        per_tok = torch.where(luffy, -(p / (p + offpolicy.gamma)) * A, per_tok)
    if ref_logp is not None and kl_coef != 0.0:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1  # k3 estimator of KL(pi_theta || pi_ref)
        per_tok = per_tok + kl_coef * kl

    n_seq = float(num_seqs) if num_seqs is not None else float(B)
    if agg == "token-mean":
        n_tok = torch.as_tensor(num_tokens if num_tokens is not None else m.sum()).clamp(min=1)
        loss = (per_tok * m).sum() / n_tok
    elif agg == "seq-mean":
        loss = ((per_tok * m).sum(-1) / m.sum(-1).clamp(min=1)).sum() / n_seq
    elif agg == "constant":
        loss = (per_tok * m).sum() / (n_seq * (max_len or T))
    else:
        raise ValueError(f"unknown agg {agg!r}")

    with torch.no_grad():
        r = ratio.detach()
        clipped_low = (r < lo) & (A < 0) & ~luffy
        clipped_high = (r > hi) & (A > 0) & ~luffy
        on_m, off_m = m * ~off, m * off
        stats = {
            "loss": float(loss), "tokens": float(m.sum()),
            "clip_frac_low": _masked_mean(clipped_low.float(), on_m),
            "clip_frac_high": _masked_mean(clipped_high.float(), on_m),
            "clip_frac": _masked_mean((clipped_low | clipped_high).float(), on_m),
            "ratio_mean": _masked_mean(r, on_m),
        }
        if ref_logp is not None:
            d = ref_logp - logp.detach()
            stats["kl"] = _masked_mean(torch.exp(d) - d - 1, m)
        if bool(off.any()):
            true_lr = logp.detach() - old_logp  # log pi_theta / pi_behaviour, whatever the mode
            true_r = true_lr.exp()
            pos = A.clamp(min=0).reshape(B)
            stats.update({
                "off/rows": float(off.sum()), "off/tokens": float(off_m.sum()),
                "off/clip_frac_low": _masked_mean(clipped_low.float(), off_m),
                "off/clip_frac_high": _masked_mean(clipped_high.float(), off_m),
                "off/clip_frac": _masked_mean((clipped_low | clipped_high).float(), off_m),
                "off/ratio_mean": _masked_mean(true_r, off_m),
                # share of off-policy tokens whose true ratio is outside the on-policy clip band
                "off/outside": _masked_mean(((true_r < lo) | (true_r > 1 + clip_high)).float(), off_m),
                # k3 estimate of KL(pi_behaviour || pi_theta) on the behaviour's own tokens
                "off/kl": _masked_mean(true_r - 1 - true_lr, off_m),
                "off/pos_adv_share": float(pos[off.reshape(B)].sum() / pos.sum()) if pos.sum() > 0 else 0.0,
            })
    return loss, stats


def _decoder(model):
    base = model.get_decoder() if hasattr(model, "get_decoder") else None
    if base is None or base is model:
        base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise TypeError(f"{type(model).__name__}: cannot find the base transformer under the LM head")
    return base


def compile_layers(model, required: bool = True) -> None:
    """grpo.compile: torch.compile each decoder layer in place (regional compilation: one small graph
    reused by every layer, so the compile costs one layer's, and parameter names do not change). Norms,
    rotary embeddings and the MLP's elementwise ops fuse around the matmuls.

    required=False (grpo.compile left to its CUDA default): a model without a layers list stays uncompiled,
    and a layer torch cannot compile runs eagerly instead of stopping the run."""
    if not required:  # the LM-head log-probs compile too: anything torch cannot compile runs eagerly
        import torch._dynamo

        torch._dynamo.config.suppress_errors = True
    try:
        layers = getattr(_decoder(model), "layers", None)
    except TypeError:  # no base transformer under the LM head
        layers = None
    if layers is None:
        if not required:
            return
        raise NpoError(f"grpo.compile: {type(model).__name__} has no decoder layers list (model.model.layers); "
                       "set grpo.compile=false")
    for layer in layers:
        layer.compile(dynamic=True)


# Peak bytes per logit of one chunk: the 16-bit logits, their float32 copy, log_softmax's output (kept for
# backward) and, in backward, its gradient.
BYTES_PER_LOGIT = 16


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # + cached blocks
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def auto_chunk(n_tokens: int, vocab: int, device: torch.device) -> int:
    """Tokens per LM-head chunk for logprob_chunk=0: all of them when their logits fit in half the free
    memory (one chunk: nothing recomputed in backward), else as many as fit (at least 256)."""
    fit = free_memory(device) // 2 // (BYTES_PER_LOGIT * vocab)
    return max(1, min(n_tokens, max(256, fit)))


def _head_logprobs(hc: torch.Tensor, tc: torch.Tensor, head: torch.nn.Module, softcap: float | None,
                   temperature: float, with_entropy: bool):
    """LM head + float32 log_softmax over one chunk of hidden states: (log p(target), entropy | None)."""
    logits = head(hc).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    lsm = torch.log_softmax(logits / temperature, dim=-1)
    lp = lsm.gather(-1, tc[:, None]).squeeze(-1)
    ent = None
    if with_entropy:
        with torch.no_grad():  # a metric: no graph through the [chunk, V] product
            ent = -(lsm.exp() * lsm).sum(-1)
    return lp, ent


@functools.cache
def compiled_head_logprobs():
    """`_head_logprobs` through torch.compile, made once (dynamic shapes: chunks of any length share one
    graph). The cast, log_softmax and gather fuse into reductions over the logits instead of float32 copies."""
    return torch.compile(_head_logprobs, dynamic=True)


def token_logprobs(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_completion: int, chunk: int,
    with_entropy: bool = True, temperature: float = 1.0, compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(token) and entropy [B, n_completion] for the last n_completion tokens of input_ids.

    One pass of the base transformer; the LM head and a float32 log_softmax run over `chunk`
    tokens at a time (0: `auto_chunk`), each chunk checkpointed when grad is on and there are several,
    so neither the forward nor the backward holds more than one chunk's float32 logits. Position ids
    follow `generate` (left padding). compiled: the head through `compiled_head_logprobs` (grpo.compile).
    Entropy is detached (a metric).
    """
    base, head = _decoder(model), model.get_output_embeddings()
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if "position_ids" in inspect.signature(base.forward).parameters:
        kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = base(**kwargs).last_hidden_state
    B, H = hidden.shape[0], hidden.shape[-1]
    h = hidden[:, -n_completion - 1 : -1].reshape(-1, H)  # position t predicts token t+1
    targets = input_ids[:, -n_completion:].reshape(-1)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    chunk = chunk or auto_chunk(h.shape[0], head.weight.shape[0], h.device)
    piece = compiled_head_logprobs() if compiled else _head_logprobs
    args = (head, softcap, temperature, with_entropy)

    lps, ents = [], []
    # With several chunks each is recomputed in backward, so only one chunk's logits live at a time;
    # a single chunk is within the bound already and skips the recompute.
    recompute = torch.is_grad_enabled() and h.requires_grad and h.shape[0] > chunk
    for s in range(0, h.shape[0], chunk):
        hc, tc = h[s : s + chunk], targets[s : s + chunk]
        if recompute:
            lp, ent = checkpoint(piece, hc, tc, *args, use_reentrant=False)
        else:
            lp, ent = piece(hc, tc, *args)
        lps.append(lp)
        ents.append(ent)
    logp = torch.cat(lps).reshape(B, n_completion)
    return logp, (torch.cat(ents).reshape(B, n_completion) if with_entropy else None)
