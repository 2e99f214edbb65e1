"""Shared machinery of throughput.py (CPU) and gpu_bench.py (H100): npo vs TRL's GRPOTrainer, same run.

Both trainers start from the same randomly initialised weights (one model saved to a temp folder and
loaded by each), see the same prompt set (the built-in arithmetic task), the same reward (npo's `exact`
verifier), the same batch (P prompts x n completions per optimizer step) and the same loss (TRL
loss_type "dapo" == npo grpo.agg "token-mean", beta 0, eps 0.2 / 0.28, one update per batch).

They alternate: TRL's own `train()` loop drives, and a TrainerCallback times each TRL step
(on_step_begin .. on_step_end: generation happens inside TRL's first micro-step, so it is included)
and then runs and times one `npo Trainer.step()` before TRL's next step begins. The first `warmup`
steps of each are excluded from the medians.

Generation and training are timed apart: npo's own gen_time (rollout backend call); for TRL a wrapper
around `_generate_and_score_completions` (generate + decode + reward + advantages) and one around
`_generate_single_turn` (the HF `generate` call alone). "train" = step - rollout for both.
"""

from __future__ import annotations

import gc
import hashlib
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a source tree without installing npo
    sys.path.insert(0, str(ROOT))

H100_BF16_DENSE = 989e12  # FLOP/s, H100 SXM bf16 dense (no sparsity)


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
    temperature: float = 1.0
    lr: float = 1e-5
    micro_batch: int = 128  # rows per forward/backward on both sides (TRL: per_device_train_batch_size)
    device: str = "cpu"
    dtype: str = "float32"  # npo model.dtype; TRL gets the model in this dtype (+ bf16 autocast if bfloat16)
    static_cache: bool = False  # npo rollout.static_cache
    logprob_chunk: int = 0  # auto, the recipe default
    compile: bool = False  # npo grpo.compile (torch.compile'd decoder layers and LM-head log-probs)
    warmup: int = 1
    steps: int = 5
    seed: int = 0
    trl_gc: bool = False  # gradient checkpointing of the main TRL trainer (TRL's default is True)
    with_trl_gc: bool = False  # also time TRL with gradient checkpointing on (after the alternation)
    threads: int = 1
    reward: str = "exact"  # "exact" (npo's verifier) or "hash" (coin flip on the completion text: non-zero
    #                        advantages even at random init, so the backward has signal; same on both sides)


@dataclass
class Side:
    name: str
    step_s: list[float] = field(default_factory=list)
    rollout_s: list[float] = field(default_factory=list)  # generation (+ scoring for TRL)
    generate_s: list[float] = field(default_factory=list)  # the bare generate call
    completion_len: list[float] = field(default_factory=list)  # mean completion length per step (incl. EOS)
    finished_frac: list[float] = field(default_factory=list)
    train_tokens: list[int] = field(default_factory=list)  # rows x (max prompt + max completion) per step
    zero_adv: list[float] = field(default_factory=list)  # share of groups whose rewards are all equal
    notes: dict = field(default_factory=dict)

    def summary(self, warmup: int, n_params: int, peak: float | None, n_embed: int = 0) -> dict:
        """Medians after warm-up. MFU = 6 N T / train time / peak; also with N + n_embed (the embedding
        table counted as a second matrix, as if untied: the convention of the 29% reference figure)."""
        def med(xs):
            xs = xs[warmup:]
            return statistics.median(xs) if xs else None

        out = {"step_s_all": [round(x, 4) for x in self.step_s], "median_step_s": med(self.step_s),
               "median_rollout_s": med(self.rollout_s), "median_generate_s": med(self.generate_s) or None,
               "mean_completion_len": (statistics.fmean(self.completion_len[warmup:])
                                       if self.completion_len[warmup:] else None),
               "finished_frac": (statistics.fmean(self.finished_frac[warmup:])
                                 if self.finished_frac[warmup:] else None),
               "zero_adv_frac": (statistics.fmean(self.zero_adv[warmup:]) if self.zero_adv[warmup:] else None),
               "warmup_s": [round(x, 3) for x in self.step_s[:warmup]], **self.notes}
        train = [s - r for s, r in zip(self.step_s, self.rollout_s)]
        out["median_train_s"] = med(train)
        toks = self.train_tokens[warmup:]
        if toks and out["median_train_s"]:
            out["train_tokens"] = statistics.median(toks)
            flops = 6.0 * n_params * out["train_tokens"]
            out["train_tflops"] = flops / out["median_train_s"] / 1e12
            if peak:
                out["train_mfu"] = flops / out["median_train_s"] / peak
                out["train_mfu_untied_n"] = (6.0 * (n_params + n_embed) * out["train_tokens"]
                                             / out["median_train_s"] / peak)
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


