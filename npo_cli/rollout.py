"""Rollout backends: prompts x n -> completions with token ids and the behaviour policy's log-probs.

The HF backend wraps `model.generate` (batched, KV cache, left padding). The behaviour log-probs
are recorded by a logits processor while sampling: it applies temperature and top-p itself and
keeps only the previous step's log-softmax, so a 150k vocabulary never holds all steps' logits.
npo_cli/vllm_backend.py implements the same `generate(prompts, n, greedy)` / `sync()` interface.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessor

from npo_cli.errors import NpoError
from npo_cli.recipe import RolloutConfig


@dataclass
class Rollout:
    prompt_ids: list[int]
    completion_ids: list[int]  # ends with the EOS token when finished (so the model learns to stop)
    logprobs: list[float]  # behaviour policy log-prob of each completion token (after temperature)
    text: str  # decoded completion, special tokens skipped
    finished: bool  # True when an EOS token ended the completion before max_new_tokens ran out
    source: str = "policy"  # who produced it: "policy" (on-policy) or an off-policy slot source's name


class _Recorder(LogitsProcessor):
    """Applies temperature / top-p and records log p(token) of each sampled token, in float32.

    The recorded log-prob is log_softmax(logits / T) before the top-p cut, the same quantity the
    trainer computes for pi_theta, so the ratio is exactly 1 for unchanged weights.

    HF calls processors before it samples, so the token chosen at step t is only visible at
    step t+1 (as input_ids[:, -1]); `finish` picks up the last one.
    """

    def __init__(self, temperature: float, top_p: float):
        self.temperature, self.top_p = temperature, top_p
        self.prev: torch.Tensor | None = None
        self.out: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prev is not None:
            self.out.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
        scores = scores.float() / self.temperature
        self.prev = torch.log_softmax(scores, dim=-1)
        if self.top_p < 1.0:
            # nucleus: drop the tail whose cumulative mass (from the top) exceeds top_p; keep >= 1 token
            sorted_lp, idx = self.prev.sort(dim=-1, descending=True)
            cum = sorted_lp.exp().cumsum(-1)
            drop_sorted = (cum - sorted_lp.exp()) >= self.top_p
            drop = drop_sorted.scatter(1, idx, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        return scores

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """[B, L] log-probs of the L generated tokens."""
        L = new_tokens.shape[1]
        out = self.out[:L]
        if len(out) < L and self.prev is not None:
            out.append(self.prev.gather(1, new_tokens[:, L - 1 : L]).squeeze(1))
        if not out:
            return torch.zeros(new_tokens.shape, dtype=torch.float32)
        return torch.stack(out, dim=1).float()


def eos_ids(model, tokenizer) -> list[int]:
    """Every token id that ends a completion: the tokenizer's EOS and the model's generation_config's."""
    eos = set()
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        eos.update([int(gen_eos)] if isinstance(gen_eos, int) else [int(e) for e in gen_eos])
    if not eos:
        raise NpoError("the tokenizer has no EOS token; set one so completions can end")
    # Padding is embedded (masked, but looked up): a pad token added to the tokenizer alone has no row. An
    # EOS outside the vocabulary is harmless, as it is never sampled (the GPU benchmark uses that).
    vocab, pad = getattr(model.config, "vocab_size", None), tokenizer.pad_token_id
    if vocab and pad is not None and pad >= vocab:
        raise NpoError(f"the tokenizer's pad token id {pad} is outside the model's vocabulary of {vocab} (it is "
                       "the EOS when the tokenizer has no pad token); use the model's own tokenizer, or give it a "
                       "pad token the model has")
    return sorted(eos)


def encode_prompts(tokenizer, prompts: list[str], add_special_tokens: bool, config, max_new_tokens: int,
                   context: int | None = None) -> list[list[int]]:
    """Each prompt's token ids, after checking that the model can take it: a prompt past the context
    (learned positions fail with an IndexError, rotary ones degrade silently), empty, or holding ids
    outside the embedding (a tokenizer that is not the model's) stops here with one line."""
    enc = tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]
    context = context or getattr(config, "max_position_embeddings", None)
    vocab = getattr(config, "vocab_size", None)
    for text, ids in zip(prompts, enc):
        if not ids:
            raise NpoError("a prompt is empty once tokenized; check task.template and the prompt file")
        if context and len(ids) + max_new_tokens > context:
            raise NpoError(f"prompt {text[:40]!r}... has {len(ids)} tokens: with rollout.max_new_tokens="
                           f"{max_new_tokens} it exceeds the model's context of {context}; shorten or drop "
                           "the long prompts, or lower rollout.max_new_tokens")
        if vocab and max(ids) >= vocab:
            raise NpoError(f"prompt {text[:40]!r} has token id {max(ids)}, outside the model's vocabulary of "
                           f"{vocab}; use the tokenizer the model was trained with")
    return enc


