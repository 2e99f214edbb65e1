"""Sources of off-policy slots (`npo.source`): the NPO guide and the baselines, one slot machinery.

Every source works the same way on the groups of a step (`mix`): a group whose on-policy accuracy
p̂(x) <= npo.gate, for which the source has a verified-correct trajectory, gets that trajectory in
place of its last wrong sample (`put_slot`; a correct sample is never displaced, and a group without a
wrong one gets none); the trainer then computes advantages over the mixed group, and the loss uses
the trajectory's stored behaviour log-probs as the ratio's denominator (grpo.OffPolicy, chosen by
npo.guide_clip / npo.importance_sampling; LUFFY shaping for source=luffy). Sources differ only in
where trajectories come from:

  npo     the guide checkpoint (a later checkpoint of the same run), via guide.GuideGenerator
  luffy   an external teacher: a JSONL of completions (npo.teacher_path) or a teacher checkpoint
  exgrpo  the run's own past verified successes (a replay buffer kept in the store), medium-difficulty
          prompts first; experience prompts take a share (npo.replay_ratio) of the batch's prompts
          (`prompts`), so the step samples as many rollouts as plain GRPO
  rlep    the verified successes a finished run recorded while it trained (npo.replay_from, recorded
          with train.record_successes), with their recorded behaviour log-probs; nothing is sampled

Slots are mixed only for npo.start <= step < npo.until. Metrics (prefix npo/, whatever the source):
gated_frac, hit_rate, Q (fraction of failing prompts, p̂ = 0, with a trajectory; absent when none
failed), kl (k3 estimate of the per-token KL(behaviour || policy) on the slot tokens, from the loss's
off/kl), V = exp(kl), S = Q / V, the slot tokens' clipped fraction / share outside the on-policy band /
share of positive advantage, and the generator's cost (tokens, seconds).
"""

from __future__ import annotations

import math
import random

from npo_cli import dist
from npo_cli.batch import Group, NoSource, StepContext
from npo_cli.errors import NpoError
from npo_cli.guide import GuideGenerator
from npo_cli.rollout import Rollout
from npo_cli.seeds import derive_seed
from npo_cli.tasks import Problem, read_records
from npo_cli.verifiers import Call, score_batch

GATE_EPS = 1e-9  # p̂ == gate mixes (k/n is not always exact in binary)


def gated(accuracy: float, gate: float) -> bool:
    return accuracy <= gate + GATE_EPS


def put_slot(ctx: StepContext, group: Group, ro: Rollout) -> bool:
    """Put off-policy rollout `ro` in place of the last wrong on-policy sample of `group`, if the verifier
    accepts it. A correct sample is never displaced (the slot adds a success, it does not swap one), so a
    group without a wrong sample (an all-correct group under npo.gate=1.0) is left as it is."""
    p = group.problem
    wrong = [i for i, ok in enumerate(group.correct) if not ok and group.rollouts[i].source == "policy"]
    if not wrong:
        return False  # every sample is right: nothing to replace
    call = Call.of(p, ro)  # a TRL reward sees the problem's columns and the ids, as on-policy samples do
    if score_batch(ctx.judge, [call])[0] < 1.0:
        return False  # a wrong answer never enters a group
    i = wrong[-1]
    group.rollouts[i] = ro
    group.rewards[i] = score_batch(ctx.reward_fn, [call])[0]
    group.correct[i] = True
    group.info["offpolicy_slot"] = ro.source
    return True