# ---------------------------------------------------------------- model, tokenizer


def synthetic_tokenizer(vocab: int):
    """Char tokenizer for prompts plus synthetic tokens up to id vocab-1, and EOS at id `vocab`.

    The model has `vocab` logits, so EOS (id == vocab) is never sampled: every completion runs to
    max_new_tokens. Every id the model can sample decodes (to a '<|tN|>' piece).
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    from npo_cli.tiny import CHARS

    toks = {"<pad>": 0, "<unk>": 1}
    for ch in CHARS:
        toks[ch] = len(toks)
    for i in range(len(toks), vocab):
        toks[f"<|t{i}|>"] = i
    toks["<eos>"] = vocab
    core = Tokenizer(models.BPE(vocab=toks, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left")


def make_model_dir(cfg: BenchConfig, root: str) -> tuple[str, int]:
    """A random-init Qwen2 (seeded) and its tokenizer saved to root/model; -> (path, parameter count)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from npo_cli.model import DTYPES
    from npo_cli.tiny import char_tokenizer

    if cfg.force_length:
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
    """One timed npo step; records the lengths the rollout produced."""
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
    side.step_s.append(dt)
    side.rollout_s.append(m["gen_time"])
    side.generate_s.append(m["gen_time"])
    side.completion_len.append(sum(len(r.completion_ids) for r in rows) / len(rows))
    side.finished_frac.append(sum(r.finished for r in rows) / len(rows))
    P = max(len(r.prompt_ids) for r in rows)
    C = max(len(r.completion_ids) for r in rows)
    side.train_tokens.append(len(rows) * (P + C))
    side.zero_adv.append(m["zero_adv_frac"])


# ---------------------------------------------------------------- TRL


def make_trl(cfg: BenchConfig, model_path: str, out_dir: str, gradient_checkpointing: bool, max_steps: int,
             callbacks: list, side: Side):
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
    )
    trainer = GRPOTrainer(model=model, reward_funcs=exact_reward, args=args, train_dataset=data,
                          processing_class=tok, callbacks=callbacks)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints TRL's end-of-train metrics dict
    if trainer.args.generation_batch_size != rows:
        raise SystemExit(f"TRL generation batch {trainer.args.generation_batch_size} != {rows}")
    return trainer


def instrument_trl(trainer, side: Side, device: str) -> None:
    """Time TRL's rollout (generate + score) and bare generate; record completion lengths."""
    gas, gst = trainer._generate_and_score_completions, trainer._generate_single_turn

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
        side.completion_len.append(sum(map(len, completion_ids)) / len(completion_ids))
        eos = set(trainer.eos_token_ids)
        side.finished_frac.append(sum(bool(c) and c[-1] in eos for c in completion_ids) / len(completion_ids))
        return completion_ids, logprobs

    trainer._generate_and_score_completions = generate_and_score
    trainer._generate_single_turn = single_turn


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


