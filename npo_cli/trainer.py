"""The GRPO loop. `Trainer.step()` reads top to bottom: prompts -> rollout -> verify -> off-policy
slots -> advantages -> loss -> optimizer -> metrics. `Trainer.train()` wraps it with checkpoints,
eval, the progress line, the branch lease and stop signals (SIGINT / SIGTERM: the step in flight gets
STOP_GRACE seconds to finish and be checkpointed, else it is abandoned and the run stands at its last
checkpoint; a second signal stops at once).

The trainer is handed its two seams (npo_cli/batch.py), called in the loop:
- `source.prompts(step, problems)` and `source.mix(ctx, groups)` (in step): an off-policy slot source
  (NPO guide, LUFFY, replay) may put its own prompts in the batch (ExGRPO's experience) and replace slots
  of the on-policy groups; it sees only a `StepContext`. Plain GRPO's `NoSource` leaves both alone.
- `controller.after_step(trainer, metrics)` (in train): a controller (AutoNPO) watches every step and
  may return True to stop the branch after a checkpoint; plain training's `NoController` never does.
Both keep JSON state (`state_dict` / `load_state_dict`) in every checkpoint; objects they keep in the
store are listed under the state's "objects" and become the manifest's `extra_objects`, so gc keeps
them. Decision records go to `trainer.events`, stored with the next checkpoint.
"""

from __future__ import annotations

import _thread
import hashlib
import json
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future
from contextlib import nullcontext

import torch

from npo_cli import dist
from npo_cli.backend import make_backend
from npo_cli.batch import (
    Group,
    NoController,
    NoSource,
    StepContext,
    collate,
    format_prompt,
    lr_at,
    score_groups,
)
from npo_cli.checkpoint import (
    DTYPES,
    host_copy,
    is_lora,
    load_model,
    load_optimizer,
    load_state_tensors,
    save_checkpoint,
)
from npo_cli.errors import NpoError, one_line, os_reason
from npo_cli.gc import prune
from npo_cli.grpo import OffPolicy, compile_layers, group_advantages, grpo_loss, token_logprobs
from npo_cli.history import branch_walk
from npo_cli.manifest import EVAL_STEP, Event, Manifest, TrainerState
from npo_cli.metrics import MetricSinks
from npo_cli.model import load_policy, param_dtype, resolve_device
from npo_cli.progress import Progress, step_info
from npo_cli.recipe import Recipe, recipe_diff
from npo_cli.rollout import Rollout
from npo_cli.seeds import data_order, eval_seed, forked_rng
from npo_cli.tasks import Problem, first_few, load_problems
from npo_cli.verifiers import Call, make_judge, make_verifier, new_run

# loss stats that are totals (summed over micro-batches), not means
COUNT_KEYS = ("loss", "tokens", "off/rows", "off/tokens")
SUCCESSES_FORMAT = "npo-successes/1"  # the object train.record_successes stores with each checkpoint
# seconds a stop signal leaves the step in flight to finish (and be checkpointed) before abandoning it: a
# short step is kept, a long or hung one does not hold the stop (schedulers kill 10-30 s after SIGTERM)
STOP_GRACE = float(os.environ.get("NPO_STOP_GRACE", "5"))


class Abandoned(BaseException):
    """Raised by the stop-signal handler into the step or eval in flight, which is dropped rather than waited
    for. A BaseException, like KeyboardInterrupt: an `except Exception` on the way (a backend's fallback, a
    verifier's) must not swallow it."""


def check_prompts(recipe: Recipe, tokenizer, config, problems: list[Problem], prompts: list[str] | None = None,
                  eval_file: bool = False) -> None:
    """Every prompt fits the model: one that is empty once tokenized, or too long for the model's context with
    rollout.max_new_tokens after it, would stop the run at the step that samples it. All of them are named in
    one line, now. `prompts`: the problems' formatted prompts, when at hand; eval_file: they are task.eval_path's
    (or task.dataset.eval_split's)."""
    r = recipe.rollout
    if not problems:
        return
    if prompts is None:
        prompts = [format_prompt(recipe, tokenizer, p) for p in problems]
    special = not recipe.task.chat_template
    fast = getattr(tokenizer, "backend_tokenizer", None)  # the Rust tokenizer: what __call__ runs, less its overhead
    lengths = ([len(e.ids) for e in fast.encode_batch(prompts, add_special_tokens=special)] if fast is not None else
               [len(ids) for ids in tokenizer(prompts, add_special_tokens=special)["input_ids"]])
    context = (r.vllm_max_model_len if r.backend == "vllm" else None) or \
        getattr(config, "max_position_embeddings", None)
    limit = context - r.max_new_tokens if context else None
    where = "eval " if eval_file else ""
    long = [f"{where}{p.name} ({n} tokens)" for p, n in zip(problems, lengths) if limit is not None and n > limit]
    empty = [where + p.name for p, n in zip(problems, lengths) if n == 0]
    why = []
    if long:
        why.append(f"{len(long)} of {len(problems)} prompts are too long: {first_few(long)}; a prompt may have "
                   f"{max(limit, 0)} tokens at most (with rollout.max_new_tokens={r.max_new_tokens} it exceeds the "
                   f"model's context of {context} otherwise): shorten or drop them, or lower rollout.max_new_tokens")
    if empty:
        why.append(f"{len(empty)} prompts are empty once tokenized: {first_few(empty)}; check task.template and "
                   "the prompt file")
    if why:
        raise NpoError("; ".join(why))