class SlotSource(NoSource):
    """Gate, replace, count. Subclasses give `trajectories(ctx, groups)`."""

    name = "slots"
    has_logprobs = True  # False: behaviour log-probs unknown (teacher file), so no KL / V / S

    def __init__(self, recipe, store):
        self.recipe, self.store, self.npo = recipe, store, recipe.npo
        self.guide: str | None = None
        self._m: dict[str, float] = {}
        self.cost = {"tokens": 0, "seconds": 0.0}  # generator totals over the branch

    def active(self, step: int) -> bool:
        return self.npo.start <= step and (self.npo.until is None or step < self.npo.until)

    def trajectories(self, ctx: StepContext, groups: list[Group]) -> list[Rollout | None]:
        """One off-policy trajectory (or None) per group; sources that mix through the base `mix` define it
        (ExGRPO overrides `mix`: its trajectories come with the experience prompts it put in the batch)."""
        raise TypeError(f"{type(self).__name__} uses SlotSource.mix but defines no trajectories()")

    def mix(self, ctx: StepContext, groups: list[Group]) -> list[Group]:
        self._m = {}
        if not self.active(ctx.step):
            self.idle(ctx)
            return groups
        self.mix_groups(ctx, groups, lambda gs: self.trajectories(ctx, gs))
        return groups

    def idle(self, ctx: StepContext) -> None:
        pass

    def mix_groups(self, ctx: StepContext, groups: list[Group], fetch) -> None:
        acc = [g.accuracy for g in groups]  # before mixing
        gate = [g for g, a in zip(groups, acc) if gated(a, self.npo.gate)]
        tokens, seconds = self._cost
        trajs = fetch(gate) if gate else []
        tokens, seconds = self._cost[0] - tokens, self._cost[1] - seconds
        self.share_ranks()
        hit = {id(g) for g, ro in zip(gate, trajs) if ro is not None and put_slot(ctx, g, ro)}
        failing = [g for g, a in zip(groups, acc) if a == 0.0]
        # torchrun: each rank mixed its own groups; the metrics and the cost are the whole batch's
        n_groups, n_gate, n_hit, n_fail, n_fail_hit, tokens = dist.all_sum(
            [len(groups), len(gate), len(hit), len(failing), sum(id(g) in hit for g in failing), tokens])
        seconds = dist.all_max(float(seconds))  # ranks sample side by side: the slowest one's wall time
        m = {"npo/active": 1.0, "npo/gated_frac": n_gate / max(1, n_groups),
             "npo/hit_rate": n_hit / n_gate if n_gate else 0.0, "npo/slots": n_hit,
             "npo/guide_tokens": tokens, "npo/guide_seconds": seconds}
        if n_fail:
            m["npo/Q"] = n_fail_hit / n_fail
        self._m.update(m)
        self.cost["tokens"] += int(tokens)
        self.cost["seconds"] += seconds

    @property
    def _cost(self) -> tuple[int, float]:
        """This rank's generator totals so far (tokens, seconds); sources without a generator cost nothing."""
        return (0, 0.0)

    def share_ranks(self) -> None:
        """torchrun: a collective every rank runs once per mixing step (GuideSource: the cache writes)."""

    def metrics(self, stats: dict | None = None) -> dict[str, float]:
        if not self._m:
            return {}
        m = {**self._m, "npo/guide_tokens_total": float(self.cost["tokens"])}
        stats = stats or {}
        if "off/kl" in stats:
            m["npo/guide_clip_frac"] = stats.get("off/clip_frac", 0.0)
            m["npo/guide_outside"] = stats.get("off/outside", 0.0)
            m["npo/guide_pos_adv_share"] = stats.get("off/pos_adv_share", 0.0)
            if self.has_logprobs:
                m["npo/kl"] = stats["off/kl"]
                m["npo/V"] = math.exp(min(stats["off/kl"], 50.0))
                if "npo/Q" in m:
                    m["npo/S"] = m["npo/Q"] / m["npo/V"]
        return m

    def state_dict(self) -> dict:
        return {"cost": dict(self.cost)}

    def load_state_dict(self, state: dict) -> None:
        cost = state.get("cost") or {}
        self.cost = {"tokens": int(cost.get("tokens", 0)), "seconds": float(cost.get("seconds", 0.0))}