class HFBackend:
    """Batched sampling with `model.generate`. Sampling uses torch's global RNG (seeded, resumable)."""

    def __init__(self, model, tokenizer, cfg: RolloutConfig, add_special_tokens: bool = True,
                 dtype: torch.dtype | None = None, copy: bool = False):
        # Sampling runs on `model` itself, or on a copy in `dtype` (16-bit sampling of fp32 master
        # weights) that sync() refreshes after the weights change. copy=True forces the copy (FSDP
        # shards the policy's weights, so sampling needs its own full ones).
        self.policy, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.model = model
        if copy or (dtype is not None and next(model.parameters()).dtype != dtype):
            import copy as _copy

            self.model = _copy.deepcopy(model).to(dtype or next(model.parameters()).dtype)
            self.model.eval().requires_grad_(False)
        self.add_special_tokens = add_special_tokens
        self.batch_size = cfg.batch_size  # sequences per generate call, halved on CUDA out-of-memory
        self.eos_ids = eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    @torch.no_grad()
    def sync(self) -> None:
        """Bring the sampling weights up to date with the policy (a no-op when they are the same)."""
        if self.model is not self.policy:
            for dst, src in zip(self.model.parameters(), self.policy.parameters()):
                dst.copy_(src.full_tensor() if hasattr(src, "full_tensor") else src)  # FSDP2: gather

    def _gen_config(self, greedy: bool) -> GenerationConfig:
        # Every sampling knob is explicit so a model's own generation_config (top_k=20,
        # repetition_penalty, ...) cannot change the behaviour policy behind our back.
        # Temperature and top-p are applied by _Recorder, so HF's warpers stay off.
        sampling = {} if greedy else {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "typical_p": 1.0}
        return GenerationConfig(
            do_sample=not greedy, max_new_tokens=self.cfg.max_new_tokens, repetition_penalty=1.0,
            num_beams=1, use_cache=True, pad_token_id=self.pad_id, eos_token_id=self.eos_ids,
            cache_implementation="static" if self.cfg.static_cache else None, **sampling,
        )

    @torch.no_grad()
    def generate(self, prompts: list[str], n: int, greedy: bool = False) -> list[list[Rollout]]:
        """n completions for each prompt, grouped per prompt, in prompt order."""
        enc = encode_prompts(self.tokenizer, prompts, self.add_special_tokens, self.model.config,
                             self.cfg.max_new_tokens)
        flat = [(i, ids) for i, ids in enumerate(enc) for _ in range(n)]
        out: list[list[Rollout]] = [[] for _ in prompts]
        was_training = self.model.training
        self.model.eval()
        try:
            s = 0
            while s < len(flat):
                chunk = flat[s : s + self.batch_size]
                try:
                    done = self._generate_batch([ids for _, ids in chunk], greedy)
                except torch.OutOfMemoryError:
                    if len(chunk) == 1:
                        raise NpoError("out of GPU memory generating one sequence; lower rollout.max_new_tokens "
                                       "or use a smaller model") from None
                    done = None
                if done is None:  # outside the except clause: the failed batch's memory is freed first
                    self.batch_size = len(chunk) // 2
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    print(f"out of GPU memory generating {len(chunk)} sequences at once: "
                          f"rollout.batch_size {self.batch_size} from now on", file=sys.stderr)
                    continue
                for (i, _), r in zip(chunk, done):
                    out[i].append(r)
                s += len(chunk)
        finally:
            self.model.train(was_training)
        return out

    def _generate_batch(self, prompt_ids: list[list[int]], greedy: bool) -> list[Rollout]:
        device = next(self.model.parameters()).device
        P = max(len(p) for p in prompt_ids)
        input_ids = torch.full((len(prompt_ids), P), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(prompt_ids), P), dtype=torch.long)
        for j, p in enumerate(prompt_ids):  # left padding: every prompt ends at column P-1
            input_ids[j, P - len(p) :] = torch.tensor(p, dtype=torch.long)
            attn[j, P - len(p) :] = 1
        rec = _Recorder(self.cfg.temperature, self.cfg.top_p)
        seqs = self.model.generate(
            input_ids=input_ids.to(device), attention_mask=attn.to(device),
            generation_config=self._gen_config(greedy), logits_processor=[rec],
        )
        lps = rec.finish(seqs[:, P:]).cpu()  # on the device, where the recorded log-probs are
        new = seqs[:, P:].cpu()
        eos = torch.tensor(self.eos_ids)
        rollouts = []
        for j, p in enumerate(prompt_ids):
            toks = new[j].tolist()
            hits = torch.isin(new[j], eos).nonzero()
            finished = len(hits) > 0
            L = int(hits[0]) + 1 if finished else len(toks)  # keep the EOS, drop the padding after it
            ids = toks[:L]
            rollouts.append(Rollout(
                prompt_ids=list(p), completion_ids=ids, logprobs=lps[j, :L].tolist(),
                text=self.tokenizer.decode(ids, skip_special_tokens=True), finished=finished,
            ))
        return rollouts


def make_backend(model, tokenizer, cfg: RolloutConfig, add_special_tokens: bool = True,
                 dtype: torch.dtype | None = None, copy: bool = False, share=None):
    """The rollout engine named by rollout.backend: HF generate, or an in-process vLLM engine.

    copy: sample from a separate full-weight copy even when dtype matches (vLLM always has its own).
    share: a backend whose vLLM engine this one samples through when the weights fit it (the guide
    through the policy's engine); ignored by HF.
    """
    if cfg.backend == "vllm":
        from npo_cli.vllm_backend import VLLMBackend  # lazy: vllm is an optional extra

        return VLLMBackend(model, tokenizer, cfg, add_special_tokens=add_special_tokens, dtype=dtype,
                           share=share if isinstance(share, VLLMBackend) else None)
    return HFBackend(model, tokenizer, cfg, add_special_tokens=add_special_tokens, dtype=dtype, copy=copy)
