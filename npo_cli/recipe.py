"""The recipe: every setting of a run, as a pydantic model loaded from YAML.

A recipe is stored with every checkpoint (as a JSON object), so a run can always be
reproduced and two checkpoints' settings can be diffed. Unknown keys are errors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from npo_cli.errors import NpoError


class Section(BaseModel):
    # strict: `true` is not 1 and "1e-4" is not a number (an int still fills a float); no inf or nan
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


class LoraConfig(Section):
    r: int = Field(ge=1, description="Rank of the adapter matrices.")
    alpha: float = Field(gt=0, description="Scale: the adapter's update is multiplied by alpha / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter's input while training.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Names of the modules to adapt (e.g. [q_proj, v_proj]), or 'all-linear': "
        "every linear layer but the LM head."
    )


class ModelConfig(Section):
    path: str = Field(
        "tiny",
        description="'tiny' (the built-in 1M-parameter Qwen2 with a char tokenizer), a Hugging Face "
        "model folder, a store ref such as 'base/weak' / 'base/main@0', or a Hugging Face Hub id ORG/NAME "
        "such as 'Qwen/Qwen2.5-0.5B-Instruct' (read through the HF cache; ORG/NAME is a store ref when the "
        "store has a run ORG).",
    )
    revision: str | None = Field(
        None, description="Hub id only: the branch, tag or commit to load (default: main); the commit loaded "
        "is recorded with the run's first checkpoint.",
    )
    store: str | None = Field(
        None, description="Store URL that `path` refers to when it is a ref (default: the run's store)."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Compute dtype for sampling and the training forward/backward."
    )
    master_fp32: bool = Field(
        True, description="With a 16-bit dtype: fp32 weights and optimizer state, training under autocast, "
        "sampling from a 16-bit copy synced every step. Off: pure 16-bit training (AdamW updates below "
        "the weights' 8-bit mantissa resolution round away).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' picks cuda when present.")
    threads: int = Field(1, ge=1, description="torch.set_num_threads on CPU (1 avoids stalls on shared cores).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    lora: LoraConfig | None = Field(
        None, description="Train a LoRA adapter (peft) instead of the whole model: the base weights stay frozen "
        "and are stored once; each checkpoint stores the adapter and its optimizer state."
    )


class ArithmeticConfig(Section):
    digits: int = Field(
        2, ge=1, le=6, description="Easy problems: operands drawn from 0 .. 10^digits - 1 (2 -> 10,000 sums)."
    )
    hard_digits: int = Field(
        3, ge=1, le=6, description="Hard problems: operands below 10^hard_digits, at least one >= 10^digits."
    )
    hard_fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="Share of hard problems (the plateau regime mixes easy and hard)."
    )
    ops: list[Literal["+", "-", "*"]] = Field(["+"], description="Operators drawn uniformly.")
    terms: int = Field(2, ge=2, le=4, description="Operands per problem.")
    train_size: int = Field(
        20000, ge=1, description="Length of the train problem list the trainer samples from (hard share = "
        "hard_fraction; a class smaller than its share repeats)."
    )


class DatasetConfig(Section):
    path: str = Field(
        description="What datasets.load_dataset reads: a Hub name (user/name, through the Hugging Face cache), a "
        "local folder of Parquet/JSONL/CSV files, a save_to_disk folder, or a format ('parquet', 'json', 'csv') "
        "with data_files."
    )
    name: str | None = Field(None, description="The dataset's configuration (subset), e.g. 'main'.")
    split: str = Field("train", description="The split trained on.")
    eval_split: str | None = Field(
        None, description="The held-out split (e.g. 'test'); default: 1 in 10 of `split` by a hash of the prompt."
    )
    data_files: str | list[str] | dict[str, str | list[str]] | None = Field(
        None, description="Files or globs (local, hf://datasets/..., any fsspec URL), or one entry per split."
    )


PACKAGED_FORMATS = ("parquet", "json", "csv", "text", "arrow")  # task.dataset.path values that name a file format


class RewardConfig(Section):
    function: str = Field(
        description="module:function, called as TRL's GRPOTrainer calls a reward: f(prompts=, completions=, "
        "completion_ids=, **columns) -> one float (or None: not applicable) per completion."
    )
    weight: float = Field(1.0, description="Its weight in the sum.")


class TaskConfig(Section):
    kind: Literal["arithmetic", "file", "dataset"] = Field(
        "arithmetic", description="Built-in generator, a prompt file, or a `datasets` source (implied by "
        "task.dataset)."
    )
    arithmetic: ArithmeticConfig = Field(default_factory=ArithmeticConfig)
    train_path: str | None = Field(None, description="JSONL or Parquet prompt set (any fsspec URL), kind=file.")
    eval_path: str | None = Field(None, description="Held-out prompt set; default: a split of train_path.")
    dataset: DatasetConfig | None = Field(None, description="A `datasets.load_dataset` source, kind=dataset.")
    prompt_field: str = Field("prompt", description="Field holding the prompt text.")
    answer_field: str = Field("answer", description="Field holding the reference answer.")
    template: str = Field("{prompt}", description="Prompt template; {prompt} is replaced by the prompt text.")
    chat_template: bool = Field(
        False, description="Wrap prompts with the tokenizer's chat template (needed by chat-format prompts: a "
        "list of {role, content} messages ending with the user's turn, as in TRL's conversational datasets)."
    )
    system_prompt: str | None = Field(
        None, description="With chat_template: a system message before each prompt (a chat prompt's own "
        "system message wins)."
    )
    eval_size: int = Field(256, ge=1, description="Held-out problems used by eval.")
    verifier: str = Field(
        "exact", description="'exact', 'math' (math-verify on the final/boxed answer) or 'module:function'."
    )
    verifier_timeout: float = Field(
        5.0, gt=0, description="Seconds per `math` or module:function verifier call before it scores 0 and "
        "counts as failed."
    )
    verifier_max_failures: float = Field(
        0.1, ge=0, le=1, description="Share of verifier calls that may fail (raise or time out; each scores 0) "
        "before the run stops; judged over at least 20 calls. 0: the first failure stops it."
    )
    format_reward: float = Field(0.0, description="Added when the completion ends with EOS in the expected format.")
    rewards: list[RewardConfig] = Field(
        [], description="TRL reward functions: the reward is their weighted sum (None entries left out) instead of "
        "the verifier's score."
    )
    correct: str | None = Field(
        None, description="What decides that a completion is correct (accuracy, eval, NPO's guide, AutoNPO's "
        "mistakes): 'verifier' (task.verifier) or the module:function of one of task.rewards. Default: "
        "'verifier'; required with task.rewards."
    )
    correct_threshold: float = Field(1.0, description="A score of task.correct at least this counts as correct.")

    @model_validator(mode="after")
    def _correct_is_named(self):
        names = [r.function for r in self.rewards]
        if self.rewards and self.correct is None:  # no reward is a safe guess at correctness
            raise ValueError("task.rewards needs task.correct: 'verifier' or the module:function of the reward "
                             "whose score decides correctness")
        if self.correct is not None and self.correct not in ("verifier", *names):
            raise ValueError(f"task.correct must be 'verifier' or one of task.rewards ({', '.join(names) or 'none'}),"
                             f" not '{self.correct}'")
        return self

    @property
    def separate_eval(self) -> bool:
        """The held-out problems come from their own file or split, not from the hash split of the train set."""
        return bool(self.eval_path or (self.dataset and self.dataset.eval_split))

    @model_validator(mode="before")
    @classmethod
    def _dataset_implies_kind(cls, data):
        if isinstance(data, dict) and data.get("dataset") is not None and "kind" not in data:
            data = {**data, "kind": "dataset"}
        return data

    @model_validator(mode="after")
    def _one_data_source(self):
        if self.kind == "dataset" and self.dataset is None:
            raise ValueError("task.kind=dataset needs task.dataset: {path: ...}")
        if self.dataset is not None and self.kind != "dataset":  # else it would be ignored
            raise ValueError(f"task.dataset is read by task.kind=dataset, not {self.kind}; drop task.kind")
        if self.dataset is not None and (self.train_path or self.eval_path):
            raise ValueError("task.dataset and task.train_path / eval_path are two data sources; keep one")
        return self

    @model_validator(mode="after")
    def _template_has_prompt(self):
        if "{prompt}" not in self.template:  # else every problem would get the same prompt
            raise ValueError("task.template must contain {prompt}, where the problem's text goes")
        if self.system_prompt is not None and not self.chat_template:  # else it would be ignored
            raise ValueError("task.system_prompt needs task.chat_template: true")
        return self


class RolloutConfig(Section):
    backend: Literal["hf", "vllm"] = Field("hf", description="Sampling engine.")
    prompts_per_step: int = Field(16, ge=1, description="Prompts per training step.")
    group_size: int = Field(8, ge=2, description="Completions per prompt (n).")
    max_new_tokens: int = Field(8, ge=1, description="Completion length limit.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")
    batch_size: int = Field(
        256, ge=1, description="Sequences per generate call (HF backend: halved for the rest of the run when "
        "the GPU runs out of memory)."
    )
    static_cache: bool | None = Field(
        None, description="Preallocated KV cache; on CUDA each decoding step (forward and sampling) is one compiled "
        "CUDA graph, and rows that have ended leave the batch every 32 tokens. Fast on GPU; the first calls "
        "compile. Default (null): on when the model is on CUDA, off on CPU."
    )
    vllm_gpu_memory: float = Field(
        0.3, gt=0, le=1, description="backend=vllm on GPU: share of GPU memory the engine may take "
        "(weights + KV cache); the rest is left to training."
    )
    vllm_max_model_len: int | None = Field(
        None, ge=1, description="backend=vllm: longest prompt + completion the engine plans for "
        "(default: the model's context length; lower it to fit the KV cache)."
    )

    @model_validator(mode="after")
    def _vllm_logprobs_before_top_p(self):
        # The trainer's log-prob is log_softmax(logits / T) before the top-p cut. vLLM reports it with
        # top_p = 1 (after temperature) or T = 1 (before any processing), never with both set.
        if self.backend == "vllm" and self.top_p < 1 and self.temperature != 1:
            raise ValueError("backend vllm reports log-probs before the top-p cut only at temperature 1 or "
                             "top_p 1; set one of them to 1 or use backend hf")
        return self


class GRPOConfig(Section):
    scale_std: bool = Field(True, description="Divide advantages by the group std (False = Dr.GRPO).")
    adv_eps: float = Field(1e-4, gt=0, description="eps in (r - mean) / (std + eps).")
    clip_low: float = Field(0.2, ge=0, description="Lower clip: ratio >= 1 - clip_low.")
    clip_high: float = Field(0.28, ge=0, description="Upper clip: ratio <= 1 + clip_high.")
    agg: Literal["token-mean", "seq-mean", "constant"] = Field(
        "token-mean",
        description="token-mean (DAPO), seq-mean (GRPO paper), constant (Dr.GRPO: sum / max_new_tokens).",
    )
    kl_coef: float = Field(0.0, ge=0, description="k3 KL penalty to the initial policy (0 = off).")
    mask_truncated: bool = Field(
        False, description="Completions cut off by rollout.max_new_tokens (no EOS) train nothing and leave the "
        "loss's normaliser (TRL's mask_truncated_completions, DAPO's overlong filtering); their rewards still "
        "count in their group's advantages."
    )
    updates_per_batch: int = Field(1, ge=1, description="Optimizer passes over each batch.")
    lr: float = Field(2e-4, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient norm clip.")
    schedule: Literal["constant", "cosine"] = Field("constant", description="LR schedule.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps (both schedules).")
    micro_batch_size: int = Field(
        64, ge=0, description="Sequences per forward/backward (grad accumulation). Halved for the rest of the "
        "run when the GPU runs out of memory; 0 = start from the whole batch."
    )
    skip_zero_adv: bool = Field(
        True, description="Skip forward/backward of rows with zero advantage (exact: they add 0 to the "
        "gradient; ignored when kl_coef > 0)."
    )
    logprob_chunk: int = Field(
        0, ge=0, description="Tokens per LM-head chunk when computing log-probs. 0 = auto: the whole "
        "micro-batch at once when its logits fit in half the free memory (no recompute in backward), "
        "else the most that fit (each chunk recomputed in backward)."
    )
    compile: bool | None = Field(
        None, description="torch.compile the training forward/backward: each decoder layer and the LM-head "
        "log-prob (dynamic shapes; the first step pays the compile). Sampling uses its own uncompiled copy. "
        "Default (null): on when the model is on CUDA (a model it cannot compile trains uncompiled; not with "
        "model.lora, whose sampling would need a full copy of the weights), off on CPU."
    )

    @field_validator("betas", mode="before")
    @classmethod
    def _betas_from_list(cls, v):
        return tuple(v) if isinstance(v, list) else v  # YAML and JSON give a list; strict wants the tuple


class TrainConfig(Section):
    steps: int = Field(200, ge=0, description="Total optimizer steps of the run.")
    save_every: int = Field(25, ge=1, description="Checkpoint every N steps (and at the end).")
    background_save: bool = Field(
        True, description="Write checkpoints in a background thread: the loop waits only for a copy of the "
        "tensors and state, and the next save (or the end) waits for the write. False: write while the loop waits."
    )
    eval_every: int = Field(
        50, ge=0, description="Held-out eval every N steps (and at the end). 0 = no eval while training, not even "
        "at the end (npo eval measures any checkpoint)."
    )
    eval_samples: int = Field(1, ge=1, description="Sampled completions per eval problem (pass@k).")
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="Under torchrun: ddp (full model per rank, gradients summed) or fsdp (FSDP2: "
        "decoder layers, their gradients and AdamW state sharded). Ignored in a single process."
    )
    record_successes: bool = Field(
        False, description="Keep every step's verified on-policy successes (with their behaviour log-probs) in "
        "the store, stored with each checkpoint, for a later run to replay with npo.source=rlep."
    )
    keep_last: int | None = Field(
        None, ge=1, description="Keep the tensors of only the last N checkpoints of the branch: after each save, "
        "older ones are marked pruned (their manifests, metrics and events stay; npo gc frees their tensors). "
        "Fork points, guides, tagged checkpoints (npo tag) and the newest one with optimizer state are never "
        "pruned. None: keep all."
    )
    save_optimizer_every: int | None = Field(
        None, ge=1, description="Store the optimizer state only at every K-th save (steps that are multiples of "
        "K * save_every), at the end and on a stop; the others are weights-only and cannot be resumed or "
        "forked from. None: at every save."
    )


class LoggingConfig(Section):
    progress: bool = Field(True, description="Rich progress bar.")
    metrics_jsonl: str | None = Field(
        "metrics.jsonl", description="Local file streaming per-step metrics (a relative path: under "
        "./runs/STORE/RUN/BRANCH/, STORE being the store folder's name and a hash of its URL; {store}, {run} "
        "and {branch} are filled in). A new run or branch starts it afresh; a resume keeps the steps before it; "
        "only the branch's lease holder writes it."
    )
    tensorboard: str | None = Field(None, description="TensorBoard log dir (needs tensorboard installed).")
    wandb: str | None = Field(None, description="W&B project (needs wandb installed).")


class NPOConfig(Section):
    source: Literal["none", "npo", "luffy", "exgrpo", "rlep"] = Field(
        "none", description="Source of off-policy slots: none = plain GRPO; npo = a near-future checkpoint's "
        "verified rollouts (npo.guide); luffy = a teacher's (npo.teacher_path or npo.guide); exgrpo = the run's "
        "own past successes; rlep = the successes a finished run recorded while training (npo.replay_from, "
        "trained with train.record_successes)."
    )
    guide: str | None = Field(None, description="Guide checkpoint ref (source=npo) or teacher (luffy).")
    start: int = Field(0, ge=0, description="First step with mixing on.")
    until: int | None = Field(None, ge=0, description="Mixing stops at this step (None: never).")
    gate: float = Field(0.6, ge=0.0, le=1.0, description="Mix only when on-policy group accuracy <= gate.")
    max_tries: int = Field(8, ge=1, description="Guide samples per prompt before giving up.")
    importance_sampling: bool = Field(True, description="Ratio pi_theta / pi_guide (False: ratio 1 detached).")
    guide_clip: Literal["same", "wide", "luffy"] = Field(
        "same", description="Guide-slot clipping: same as on-policy, wider upper bound, or LUFFY shaping."
    )
    guide_clip_high: float = Field(1.0, ge=0, description="Upper clip of the guide slot when guide_clip=wide.")
    luffy_gamma: float = Field(0.1, gt=0, description="LUFFY policy shaping f(p) = p / (p + gamma).")
    teacher_path: str | None = Field(None, description="luffy: JSONL of teacher completions (prompt, completion).")
    replay_from: str | None = Field(
        None, description="rlep: the checkpoint (RUN, RUN/BRANCH, RUN@STEP or id) whose lineage's recorded "
        "successes (train.record_successes) are replayed, with their recorded behaviour log-probs."
    )
    guide_round: int = Field(
        4, ge=1, description="Guide samples per prompt per generate call, until max_tries (ours)."
    )
    replay_ratio: float = Field(
        0.5, ge=0.0, le=1.0, description="exgrpo: share of rollout.prompts_per_step given to experience "
        "prompts (ExGRPO's rho): sampled like the fresh ones, with a stored success in a wrong slot when "
        "gated; the fresh prompts they displace are skipped, so a step samples as many rollouts as GRPO."
    )
    replay_capacity: int = Field(2048, ge=1, description="exgrpo: prompts kept in the replay buffer (oldest go).")
    replay_per_prompt: int = Field(4, ge=1, description="exgrpo: successes kept per prompt (newest).")
    replay_sigma: float = Field(
        0.2, gt=0, description="exgrpo: prompts are drawn with weight exp(-(acc-0.5)^2 / 2 sigma^2): "
        "medium difficulty first (ExGRPO's bucket preference, as one Gaussian; ours)."
    )

    @model_validator(mode="after")
    def _source_named(self):
        # a guide, teacher file or replay run without a source would be ignored: plain GRPO, silently
        if self.source == "none":
            for key in ("guide", "teacher_path", "replay_from"):
                if getattr(self, key) is not None:
                    raise ValueError(f"npo.{key} is set but npo.source is none; set npo.source "
                                     "(npo, luffy, exgrpo or rlep)")
        return self


class AutoConfig(Section):
    """AutoNPO (npo_cli/auto.py): warn on a plateau, confirm with a probe, roll back, replay with NPO."""

    enabled: bool = Field(False, description="AutoNPO controller on (npo auto sets it).")
    ema_alpha: float = Field(
        0.05, gt=0.0, le=1.0, description="Weight of the newest step in the EMAs of training reward and entropy."
    )
    window: int = Field(40, ge=2, description="Steps over which the EMAs' trends are fitted (least squares).")
    slope_eps: float = Field(
        0.001, description="Warning needs the reward EMA's slope below this (reward per step): stagnation."
    )
    entropy_drop: float = Field(
        0.1, ge=-1.0, le=1.0, description="Warning needs the entropy EMA to fall by at least this share of its "
        "level over the window (fitted slope x window / level)."
    )
    min_rise: float = Field(
        0.05, description="Warning needs the reward EMA to have risen by at least this (reward units) above its "
        "lowest value since the run's start or the last replay's start (counted once the EMA spans 1/ema_alpha "
        "steps): a plateau follows progress; a sparse start, where reward has not moved, is auto.bootstrap's case."
    )
    patience: int = Field(5, ge=1, description="Consecutive warned steps before the confirming probe.")
    min_gap: int = Field(
        30, ge=0, description="Steps after a replay ends (or a probe that did not confirm) before the next warning."
    )
    pool_size: int = Field(
        512, ge=1, description="Mistake pool B: most recent all-wrong prompts kept, each with the step it failed at."
    )
    probe_size: int = Field(
        64, ge=1, description="Prompts in a probe: pool prompts in the confirming probe (spread over candidates); "
        "early mistakes in a bootstrap scout's checks."
    )
    probe_samples: int = Field(
        4, ge=1, description="Of the npo.max_tries completions sampled per probe prompt, the first this many "
        "enter the KL forwards for V (bounds their cost)."
    )
    deltas: list[int] | None = Field(
        None, description="Candidate rollback distances; None: every saved step within delta_max."
    )
    delta_max: int = Field(100, ge=1, description="Largest rollback distance considered (steps).")
    bucket: Literal["around", "stretch"] = Field(
        "around", description="B_delta for Q: mistakes nearest to step t-delta (around, within train.save_every), "
        "or every mistake made since t-delta (stretch) (ours)."
    )
    min_score: float = Field(
        0.25, ge=0.0, description="Confirmation: intervene (or restart from a bootstrap scout's guide) only when the "
        "best S = Q/V reaches this, on NPO's scale (Q solved within npo.max_tries, V = exp KL); set from the stall "
        "regime's pilot: stalled checkpoints S 0.17-0.18, the policy's own retries 0.19, a guide that helped 0.29."
    )
    max_interventions: int = Field(2, ge=0, description="Plateau interventions (rollback + replay) at most.")
    gate: float | None = Field(
        None, ge=0.0, le=1.0, description="npo.gate during replays (None: the recipe's npo.gate)."
    )
    bootstrap: bool = Field(
        False, description="Early bootstrapping: the run starts as a scout; at every saved step L (and at "
        "scout_steps) it measures S(L) = Q/V of its policy as a guide for the step-0 policy (Q: share of the early "
        "mistakes, those of its first train.save_every steps (up to probe_size), solved within npo.max_tries; "
        "V = exp KL(pi_L || pi_0)); when it stops (scout_patience, scout_steps) it restarts from step 0 with the "
        "argmax-S checkpoint L* as guide (NPO for steps 0..L*). No early mistake, or none solved by the longest "
        "scout: no restart, the scout goes on as the run."
    )
    scout_patience: int = Field(
        2, ge=1, description="The scout stops once S has stayed below its best (with Q > 0) for this many checks."
    )
    scout_steps: int = Field(
        100, ge=1, description="Longest bootstrapping scout (steps); it stops here at the latest."
    )


class Recipe(Section):
    name: str = Field("run", description="Run name in the store.")
    seed: int = Field(0, description="Seeds data order, sampling and init.")
    store: str | None = Field(None, description="Store URL (default: $NPO_STORE, else ./checkpoints).")
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    npo: NPOConfig = Field(default_factory=NPOConfig)
    auto: AutoConfig = Field(default_factory=AutoConfig)

    @model_validator(mode="after")
    def _auto_keeps_checkpoints(self):
        # AutoNPO measures and rolls back to older checkpoints of the run: it needs their weights and optimizer
        if self.auto.enabled and (self.train.keep_last or self.train.save_optimizer_every):
            raise ValueError("train.keep_last and train.save_optimizer_every cannot be used with auto.enabled: "
                             "AutoNPO rolls back to older checkpoints and needs them whole")
        return self

    @model_validator(mode="after")
    def _lora_samples_with_hf(self):
        if self.model.lora is not None and self.rollout.backend == "vllm":
            raise ValueError("model.lora samples with rollout.backend=hf only (the vLLM engine takes full "
                             "weights); set rollout.backend=hf")
        return self


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "recipe"
    if first["type"] == "extra_forbidden":
        return f"unknown recipe key '{where}'"
    msg = first["msg"].removeprefix("Value error, ")
    got = first.get("input")
    wanted = {"int_type": "a whole number", "float_type": "a number", "bool_type": "true or false"}.get(first["type"])
    if wanted and isinstance(got, str) and got.strip().lower().lstrip("+-") in ("inf", "infinity", "nan"):
        msg += f", got {got[:40]!r}; write a finite number"
    elif wanted and isinstance(got, str):  # "1e-4" in quotes, "true", "many"
        msg += f", got the text {got[:40]!r}; write {wanted} without quotes"
    elif (wanted or first["type"] == "finite_number") and isinstance(got, bool | int | float):
        msg += f", got {json.dumps(got) if isinstance(got, bool) else got}"
    return f"recipe key '{where}': {msg}"


class _Refused(yaml.YAMLError):
    """YAML that parses but that a recipe may not hold; the message says what to fix."""


_MAX_VALUES = 10_000  # a recipe holds ~100; aliases expanding past this are an alias bomb


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader that reads 1e-4 as a number (YAML 1.1 wants 1.0e-4, else it is text), refuses a key set
    twice in one mapping (YAML keeps the last, silently) and aliases that recurse or expand past _MAX_VALUES."""

    def compose_mapping_node(self, anchor):
        node = super().compose_mapping_node(anchor)
        lines: dict[tuple[str, str], int] = {}
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                line = key.start_mark.line + 1
                if (key.tag, key.value) in lines:
                    raise _Refused(f"key {key.value[:40]!r} is set twice (line {lines[key.tag, key.value]}, "
                                   f"then line {line}); keep one")
                lines[key.tag, key.value] = line
        return node

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _expanded_size(node, set(), {})
        return node