def slot_rollout(group: Group, entry: dict, name: str) -> Rollout:
    """A cached trajectory as a rollout of this group's prompt (prompt ids: the policy's own)."""
    return Rollout(prompt_ids=list(group.rollouts[-1].prompt_ids), completion_ids=list(entry["completion_ids"]),
                   logprobs=list(entry["logprobs"]), text=entry["text"], finished=bool(entry["finished"]),
                   source=name)


class GuideSource(SlotSource):
    """Trajectories of one checkpoint through the guide generator (npo, luffy with a checkpoint)."""

    def __init__(self, recipe, store, ref: str):
        super().__init__(recipe, store)
        self.gen = GuideGenerator(store, ref, recipe)
        self.guide = self.gen.guide_id

    def entries(self, ctx: StepContext, groups: list[Group]) -> list[dict | None]:
        # torchrun: ranks sample different prompts; a rank's own seed keeps their streams apart
        seed = dist.rank_seed(derive_seed(self.recipe.seed, self.gen.seed_id, ctx.step))
        return self.gen.get([(g.prompt, g.problem) for g in groups], seed, engine=ctx.backend)

    @property
    def _cost(self) -> tuple[int, float]:
        return (self.gen.stats.tokens, self.gen.stats.seconds) if self.gen else (0, 0.0)

    def share_ranks(self) -> None:
        """torchrun: only rank 0 writes the store, so the other ranks' new cache entries go through it."""
        if self.gen:
            self.gen.share()

    def trajectories(self, ctx: StepContext, groups: list[Group]) -> list[Rollout | None]:
        out = []
        for g, e in zip(groups, self.entries(ctx, groups)):
            if e is not None and e["prompt_ids"] != g.rollouts[-1].prompt_ids:
                raise NpoError(f"guide {self.store.describe(self.guide)} tokenizes prompts differently from "
                               f"the policy; npo.source={self.name} needs the same tokenizer (luffy re-tokenizes)")
            out.append(slot_rollout(g, e, self.name) if e is not None else None)
        return out

    def idle(self, ctx: StepContext) -> None:
        if self.npo.until is not None and ctx.step >= self.npo.until:
            self.gen.unload()  # the window is over: free the guide's memory


class NPOSource(GuideSource):
    """Near-future guide: a later checkpoint of the same run (npo.guide)."""

    name = "npo"

    def __init__(self, recipe, store):
        if not recipe.npo.guide:
            raise NpoError("npo.source=npo needs npo.guide (a later checkpoint, e.g. RUN@400); "
                           "or branch with: npo intervene --at A --guide G")
        super().__init__(recipe, store, recipe.npo.guide)


class RLEPSource(SlotSource):
    """RLEP: the verified successes a finished run recorded while it trained (train.record_successes),
    replayed from step 0 of this run with their recorded behaviour log-probs; nothing is sampled.
    npo.replay_from names the checkpoint; the successes of every checkpoint on its lineage count. A gated
    group whose prompt has some gets one, drawn from (seed, step, prompt): a pure function, so a resume
    (or another rank) draws the same."""

    name = "rlep"

    def __init__(self, recipe, store):
        if not recipe.npo.replay_from:
            raise NpoError("npo.source=rlep needs npo.replay_from (the finished run, e.g. RUN or RUN@STEP)")
        super().__init__(recipe, store)
        # the manifests' guide link: gc keeps the replayed checkpoint, its lineage and so its successes
        self.guide = store.resolve(recipe.npo.replay_from)
        self.table = recorded_successes(store, self.guide)
        if not self.table:
            raise NpoError(f"{store.describe(self.guide)} recorded no successes to replay; train the run it "
                           "replays with train.record_successes=true")

    def trajectories(self, ctx: StepContext, groups: list[Group]) -> list[Rollout | None]:
        out: list[Rollout | None] = []
        for g in groups:
            trajs = self.table.get(g.prompt)
            if not trajs:
                out.append(None)
                continue
            rng = random.Random(derive_seed(self.recipe.seed, "rlep", ctx.step, g.prompt))
            t = trajs[rng.randrange(len(trajs))]
            if t["prompt_ids"] != g.rollouts[0].prompt_ids:
                raise NpoError(f"{self.store.describe(self.guide)} tokenized prompts differently from the "
                               "policy; npo.source=rlep needs the same tokenizer")
            out.append(slot_rollout(g, t, self.name))
        return out


