"""Rollout backends: prompts x n -> completions with token ids and the behaviour policy's log-probs.

The HF backend wraps `model.generate` (batched, KV cache, left padding). The behaviour log-probs
are recorded by a logits processor while sampling: it applies temperature and top-p itself and
keeps only the previous step's log-softmax, so a 150k vocabulary never holds all steps' logits.
With rollout.static_cache it runs npo's own decoding loop instead (`HFBackend._decode_static`).
npo_cli/vllm_backend.py implements the same `generate(prompts, n, greedy)` / `sync()` interface;
npo_cli/backend.py picks one of the two.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass

import torch

from npo_cli.errors import NpoError, one_line
from npo_cli.recipe import RolloutConfig


@dataclass
class Rollout:
    prompt_ids: list[int]
    completion_ids: list[int]  # ends with the EOS token when finished (so the model learns to stop)
    logprobs: list[float]  # behaviour policy log-prob of each completion token (after temperature)
    text: str  # decoded completion, special tokens skipped
    finished: bool  # True when an EOS token ended the completion before max_new_tokens ran out
    source: str = "policy"  # who produced it: "policy" (on-policy) or an off-policy slot source's name


def _nucleus_drop(logp: torch.Tensor, top_p: float) -> torch.Tensor:
    """Tokens outside the top-p nucleus of log-probs [B, V]: the tail whose cumulative mass from the top
    exceeds top_p (at least one token is kept)."""
    sorted_lp, idx = logp.sort(dim=-1, descending=True)
    p = sorted_lp.exp()
    drop_sorted = (p.cumsum(-1) - p) >= top_p
    return drop_sorted.scatter(1, idx, drop_sorted)


def _pick(logits: torch.Tensor, temperature: float, top_p: float, greedy: bool):
    """(token, log p(token)) per row of last-position logits [B, V]. log p is log_softmax(logits / T) before
    the top-p cut, as _Recorder records it. Sampling is the exponential race argmax(log p - log E),
    E ~ Exp(1), which draws from softmax exactly (vLLM samples this way) without torch.multinomial: no host
    sync, so a whole decoding step can be one CUDA graph."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    if greedy:
        tok = logp.argmax(-1)
    else:
        keys = logp if top_p >= 1.0 else logp.masked_fill(_nucleus_drop(logp, top_p), float("-inf"))
        tok = (keys - torch.rand_like(keys).log().neg().log()).argmax(-1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


def _decode_step(model, cache, ids, position_ids, attention_mask, temperature: float, top_p: float, greedy: bool):
    """One token per row through the static cache, then `_pick`: what a CUDA graph replays per token."""
    logits = model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids,
                   past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    return _pick(logits, temperature, top_p, greedy)


class _Recorder:
    """A logits processor for HF generate (any callable is one): applies temperature / top-p and records
    log p(token) of each sampled token, in float32.

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
            scores = scores.masked_fill(_nucleus_drop(self.prev, self.top_p), float("-inf"))
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
        # rollout.static_cache: npo's decoding loop where the model takes its cache position from the cache
        # (transformers >= 5.19's forward signature), else HF generate's own static cache
        # rollout.static_cache unset: on CUDA, where it measured faster (compiled decoding), never on CPU
        self.static_cache = (cfg.static_cache if cfg.static_cache is not None
                             else next(self.model.parameters()).device.type == "cuda")
        params = inspect.signature(type(self.model).forward).parameters
        self.own_decoding = (self.static_cache and "cache_position" not in params
                             and {"logits_to_keep", "position_ids"} <= params.keys())
        self._caches: dict[tuple[int, int], object] = {}  # (rows, length) -> StaticCache, reused: fixed addresses
        self._step = None  # _decode_step, compiled into a CUDA graph on CUDA
        self.compile_error: str | None = None  # why the compiled step was given up for HF generate, if it was
        self.drop_finished = True  # _decode_static drops ended rows from the batch (False: the loop as it was)

    @torch.no_grad()
    def sync(self) -> None:
        """Bring the sampling weights up to date with the policy (a no-op when they are the same)."""
        if self.model is not self.policy:
            for dst, src in zip(self.model.parameters(), self.policy.parameters()):
                dst.copy_(src.full_tensor() if hasattr(src, "full_tensor") else src)  # FSDP2: gather

    def _gen_config(self, greedy: bool):
        # transformers is imported where used: commands that only read the store start without it
        from transformers import GenerationConfig

        # Every sampling knob is explicit so a model's own generation_config (top_k=20,
        # repetition_penalty, ...) cannot change the behaviour policy behind our back.
        # Temperature and top-p are applied by _Recorder, so HF's warpers stay off.
        sampling = {} if greedy else {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "typical_p": 1.0}
        return GenerationConfig(
            do_sample=not greedy, max_new_tokens=self.cfg.max_new_tokens, repetition_penalty=1.0,
            num_beams=1, use_cache=True, pad_token_id=self.pad_id, eos_token_id=self.eos_ids,
            cache_implementation="static" if self.static_cache else None, **sampling,
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
                    self._caches.clear()  # static caches of the old batch size
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

    def _left_pad(self, prompt_ids: list[list[int]], P: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) [B, P] on the model's device, every prompt ending at column P-1."""
        input_ids = torch.full((len(prompt_ids), P), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(prompt_ids), P), dtype=torch.long)
        for j, p in enumerate(prompt_ids):
            input_ids[j, P - len(p) :] = torch.tensor(p, dtype=torch.long)
            attn[j, P - len(p) :] = 1
        device = next(self.model.parameters()).device
        return input_ids.to(device), attn.to(device)

    def _generate_batch(self, prompt_ids: list[list[int]], greedy: bool) -> list[Rollout]:
        new = None
        if self.own_decoding:
            try:
                new, lps = self._decode_static(prompt_ids, greedy)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:
                if self._step is _decode_step:  # eager: a bug to see, not a compiler to work around
                    raise
                # torch.compile / CUDA graphs on a model or torch they do not support: HF's own path works
                self.own_decoding, self.compile_error = False, f"{type(e).__name__}: {one_line(e)[:300]}"
                print(f"rollout.static_cache: compiling npo's decoding step failed ({self.compile_error}); "
                      "sampling with HF generate's static cache from now on", file=sys.stderr)
        if new is None:
            P = max(len(p) for p in prompt_ids)
            input_ids, attn = self._left_pad(prompt_ids, P)
            rec = _Recorder(self.cfg.temperature, self.cfg.top_p)
            seqs = self.model.generate(input_ids=input_ids, attention_mask=attn,
                                       generation_config=self._gen_config(greedy), logits_processor=[rec])
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

    def _decode_static(self, prompt_ids: list[list[int]], greedy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """rollout.static_cache: (tokens, log-probs) [rows, max_new_tokens] (fewer columns when every row has
        ended; a row's columns after its EOS hold padding), sampled through a preallocated KV cache. Each token
        after the prompt is one call of `_decode_step` on fixed shapes, compiled on CUDA into one CUDA graph
        (torch.compile, reduce-overhead): the forward, temperature, top-p, sampling and the log-prob record
        replay as one launch, with no host sync. HF generate instead runs its sampling, processors and stopping
        checks as separate kernels between graph replays.

        Every 32 tokens (one host sync) the rows that have ended leave the batch: the live rows' caches move to
        a smaller one, so a batch whose lengths spread wide (reasoning: tens to thousands of tokens) stops
        paying for its finished rows. Eager, the batch shrinks to the live rows; compiled, to the smallest
        half of the compiled batch (down to 16 rows) that holds them, so a batch size compiles at most
        log2(batch / 16) + 1 graphs. Prompts are left-padded to a multiple of 64 tokens and, when compiled, the
        batch to a multiple of 64 rows (copies of the first prompt, dropped after), so batches of similar
        prompts share graphs: each new shape compiles once (~25 s at 0.5B on an H200), and past torch's
        recompile limit (8 shapes) a shape runs uncompiled."""
        if self._step is None:
            self._step = (torch.compile(_decode_step, mode="reduce-overhead", dynamic=False)
                          if next(self.model.parameters()).device.type == "cuda" else _decode_step)
        compiled = self._step is not _decode_step
        rows, C = len(prompt_ids), self.cfg.max_new_tokens
        if compiled:
            prompt_ids = prompt_ids + [prompt_ids[0]] * (-rows % 64)
        B, P = len(prompt_ids), -(-max(len(p) for p in prompt_ids) // 64) * 64
        input_ids, attn = self._left_pad(prompt_ids, P)
        device = input_ids.device
        attn = torch.cat([attn, attn.new_ones(B, C)], dim=1)  # the generated tokens: all attended
        cache = self._cache(B, P + C)
        cache.reset()
        T, top_p = self.cfg.temperature, self.cfg.top_p
        pos = (attn[:, :P].cumsum(-1) - 1).clamp(min=0)  # positions as generate gives them (left padding)
        # Row `rows` is a sink: padding rows write there, so the real rows' outputs are never overwritten.
        tokens = torch.full((rows + 1, C), self.pad_id, dtype=torch.long, device=device)
        logps = torch.zeros(rows + 1, C, dtype=torch.float32, device=device)
        where = torch.arange(B, device=device).clamp(max=rows)  # batch row -> output row
        logits = self.model(input_ids=input_ids, attention_mask=attn, position_ids=pos, past_key_values=cache,
                            use_cache=True, logits_to_keep=1).logits[:, -1]  # the prompt: eager (its shape varies)
        tokens[where, 0], logps[where, 0] = _pick(logits, T, top_p, greedy)
        pos = pos[:, -1:]
        eos = torch.tensor(self.eos_ids, device=device)
        n = C
        for t in range(1, C):
            if t % 32 == 0:  # a host sync every 32 tokens: drop the rows that have ended
                live = (where < rows) & ~torch.isin(tokens[where, :t], eos).any(-1)
                n_live = int(live.sum())
                if n_live == 0:
                    n = t
                    break
                size = self._live_batch(n_live, len(where), compiled) if self.drop_finished else len(where)
                if size < len(where):
                    keep = live.nonzero()[:, 0]
                    keep = torch.cat([keep, keep[:1].expand(size - n_live)])  # padding rows: copies, to the sink
                    cache = self._move_rows(cache, keep, P + C, keep_cache=compiled)
                    where = torch.cat([where[keep[:n_live]], where.new_full((size - n_live,), rows)])
                    attn, pos = attn[keep], pos[keep]
            pos = pos + 1
            if device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # the last replay's outputs are copied out below
            tok, lp = self._step(self.model, cache, tokens[where, t - 1 : t], pos, attn, T, top_p, greedy)
            tokens[where, t], logps[where, t] = tok, lp
        return tokens[:rows, :n].cpu(), logps[:rows, :n].cpu()

    @staticmethod
    def _live_batch(n_live: int, size: int, compiled: bool) -> int:
        """Rows to decode the live ones with: themselves eager; compiled, the smallest of size / 2^k (at
        least 16 rows) that holds them, so the graphs are few and each compiles once."""
        if not compiled:
            return n_live
        while size // 2 >= max(n_live, 16) and size % 2 == 0:
            size //= 2
        return size

    def _cache(self, rows: int, length: int, keep: bool = True):
        """The StaticCache of this shape, made once and reused (a CUDA graph replays on fixed addresses); with
        keep=False a new one, dropped after the call (eager batches of any number of live rows)."""
        from transformers import StaticCache

        cache = self._caches.get((rows, length))
        if cache is None:
            cache = StaticCache(config=self.model.config, max_cache_len=length)
            if keep:
                self._caches[(rows, length)] = cache
        return cache

    def _move_rows(self, cache, keep: torch.Tensor, length: int, keep_cache: bool):
        """The cache of len(keep) rows holding `cache`'s rows `keep` (keys, values and fill position)."""
        small = self._cache(len(keep), length, keep_cache)
        for src, dst in zip(cache.layers, small.layers):
            if not dst.is_initialized:
                dst.lazy_initialization(src.keys[keep], src.values[keep])
            dst.keys.copy_(src.keys[keep])
            dst.values.copy_(src.values[keep])
            dst.cumulative_length.copy_(src.cumulative_length)
        return small
