"""Shared machinery of throughput.py (CPU) and gpu_bench.py (H100/H200): npo vs TRL's GRPOTrainer, same run.

Both trainers start from the same randomly initialised weights (one model saved to a temp folder and
loaded by each), see the same prompt set (the built-in arithmetic task), the same reward (npo's `exact`
verifier), the same batch (P prompts x n completions per optimizer step) and the same loss (TRL
loss_type "dapo" == npo grpo.agg "token-mean", beta 0, eps 0.2 / 0.28, one update per batch).

TRL's generation paths. TRL 1.16 generates with transformers in one of three ways; one run times npo
against each path named in `BenchConfig.trl_paths`, with the settings TRL's docs recommend (`TRL_PATHS`):

    dynamic  TRL's default: HF `generate` with a dynamic KV cache
    static   HF `generate` with a static KV cache (cache_implementation="static"; TRL passes disable_compile)
    paged    transformers continuous batching (`generate_batch`, what use_transformers_paged=True maps to),
             use_cuda_graph False, max_memory_percent 0.4 (the GRPO docs' settings); no behaviour log-probs

For each path in order: that TRL trainer is built, and TRL's own `train()` loop drives warmup + steps
optimizer steps; a TrainerCallback times each TRL step (on_step_begin .. on_step_end: generation happens
inside TRL's first micro-step, so it is included) and then runs and times one `npo Trainer.step()`
before TRL's next step begins. The TRL trainer is then freed before the next path's is built. The npo
trainer is built once and keeps stepping through all paths, so each path gets a pair measured side by
side: TRL's steps (its first `warmup` excluded) and the npo steps interleaved with them (npo's own first
`warmup` steps, in the first path, excluded). A path that fails (e.g. continuous batching unavailable on
the device) is recorded in res["errors"]["trl:<path>"], and npo's steps for it still run.

Generation and training are timed apart: npo's own gen_time (rollout backend call); for TRL a wrapper
around `_generate_and_score_completions` (generate + decode + reward + advantages) and one around
`_generate_single_turn` (the generate call alone). "train" = step - rollout for both.

Two completion-length regimes:

  forced (force_length=True): the tokenizer's EOS is id `vocab`, outside the model's logits, so it is
    never sampled and every completion is exactly new_tokens long (the published GPU shape).

  natural EOS, shaped like reasoning RL (mean_length=M): completions end by themselves with a geometric
    length distribution. The model gets a synthetic tokenizer (prompt characters, then synthetic tokens up
    to vocab-1) and its generation_config.eos_token_id becomes a *stop set* of K = round(vocab / M) token
    ids, evenly spaced over the synthetic ids (never a prompt character, pad or unk; `stop_ids`). A
    random-init model samples almost uniformly (entropy 11.75 nats vs log V = 11.93 at the Qwen2-0.5B
    shape, 8.305 vs 8.318 at hidden 64 / vocab 4096), so each token stops a completion with probability
    about K / V = 1 / M: lengths are geometric with mean M (EOS counted), cut at new_tokens. The stop set
    is a function of (vocab, M) and the weights of the seed, so the distribution is the same on both sides.
    npo (`rollout.eos_ids`: the tokenizer's EOS and the generation_config's) and TRL (`eos_token_ids` from
    model.generation_config, masked with `torch.isin`; continuous batching stops each request on any of
    them) both end a completion at any id of the set.

Useful tokens: per step, the sum over rows of completion tokens up to and including the first EOS of the
stop set (no padding); for TRL counted on `_generate_single_turn`'s completion ids (the HF paths cut them
after the first EOS, continuous batching stops there; tokens found after an EOS are counted in the notes
as tokens_after_eos). Summaries give useful tokens per step, useful tokens/s over generate time and over
step time, and the completion length distribution (p10/p50/p90/max, EOS included).
"""

from __future__ import annotations

import copy
import gc
import hashlib
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a source tree without installing npo
    sys.path.insert(0, str(ROOT))

H100_BF16_DENSE = 989e12  # FLOP/s, H100 SXM bf16 dense (no sparsity)

# TRL 1.16's transformers generation paths: name -> extra GRPOConfig kwargs (the settings TRL's docs recommend)
TRL_PATHS: dict[str, dict] = {
    "dynamic": {},  # TRL's default: HF generate with a dynamic KV cache
    "static": {"cache_implementation": "static"},  # HF generate with a static KV cache (TRL passes disable_compile)
    "paged": {"use_transformers_continuous_batching": True,  # what use_transformers_paged=True maps to
              "transformers_continuous_batching_config": {"use_cuda_graph": False, "max_memory_percent": 0.4}},
}