def recorded_successes(store, ref: str) -> dict[str, list[dict]]:
    """Formatted prompt -> the verified on-policy successes recorded on the lineage of checkpoint `ref`
    (train.record_successes), oldest first."""
    table: dict[str, list[dict]] = {}
    for m in reversed(store.lineage(ref)):
        if m.state.successes:
            for t in store.get_json(m.state.successes, "recorded successes")["items"]:
                table.setdefault(t["prompt"], []).append(t)
    return table


class LuffySource(GuideSource):
    """LUFFY: an external teacher's trajectories, objective f(pi_theta) * A with f(p) = p / (p + gamma)."""

    name = "luffy"

    def __init__(self, recipe, store):
        npo = recipe.npo
        self.table: dict[str, list[dict]] | None = None
        if npo.teacher_path:
            SlotSource.__init__(self, recipe, store)
            self.gen = None  # a file, not a checkpoint: nothing to sample
            self.table = read_teacher(npo.teacher_path, recipe.task.prompt_field)
            self.has_logprobs = False
        elif npo.guide:
            super().__init__(recipe, store, npo.guide)
        else:
            raise NpoError("npo.source=luffy needs npo.teacher_path (JSONL of prompt, completion) "
                           "or npo.guide (a teacher checkpoint)")

    def trajectories(self, ctx: StepContext, groups: list[Group]) -> list[Rollout | None]:
        if self.table is None:  # teacher checkpoint: its ids if the tokenizer matches, else re-tokenized
            return [None if e is None else slot_rollout(g, e, self.name)
                    if e["prompt_ids"] == g.rollouts[-1].prompt_ids else self.tokenize(ctx, g, e["text"])
                    for g, e in zip(groups, self.entries(ctx, groups))]
        out = []
        for g in groups:
            ro = None
            for row in self.table.get(g.problem.prompt, []):
                cand = self.tokenize(ctx, g, row["completion"])
                if cand is not None and score_batch(ctx.judge, [Call.of(g.problem, cand)])[0] >= 1.0:
                    ro = cand
                    break
            out.append(ro)
        return out

    def idle(self, ctx: StepContext) -> None:
        if self.table is None:
            super().idle(ctx)

    def tokenize(self, ctx: StepContext, group: Group, text: str) -> Rollout | None:
        """A teacher completion in the policy's tokens (+ EOS); None if longer than max_new_tokens.
        Behaviour log-probs are unknown (0): LUFFY shaping does not use them."""
        tok = ctx.tokenizer
        ids = tok(text, add_special_tokens=False)["input_ids"] + [int(tok.eos_token_id)]
        if len(ids) > self.recipe.rollout.max_new_tokens:
            return None
        return Rollout(prompt_ids=list(group.rollouts[-1].prompt_ids), completion_ids=ids,
                       logprobs=[0.0] * len(ids), text=tok.decode(ids, skip_special_tokens=True),
                       finished=True, source=self.name)


def read_teacher(url: str, prompt_field: str = "prompt") -> dict[str, list[dict]]:
    """prompt -> teacher completions, from a JSONL/Parquet file (any fsspec URL) with `prompt_field` and
    `completion` fields."""
    table: dict[str, list[dict]] = {}
    for i, row in enumerate(read_records(url, (prompt_field, "completion")), 1):
        if not isinstance(row, dict) or row.get(prompt_field) is None or row.get("completion") is None:
            raise NpoError(f"teacher file {url} record {i} needs fields '{prompt_field}' and 'completion'")
        table.setdefault(str(row[prompt_field]), []).append({"completion": str(row["completion"])})
    if not table:
        raise NpoError(f"teacher file {url} has no records")
    return table