def run(cfg: BenchConfig, log=print) -> dict:
    import transformers

    transformers.logging.set_verbosity_error()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cfg.device == "cpu":
        torch.set_num_threads(cfg.threads)
    total = cfg.warmup + cfg.steps
    peak = H100_BF16_DENSE if cfg.device.startswith("cuda") else None
    res: dict = {"config": asdict(cfg), "torch": torch.__version__, "transformers": transformers.__version__}
    if cfg.device.startswith("cuda"):
        res["gpu"] = torch.cuda.get_device_name()
    with tempfile.TemporaryDirectory(prefix="npo-bench-") as tmp:
        t = time.perf_counter()
        model_path, n_params = make_model_dir(cfg, tmp)
        res["n_params"] = n_params
        n_embed = (cfg.vocab or 0) * cfg.hidden if cfg.vocab else 0  # tied: the LM head reuses it
        log(f"model: {n_params / 1e6:.2f}M params (tied embedding counted once), saved in "
            f"{time.perf_counter() - t:.1f}s")

        t = time.perf_counter()
        npo_trainer, _ = make_npo(cfg, model_path)
        log(f"npo trainer built in {time.perf_counter() - t:.1f}s")
        npo = Side("npo")
        trl = Side("trl")
        err: dict[str, str] = {}

        state = {"npo": npo_trainer}

        def npo_once() -> bool:
            """One npo step. The GPU run is one shot: if the static-cache path fails, retry npo with a
            dynamic cache; if npo fails for good, stop it and let TRL finish. False when npo is out."""
            if state.get("npo") is None:
                return False
            try:
                npo_step(state["npo"], npo, cfg.device)
                return True
            except Exception as e:  # noqa: BLE001
                import traceback

                traceback.print_exc()
                state["npo"] = None
                gc.collect()
                if cfg.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                if not cfg.static_cache or "npo" in err:
                    err["npo_fatal"] = f"{type(e).__name__}: {e}"
                    log(f"npo failed ({err['npo_fatal']}); npo stopped")
                    return False
                err["npo"] = f"{type(e).__name__}: {e}"
                log(f"npo step failed with rollout.static_cache=true ({err['npo']}); "
                    "rebuilding npo with static_cache=false")
                npo.notes["static_cache_failed"] = True
                for xs in (npo.step_s, npo.rollout_s, npo.generate_s, npo.completion_len, npo.finished_frac,
                           npo.train_tokens, npo.zero_adv):
                    xs.clear()
                state["npo"] = make_npo(replace(cfg, static_cache=False, seed=cfg.seed + 1), model_path)[0]
                return npo_once()

        def after(i: int) -> None:
            ok = npo_once()
            log(f"  step {i}/{total}: trl {trl.step_s[-1]:.3f}s  npo {npo.step_s[-1] if ok else float('nan'):.3f}s"
                f"{'  (warm-up)' if i <= cfg.warmup else ''}")

        try:
            import trl as trl_pkg

            res["trl_version"] = trl_pkg.__version__
            t = time.perf_counter()
            trl_trainer = make_trl(cfg, model_path, str(Path(tmp) / "trl"), cfg.trl_gc, total,
                                   [_callback_class()(trl, cfg.device, after)], trl)
            instrument_trl(trl_trainer, trl, cfg.device)
            log(f"TRL trainer built in {time.perf_counter() - t:.1f}s "
                f"(gradient checkpointing {'on' if cfg.trl_gc else 'off'})")
            trl.notes.update({"gradient_checkpointing": cfg.trl_gc, "optim": str(trl_trainer.args.optim),
                              "per_device_train_batch_size": trl_trainer.args.per_device_train_batch_size,
                              "gradient_accumulation_steps": trl_trainer.args.gradient_accumulation_steps,
                              "generation_batch_size": trl_trainer.args.generation_batch_size})
            trl_trainer.train()
            res["threads_after"] = torch.get_num_threads()
        except Exception as e:  # noqa: BLE001  (on the one-shot GPU run, npo's numbers must still come out)
            import traceback

            traceback.print_exc()
            err["trl"] = f"{type(e).__name__}: {e}"
            log(f"TRL failed ({err['trl']}); timing npo alone")
        while len(npo.step_s) < total and npo_once():  # TRL failed part way, or npo fell back
            log(f"  npo step {len(npo.step_s)}/{total}: {npo.step_s[-1]:.3f}s")
        npo.notes.update({"gradient_checkpointing": False, "static_cache": cfg.static_cache, "compile": cfg.compile,
                          "micro_batch_size": cfg.micro_batch, "optim": "torch.optim.AdamW (default)"})
        if state.get("npo") is not None:  # rollout.static_cache: npo's own decoding, or HF's after a compile failure
            backend = state["npo"].backend
            npo.notes.update({"own_decoding": getattr(backend, "own_decoding", None),
                              "decode_compile_error": getattr(backend, "compile_error", None)})
        del npo_trainer
        state.clear()
        trl_gc = None
        if cfg.with_trl_gc and "trl" not in err:
            trl_gc = Side("trl_gc")
            try:
                del trl_trainer
                gc.collect()
                if cfg.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                tr = make_trl(cfg, model_path, str(Path(tmp) / "trl-gc"), True, total,
                              [_callback_class()(trl_gc, cfg.device)], trl_gc)
                instrument_trl(tr, trl_gc, cfg.device)
                log("TRL with gradient checkpointing on (its default), alone after the alternation:")
                tr.train()
                log("  steps: " + "  ".join(f"{x:.3f}" for x in trl_gc.step_s))
                trl_gc.notes["gradient_checkpointing"] = True
            except Exception as e:  # noqa: BLE001
                err["trl_gc"] = f"{type(e).__name__}: {e}"
    res["npo"] = npo.summary(cfg.warmup, n_params, peak, n_embed) if npo.step_s else {}
    if trl.step_s:
        res["trl"] = trl.summary(cfg.warmup, n_params, peak, n_embed)
    if trl_gc is not None and trl_gc.step_s:
        res["trl_gc"] = trl_gc.summary(cfg.warmup, n_params, peak, n_embed)
    a, b = res["npo"].get("median_step_s"), (res.get("trl") or {}).get("median_step_s")
    res["ratio_npo_over_trl"] = a / b if a and b else None
    if err:
        res["errors"] = err
    if cfg.device.startswith("cuda"):
        res["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def table(res: dict) -> str:
    def f(x, fmt="{:.3f}"):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)

    sides = [k for k in ("npo", "trl", "trl_gc") if isinstance(res.get(k), dict)]
    head = f"{'':22s}" + "".join(f"{s:>12s}" for s in sides)
    rows = [("median step s", "median_step_s", "{:.3f}"), ("  rollout s", "median_rollout_s", "{:.3f}"),
            ("  generate s", "median_generate_s", "{:.3f}"), ("  train s", "median_train_s", "{:.3f}"),
            ("mean completion len", "mean_completion_len", "{:.2f}"), ("finished (EOS) frac", "finished_frac",
                                                                         "{:.3f}"),
            ("zero-adv group frac", "zero_adv_frac", "{:.3f}"),
            ("train tokens/step", "train_tokens", "{:.0f}"), ("train TFLOP/s", "train_tflops", "{:.2f}"),
            ("train MFU", "train_mfu", "{:.1%}"), ("  MFU, N + V*H", "train_mfu_untied_n", "{:.1%}")]
    lines = [head]
    for label, key, fmt in rows:
        vals = [res[s].get(key) for s in sides]
        if all(v is None for v in vals):
            continue
        lines.append(f"{label:22s}" + "".join(f"{f(v, fmt):>12s}" for v in vals))
    if res.get("ratio_npo_over_trl"):
        lines.append(f"npo / TRL step time: {res['ratio_npo_over_trl']:.3f}")
    return "\n".join(lines)