_RecipeLoader.add_implicit_resolver(  # 1e-4, 2E5, 1.0e4: YAML 1.2 floats that YAML 1.1 leaves as text
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _expanded_size(node: yaml.Node, open_: set[int], sizes: dict[int, int]) -> int:
    """Values under `node` with every alias expanded; refuses a node inside itself (a recursive alias)."""
    if isinstance(node, yaml.ScalarNode):
        return 1
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_:
        raise _Refused(f"the anchor at line {node.start_mark.line + 1} is used inside itself (a recursive "
                       "alias); write the value out")
    open_.add(id(node))
    kids = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else node.value
    size = 1 + sum(_expanded_size(k, open_, sizes) for k in kids)
    open_.discard(id(node))
    if size > _MAX_VALUES:
        raise _Refused(f"its aliases expand to more than {_MAX_VALUES} values (line {node.start_mark.line + 1}); "
                       "write the values out")
    sizes[id(node)] = size
    return size


def parse_override(item: str) -> tuple[list[str], Any]:
    """'a.b=c' -> (['a', 'b'], value); the value is parsed as YAML so 3, 1e-4, true, [1, 2] are typed."""
    if "=" not in item:
        raise NpoError(f"--set needs KEY=VALUE, got '{item}'")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise NpoError(f"--set key '{key}' is not a dotted recipe path like train.steps")
    try:
        value = yaml.load(raw, Loader=_RecipeLoader) if raw.strip() else ""
    except (yaml.YAMLError, RecursionError):
        value = raw
    return path, value


def _is_text_key(path: list[str]) -> bool:
    """The recipe key at `path` holds text (str, or str | None)."""
    kind: Any = Recipe
    for part in path:
        field = getattr(kind, "model_fields", {}).get(part)
        if field is None:
            return False
        kind = field.annotation
    return set(get_args(kind) or (kind,)) in ({str}, {str, type(None)})


def build_recipe(data: dict, overrides: list[str] = ()) -> Recipe:
    data = json.loads(json.dumps(data or {}))  # deep copy, JSON types only
    for item in overrides:
        path, value = parse_override(item)
        if value is not None and not isinstance(value, str) and _is_text_key(path):
            value = item.split("=", 1)[1]  # a text key takes what was typed: name=2024, template=Q: {prompt}
        node = data
        for part in path[:-1]:
            if node.get(part) is None:  # an unset section (model.lora: null) takes its first key
                node[part] = {}
            nxt = node[part]
            if not isinstance(nxt, dict):
                raise NpoError(f"--set {'.'.join(path)}: '{part}' is not a section")
            node = nxt
        node[path[-1]] = value
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise NpoError(_one_line(e)) from None


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """The recipe file plus `--set` overrides."""
    return build_recipe(read_recipe(path), overrides)


def read_recipe(path: str | Path) -> dict:
    """The recipe file as a dict, its relative local paths made absolute (see _resolve_paths)."""
    p = Path(path)
    if p.is_dir():
        raise NpoError(f"recipe {path} is a folder; give a recipe file (YAML), e.g. recipes/quickstart.yaml")
    if not p.is_file():
        raise NpoError(f"recipe file not found: {path}")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise NpoError(f"cannot read recipe {path} ({e.strerror or type(e).__name__}); make it a readable file") \
            from None
    try:
        if b"\0" in raw:
            raise ValueError
        text = raw.decode("utf-8")
    except ValueError:
        raise NpoError(f"recipe {path} is not text (binary, or not UTF-8); give a YAML recipe file") from None
    try:
        data = yaml.load(text, Loader=_RecipeLoader)
    except _Refused as e:
        raise NpoError(f"recipe {path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise NpoError(f"recipe {path} is not valid YAML{where}") from None
    except RecursionError:
        raise NpoError(f"recipe {path} is nested too deeply; a recipe has sections of settings") from None
    if data is None:  # an empty or comment-only file would train a run named 'run' on every default
        raise NpoError(f"recipe {path} is empty; write its settings (`npo recipe schema` lists them)")
    if not isinstance(data, dict):
        raise NpoError(f"recipe {path} must be a YAML mapping of sections, got {type(data).__name__}")
    _resolve_paths(data, p.absolute().parent)
    return data


def _resolve_paths(data: dict, folder: Path) -> None:
    """Relative local paths in a recipe file name files beside it, wherever npo runs: they become absolute
    (the stored recipe then reads the same files on resume and eval). URLs (s3://, memory://) stay as they
    are; so does a model.path that is 'tiny' or a store ref (RUN/BRANCH) unless that folder is beside the
    recipe, the rule npo_cli/model.py follows."""
    def local(value: Any, is_model: bool = False) -> Any:
        if not isinstance(value, str) or not value or "://" in value or Path(value).expanduser().is_absolute():
            return value
        beside = folder / value
        looks_like_ref = value.count("/") <= 1 and not value.startswith(".")
        if is_model and (value == "tiny" or (looks_like_ref and not beside.is_dir())):
            return value
        return str(beside.resolve())

    if "store" in data:
        data["store"] = local(data["store"])
    for section, key in (("model", "store"), ("model", "path"), ("task", "train_path"), ("task", "eval_path"),
                         ("npo", "teacher_path")):
        node = data.get(section)
        if isinstance(node, dict) and key in node:
            node[key] = local(node[key], is_model=(section, key) == ("model", "path"))
    ds = data.get("task", {}).get("dataset") if isinstance(data.get("task"), dict) else None
    if isinstance(ds, dict):
        # a folder beside the recipe, else as written (a Hub name, a format); data_files are the folder's
        # own or a Hub dataset's (relative to it) unless path names a format
        if ds.get("path") in PACKAGED_FORMATS and "data_files" in ds:
            def files(v):
                return [*map(local, v)] if isinstance(v, list) else local(v)
            f = ds["data_files"]
            ds["data_files"] = {k: files(v) for k, v in f.items()} if isinstance(f, dict) else files(f)
        if "path" in ds:
            ds["path"] = local(ds["path"], is_model=True)


def recipe_diff(a: dict, b: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Keys whose values differ between two recipe dicts, as (dotted.key, a, b)."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        key = f"{prefix}{k}"
        if isinstance(va, dict) and isinstance(vb, dict):
            out += recipe_diff(va, vb, key + ".")
        elif va != vb:
            out.append((key, va, vb))
    return out


def schema_rows(model: type[BaseModel] = Recipe, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) for every field, for `npo recipe schema`."""
    rows = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += schema_rows(ann, f"{prefix}{name}.")
            continue
        default = f.get_default(call_default_factory=True)
        # a class by its name; anything else as written: "int | None", "Literal['hf', 'vllm']" (the choices)
        kind = ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", "")
        rows.append((f"{prefix}{name}", kind, json.dumps(default), f.description or ""))
    return rows