class ExGRPOSource(SlotSource):
    """ExGRPO: replay of the run's own verified successes, with their behaviour log-probs, at the rollout
    budget of plain GRPO.

    Every step records the on-policy successes per prompt (newest npo.replay_per_prompt kept; a prompt
    solved by the whole group is retired) and each prompt's latest accuracy. In the window, experience
    prompts take round(replay_ratio * prompts_per_step) places of the step's batch (`prompts`): buffered
    prompts drawn with weight exp(-(acc - 0.5)^2 / 2 sigma^2) (medium difficulty first), sampled like any
    other prompt; if gated, the stored success with the highest mean log-prob (ExGRPO prefers low-entropy
    trajectories) takes a wrong slot. The buffer is saved as JSON objects in the store: append-only
    segments of trajectories plus an index, all listed in the checkpoint's state (so gc keeps them and
    resume restores it).
    """

    name = "exgrpo"
    MAX_SEGMENTS = 32  # then the live trajectories are rewritten as one segment

    def __init__(self, recipe, store):
        super().__init__(recipe, store)
        self.buffer: dict[str, dict] = {}  # formatted prompt -> record; order = least recently updated first
        self.segments: list[str] = []
        self.chosen: dict[str, dict] = {}  # this step's experience prompts -> the success each replays

    def prompts(self, step: int, problems: list[Problem]) -> list[Problem]:
        """The batch with its last k fresh problems replaced by k experience prompts (not in the batch). The
        displaced problems are skipped: the data position still advances by prompts_per_step. torchrun: the
        buffer is the same on every rank (every rank records every rank's groups, in the global order), and
        so are the picks; the trainer splits this list between the ranks like any batch."""
        self.chosen = {}
        k = round(self.npo.replay_ratio * len(problems))
        if not (self.active(step) and k > 0 and self.buffer):
            return problems
        keys = {p.key for p in problems}
        in_batch = {p for p, rec in self.buffer.items() if Problem.from_json(rec["problem"]).key in keys}
        picks = self.pick(k, in_batch, step)
        # the success each one replays, taken now: recording this step's outcomes updates the records
        self.chosen = {p: self.best(rec) for p, rec in picks.items()}
        fresh = problems[: len(problems) - len(picks)]
        return fresh + [Problem.from_json(rec["problem"]) for rec in picks.values()]

    def mix(self, ctx: StepContext, groups: list[Group]) -> list[Group]:
        self._m = {}
        for o in dist.gather_strided([self.outcome(g, ctx.step) for g in groups]):  # in the global order
            self.record(o, ctx.step)
        # the step's `accuracy` counts the experience prompts, chosen because the policy solved them before:
        # the fresh prompts' own accuracy is the one comparable with plain GRPO's
        fresh = [g for g in groups if g.prompt not in self.chosen]
        hits, n = dist.all_sum([sum(sum(g.correct) for g in fresh), sum(len(g.correct) for g in fresh)])
        if n:
            self._m["npo/fresh_accuracy"] = hits / n
        if self.active(ctx.step):
            replayed = [g for g in groups if g.prompt in self.chosen]  # this rank's share of them
            self.mix_groups(ctx, replayed, lambda gs: [slot_rollout(g, self.chosen[g.prompt], self.name)
                                                       for g in gs])
            self._m["npo/replay_prompts"] = float(len(self.chosen))  # in the batch (old runs: replay_groups)
            self._m["npo/buffer_prompts"] = float(len(self.buffer))
        self.chosen = {}
        return groups

    def pick(self, k: int, exclude: set[str], step: int) -> dict[str, dict]:
        """k buffered prompts (not in this batch), weighted sampling without replacement (A-ExpJ keys)."""
        rng = random.Random(derive_seed(self.recipe.seed, "exgrpo", step))
        s2 = 2 * self.npo.replay_sigma ** 2
        keyed = []
        for p, rec in self.buffer.items():
            u = rng.random()
            if p in exclude or not rec["trajs"]:
                continue
            w = math.exp(-((rec["acc"] - 0.5) ** 2) / s2)
            keyed.append((math.log(max(u, 1e-300)) / w, p))
        keyed.sort(reverse=True)
        return {p: self.buffer[p] for _, p in keyed[:k]}

    @staticmethod
    def best(rec: dict) -> dict | None:
        trajs = rec["trajs"]
        return max(trajs, key=lambda t: sum(t["logprobs"]) / max(1, len(t["logprobs"]))) if trajs else None

    @staticmethod
    def outcome(g: Group, step: int) -> dict:
        """What the buffer keeps of a group (JSON: under torchrun it goes to every rank): its accuracy and
        on-policy successes, before any slot is replaced."""
        wins = [ro for ro, ok in zip(g.rollouts, g.correct) if ok and ro.source == "policy"]
        return {"prompt": g.prompt, "problem": g.problem.to_json(), "acc": g.accuracy,
                "wins": [{"completion_ids": list(ro.completion_ids), "logprobs": list(ro.logprobs),
                          "text": ro.text, "finished": bool(ro.finished), "step": step} for ro in wins]}

    def record(self, o: dict, step: int) -> None:
        """Remember a group's outcome (`outcome`) in the buffer."""
        rec = self.buffer.pop(o["prompt"], None)
        if o["acc"] >= 1.0:
            return  # solved by the whole group: retired
        if rec is None and not o["wins"]:
            return
        rec = rec or {"problem": o["problem"], "trajs": []}
        rec["acc"], rec["step"] = o["acc"], step
        rec["trajs"] = (rec["trajs"] + o["wins"])[-self.npo.replay_per_prompt :]
        self.buffer[o["prompt"]] = rec
        while len(self.buffer) > self.npo.replay_capacity:
            self.buffer.pop(next(iter(self.buffer)))

    def state_dict(self) -> dict:
        if len(self.segments) >= self.MAX_SEGMENTS:  # compact: forget the old segments
            self.segments = []
            for rec in self.buffer.values():
                for t in rec["trajs"]:
                    t.pop("ref", None)
        new = [t for rec in self.buffer.values() for t in rec["trajs"] if "ref" not in t]
        if new:
            seg = len(self.segments)
            self.segments.append(self.store.put_json([{k: v for k, v in t.items() if k != "ref"} for t in new]))
            for j, t in enumerate(new):
                t["ref"] = [seg, j]
        index = {"format": "npo-replay/2", "segments": self.segments,
                 "prompts": [[p, {**{k: v for k, v in rec.items() if k != "trajs"},
                                  "trajs": [t["ref"] for t in rec["trajs"]]}] for p, rec in self.buffer.items()]}
        oid = self.store.put_json(index)
        return {**super().state_dict(), "replay": oid, "objects": [oid, *self.segments]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.buffer, self.segments = {}, []
        if not state.get("replay"):
            return
        index = self.store.get_json(state["replay"], "exgrpo replay buffer")
        self.segments = list(index["segments"])
        segs = [self.store.get_json(o, "exgrpo replay segment") for o in self.segments]
        for p, rec in index["prompts"]:
            if "raw" in rec:  # npo-replay/1 kept the problem's fields in the record itself
                rec["problem"] = {"prompt": rec.pop("raw"), "answer": rec.pop("answer"), "tags": rec.pop("tags")}
            rec["trajs"] = [{**segs[s][j], "ref": [s, j]} for s, j in rec["trajs"]]
            self.buffer[p] = rec


def make_source(recipe, store):
    """The slot source named by npo.source."""
    s = recipe.npo.source
    if s == "none":
        return NoSource()
    if s == "npo":
        return NPOSource(recipe, store)
    if s == "luffy":
        return LuffySource(recipe, store)
    if s == "exgrpo":
        return ExGRPOSource(recipe, store)
    if s == "rlep":
        return RLEPSource(recipe, store)
    raise NpoError(f"unknown npo.source {s!r}")