@dataclass
class BenchConfig:
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 1024
    vocab: int | None = None  # None: the char tokenizer's size; else a synthetic tokenizer of this size
    prompts: int = 16
    group: int = 8
    new_tokens: int = 32
    force_length: bool = False  # EOS outside the model's vocab: every completion is exactly new_tokens
    mean_length: int | None = None  # natural EOS: a stop set of round(vocab / mean_length) ids (geometric lengths)
    temperature: float = 1.0
    lr: float = 1e-5
    micro_batch: int = 128  # rows per forward/backward on both sides (TRL: per_device_train_batch_size)
    device: str = "cpu"
    dtype: str = "float32"  # npo model.dtype; TRL gets the model in this dtype (+ bf16 autocast if bfloat16)
    static_cache: bool | None = False  # npo rollout.static_cache (None: npo's default, on for CUDA)
    logprob_chunk: int = 0  # auto, the recipe default
    compile: bool | None = False  # npo grpo.compile (torch.compile'd decoder layers and LM-head log-probs;
    #                               None: npo's default, on for CUDA)
    warmup: int = 1  # untimed steps of each TRL path (and of npo in the first path, unless npo_warmup)
    npo_warmup: int = 0  # untimed npo steps alone before the first path (its compiles), then every npo step counts
    profile: bool = False  # on CUDA: the top kernels of one npo step after the timed ones (res["profile"])
    steps: int = 5
    seed: int = 0
    trl_gc: bool = False  # gradient checkpointing of the TRL trainers (TRL's default is True)
    trl_paths: tuple[str, ...] = ("dynamic",)  # TRL generation paths timed against npo, in this order (TRL_PATHS)
    threads: int = 1
    reward: str = "exact"  # "exact" (npo's verifier) or "hash" (coin flip on the completion text: non-zero
    #                        advantages even at random init, so the backward has signal; same on both sides)


def _quantiles(xs: list[float]) -> dict:
    """p10 / p50 / p90 (linear interpolation between order statistics) and max; {} when empty."""
    if not xs:
        return {}
    d = statistics.quantiles(xs, n=10, method="inclusive") if len(xs) > 1 else [xs[0]] * 9
    return {"completion_len_p10": d[0], "completion_len_p50": d[4], "completion_len_p90": d[8],
            "completion_len_max": max(xs)}


@dataclass
class Side:
    name: str
    warm: int = 0  # leading warm-up steps, excluded from the medians
    step_s: list[float] = field(default_factory=list)
    rollout_s: list[float] = field(default_factory=list)  # generation (+ scoring for TRL)
    generate_s: list[float] = field(default_factory=list)  # the bare generate call
    completion_len: list[float] = field(default_factory=list)  # mean completion length per step (incl. EOS)
    finished_frac: list[float] = field(default_factory=list)
    useful_tokens: list[int] = field(default_factory=list)  # per step: completion tokens up to the first EOS
    lengths: list[list[int]] = field(default_factory=list)  # per step: each row's completion length (incl. EOS)
    train_tokens: list[int] = field(default_factory=list)  # rows x (max prompt + max completion) per step
    zero_adv: list[float] = field(default_factory=list)  # share of groups whose rewards are all equal
    notes: dict = field(default_factory=dict)

    SERIES = ("step_s", "rollout_s", "generate_s", "completion_len", "finished_frac", "useful_tokens", "lengths",
              "train_tokens", "zero_adv")

    def clear(self) -> None:
        for k in self.SERIES:
            getattr(self, k).clear()

    def summary(self, warmup: int | None, n_params: int, peak: float | None, n_embed: int = 0) -> dict:
        """Medians after warm-up (`warmup`, or this side's own `warm` when None). MFU = 6 N T / train time / peak;
        also with N + n_embed (the embedding table counted as a second matrix, as if untied: the convention of
        the 29% reference figure)."""
        w = self.warm if warmup is None else warmup

        def med(xs):
            xs = xs[w:]
            return statistics.median(xs) if xs else None

        def mean(xs):
            xs = xs[w:]
            return statistics.fmean(xs) if xs else None

        out = {"step_s_all": [round(x, 4) for x in self.step_s], "median_step_s": med(self.step_s),
               "median_rollout_s": med(self.rollout_s), "median_generate_s": med(self.generate_s) or None,
               "mean_completion_len": mean(self.completion_len), "finished_frac": mean(self.finished_frac),
               "zero_adv_frac": mean(self.zero_adv), "warmup_s": [round(x, 3) for x in self.step_s[:w]],
               "timed_steps": max(0, len(self.step_s) - w), **self.notes}
        train = [s - r for s, r in zip(self.step_s, self.rollout_s)]
        out["median_train_s"] = med(train)
        out["useful_tokens"] = med(self.useful_tokens)
        out["useful_tok_per_s_generate"] = med([u / g for u, g in zip(self.useful_tokens, self.generate_s) if g])
        out["useful_tok_per_s_step"] = med([u / s for u, s in zip(self.useful_tokens, self.step_s) if s])
        out.update(_quantiles([x for row in self.lengths[w:] for x in row]))
        if self.notes.get("cb_setup_s"):  # continuous batching: one manager set-up per generate call
            out["median_cb_setup_s"] = med(self.notes["cb_setup_s"])
        toks = self.train_tokens[w:]
        if toks and out["median_train_s"]:
            out["train_tokens"] = statistics.median(toks)
            flops = 6.0 * n_params * out["train_tokens"]
            out["train_tflops"] = flops / out["median_train_s"] / 1e12
            if peak:
                out["train_mfu"] = flops / out["median_train_s"] / peak
                out["train_mfu_untied_n"] = (6.0 * (n_params + n_embed) * out["train_tokens"]
                                             / out["median_train_s"] / peak)
        return out