def evaluate(model, tokenizer, recipe: Recipe, problems: list, samples: int, seed: int,
             backend=None) -> dict[str, float]:
    """Held-out accuracy: sampled (mean over `samples` per problem), pass@samples, and greedy.

    Runs in a forked RNG seeded from `seed`, so evaluating never changes the training stream.
    """
    t0 = time.perf_counter()
    judge = make_judge(recipe.task)
    if backend is None:
        backend = make_backend(model, tokenizer, recipe.rollout, add_special_tokens=not recipe.task.chat_template)
    prompts = [format_prompt(recipe, tokenizer, p) for p in problems]
    check_prompts(recipe, tokenizer, getattr(model, "config", None), problems, prompts, recipe.task.separate_eval)
    with forked_rng(seed):
        sampled = backend.generate(prompts, samples)
        greedy = backend.generate(prompts, 1, greedy=True)

    # one batch for all the verifier calls: one trip to its worker processes
    calls = [Call.of(p, r) for p, g in zip(problems, sampled) for r in g]
    calls += [Call.of(p, g[0]) for p, g in zip(problems, greedy)]
    oks = iter(x >= 1.0 for x in judge.batch(calls))
    hits = [[next(oks) for _ in g] for g in sampled]
    out = {
        "eval/accuracy": sum(map(sum, hits)) / max(1, sum(map(len, hits))),
        "eval/greedy_accuracy": sum(next(oks) for _ in greedy) / max(1, len(problems)),
    }
    if samples > 1:
        out[f"eval/pass@{samples}"] = sum(any(h) for h in hits) / max(1, len(hits))
    out["eval/time"] = time.perf_counter() - t0
    return out


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """GRPO on one branch of one run: a new run (init None) or one restored from checkpoint `init` (a resume
    of its branch, or the fork point of a new branch). npo_cli/branching.py builds trainers with their source."""

    def __init__(self, recipe: Recipe, store, *, branch: str = "main", init: Manifest | None = None,
                 source=None, controller=None, console=None):
        self.recipe, self.store, self.branch, self.console = recipe, store, branch, console
        self.run = recipe.name
        self.source = source or NoSource()
        self.controller = controller or NoController()
        self.events: list[Event] = []
        self.pending_metrics: list[dict] = []  # steps since the last checkpoint
        self.successes: list[dict] = []  # train.record_successes: rank 0's, since the last checkpoint
        self.history: list[dict] = []  # every step of this process (for the end summary)
        self.last_eval: dict[str, float] = {}
        self._stop_signal: int | None = None
        self._in_flight: str | None = None  # "step" or "eval" while one runs: a stop signal abandons it
        self._grace: threading.Timer | None = None  # running from a stop signal until STOP_GRACE ends
        self._grace_over = False
        self.saved_step = 0  # the step of the last checkpoint written or resumed from

        self._load_task()  # first: a bad prompt file or verifier fails before a model is loaded
        self._load_model(init)
        # every prompt fits the model: found now, not at the step that samples it
        check_prompts(recipe, self.tokenizer, self.model.config, list({p.key: p for p in self.train_problems}.values()))
        check_prompts(recipe, self.tokenizer, self.model.config, self.eval_problems,
                      eval_file=recipe.task.separate_eval)
        self.fsdp = dist.on() and recipe.train.parallel == "fsdp"
        if self.fsdp and is_lora(self.model):
            raise NpoError("a LoRA model (model.lora) does not train under train.parallel=fsdp; use "
                           "train.parallel=ddp (the adapter is small enough to replicate)")
        self.micro_batch = recipe.grpo.micro_batch_size  # halved on CUDA out-of-memory (0: the whole batch)
        # grpo.compile unset: compiled on CUDA, where it measured faster, and never on CPU. Not for LoRA: a
        # compiled policy samples from a full copy of its weights, which an adapter run exists to avoid.
        self.compile = (recipe.grpo.compile if recipe.grpo.compile is not None
                        else self.device.type == "cuda" and not is_lora(self.model))
        self.optimizer = self._make_optimizer()
        # FSDP shards the policy and compiled layers would recompile per decoding shape: sample from a copy.
        # With fp32 masters the backend samples from its own 16-bit copy (synced before every rollout, as a
        # vLLM engine would be).
        self.backend = make_backend(self.model, self.tokenizer, recipe.rollout, dtype=DTYPES[recipe.model.dtype],
                                    copy=self.fsdp or self.compile,
                                    add_special_tokens=not recipe.task.chat_template)

        # counters and data position (all restored on resume)
        self.step_num = 0
        self.epoch, self.pos = 0, 0
        self.samples_seen = 0
        self.tokens_generated = 0
        self.head: str | None = None  # id of the last checkpoint written or resumed from (see wait_saved)
        # the save in flight: (step, its writer thread, its checkpoint id)
        self._saving: tuple[int, threading.Thread | None, Future] | None = None
        # Where this branch stands for this trainer: a save moves it only from there.
        if init is None:
            self.branch_head = None  # a new run: nowhere, even if a same-named run appeared since it was checked
        elif (init.run, init.branch) == (self.run, branch):
            self.branch_head = init.id  # a resume: its head
        else:
            self.branch_head = store.head(self.run, branch)  # a branch from a fork: its ref, if made already
        self.new_branch = self.branch_head is None  # this trainer's first save makes the branch (see train)
        self._order_cache: tuple[int, list[int]] | None = None
        if init is not None:
            self._restore(init)
        else:
            torch.manual_seed(dist.rank_seed(recipe.seed))  # the sampling stream starts from the seed
        if dist.on():
            self._parallel_setup(init is None)
        if self.compile:  # after FSDP's sharding, which compiled layers must see
            compile_layers(self.model, required=recipe.grpo.compile is True)

    def _load_task(self) -> None:
        """Train and eval problems, the reward and the judge (correctness without the format bonus)."""
        r = self.recipe
        self.train_problems = load_problems(r.task, "train", r.seed)
        self.eval_problems = load_problems(r.task, "eval", r.seed)[: r.task.eval_size]
        if not self.train_problems:
            raise NpoError("the task has no training problems")
        if not self.eval_problems and dist.is_main():  # a small file can leave the hash split empty
            self._say("note: the task has no held-out problems, so there is no eval; set task.eval_path "
                      "(task.dataset.eval_split)")
        # what the data position of a checkpoint counts in: a resume must see the same problems
        self.train_sha = hashlib.sha256(json.dumps([[p.key, p.answer] for p in self.train_problems])
                                        .encode()).hexdigest()
        new_run()  # verifier failures are counted per run (and per branch)
        self.reward_fn = make_verifier(r.task)
        self.judge = make_judge(r.task)

    def _load_model(self, init: Manifest | None) -> None:
        """The policy (the checkpoint `init`, else model.path), its tokenizer, the frozen reference model when
        the KL term is on, and the autocast dtype of fp32 master weights."""
        r = self.recipe
        if init is not None:
            device = resolve_device(r.model)
            if device == "cpu":
                torch.set_num_threads(r.model.threads)
            self.model, self.tokenizer, _ = load_model(self.store, init.id, dtype=param_dtype(r.model), device=device)
            if r.model.gradient_checkpointing:
                self.model.gradient_checkpointing_enable()
        else:
            self.model, self.tokenizer, start = load_policy(r.model, self.store, seed=r.seed)
            self.events.append(start)  # provenance of the initial policy, stored with the step-0 checkpoint
        self.device = next(self.model.parameters()).device
        self.model.train()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.ref_model = None
        if r.grpo.kl_coef > 0:
            self.ref_model = load_policy(r.model, self.store, seed=r.seed)[0].eval()
            self.ref_model.requires_grad_(False)
        compute = DTYPES[r.model.dtype]  # fp32 masters under a 16-bit compute dtype: autocast the forward
        self.autocast = compute if next(self.model.parameters()).dtype != compute else None

    def _make_optimizer(self) -> torch.optim.Optimizer:
        g = self.recipe.grpo
        # fused: one kernel for all params on CUDA; FSDP2 mixes sharded (DTensor) and replicated
        # parameters, which the fused / foreach kernels refuse: per-parameter updates there
        kernels = {"foreach": False} if self.fsdp else {"fused": self.device.type == "cuda"}
        params = [p for p in self.model.parameters() if p.requires_grad]  # LoRA: the adapter's only
        return torch.optim.AdamW(params, lr=g.lr, betas=tuple(g.betas),
                                 weight_decay=g.weight_decay, **kernels)

    def _parallel_setup(self, new: bool) -> None:
        """torchrun: check the recipe fits, start all ranks from rank 0's weights, shard for FSDP."""
        r = self.recipe
        if r.rollout.prompts_per_step % dist.world() != 0:
            raise NpoError(f"rollout.prompts_per_step={r.rollout.prompts_per_step} must be a multiple of the "
                           f"number of processes ({dist.world()}): each rank takes whole prompt groups")
        # ranks under different settings would hang at mismatched collectives: stop them all with the reason
        mine = json.loads(json.dumps(r.model_dump(mode="json")))  # as the others' arrive (e.g. str dict keys)
        for rank, theirs in enumerate(dist.gather_json(mine)):
            if theirs != mine:
                key, a, b = recipe_diff(theirs, mine)[0]
                raise NpoError(f"the processes were given different recipes: {key} is {a!r} on rank {rank} "
                               f"and {b!r} on rank {dist.rank()}; start every rank with the same recipe")
        if new:
            dist.broadcast_params(self.model)
        dist.barrier()  # no rank writes to the store before every rank has read it
        if self.fsdp:
            old = self.optimizer
            dist.shard(self.model)
            self.optimizer = self._make_optimizer()
            dist.move_optimizer_state(old, self.optimizer)

    # ---------------------------------------------------------------- restore

    def _check_same_problems(self, man, saved: str | None) -> None:
        """A resume under the same task settings must read the same training problems: a prompt file read
        from another folder (relative paths follow the working directory) or edited since would silently
        continue the data position in other data. A changed task setting (--set task.train_path=...)
        is the user's choice and goes through."""
        if saved is None or saved == self.train_sha or man.recipe is None:
            return
        if self.store.get_json(man.recipe).get("task") == self.recipe.task.model_dump(mode="json"):
            t = self.recipe.task
            where = f" '{t.train_path}'" if t.kind == "file" else f" of dataset '{t.dataset.path}'" if t.dataset else ""
            raise NpoError(f"the training prompts{where} differ from the ones checkpoint {man.id[:12]} was "
                           "trained on (edited, or a relative path read from another folder); run from the "
                           "run's folder, or point task.train_path at the original file with --set")

    def _restore(self, man: Manifest) -> None:
        st = man.state
        self._check_same_problems(man, st.train_sha)
        self.step_num = man.step if st.step is None else st.step
        self.epoch, self.pos = st.epoch, st.pos
        self.samples_seen, self.tokens_generated = st.samples_seen, st.tokens_generated
        self.last_eval = dict(st.last_eval)
        self.source.load_state_dict(st.source)
        self.controller.load_state_dict(st.controller)
        if man.optimizer:
            load_optimizer(self.store, man, self.optimizer)
        tensors = load_state_tensors(self.store, man)
        saved_by = sum(k.startswith("torch_rng") for k in tensors)
        if saved_by and saved_by != dist.world() and dist.is_main():
            self._say(f"resuming a checkpoint of {saved_by} process(es) with {dist.world()}: each process "
                      "samples from its own saved stream, so this resume is not exact (it continues correctly)")
        sfx = f"_rank{dist.rank()}" if dist.rank() else ""  # torchrun: each rank's own sampling stream
        if "torch_rng" + sfx in tensors:
            # clone: set_state reads from the start of the storage, and a loaded tensor may be a view
            torch.set_rng_state(tensors["torch_rng" + sfx].to(torch.uint8).clone())
        else:
            torch.manual_seed(dist.rank_seed(self.recipe.seed) + self.step_num)
        if "cuda_rng" + sfx in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["cuda_rng" + sfx].to(torch.uint8).clone())
        self.head, self.saved_step = man.id, self.step_num

    # ---------------------------------------------------------------- data

    def _order(self, epoch: int) -> list[int]:
        """The shuffled problem order of an epoch: a pure function of (seed, epoch), so resume needs only
        (epoch, pos)."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            self._order_cache = (epoch, data_order(self.recipe.seed, epoch, len(self.train_problems)))
        return self._order_cache[1]

    def next_problems(self, k: int) -> list:
        out = []
        while len(out) < k:
            order = self._order(self.epoch)
            take = order[self.pos : self.pos + k - len(out)]
            out += [self.train_problems[i] for i in take]
            self.pos += len(take)
            if self.pos >= len(order):
                self.epoch, self.pos = self.epoch + 1, 0
        return out

    # ---------------------------------------------------------------- one step

    def step(self) -> dict[str, float]:
        """One GRPO step; returns its metrics (also appended to pending_metrics / history)."""
        r = self.recipe
        t0 = time.perf_counter()
        self._in_flight = "step"  # until the step ends, a stop signal abandons it (see _on_signal)

        # 1. sample prompts
        problems = self.next_problems(r.rollout.prompts_per_step)
        problems = self.source.prompts(self.step_num, problems)  # the whole batch: the same on every rank
        problems = problems[dist.rank() :: dist.world()]  # torchrun: this rank's whole groups
        prompts = [format_prompt(r, self.tokenizer, p) for p in problems]

        # 2. rollout: n completions per prompt from the current policy, with behaviour log-probs
        self.backend.sync()
        sampled = self.backend.generate(prompts, r.rollout.group_size)
        t_gen = time.perf_counter() - t0

        # 3. verify
        groups = self.score(problems, prompts, sampled)
        self._record_successes(groups)
        # TRL's reward_std: the groups' mean (unbiased) std, the spread the advantages divide by
        std_sum = float(torch.tensor([g.rewards for g in groups]).std(-1).sum())
        rsum, csum, cnt, std_sum, n_on = dist.all_sum([
            sum(sum(g.rewards) for g in groups), sum(sum(g.correct) for g in groups),
            sum(len(g.rewards) for g in groups), std_sum, len(groups)])
        on_policy_reward, on_policy_acc = rsum / cnt, csum / cnt

        # 4. off-policy slots (NPO guide / LUFFY / replay); plain GRPO leaves groups alone
        groups = self.source.mix(self.context(), groups)

        # 5. group-relative advantages
        rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float32)
        adv = group_advantages(rewards, r.grpo.scale_std, r.grpo.adv_eps)

        # 6. loss, backward (micro-batched), clip, optimizer step
        t1 = time.perf_counter()
        rows = [ro for g in groups for ro in g.rollouts]
        lr = lr_at(r, self.step_num)
        for pg in self.optimizer.param_groups:
            pg["lr"] = lr
        stats = self.update(rows, adv.reshape(-1))
        t_upd = time.perf_counter() - t1

        # 7. metrics
        self.step_num += 1
        n_tok, n_rows, n_fin, n_zero, n_groups = dist.all_sum([
            sum(len(ro.completion_ids) for ro in rows), len(rows), sum(ro.finished for ro in rows),
            float((adv == 0).all(-1).sum()), len(groups)])
        n_tok, n_rows = int(n_tok), int(n_rows)
        self.samples_seen += n_rows
        self.tokens_generated += n_tok
        dt = time.perf_counter() - t0
        m = {
            "step": self.step_num,
            "reward": on_policy_reward,
            "reward_std": std_sum / n_on,
            "accuracy": on_policy_acc,
            "zero_adv_frac": n_zero / n_groups,
            "response_length": n_tok / n_rows,
            "finished_frac": n_fin / n_rows,
            "lr": lr,
            **stats,
            **self.source.metrics(stats),
            "step_time": dt, "gen_time": t_gen, "update_time": t_upd, "tokens_per_s": n_tok / max(dt, 1e-9),
        }
        if self.source.name != "none":
            m["reward_mixed"] = float(rewards.mean())
        self.pending_metrics.append(m)
        self.history.append(m)
        self._in_flight = None
        return m

    def score(self, problems: list[Problem], prompts: list[str], sampled: list[list[Rollout]]) -> list[Group]:
        return score_groups(problems, prompts, sampled, self.reward_fn)

    def _record_successes(self, groups: list[Group]) -> None:
        """train.record_successes: keep the step's verified on-policy successes, as sampled (before any slot
        is mixed in), for a later run to replay (npo.source=rlep). The next checkpoint stores them."""
        if not self.recipe.train.record_successes:
            return
        wins = [[{"prompt": g.prompt, "problem": g.problem.to_json(), "prompt_ids": list(ro.prompt_ids),
                  "completion_ids": list(ro.completion_ids), "logprobs": list(ro.logprobs), "text": ro.text,
                  "finished": bool(ro.finished), "step": self.step_num}
                 for ro, ok in zip(g.rollouts, g.correct) if ok and ro.source == "policy"] for g in groups]
        wins = dist.gather_strided(wins)  # torchrun: every rank's groups, in the global order
        if dist.is_main():  # only rank 0 writes the store
            self.successes += [w for group in wins for w in group]

    def context(self) -> StepContext:
        """What the off-policy source may use at this step."""
        return StepContext(step=self.step_num, judge=self.judge, reward_fn=self.reward_fn,
                           tokenizer=self.tokenizer, backend=self.backend)

    def update(self, rows: list[Rollout], adv: torch.Tensor) -> dict[str, float]:
        """updates_per_batch optimizer steps over the batch, each accumulated over micro-batches.

        With one update the ratio's denominator is logp.detach() (ratio == 1, as TRL does) for on-policy
        rows; with more, it is the stored behaviour log-prob. Off-policy rows always use their stored
        behaviour log-probs (the guide's / teacher's).
        """
        g = self.recipe.grpo
        pad_row = rows[0]  # FSDP: ranks with fewer micro-batches run this row with zero weight
        on = [ro for ro in rows if ro.source == "policy"]  # for the entropy below, truncated rows included
        if g.mask_truncated:  # advantages were computed with them; the update leaves them out entirely
            keep = [i for i, ro in enumerate(rows) if ro.finished]
            rows, adv = [rows[i] for i in keep], adv[keep]
        # global counts: per-rank losses then sum to the single-process loss, and so do the gradients
        n_tokens, n_seqs = dist.all_sum([float(sum(len(ro.completion_ids) for ro in rows)), float(len(rows))])
        # Entropy of the sampling policy, estimated over every on-policy token from the behaviour
        # log-probs (E[-log p] = H): covers rows the update below skips, at no extra forward.
        lp_sum, lp_n = dist.all_sum([sum(sum(ro.logprobs) for ro in on), sum(len(ro.logprobs) for ro in on)])
        entropy = -lp_sum / max(lp_n, 1)
        if g.skip_zero_adv and g.kl_coef == 0:
            # A row with advantage 0 adds exactly 0 to the loss and to its gradient (every term is
            # scaled by A): skip its forward/backward. Normalisers stay the whole batch's.
            keep = [i for i, a in enumerate(adv.tolist()) if a != 0.0]
            rows, adv = [rows[i] for i in keep], adv[keep]
        passes, grad_norms = [], []
        for _ in range(g.updates_per_batch):
            passes.append(self._backward_fitting_memory(rows, adv, n_tokens, n_seqs, pad_row))
            dist.sum_grads(self.model)
            grad_norms.append(dist.clip_grad_norm(self.model, g.grad_clip))
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        acc, counts, weights = _merge_stats(passes)
        if dist.on():  # ranks' loss stats: counts add up, means are re-weighted by their token weights
            acc, counts, weights = _merge_stats(dist.gather_json([acc, counts, weights]))
        # micro-batch losses sum to the batch loss; counts and the loss are per pass
        out = {k: v / g.updates_per_batch for k, v in counts.items()}
        out.update({k: v / max(weights[k], 1e-12) for k, v in acc.items()})
        for k in ("loss", "tokens"):  # a step whose groups all have advantage 0 trains no row: both are 0
            out.setdefault(k, 0.0)
        out["entropy"] = entropy
        out["grad_norm"] = sum(grad_norms) / len(grad_norms)
        return out

    def _backward_fitting_memory(self, rows, adv, n_tokens, n_seqs, pad_row) -> tuple[dict, dict, dict]:
        """One pass of forward/backward over the batch; when the GPU runs out of memory, the pass restarts
        with half the micro-batch, which later steps keep (grpo.micro_batch_size is the upper bound;
        0 starts from the whole batch). FSDP cannot retry: its ranks must run the same passes."""
        while True:
            mbs = self.micro_batch or max(len(rows), 1)
            try:
                return self._backward(rows, adv, n_tokens, n_seqs, pad_row, mbs)
            except torch.OutOfMemoryError:
                if self.fsdp or mbs == 1:
                    raise NpoError(f"out of GPU memory at grpo.micro_batch_size={mbs}"
                                   f"{' under FSDP' if self.fsdp else ''}; lower grpo.micro_batch_size, "
                                   "set model.gradient_checkpointing=true or rollout.max_new_tokens lower") from None
            # outside the except clause: the failed pass's graph is freed before the retry
            self.micro_batch = mbs // 2
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._say(f"out of GPU memory with {mbs} sequences per micro-batch: retrying with {self.micro_batch}")

    def _say(self, msg: str) -> None:
        """A warning for the user: through the console when there is one, else on stderr."""
        if self.console is not None:
            self.console.print(f"[yellow]{msg}[/yellow]")
        else:
            print(msg, file=sys.stderr)

    def _backward(self, rows, adv, n_tokens, n_seqs, pad_row, mbs: int) -> tuple[dict, dict, dict]:
        """Gradients of the batch's loss (zeroed first), accumulated over micro-batches of `mbs` rows:
        (token-weighted sums, counts, weights) of the loss stats."""
        r, g = self.recipe, self.recipe.grpo
        acc: dict[str, float] = {}
        counts: dict[str, float] = {}
        weights: dict[str, float] = {}
        self.optimizer.zero_grad(set_to_none=False)  # zeros, not None: AdamW steps even with no row kept
        n_mb = -(-len(rows) // mbs)
        for s in range(0, mbs * (dist.all_max(n_mb) if self.fsdp else n_mb), mbs):
            pad = s >= len(rows)  # FSDP runs collectives per forward/backward: every rank runs as many
            b = collate([pad_row] if pad else rows[s : s + mbs], self.pad_id, self.device)
            with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                logp, _ = token_logprobs(self.model, b["input_ids"], b["attention_mask"], b["n_completion"],
                                         g.logprob_chunk, with_entropy=False,
                                         temperature=r.rollout.temperature, compiled=self.compile)
            if pad:
                (logp.sum() * 0.0).backward()
                continue
            if g.updates_per_batch == 1:
                old = torch.where(b["offpolicy"][:, None], b["old_logp"], logp.detach())
            else:
                old = b["old_logp"]
            ref_logp = None
            if self.ref_model is not None:
                with torch.no_grad():
                    ref_logp, _ = token_logprobs(self.ref_model, b["input_ids"], b["attention_mask"],
                                                 b["n_completion"], g.logprob_chunk, with_entropy=False,
                                                 temperature=r.rollout.temperature, compiled=self.compile)
            off = None
            if bool(b["offpolicy"].any()):
                off = OffPolicy.from_config(b["offpolicy"], r.npo)
            loss, st = grpo_loss(
                logp, old, adv[s : s + mbs].to(self.device), b["mask"],
                clip_low=g.clip_low, clip_high=g.clip_high, agg=g.agg, max_len=r.rollout.max_new_tokens,
                ref_logp=ref_logp, kl_coef=g.kl_coef, offpolicy=off,
                num_tokens=n_tokens, num_seqs=n_seqs,
            )
            loss.backward()
            # token-weighted means of the loss stats over micro-batches and passes
            w = st.get("tokens", float(b["mask"].sum()))
            for k, v in st.items():
                if k in COUNT_KEYS:  # counts add up over micro-batches
                    counts[k] = counts.get(k, 0.0) + v
                    continue
                wk = st.get("off/tokens", w) if k.startswith("off/") else w
                acc[k] = acc.get(k, 0.0) + v * wk
                weights[k] = weights.get(k, 0.0) + wk
        return acc, counts, weights

    # ---------------------------------------------------------------- eval, checkpoint

    def evaluate(self, samples: int | None = None) -> dict[str, float]:
        k = self.recipe.train.eval_samples if samples is None else samples
        if k < 1:
            raise NpoError(f"evaluation needs samples >= 1, not {k}")
        self.backend.sync()
        res = {}
        if dist.is_main():  # torchrun: rank 0 evaluates, the others wait for its numbers
            res = evaluate(getattr(self.backend, "model", self.model), self.tokenizer, self.recipe,
                           self.eval_problems, k, seed=eval_seed(self.recipe.seed, self.step_num),
                           backend=self.backend)
        res = dist.broadcast_json(res)
        # the step rides along into checkpoint summaries, so `npo ls` / `show` know where an eval was measured
        self.last_eval = {**res, EVAL_STEP: float(self.step_num)}
        return res

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {"step": float(self.step_num)}
        if self.history:
            last = self.history[-1]
            out.update({k: float(last[k]) for k in ("reward", "accuracy") if k in last})
        out.update({k: float(v) for k, v in self.last_eval.items() if k != "eval/time"})
        return out

    def save(self, parent: str = "head", with_optimizer: bool = True) -> None:
        """Checkpoint the run on its branch; parent: the branch's head, or the fork a new branch starts from.
        with_optimizer False: a weights-only checkpoint (train.save_optimizer_every), marked so in its state.
        Then train.keep_last marks the branch's older checkpoints pruned (npo_cli/gc.py: `prune`).

        train.background_save: returns once the tensors and state are copied to host memory; a thread writes
        them, and `wait_saved()` gives the checkpoint's id. At most one save is in flight: a save first waits
        for the one before, which moves the branch this one starts from."""
        self.wait_saved()
        main = dist.is_main()  # the source's and controller's state_dict write their objects: rank 0 only
        source = self.source.state_dict() if main else {}
        controller = self.controller.state_dict() if main else {}
        # objects the source / controller keep in the store (a replay buffer, a mistake pool): gc keeps them
        extra = [*source.pop("objects", []), *controller.pop("objects", [])]
        # train.record_successes: those since the last checkpoint (a resume starts after it); the list is
        # replaced below, never changed
        successes = self.successes if main else []
        state = TrainerState(step=self.step_num, epoch=self.epoch, pos=self.pos, train_sha=self.train_sha,
                             samples_seen=self.samples_seen, tokens_generated=self.tokens_generated,
                             last_eval=self.last_eval, source=source, controller=controller,
                             weights_only=not with_optimizer)
        tensors = {}
        for i, t in enumerate(dist.gather_tensor(torch.get_rng_state())):  # torchrun: every rank's stream
            tensors["torch_rng" + (f"_rank{i}" if i else "")] = t
        if torch.cuda.is_available():
            for i, t in enumerate(dist.gather_tensor(torch.cuda.get_rng_state())):
                tensors["cuda_rng" + (f"_rank{i}" if i else "")] = t
        model, optimizer = dist.full_state(self.model, self.optimizer)  # FSDP: gathered on every rank
        optimizer = optimizer if with_optimizer else None
        background, tokenizer = self.recipe.train.background_save, self.tokenizer
        events, metrics = self.events, self.pending_metrics
        if main and background:  # the writer's own copy: training changes the tensors and the state's lists
            model, optimizer, tokenizer = host_copy(model, optimizer, tokenizer)
            state, events = state.model_copy(deep=True), [e.model_copy(deep=True) for e in events]
            metrics = [dict(m) for m in metrics]
        store, run, branch, step = self.store, self.run, self.branch, self.step_num
        keep_last, guide, expect = self.recipe.train.keep_last, self.source.guide, self.branch_head
        summary, recipe = self.summary(), self.recipe.model_dump(mode="json")

        def write() -> str:  # the store writes: on rank 0, in a thread under train.background_save
            objects, st = list(extra), state
            if successes:
                oid = store.put_json({"format": SUCCESSES_FORMAT, "items": successes})
                objects, st = [*objects, oid], state.model_copy(update={"successes": oid})
            cid = save_checkpoint(
                store, run=run, branch=branch, step=step, model=model, tokenizer=tokenizer, optimizer=optimizer,
                state=st, state_tensors=tensors, metrics=metrics, summary=summary, recipe=recipe, guide=guide,
                events=events, extra_objects=objects, parent=parent, expect=expect,
            )
            if keep_last:
                prune(store, run, branch, keep_last)
            return cid

        saving: Future = Future()
        writer = None
        if main and background:
            writer = threading.Thread(target=_resolve, args=(saving, write), name="npo-save")
            writer.start()
        else:  # only rank 0 writes the store
            saving.set_result(write() if main else None)
        self._saving = (step, writer, saving)
        self.saved_step = self.step_num
        self.pending_metrics, self.events, self.successes = [], [], []
        if not background:
            self.wait_saved()

    def wait_saved(self) -> str | None:
        """The id of the last checkpoint, once written: waits for the save in flight, if any. Its error stops
        the run here, in one line; the branch stands at the checkpoint before it. torchrun: every rank calls
        this at the same point (rank 0 tells the others the id)."""
        if self._saving is None:
            return self.head
        step, writer, saving = self._saving
        head, error, cause = None, None, None
        if writer is not None:
            writer.join()  # ended, not only done: a thread still unwinding at exit aborts the process
        try:
            head = saving.result()
        except NpoError as e:  # the store refused (not writable, full, the lease lost): it says what to do
            error, cause = f"the checkpoint of step {step} was not written: {e}", e
        except Exception as e:  # noqa: BLE001  (the network, a bug: its words, and where the run stands)
            why = f"cannot use {e.filename}: {os_reason(e)}" if isinstance(e, OSError) and e.filename else one_line(e)
            error, cause = (f"the checkpoint of step {step} was not written: {why}; {self.run}/{self.branch} "
                            "stands at its checkpoint before it, which a resume continues"), e
        self._saving = None
        head, error = dist.broadcast_json([head, error])
        if error:
            raise NpoError(error) from cause
        self.head = self.branch_head = head
        return head

    def _settle(self) -> None:
        """Let the save in flight end before the lease does, when another error stops the run (that one is
        reported, not this save's). No collective: under torchrun the other ranks may be gone."""
        if self._saving is None:
            return
        _, writer, saving = self._saving
        self._saving = None
        if writer is not None:
            writer.join()
        if saving.exception() is None and dist.is_main():
            self.head = self.branch_head = saving.result()

    # ---------------------------------------------------------------- the loop

    def _on_signal(self, signum, frame):
        """SIGINT / SIGTERM: stop after checkpointing the finished step. The step or eval in flight gets
        STOP_GRACE seconds to finish; then _end_grace signals again and it is abandoned. Under torchrun the
        ranks must stop at the same step: they stop after it (torchrun kills a rank that outlives its grace
        period; a save cut short leaves the store as it was)."""
        if self._grace_over:  # the call from _end_grace
            self._grace_over = False
            if self._in_flight:
                raise Abandoned(self._in_flight)
            return
        if self._stop_signal is not None:  # a second signal: stop now, even mid-save (harmless, as above)
            raise KeyboardInterrupt
        self._stop_signal = signum
        if self._in_flight and not dist.on():
            self._grace = threading.Timer(STOP_GRACE, self._end_grace, (signum,))
            self._grace.daemon = True
            self._grace.start()

    def _end_grace(self, signum: int) -> None:
        """(timer thread) The grace is over: signal the main thread again, where _on_signal abandons."""
        self._grace_over = True
        _thread.interrupt_main(signum)

    def _stopping(self) -> bool:
        """A stop signal came and this process may act on it alone (under torchrun the ranks agree after a step)."""
        return self._stop_signal is not None and not dist.on()

    def _branch_start(self) -> tuple[int, Manifest | None]:
        """The step of this branch's first checkpoint (the current step while it has none), and the checkpoint
        it started from (None for a run's first branch)."""
        if self.head is None:
            return self.step_num, None
        own, fork, damage = branch_walk(self.store, self.head, self.run, self.branch)
        if damage:  # the branch's start lies behind a damaged manifest: keep every row
            return 0, None
        return (own[-1].step if own else self.step_num), fork

    def _train_step(self, sinks, bar) -> str | None:
        """One step of the loop: step, eval when due, log, checkpoint when due; what stopped the run, if any.
        A stop signal abandons the step while it (or the controller's look at it) runs: Abandoned reaches
        train. One during the eval ends the eval: the finished step is saved without it."""
        r = self.recipe
        if self._stopping():  # the signal came while the last step was saved
            return signal.Signals(self._stop_signal).name
        try:
            m = self.step()
            every = r.train.eval_every  # 0: no eval while training, not even at the end
            due_eval = every and (self.step_num % every == 0 or self.step_num == r.train.steps)
            if due_eval and self.eval_problems and not self._stopping():
                try:
                    self._in_flight = "eval"
                    m.update(self.evaluate())
                except Abandoned:
                    pass
                self._in_flight = None
            if sinks is not None:
                sinks.write(m)
            bar.update(m["step"], self._progress_info(m), always="eval/accuracy" in m)
            self._in_flight = "step"
            stopped_by = "controller" if self.controller.after_step(self, m) else None
        finally:
            self._in_flight = None
        if stopped_by is None and self._stop_signal is not None:
            stopped_by = signal.Signals(self._stop_signal).name
        if dist.on():  # every rank stops at the same step: rank 0's reason, else any rank's signal
            stopped_by = next((s for s in dist.gather_json(stopped_by) if s), None)
        if self.step_num % r.train.save_every == 0 or self.step_num == r.train.steps or stopped_by:
            k = r.train.save_optimizer_every  # the end and a stop always keep the optimizer: a resume goes on there
            self.save(with_optimizer=not k or self.step_num % (k * r.train.save_every) == 0
                      or self.step_num == r.train.steps or stopped_by is not None)
        return stopped_by

    def _progress_info(self, m: dict) -> str:
        return step_info(m, self.controller.status())  # status: AutoNPO's phase

    def train(self, progress: bool | None = None, force: bool = False) -> dict:
        """Train to recipe.train.steps under the branch lease; returns the end summary."""
        r = self.recipe
        show = r.logging.progress if progress is None else progress
        t_start, start_step = time.perf_counter(), self.step_num
        stopped_by, sinks, bar = None, None, None
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                handlers[s] = signal.signal(s, self._on_signal)
        try:
            main = dist.is_main()  # torchrun: rank 0 holds the lease and writes metrics
            with self.store.lease(self.run, self.branch, force=force) if main else nullcontext() as lease:
                sinks = MetricSinks(r, lease, start_step, *self._branch_start()) if main else None
                bar = Progress(self.console, "step", r.train.steps, start_step, enabled=show and main)
                try:
                    if self.head is None:  # new run: the initial policy is step 0 (rewind/intervene --at 0)
                        self.save()
                    try:
                        while self.step_num < r.train.steps and not stopped_by:
                            stopped_by = self._train_step(sinks, bar)
                    except Abandoned:  # nothing of the abandoned step was saved: the run stands at its checkpoint
                        stopped_by, self.step_num = signal.Signals(self._stop_signal).name, self.saved_step
                    self.wait_saved()  # the last checkpoint is written under the lease
                except BaseException as e:
                    self._settle()
                    # A new run or branch whose first step failed (a bad verifier, data, memory) holds only
                    # the checkpoint written above: drop its ref, so that the same command can be rerun.
                    if (isinstance(e, Exception) and self.new_branch and main and self.step_num == start_step
                            and self.head):
                        self.store.drop_branch(self.run, self.branch, self.head)
                    raise
        finally:
            if self._grace is not None:
                self._grace.cancel()
            if bar is not None:
                bar.close()
            if sinks is not None:
                sinks.close()
            for s, h in handlers.items():
                signal.signal(s, h)
        wall = time.perf_counter() - t_start
        steps = self.history
        times = sorted(x["step_time"] for x in steps)
        return {
            "run": self.run, "branch": self.branch, "step": self.step_num, "checkpoint": self.head,
            "steps_done": self.step_num - start_step, "wall_s": wall,
            "median_step_s": times[len(times) // 2] if times else None,
            "summary": self.summary(), "stopped_by": stopped_by, "metrics_jsonl": sinks and sinks.jsonl_path,
            "store": self.store.url,
        }


def _resolve(future: Future, fn) -> None:
    """(a thread) fn's result or error into future."""
    try:
        future.set_result(fn())
    except BaseException as e:  # noqa: BLE001  (handed to whoever waits: wait_saved)
        future.set_exception(e)


def _merge_stats(parts: list) -> tuple[dict, dict, dict]:
    """Sum passes' or ranks' (token-weighted sums, counts, weights) of the loss stats."""
    acc: dict[str, float] = {}
    counts: dict[str, float] = {}
    weights: dict[str, float] = {}
    for a, c, w in parts:
        for src, dst in ((a, acc), (c, counts), (w, weights)):
            for k, v in src.items():
                dst[k] = dst.get(k, 0.0) + v
    return acc, counts, weights


