"""Loading the policy: the built-in tiny model, a Hugging Face folder, a checkpoint in the store, or a model on the
Hugging Face Hub (through its cache)."""

from __future__ import annotations

from pathlib import Path

import torch

from npo_cli.checkpoint import DTYPES, is_lora, load_model, lora_model
from npo_cli.errors import NpoError, one_line
from npo_cli.manifest import Event
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


def _is_hub_id(s: str) -> bool:
    # ORG/NAME: the shape of a store ref RUN/BRANCH too; load_policy reads it as a ref when the store has run ORG
    return s.count("/") == 1 and "@" not in s and _looks_like_ref(s)


# what from_pretrained reads (config, safetensors weights, tokenizer); not other formats' weights or docs
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]


def _hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """The Hub model's snapshot folder in the Hugging Face cache (fetched first unless HF_HUB_OFFLINE is set);
    the folder's name is the commit hash."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    at = f" at revision {revision}" if revision else ""
    fetch = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES,
                                      local_files_only=constants.HF_HUB_OFFLINE))
    except RevisionNotFoundError:
        raise NpoError(f"model.revision '{revision}' is not a branch, tag or commit of {repo_id} on the "
                       "Hugging Face Hub") from None
    except RepositoryNotFoundError:
        raise NpoError(f"model.path '{repo_id}' is neither a run in the store nor a model on the Hugging Face "
                       "Hub (a gated or private model needs `hf auth login`)") from None
    except LocalEntryNotFoundError as e:
        if constants.HF_HUB_OFFLINE:
            raise NpoError(f"model.path '{repo_id}'{at} is neither a run in the store nor in the Hugging Face "
                           f"cache ({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE is set: fetch it with "
                           f"`{fetch}` or unset HF_HUB_OFFLINE") from None
        raise NpoError(f"cannot fetch {repo_id}{at} from the Hugging Face Hub, and it is not in the cache "
                       f"({constants.HF_HUB_CACHE}): {one_line(e)}") from None
    except (OSError, ValueError) as e:  # an invalid id, a network or disk error
        raise NpoError(f"cannot fetch {repo_id}{at} from the Hugging Face Hub: {one_line(e)}") from None


def _load_folder(folder: Path, name: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (folder / "config.json").is_file():
        raise NpoError(f"model folder {name} has no config.json; point model.path at a HF model folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as e:
        raise NpoError(f"cannot load model folder {name}: {one_line(e)}") from None
    return model, tokenizer


def param_dtype(cfg: ModelConfig) -> torch.dtype:
    """dtype the trained weights live in: fp32 masters under a 16-bit compute dtype (master_fp32)."""
    return torch.float32 if cfg.master_fp32 else DTYPES[cfg.dtype]


def load_policy(cfg: ModelConfig, store=None, seed: int = 0):
    """(model, tokenizer, start) for model.path, on the recipe's device and dtype; start is the run's start
    event: the model path, and the checkpoint or Hub commit it was read from.

    store: the run's Store, used when model.path is a ref and model.store is not set.
    """
    from transformers import AutoModelForCausalLM

    path = cfg.path
    if cfg.revision and not _is_hub_id(path):
        raise NpoError(f"model.revision is for a Hugging Face Hub id (ORG/NAME); model.path '{path}' is not one: "
                       "remove model.revision")
    device, dtype = resolve_device(cfg), param_dtype(cfg)
    if device == "cpu":
        torch.set_num_threads(cfg.threads)
    manifest, revision = None, None
    if path == "tiny":
        torch.manual_seed(seed)  # the tiny model's init is part of the run's seed
        model = AutoModelForCausalLM.from_config(tiny_config(), dtype=dtype)
        tokenizer = char_tokenizer()
    elif Path(path).expanduser().is_dir():
        model, tokenizer = _load_folder(Path(path).expanduser(), path, dtype)
    elif _looks_like_ref(path):
        src = Store.open(cfg.store) if cfg.store else store
        if src is None:
            src = Store.open(None)
        run = path.split("/")[0]
        if _is_hub_id(path) and run not in src.runs():
            snapshot = _hub_snapshot(path, cfg.revision)
            model, tokenizer = _load_folder(snapshot, path, dtype)
            revision = snapshot.name
        elif cfg.revision:
            raise NpoError(f"model.revision is for a Hub id, and model.path '{path}' is read as a store ref (the "
                           f"store has a run '{run}'): remove model.revision, or `hf download` the Hub model into "
                           "a folder and set model.path to it")
        else:
            try:
                model, tokenizer, manifest = load_model(src, path, dtype=dtype, device="cpu")
            except NpoError as e:
                hub = f"; it is read as a store ref, not a Hub id, as the store has a run '{run}'" \
                    if _is_hub_id(path) else ""
                raise NpoError(f"model.path '{path}' is not 'tiny', not a model folder, and not a checkpoint "
                               f"in the store ({e}){hub}") from None
    else:
        raise NpoError(f"model folder not found: {path}")
    if tokenizer.pad_token_id is None:  # e.g. Llama: pad with EOS (masks, not token ids, mark padding)
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if is_lora(model):  # a LoRA checkpoint as the start: its adapter merged in (model.lora adds a new one)
        model = model.merge_and_unload()
    model.to(device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False  # generate() turns the cache back on per call
    if cfg.lora is not None:  # only the adapter trains: the optimizer and each checkpoint hold the adapter's
        torch.manual_seed(seed)  # the adapter's init is part of the run's seed
        model = lora_model(model, cfg.lora)
    start = Event(kind="start", model=path, checkpoint=manifest.id if manifest else None, revision=revision)
    return model, tokenizer, start