def pool(sides: list[Side], name: str) -> Side:
    """One side holding every side's steps: all warm-up steps first, then every timed step in order."""
    out = Side(name, warm=sum(min(s.warm, len(s.step_s)) for s in sides))
    for k in Side.SERIES:
        xs = getattr(out, k)
        for s in sides:
            xs += getattr(s, k)[: s.warm]
        for s in sides:
            xs += getattr(s, k)[s.warm:]
    for s in sides:
        out.notes.update(s.notes)
    return out


def hash_reward(prompt: str, completion: str, answer: str) -> float:
    """A deterministic coin flip on the completion text (for --reward hash)."""
    return float(hashlib.sha256(completion.encode()).digest()[0] & 1)


def zero_adv_frac(rewards: list[float], group: int) -> float:
    groups = [rewards[i : i + group] for i in range(0, len(rewards), group)]
    return sum(len(set(g)) == 1 for g in groups) / len(groups)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:400]}"


# ---------------------------------------------------------------- model, tokenizer


def _first_synthetic_id() -> int:
    from npo_cli.tiny import CHARS

    return 2 + len(CHARS)  # <pad>, <unk>, then the prompt characters


def synthetic_tokenizer(vocab: int):
    """Char tokenizer for prompts plus synthetic tokens up to id vocab-1, and EOS at id `vocab`.

    The model has `vocab` logits, so this EOS (id == vocab) is never sampled: without a stop set in the
    model's generation_config every completion runs to max_new_tokens. Every id the model can sample
    decodes (to a '<|tN|>' piece).
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    from npo_cli.tiny import CHARS

    toks = {"<pad>": 0, "<unk>": 1}
    for ch in CHARS:
        toks[ch] = len(toks)
    assert len(toks) == _first_synthetic_id()
    for i in range(len(toks), vocab):
        toks[f"<|t{i}|>"] = i
    toks["<eos>"] = vocab
    core = Tokenizer(models.BPE(vocab=toks, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left")


def stop_ids(vocab: int, mean_length: int) -> list[int]:
    """The stop set of the reasoning-shaped rollout: K = round(vocab / mean_length) synthetic token ids, evenly
    spaced over [first synthetic id, vocab) (never a prompt character, pad or unk). Sampling near uniformly
    over the vocab, a completion stops at each token with probability K / vocab ~ 1 / mean_length."""
    first = _first_synthetic_id()
    k = max(1, round(vocab / mean_length))
    if vocab - first < k:
        raise ValueError(f"vocab {vocab} has {vocab - first} synthetic ids, fewer than the {k} stop ids "
                         f"mean_length {mean_length} needs")
    return [first + (i * (vocab - first)) // k for i in range(k)]


def make_model_dir(cfg: BenchConfig, root: str) -> tuple[str, int]:
    """A random-init Qwen2 (seeded) and its tokenizer saved to root/model; -> (path, parameter count).
    With cfg.mean_length the saved generation_config's eos_token_id is the stop set (`stop_ids`)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from npo_cli.model import DTYPES
    from npo_cli.tiny import char_tokenizer

    stops = None
    if cfg.mean_length is not None:
        if cfg.force_length:
            raise ValueError("mean_length (natural EOS) needs force_length=False")
        if cfg.mean_length < 1:
            raise ValueError(f"mean_length must be >= 1, not {cfg.mean_length}")
        if not cfg.vocab or cfg.vocab <= _first_synthetic_id():
            raise ValueError(f"mean_length needs a synthetic vocab larger than the char tokenizer's "
                             f"{_first_synthetic_id()} ids (BenchConfig.vocab)")
        tok, vocab, eos = synthetic_tokenizer(cfg.vocab), cfg.vocab, None
        stops = stop_ids(vocab, cfg.mean_length)
    elif cfg.force_length:
        tok = synthetic_tokenizer(cfg.vocab or 151936)
        vocab, eos = cfg.vocab or 151936, None  # tokenizer EOS == vocab: outside the logits
    else:
        tok = char_tokenizer()
        vocab, eos = cfg.vocab or len(tok), tok.eos_token_id
        if vocab > len(tok):
            tok, eos = synthetic_tokenizer(vocab), None
    mc = Qwen2Config(
        vocab_size=vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=4096, rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        hidden_act="silu", initializer_range=0.02, pad_token_id=0, eos_token_id=eos, bos_token_id=None,
        use_cache=True,
    )
    torch.manual_seed(cfg.seed)
    init_dev = cfg.device if cfg.device.startswith("cuda") else "cpu"
    with torch.device(init_dev):  # 0.5B random init is much faster on the GPU
        model = AutoModelForCausalLM.from_config(mc, dtype=DTYPES[cfg.dtype])
    if stops is not None:
        model.generation_config.eos_token_id = stops
    n_params = sum(p.numel() for p in model.parameters())  # tied embedding counted once
    path = str(Path(root) / "model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    del model
    if init_dev != "cpu":
        torch.cuda.empty_cache()
    return path, n_params


# ---------------------------------------------------------------- npo


VERIFIERS = {"exact": "exact", "hash": "grpo_bench:hash_reward"}


def make_npo(cfg: BenchConfig, model_path: str):
    from npo_cli.branching import new_trainer
    from npo_cli.recipe import build_recipe
    from npo_cli.store import Store

    rows = cfg.prompts * cfg.group
    recipe = build_recipe({
        "name": "bench-npo", "seed": cfg.seed,
        "model": {"path": model_path, "dtype": cfg.dtype, "device": "cuda" if cfg.device.startswith("cuda")
                  else "cpu", "threads": cfg.threads, "gradient_checkpointing": False},
        "task": {"kind": "arithmetic", "verifier": VERIFIERS[cfg.reward]},
        "rollout": {"prompts_per_step": cfg.prompts, "group_size": cfg.group, "max_new_tokens": cfg.new_tokens,
                    "temperature": cfg.temperature, "top_p": 1.0, "batch_size": rows,
                    "static_cache": cfg.static_cache},
        "grpo": {"agg": "token-mean", "clip_low": 0.2, "clip_high": 0.28, "kl_coef": 0.0, "scale_std": True,
                 "updates_per_batch": 1, "lr": cfg.lr, "grad_clip": 1.0, "schedule": "constant",
                 "micro_batch_size": cfg.micro_batch, "logprob_chunk": cfg.logprob_chunk,
                 "compile": cfg.compile},
        "train": {"steps": 10**9, "save_every": 10**9, "eval_every": 10**9},
        "logging": {"progress": False, "metrics_jsonl": None},
    })
    store = Store.open(f"memory://bench-{os.getpid()}-{time.time_ns()}")
    trainer = new_trainer(recipe, store)
    return trainer, recipe


def npo_step(trainer, side: Side, device: str) -> None:
    """One timed npo step; records the lengths the rollout produced (npo's rows end at their EOS, no padding)."""
    captured = {}
    backend = trainer.backend
    orig = type(backend).generate

    def generate(prompts, n, greedy=False):
        out = orig(backend, prompts, n, greedy)
        captured["rows"] = [r for g in out for r in g]
        return out

    backend.generate = generate
    try:
        sync(device)
        t0 = time.perf_counter()
        m = trainer.step()
        sync(device)
        dt = time.perf_counter() - t0
    finally:
        del backend.generate
    rows = captured["rows"]
    lengths = [len(r.completion_ids) for r in rows]
    side.step_s.append(dt)
    side.rollout_s.append(m["gen_time"])
    side.generate_s.append(m["gen_time"])
    side.completion_len.append(sum(lengths) / len(rows))
    side.lengths.append(lengths)
    side.useful_tokens.append(sum(lengths))
    side.finished_frac.append(sum(r.finished for r in rows) / len(rows))
    P = max(len(r.prompt_ids) for r in rows)
    C = max(lengths)
    side.train_tokens.append(len(rows) * (P + C))
    side.zero_adv.append(m["zero_adv_frac"])


# ---------------------------------------------------------------- TRL


def make_trl(cfg: BenchConfig, model_path: str, out_dir: str, gradient_checkpointing: bool, max_steps: int,
             callbacks: list, side: Side, path: str = "dynamic"):
    """TRL's GRPOTrainer on the saved model, generating through TRL_PATHS[path]."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from npo_cli.model import DTYPES
    from npo_cli.recipe import TaskConfig
    from npo_cli.tasks import load_problems
    from npo_cli.verifiers import make_verifier

    rows = cfg.prompts * cfg.group
    if rows % cfg.micro_batch:
        raise SystemExit(f"micro batch {cfg.micro_batch} must divide {rows} rows")
    task = TaskConfig(kind="arithmetic", verifier="exact")
    problems = load_problems(task, "train", cfg.seed)
    data = datasets.Dataset.from_list([{"prompt": p.prompt, "answer": p.answer} for p in problems])
    verify = make_verifier(task) if cfg.reward == "exact" else hash_reward

    def exact_reward(prompts, completions, answer, **kw):  # TRL logs it under this name
        out = [float(verify(p, c, a)) for p, c, a in zip(prompts, completions, answer)]
        side.zero_adv.append(zero_adv_frac(out, cfg.group))  # rows come grouped by prompt
        return out

    tok = AutoTokenizer.from_pretrained(model_path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPES[cfg.dtype])
    on_cpu = not cfg.device.startswith("cuda")
    args = GRPOConfig(
        output_dir=out_dir, use_cpu=on_cpu, bf16=cfg.dtype == "bfloat16", fp16=False,
        per_device_train_batch_size=cfg.micro_batch, gradient_accumulation_steps=rows // cfg.micro_batch,
        num_generations=cfg.group, max_completion_length=cfg.new_tokens, temperature=cfg.temperature,
        top_p=1.0, top_k=0, repetition_penalty=1.0,
        learning_rate=cfg.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        loss_type="dapo", beta=0.0, epsilon=0.2, epsilon_high=0.28, scale_rewards="group", num_iterations=1,
        gradient_checkpointing=gradient_checkpointing,
        max_steps=max_steps, report_to=[], logging_strategy="no", save_strategy="no", eval_strategy="no",
        dataloader_num_workers=0, disable_tqdm=True, seed=cfg.seed, log_completions=False,
        **copy.deepcopy(TRL_PATHS[path]),
    )
    trainer = GRPOTrainer(model=model, reward_funcs=exact_reward, args=args, train_dataset=data,
                          processing_class=tok, callbacks=callbacks)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints TRL's end-of-train metrics dict
    if trainer.args.generation_batch_size != rows:
        raise SystemExit(f"TRL generation batch {trainer.args.generation_batch_size} != {rows}")
    return trainer


def instrument_trl(trainer, side: Side, device: str) -> None:
    """Time TRL's rollout (generate + score) and bare generate; record completion lengths, counted up to and
    including the first id of TRL's EOS set (tokens after it, if a path returned any, go to notes)."""
    gas, gst = trainer._generate_and_score_completions, trainer._generate_single_turn
    eos = {int(e) for e in trainer.eos_token_ids}  # not the trainer itself: no reference cycle
    side.notes["eos_ids"] = len(eos)
    side.notes.setdefault("tokens_after_eos", 0)

    def generate_and_score(*a, **kw):
        sync(device)
        t0 = time.perf_counter()
        out = gas(*a, **kw)
        sync(device)
        side.rollout_s.append(time.perf_counter() - t0)
        # prompt ids are left padded, completion ids right padded: this is the training shape
        pi, ci = out["prompt_ids"], out["completion_ids"]
        side.train_tokens.append(int(pi.shape[0]) * int(pi.shape[1] + ci.shape[1]))
        return out

    def single_turn(prompt_ids, *a, **kw):
        sync(device)
        t0 = time.perf_counter()
        completion_ids, logprobs = gst(prompt_ids, *a, **kw)
        sync(device)
        side.generate_s.append(time.perf_counter() - t0)
        lengths, finished = [], 0
        for c in completion_ids:
            c = c.tolist() if hasattr(c, "tolist") else list(c)
            n = next((i + 1 for i, t in enumerate(c) if t in eos), None)
            finished += n is not None
            lengths.append(len(c) if n is None else n)
            side.notes["tokens_after_eos"] += len(c) - lengths[-1]
        side.lengths.append(lengths)
        side.useful_tokens.append(sum(lengths))
        side.completion_len.append(sum(lengths) / len(lengths))
        side.finished_frac.append(finished / len(lengths))
        return completion_ids, logprobs

    trainer._generate_and_score_completions = generate_and_score
    trainer._generate_single_turn = single_turn


@contextmanager
def cb_setup_timer(side: Side, device: str):
    """Times continuous batching's per-call setup (the manager's warm-up: paged cache, static input tensors and
    attention masks sized from max_memory_percent of free device memory, CUDA graphs if any) into
    side.notes["cb_setup_s"]. TRL calls generate_batch once per step, which builds a new manager each time."""
    try:
        from transformers.generation.continuous_batching.continuous_api import ContinuousBatchingManager
    except ImportError:
        yield
        return
    orig = ContinuousBatchingManager.warmup
    times = side.notes.setdefault("cb_setup_s", [])

    def warmup(self, *a, **kw):
        sync(device)
        t0 = time.perf_counter()
        try:
            return orig(self, *a, **kw)
        finally:
            sync(device)
            times.append(round(time.perf_counter() - t0, 4))

    ContinuousBatchingManager.warmup = warmup
    try:
        yield
    finally:
        ContinuousBatchingManager.warmup = orig


def _callback_class():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Times TRL optimizer steps; after each, runs `after(step_index)` (the npo step) off the clock."""

        def __init__(self, side: Side, device: str, after=None):
            self.side, self.device, self.after, self.t0 = side, device, after, 0.0

        def on_step_begin(self, args, state, control, **kw):
            sync(self.device)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync(self.device)
            self.side.step_s.append(time.perf_counter() - self.t0)
            if self.after is not None:
                self.after(len(self.side.step_s))

    return StepTimer


# ---------------------------------------------------------------- the run


def _ratio(npo: dict, trl: dict | None) -> float | None:
    a, b = (npo or {}).get("median_step_s"), (trl or {}).get("median_step_s")
    return a / b if a and b else None


def run(cfg: BenchConfig, log=print) -> dict:
    import transformers

    unknown = [p for p in cfg.trl_paths if p not in TRL_PATHS]
    if unknown or not cfg.trl_paths:
        raise ValueError(f"trl_paths {list(cfg.trl_paths)}: each must be one of {list(TRL_PATHS)}")
    transformers.logging.set_verbosity_error()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cfg.device == "cpu":
        torch.set_num_threads(cfg.threads)
    total = cfg.warmup + cfg.steps
    peak = H100_BF16_DENSE if cfg.device.startswith("cuda") else None
    res: dict = {"config": asdict(cfg), "torch": torch.__version__, "transformers": transformers.__version__}
    if cfg.device.startswith("cuda"):
        res["gpu"] = torch.cuda.get_device_name()
    err: dict[str, str] = {}
    tracebacks: dict[str, str] = {}
    npo_sides: list[Side] = []
    trl_sides: dict[str, Side] = {}
    with tempfile.TemporaryDirectory(prefix="npo-bench-") as tmp:
        t = time.perf_counter()
        model_path, n_params = make_model_dir(cfg, tmp)
        res["n_params"] = n_params
        n_embed = (cfg.vocab or 0) * cfg.hidden if cfg.vocab else 0  # tied: the LM head reuses it
        if cfg.mean_length is not None:
            res["stop_ids"] = len(stop_ids(cfg.vocab, cfg.mean_length))
        log(f"model: {n_params / 1e6:.2f}M params (tied embedding counted once), saved in "
            f"{time.perf_counter() - t:.1f}s"
            + (f"; stop set of {res['stop_ids']} ids (mean length {cfg.mean_length})" if "stop_ids" in res else ""))

        t = time.perf_counter()
        state = {"npo": make_npo(cfg, model_path)[0]}
        log(f"npo trainer built in {time.perf_counter() - t:.1f}s")

        def npo_once(side: Side) -> bool:
            """One npo step. The GPU run is one shot: if the static-cache path fails, retry npo with a
            dynamic cache; if npo fails for good, stop it and let TRL finish. False when npo is out."""
            if state.get("npo") is None:
                return False
            try:
                npo_step(state["npo"], side, cfg.device)
                return True
            except Exception as e:  # noqa: BLE001
                tracebacks[f"npo{len(tracebacks)}"] = traceback.format_exc()
                state["npo"] = None
                free(cfg.device)
                if cfg.static_cache is False or "npo" in err:
                    err["npo_fatal"] = one_line(e)
                    log(f"npo failed ({err['npo_fatal']}); npo stopped")
                    return False
                err["npo"] = one_line(e)
                log(f"npo step failed with rollout.static_cache=true ({err['npo']}); "
                    "rebuilding npo with static_cache=false")
                side.notes["static_cache_failed"] = True
                side.clear()
                side.warm = cfg.warmup  # a new trainer: its own warm-up again
                state["npo"] = make_npo(replace(cfg, static_cache=False, seed=cfg.seed + 1), model_path)[0]
                return npo_once(side)

        try:  # a missing TRL (or one of its needs) fails each path below, and npo is timed alone
            import trl as trl_pkg

            res["trl_version"] = trl_pkg.__version__
        except Exception as e:  # noqa: BLE001
            log(f"TRL does not import ({one_line(e)})")
        if cfg.npo_warmup:
            warm = Side("npo warm-up")
            for i in range(cfg.npo_warmup):
                if npo_once(warm):
                    log(f"  npo warm-up step {i + 1}/{cfg.npo_warmup}: {warm.step_s[-1]:.3f}s")
            res["npo_warmup_s"] = [round(x, 3) for x in warm.step_s]
        for k, path in enumerate(cfg.trl_paths):
            npo = Side("npo", warm=cfg.warmup if k == 0 and not cfg.npo_warmup else 0)  # warm after that
            trl = Side(f"trl {path}", warm=cfg.warmup)
            npo_sides.append(npo)
            trl_sides[path] = trl
            if cfg.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()

            def after(i: int, npo=npo, trl=trl) -> None:
                ok = npo_once(npo)
                log(f"  step {i}/{total}: trl {trl.step_s[-1]:.3f}s  npo "
                    f"{npo.step_s[-1] if ok else float('nan'):.3f}s{'  (warm-up)' if i <= cfg.warmup else ''}")

            log(f"TRL {path} ({TRL_PATHS[path] or 'defaults'}):")
            trl_trainer = None
            try:
                t = time.perf_counter()
                trl_trainer = make_trl(cfg, model_path, str(Path(tmp) / f"trl-{path}"), cfg.trl_gc, total,
                                       [_callback_class()(trl, cfg.device, after)], trl, path)
                instrument_trl(trl_trainer, trl, cfg.device)
                log(f"  TRL trainer built in {time.perf_counter() - t:.1f}s "
                    f"(gradient checkpointing {'on' if cfg.trl_gc else 'off'})")
                trl.notes.update({"gradient_checkpointing": cfg.trl_gc, "optim": str(trl_trainer.args.optim),
                                  "per_device_train_batch_size": trl_trainer.args.per_device_train_batch_size,
                                  "gradient_accumulation_steps": trl_trainer.args.gradient_accumulation_steps,
                                  "generation_batch_size": trl_trainer.args.generation_batch_size})
                if TRL_PATHS[path].get("use_transformers_continuous_batching"):
                    with cb_setup_timer(trl, cfg.device):
                        trl_trainer.train()
                else:
                    trl_trainer.train()
                trl.notes["attn_implementation"] = getattr(trl_trainer.model.config, "_attn_implementation", None)
                res["threads_after"] = torch.get_num_threads()
            except Exception as e:  # noqa: BLE001  (one path failing must not stop the others, nor npo)
                tracebacks[f"trl:{path}"] = traceback.format_exc()
                err[f"trl:{path}"] = one_line(e)
                log(f"  TRL {path} failed ({err[f'trl:{path}']}); npo goes on")
            trl_trainer = None  # free it before the next path's
            free(cfg.device)
            while len(npo.step_s) < total and npo_once(npo):  # TRL failed (part way), or npo fell back
                log(f"  npo step {len(npo.step_s)}/{total}: {npo.step_s[-1]:.3f}s")
            entry = {"trl": trl.summary(None, n_params, peak, n_embed) if trl.step_s else None,
                     "npo": npo.summary(None, n_params, peak, n_embed) if npo.step_s else None,
                     "trl_config": copy.deepcopy(TRL_PATHS[path])}
            entry["ratio_npo_over_trl"] = _ratio(entry["npo"], entry["trl"])
            if cfg.device.startswith("cuda"):
                entry["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            res.setdefault("paths", {})[path] = entry
            if entry["ratio_npo_over_trl"]:
                log(f"  npo / TRL {path} step time: {entry['ratio_npo_over_trl']:.3f}")
        npo_notes = {"gradient_checkpointing": False, "static_cache": cfg.static_cache, "compile": cfg.compile,
                     "micro_batch_size": cfg.micro_batch, "optim": "torch.optim.AdamW (default)"}
        if state.get("npo") is not None:  # rollout.static_cache: npo's own decoding, or HF's after a compile failure
            trainer = state["npo"]
            backend = trainer.backend
            npo_notes.update({"static_cache": getattr(backend, "static_cache", cfg.static_cache),
                              "compile": trainer.compile, "own_decoding": getattr(backend, "own_decoding", None),
                              "decode_compile_error": getattr(backend, "compile_error", None)})
            if cfg.profile and cfg.device.startswith("cuda"):
                res["profile"] = profile_step(trainer, cfg.device)
                log("npo step profile (top CUDA kernels):\n" + "\n".join(
                    f"  {k['share']:6.1%}  {k['cuda_ms']:9.1f} ms  {k['name']}" for k in res["profile"]))
        state.clear()
        free(cfg.device)
    pooled = pool(npo_sides, "npo")
    pooled.notes.update(npo_notes)
    res["npo"] = pooled.summary(None, n_params, peak, n_embed) if pooled.step_s else {}
    for entry in res.get("paths", {}).values():
        if entry["npo"] is not None:
            entry["npo"].update(npo_notes)
    first = res.get("paths", {}).get(cfg.trl_paths[0], {})
    if first.get("trl"):
        res["trl"] = first["trl"]
    res["ratio_npo_over_trl"] = first.get("ratio_npo_over_trl")
    if err:
        res["errors"] = err
        res["tracebacks"] = tracebacks
    if cfg.device.startswith("cuda"):
        res["max_memory_gib"] = max([e.get("max_memory_gib", 0.0) for e in res.get("paths", {}).values()] or [0.0])
    return res


def profile_step(trainer, device: str, top: int = 10) -> list[dict]:
    """The top CUDA kernels of one npo step (rollout and update), by total CUDA time, with their share."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        trainer.step()
        sync(device)
    events = prof.key_averages()
    # the kernels themselves; else the operators, by the CUDA time they launched directly
    kernels = [e for e in events if e.device_type.name == "CUDA"] or [e for e in events if e.self_device_time_total]
    total = sum(e.self_device_time_total for e in kernels) or 1.0
    kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
    return [{"name": e.key[:120], "cuda_ms": e.self_device_time_total / 1e3, "calls": e.count,
             "share": e.self_device_time_total / total} for e in kernels[:top]]


def describe(cfg: BenchConfig) -> str:
    """The configuration behind a run's figures, in one line."""
    eos = (f"natural EOS (stop set, mean length {cfg.mean_length}, cut at {cfg.new_tokens})" if cfg.mean_length
           else "forced length (EOS never sampled)" if cfg.force_length or (cfg.vocab or 0) > _first_synthetic_id()
           else "char tokenizer EOS")
    return (f"hidden {cfg.hidden}, {cfg.layers} layers, vocab {cfg.vocab or 'char'}, {cfg.prompts}x{cfg.group} "
            f"rows, {cfg.new_tokens} new tokens, {eos}, {cfg.dtype} on {cfg.device}, micro batch {cfg.micro_batch}; "
            f"npo static cache {_setting(cfg.static_cache)}, compile {_setting(cfg.compile)}; TRL gradient "
            f"checkpointing {'on' if cfg.trl_gc else 'off'}; {cfg.warmup} warm-up + {cfg.steps} timed steps per "
            f"path" + (f", npo {cfg.npo_warmup} warm-up steps first" if cfg.npo_warmup else ""))


def _setting(value: bool | None) -> str:
    return "default (on for CUDA)" if value is None else str(value)


def table(res: dict) -> str:
    def f(x, fmt="{:.3f}"):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)

    paths = list(res.get("paths") or {})
    cols = [("npo", res.get("npo") or {})]
    if paths:
        cols += [(f"trl {p}", res["paths"][p].get("trl") or {}) for p in paths]
    elif isinstance(res.get("trl"), dict):
        cols.append(("trl", res["trl"]))
    w = max(12, *(len(c) + 2 for c, _ in cols))
    head = f"{'':26s}" + "".join(f"{c:>{w}s}" for c, _ in cols)
    rows = [("median step s", "median_step_s", "{:.3f}"), ("  rollout s", "median_rollout_s", "{:.3f}"),
            ("  generate s", "median_generate_s", "{:.3f}"),
            ("    of it CB set-up s", "median_cb_setup_s", "{:.3f}"), ("  train s", "median_train_s", "{:.3f}"),
            ("mean completion len", "mean_completion_len", "{:.2f}"),
            ("completion len p10", "completion_len_p10", "{:.1f}"),
            ("completion len p50", "completion_len_p50", "{:.1f}"),
            ("completion len p90", "completion_len_p90", "{:.1f}"),
            ("completion len max", "completion_len_max", "{:.0f}"),
            ("finished (EOS) frac", "finished_frac", "{:.3f}"),
            ("useful tokens/step", "useful_tokens", "{:.0f}"),
            ("useful tok/s, generate", "useful_tok_per_s_generate", "{:.0f}"),
            ("useful tok/s, step", "useful_tok_per_s_step", "{:.0f}"),
            ("zero-adv group frac", "zero_adv_frac", "{:.3f}"),
            ("train tokens/step", "train_tokens", "{:.0f}"), ("train TFLOP/s", "train_tflops", "{:.2f}"),
            ("train MFU", "train_mfu", "{:.1%}"), ("  MFU, N + V*H", "train_mfu_untied_n", "{:.1%}"),
            ("timed steps", "timed_steps", "{:.0f}")]
    lines = [head]
    for label, key, fmt in rows:
        vals = [s.get(key) for _, s in cols]
        if all(v is None for v in vals):
            continue
        lines.append(f"{label:26s}" + "".join(f"{f(v, fmt):>{w}s}" for v in vals))
    if paths:
        for p in paths:
            e = res["paths"][p]
            r = e.get("ratio_npo_over_trl")
            err = (res.get("errors") or {}).get(f"trl:{p}")
            lines.append(f"npo / TRL {p} step time: {f(r)}" + (f"  (TRL failed: {err[:160]})" if err else "")
                         + (f"  [npo alongside it: {f(e['npo'].get('median_step_s'))} s]" if e.get("npo") else ""))
    elif res.get("ratio_npo_over_trl"):
        lines.append(f"npo / TRL step time: {res['ratio_npo_over_trl']:.3f}")
    return "\n".join(lines)
