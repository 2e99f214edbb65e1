"""Loading the policy: the built-in tiny model, a Hugging Face folder, or a checkpoint in the store."""

from __future__ import annotations

from pathlib import Path

import torch

from npo_cli.checkpoint import DTYPES, load_model
from npo_cli.errors import NpoError, one_line
from npo_cli.recipe import ModelConfig
from npo_cli.store import Store
from npo_cli.tiny import char_tokenizer, tiny_config


def resolve_device(cfg: ModelConfig) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise NpoError("model.device is 'cuda' but no CUDA device is visible; use model.device=cpu")
    return cfg.device


def _looks_like_ref(s: str) -> bool:
    # refs: RUN, RUN@STEP, RUN/BRANCH, RUN/BRANCH@STEP, id prefix: at most one '/', no path-ish parts
    return s.count("/") <= 1 and not s.startswith((".", "/", "~"))


def param_dtype(cfg: ModelConfig) -> torch.dtype:
    """dtype the trained weights live in: fp32 masters under a 16-bit compute dtype (master_fp32)."""
    return torch.float32 if cfg.master_fp32 else DTYPES[cfg.dtype]


def load_policy(cfg: ModelConfig, store=None, seed: int = 0):
    """(model, tokenizer, source_manifest | None) for model.path, on the recipe's device and dtype.

    store: the run's Store, used when model.path is a ref and model.store is not set.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device, dtype = resolve_device(cfg), param_dtype(cfg)
    if device == "cpu":
        torch.set_num_threads(cfg.threads)
    manifest = None
    path = cfg.path
    if path == "tiny":
        torch.manual_seed(seed)  # the tiny model's init is part of the run's seed
        model = AutoModelForCausalLM.from_config(tiny_config(), dtype=dtype)
        tokenizer = char_tokenizer()
    elif Path(path).expanduser().is_dir():
        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise NpoError(f"model folder {path} has no config.json; point model.path at a HF model folder")
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
        except (OSError, ValueError) as e:
            raise NpoError(f"cannot load model folder {path}: {one_line(e)}") from None
    elif _looks_like_ref(path):
        src = Store.open(cfg.store) if cfg.store else store
        if src is None:
            src = Store.open(None)
        try:
            model, tokenizer, manifest = load_model(src, path, dtype=dtype, device="cpu")
        except NpoError as e:
            raise NpoError(f"model.path '{path}' is not 'tiny', not a model folder, and not a checkpoint "
                           f"in the store ({e})") from None
    else:
        raise NpoError(f"model folder not found: {path}")
    if tokenizer.pad_token_id is None:  # e.g. Llama: pad with EOS (masks, not token ids, mark padding)
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.to(device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False  # generate() turns the cache back on per call
    return model, tokenizer, manifest
