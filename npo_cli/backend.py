"""The rollout engine a recipe names: `make_backend` picks HFBackend or VLLMBackend from rollout.backend.

It sits above both backends (npo_cli/rollout.py, npo_cli/vllm_backend.py) so neither imports the other's
chooser. Importing npo_cli.vllm_backend is cheap: vLLM itself is imported only when an engine is built.
"""

from __future__ import annotations

import torch

from npo_cli.recipe import RolloutConfig
from npo_cli.rollout import HFBackend
from npo_cli.vllm_backend import VLLMBackend


def make_backend(model, tokenizer, cfg: RolloutConfig, add_special_tokens: bool = True,
                 dtype: torch.dtype | None = None, copy: bool = False, share=None):
    """The rollout engine named by rollout.backend: HF generate, or an in-process vLLM engine.

    copy: sample from a separate full-weight copy even when dtype matches (vLLM always has its own).
    share: a backend whose vLLM engine this one samples through when the weights fit it (the guide
    through the policy's engine); ignored by HF.
    """
    if cfg.backend == "vllm":
        return VLLMBackend(model, tokenizer, cfg, add_special_tokens=add_special_tokens, dtype=dtype,
                           share=share if isinstance(share, VLLMBackend) else None)
    return HFBackend(model, tokenizer, cfg, add_special_tokens=add_special_tokens, dtype=dtype, copy=copy)
