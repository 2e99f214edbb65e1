"""AutoNPO (`npo auto`): NPO without a human.

The controller (`AutoController`, the trainer's `controller` seam) watches every step:
1. warning: the reward EMA stagnates (least-squares slope over `auto.window` steps < slope_eps) while the
   entropy EMA declines (by >= entropy_drop of its level over the window), after progress: the reward EMA
   has risen by >= min_rise above its lowest value since the run's start or the last replay's start (a
   flat sparse start is no plateau: that is auto.bootstrap's case); for `patience` steps (`warning`);
2. confirmation: a probe of the current policy pi_t on the mistake pool B (prompts whose whole group
   failed, each with the step it failed at; `AutoTrainer.score` feeds it): npo.max_tries samples per probed
   mistake in one generate call; a mistake is solved when one of them is verified correct;
3. rollback distance: for every saved checkpoint t-D of the lineage (D <= delta_max, or auto.deltas),
   Q(D) = the share of B_D (the probed mistakes from around step t-D) that pi_t solves within npo.max_tries
   (NPO's Q with pi_t as the guide) and V(D) = exp(mean per-token KL(pi_t || pi_{t-D})) on the probe's own
   trajectories (the first probe_samples of each prompt; one forward of the old checkpoint each, no extra
   sampling); D* = argmax S = Q/V (`select_delta`, a pure function).
   When S(D*) >= min_score the controller stops the branch (the trainer checkpoints step t: the guide).
4. the driver (`drive`) makes branch `auto-k` at t-D* (`rollback`, through `branching.fork_branch`),
   pre-fills the guide cache (guide = the step-t checkpoint) for the mistakes of the replayed stretch
   [t-D*, t) (the replay meets exactly those prompts again: the data order is a function of the step;
   other gated prompts are generated on demand), replays t-D*..t with npo.source=npo, then continues
   GRPO, and repeats on the next plateau.
5. auto.bootstrap: the run starts as a scout. The all-wrong prompts of its first train.save_every steps
   (up to probe_size) are kept aside as its early mistakes. At every saved step L (and at scout_steps) it
   measures S(L) = Q(L)/V(L) of its policy pi_L as a guide for the step-0 policy: Q(L) = the share of the
   early mistakes pi_L solves within npo.max_tries, V(L) = exp(KL(pi_L || pi_0)) on the first probe_samples
   of those samples (an `auto-scout` event each). Once S has stayed below its best (with Q > 0) for
   scout_patience checks, or at scout_steps (the longest scout), it restarts from step 0 on branch
   `auto-boot` with the argmax-S checkpoint L* as guide, NPO for steps 0..L* (`scout_choice`, a pure
   function; the driver takes the decision's guide, which may predate the stop). With no early mistake,
   or none solved by scout_steps, there is no restart: the scout goes on as the run.

Every decision is an event stored with the checkpoint of the step it was taken at (`npo show`); each
auto branch's first checkpoint carries an `auto-branch` event (`npo ls` draws the chain from them).
The controller's state (EMAs, window, reward low, pool and early mistakes (a JSON object in the store),
scout checks, interventions, phase, compute spent) is saved in every checkpoint, so `npo auto --resume RUN`
(or `npo run --resume RUN`) continues exactly, also in the middle of a scout or a replay, or between a
decision and its branch.
"""

from __future__ import annotations

import math

import torch

from npo_cli import dist
from npo_cli.batch import Group, collate, format_prompt
from npo_cli.branching import fork_branch, head_with_recipe, npo_recipe, resume_trainer
from npo_cli.checkpoint import DTYPES, load_model
from npo_cli.errors import NpoError
from npo_cli.grpo import token_logprobs
from npo_cli.guide import GuideGenerator
from npo_cli.history import branch_walk, ls_data
from npo_cli.lease import npo_command
from npo_cli.manifest import Event
from npo_cli.recipe import Recipe, build_recipe
from npo_cli.seeds import derive_seed, forked_rng
from npo_cli.store import Store
from npo_cli.tasks import Problem
from npo_cli.trainer import Trainer
from npo_cli.verifiers import Call, score_batch

DECISION_KINDS = ("auto", "auto-probe", "auto-scout", "auto-bootstrap", "auto-branch")


# --------------------------------------------------------------------------- pure functions (tested alone)


def ls_slope(ys: list[float]) -> float:
    """Least-squares slope of ys against 0..n-1."""
    n = len(ys)
    if n < 2:
        return 0.0
    mx, my = (n - 1) / 2, sum(ys) / n
    return sum((i - mx) * (y - my) for i, y in enumerate(ys)) / sum((i - mx) ** 2 for i in range(n))


def warning(hist: list[list[float]], cfg, low: float) -> tuple[bool, dict[str, float]]:
    """(warn, signals) from the last window+1 [reward_ema, entropy_ema] pairs and `low`, the lowest reward
    EMA since the run's (or the last replay's) start: the reward stagnates while the entropy declines, after
    the reward has risen by min_rise. A plateau follows progress; a flat start (sparse reward: nearly every
    group all-wrong) stagnates too, but rolling back cannot help there (auto.bootstrap's case). No warning
    before the window is full."""
    if not hist:
        return False, {}
    rise = hist[-1][0] - low
    if len(hist) < cfg.window + 1:
        return False, {"reward_rise": rise}
    h = hist[-(cfg.window + 1):]
    r_slope = ls_slope([x[0] for x in h])
    e_slope = ls_slope([x[1] for x in h])
    level = max(abs(h[-1][1]), 1e-8)
    drop = -e_slope * cfg.window / level  # share of the entropy level lost over the window
    sig = {"reward_slope": r_slope, "entropy_drop": drop, "reward_rise": rise}
    return r_slope < cfg.slope_eps and drop >= cfg.entropy_drop and rise >= cfg.min_rise, sig


def members(pool: list[dict], steps: list[int], t: int, mode: str, radius: int) -> dict[int, list[dict]]:
    """B_D for every candidate step c = t-D. around: each mistake goes to the candidate nearest to the
    step it failed at (ties: the older), if within radius; stretch: every mistake made in [c, t)."""
    out: dict[int, list[dict]] = {c: [] for c in steps}
    if not steps:
        return out
    for it in pool:
        s = it["step"]
        if mode == "stretch":
            for c in steps:
                if c <= s < t:
                    out[c].append(it)
            continue
        c = min(steps, key=lambda c: (abs(s - c), c))
        if abs(s - c) <= radius and s < t:
            out[c].append(it)
    return out


def spread(groups: dict[int, list[dict]], k: int) -> list[dict]:
    """Up to k distinct mistakes, taken round-robin over the candidates, newest first in each."""
    queues = [sorted(v, key=lambda it: -it["step"]) for _, v in sorted(groups.items(), reverse=True)]
    picked, seen = [], set()
    while len(picked) < k and any(queues):
        for q in queues:
            while q and q[0]["prompt"] in seen:
                q.pop(0)
            if q and len(picked) < k:
                it = q.pop(0)
                seen.add(it["prompt"])
                picked.append(it)
    return picked


def select_delta(table: list[dict], min_score: float = 0.0) -> dict:
    """D* = argmax Q/V over the candidates (ties: the smaller D, a shorter replay).

    table rows: {"delta", "Q" (None: no probed mistake in B_D), "V"}; returns the rows with S added,
    the best row (or None) and whether it confirms the plateau (S >= min_score)."""
    rows = []
    for r in table:
        q, v = r.get("Q"), r.get("V")
        s = q / v if q is not None and v is not None and v > 0 else None
        rows.append({**r, "S": s})
    scored = [r for r in rows if r["S"] is not None]
    best = max(scored, key=lambda r: (r["S"], -r["delta"])) if scored else None
    ok = best is not None and best["S"] >= min_score
    return {"rows": rows, "best": best, "confirmed": ok}


def scout_choice(table: list[dict], patience: int, last: bool = False, min_score: float = 0.0) -> dict | None:
    """The bootstrap scout's guide once it should stop, else None (scout on; at the longest: no guide).

    table rows (one per check, in step order): {"step", "Q", "V", "S"}. S = Q/V is concave in the scout's
    length (Q rises as pi_L learns, V grows with its distance from pi_0), so once S has stayed below its
    best for `patience` checks the best is taken, or at the longest scout (last). The best row is argmax S
    (ties: the earlier step, a shorter NPO stretch). A best with Q = 0 solves no early mistake, and one
    below min_score (auto.min_score, the plateau probe's threshold) is no better than a stalled policy's
    retries: no guide (the scout goes on, or at the longest scout there is no restart)."""
    scored = [r for r in table if r.get("S") is not None]
    if not scored:
        return None
    best = max(scored, key=lambda r: (r["S"], -r["step"]))
    if not best["Q"] or best["S"] < min_score:
        return None
    below = 0  # consecutive checks since the last one at the best S
    for r in reversed(table):
        if r.get("S") is not None and r["S"] >= best["S"]:
            break
        below += 1
    return best if last or below >= patience else None


# --------------------------------------------------------------------------- the controller


class AutoController:
    """Watches every step (observe), probes and decides (after_step). JSON state in every checkpoint."""

    def __init__(self, cfg, store):
        self.cfg, self.store = cfg, store
        self.phase = "scouting" if cfg.bootstrap else "watching"
        self.reward_ema: float | None = None  # bias-corrected EMAs (as Adam's moments): the first
        self.entropy_ema: float | None = None  # steps do not drag the trend
        self.raw = [0.0, 0.0, 0]  # uncorrected EMAs of reward and entropy, steps seen
        self.hist: list[list[float]] = []  # [reward_ema, entropy_ema] of the last window+1 steps
        self.low: float | None = None  # lowest reward EMA since the run's or the last replay's start
        self.warned = 0  # consecutive warned steps
        self.quiet_until = 0  # no warning before this step
        self.floor = 0  # rollback candidates are at or after this step (the end of the last replay)
        self.interventions = 0  # plateau interventions so far (bootstrap not counted)
        self.replay: dict | None = None  # {"k", "branch", "start", "until", "guide"} while replaying
        self.decision: Event | None = None  # the confirmed decision the driver acts on
        self.pool: list[dict] = []  # Problem.to_json() + {"step"}; unique prompts, oldest first
        self.early: list[dict] = []  # the scout's early mistakes (as pool items): the same prompts each check
        self.scout: list[dict] = []  # the scout's checks: {"step", "n", "Q", "kl", "V", "S", "tokens"}
        self.compute = {"steps": 0, "rollout_tokens": 0, "guide_tokens": 0, "probe_tokens": 0}
        self.signals: dict[str, float] = {}

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict:
        pool = self.store.put_json({"format": "npo-auto-pool/1", "items": self.pool, "early": self.early})
        return {"auto": 1, "phase": self.phase, "reward_ema": self.reward_ema, "entropy_ema": self.entropy_ema,
                "raw": self.raw, "hist": self.hist, "low": self.low, "scout": self.scout,
                "warned": self.warned, "quiet_until": self.quiet_until,
                "floor": self.floor, "interventions": self.interventions, "replay": self.replay,
                "decision": self.decision.model_dump() if self.decision else None,
                "compute": dict(self.compute), "signals": self.signals, "pool": pool, "objects": [pool]}

    def load_state_dict(self, st: dict) -> None:
        if not st.get("auto"):
            return  # a checkpoint written without the controller (e.g. a plain run's step 0)
        self.phase, self.reward_ema, self.entropy_ema = st["phase"], st["reward_ema"], st["entropy_ema"]
        self.raw = list(st["raw"])
        self.hist, self.warned, self.quiet_until = [list(x) for x in st["hist"]], st["warned"], st["quiet_until"]
        self.floor, self.interventions = st["floor"], st["interventions"]
        self.replay, self.signals = st["replay"], dict(st["signals"])
        self.decision = Event.model_validate(st["decision"]) if st["decision"] else None
        self.compute = {**self.compute, **st["compute"]}
        pool = self.store.get_json(st["pool"], "auto mistake pool")
        self.pool, self.early = list(pool["items"]), list(pool.get("early", []))
        # states written before the reward low and the scout table: tracked from here on
        self.low, self.scout = st.get("low"), list(st.get("scout", []))

    @classmethod
    def from_state(cls, cfg, store, st: dict) -> AutoController:
        c = cls(cfg, store)
        c.load_state_dict(st)
        return c

    def status(self) -> str:
        """For the progress bar."""
        if self.phase == "scouting":
            best = max(self.scout, key=lambda r: r["S"], default=None)
            return f"auto: scouting (at most to {self.cfg.scout_steps}" + (
                f"; best S {best['S']:.3f} at step {best['step']})" if best else ")")
        if self.phase == "replaying":
            k = self.replay["k"]
            return f"auto: replaying {k if k else 'boot'} (NPO to {self.replay['until']})"
        if self.phase == "warned":
            return f"auto: warned {self.warned}/{self.cfg.patience}"
        used = f", {self.interventions}/{self.cfg.max_interventions} interventions used"
        return f"auto: {self.phase}" + (used if self.interventions >= self.cfg.max_interventions else "")

    # ---------------------------------------------------------------- watching

    def note_mistake(self, problem, step: int, early: bool = False) -> None:
        """A prompt whose whole group failed at `step` (the policy of checkpoint `step`). early: a step of
        the scout's first train.save_every: the mistake may join the early mistakes its checks measure Q on
        (kept apart from the pool, which drops old items)."""
        item = {**problem.to_json(), "step": step}
        self.pool = [it for it in self.pool if it["prompt"] != problem.prompt]
        self.pool.append(item)
        del self.pool[: max(0, len(self.pool) - self.cfg.pool_size)]
        if (early and self.phase == "scouting" and len(self.early) < self.cfg.probe_size
                and all(it["prompt"] != problem.prompt for it in self.early)):
            self.early.append(item)

    def observe(self, trainer, m: dict, rollout_tokens: int) -> None:
        """After each step's update, before the progress bar: EMAs, trend, phase; auto/* metrics."""
        c, a, step = self.cfg, self.cfg.ema_alpha, trainer.step_num
        self.compute["steps"] += 1
        self.compute["rollout_tokens"] += int(rollout_tokens)
        self.compute["guide_tokens"] += int(m.get("npo/guide_tokens", 0))
        r, h = float(m["reward"]), float(m["entropy"])
        n = self.raw[2] + 1
        self.raw = [(1 - a) * self.raw[0] + a * r, (1 - a) * self.raw[1] + a * h, n]
        self.reward_ema, self.entropy_ema = (x / (1 - (1 - a) ** n) for x in self.raw[:2])
        self.hist = (self.hist + [[self.reward_ema, self.entropy_ema]])[-(c.window + 1):]
        # the low follows the EMA until it spans its memory (1/alpha steps): before, it averages a few steps,
        # whose dips would pass for a rise later
        warming = self.low is None or n < 1 / a
        self.low = self.reward_ema if warming else min(self.low, self.reward_ema)
        warn, self.signals = warning(self.hist, c, self.low)
        if self.phase == "replaying" and step >= self.replay["until"]:
            self.floor, self.quiet_until = self.replay["until"], step + c.min_gap
            self.phase, self.replay = "watching", None
        if self.phase in ("watching", "warned"):
            if warn and step >= self.quiet_until and self.interventions < c.max_interventions:
                self.phase, self.warned = "warned", self.warned + 1
            else:
                self.phase, self.warned = "watching", 0
        m.update({"auto/reward_ema": self.reward_ema, "auto/entropy_ema": self.entropy_ema,
                  **{f"auto/{k}": v for k, v in self.signals.items()},
                  "auto/warned": float(self.warned), "auto/pool": float(len(self.pool)),
                  "auto/interventions": float(self.interventions),
                  "auto/compute_tokens": float(self.total_tokens())})

    def total_tokens(self) -> int:
        """Generated tokens of every branch (replays and abandoned stretches), guide and probe sampling."""
        c = self.compute
        return c["rollout_tokens"] + c["guide_tokens"] + c["probe_tokens"]

    def after_step(self, trainer, m: dict) -> bool:
        """True: stop the branch (the trainer checkpoints this step, the guide) for the driver to act."""
        step = trainer.step_num
        if self.phase == "scouting":
            return self._scout(trainer)
        if self.phase == "warned" and self.warned >= self.cfg.patience:
            self._say(trainer, f"auto: step {step} plateau warning ({self._sig()}); probing {len(self.pool)} "
                      "mistakes")
            # torchrun: rank 0 probes (the controller's state is the same on every rank), the others take
            # its decision and its cost. Every rank syncs the sampler first: under FSDP it gathers the shards.
            # The candidates are the saved checkpoints: the last save is written first (every rank waits).
            trainer.backend.sync()
            trainer.wait_saved()
            d = Event.model_validate(dist.broadcast_json(self.probe(trainer).model_dump() if dist.is_main() else None))
            if not dist.is_main():
                self.compute["probe_tokens"] += (d.probe or {}).get("tokens", 0)
            if d.confirmed:
                self.decision = d
                return self._decide(trainer)
            trainer.events.append(d)
            self._say(trainer, f"auto: step {step} not confirmed: {d.reason or 'S below min_score'}")
            self.phase, self.warned, self.quiet_until = "watching", 0, step + self.cfg.min_gap
        return False

    def _decide(self, trainer) -> bool:
        trainer.events.append(self.decision)
        self.phase = "decided"
        d = self.decision
        if d.kind == "auto-bootstrap":
            self._say(trainer, f"auto: scout stopped at step {d.step} -> restart from step 0 on {d.branch}, NPO to "
                      f"step {d.until}, guide = step {d.guide_step} (S={d.S:.3f})")
        else:
            self._say(trainer, f"auto: step {d.step} -> roll back to step {d.fork_step} (D*={d.delta}), "
                      f"guide = this step, branch {d.branch}")
        return True

    def _sig(self) -> str:
        s = self.signals
        return (f"reward slope {s.get('reward_slope', 0):+.4f}/step, rise {s.get('reward_rise', 0):+.3f}, "
                f"entropy -{100 * s.get('entropy_drop', 0):.1f}%")

    @staticmethod
    def _say(trainer, text: str) -> None:
        if trainer.console is not None and trainer.recipe.logging.progress:
            trainer.console.print(text, highlight=False, soft_wrap=True)

    # ---------------------------------------------------------------- the bootstrap scout

    def _scout(self, trainer) -> bool:
        """A check at every saved step (the trainer writes this step's checkpoint right after this call, so
        the measured policy can become the guide) and at the longest scout: S of pi_L as a guide for pi_0,
        then stop (a decision, or no bootstrap) or scout on."""
        step, cfg, every = trainer.step_num, self.cfg, trainer.recipe.train.save_every
        last = step >= cfg.scout_steps
        if step % every and not last:
            return False
        if not self.early:
            return self._no_bootstrap(trainer, f"no all-wrong prompt in the scout's first {every} steps")
        # torchrun: rank 0 measures (as in the probe), the others take its row and its cost; the checks read
        # the saved checkpoints: the last save is written first (every rank waits)
        trainer.backend.sync()
        trainer.wait_saved()
        row = dist.broadcast_json(self.scout_check(trainer) if dist.is_main() else None)
        if not dist.is_main():
            self.compute["probe_tokens"] += row["tokens"]
        self.scout.append(row)
        trainer.events.append(Event(kind="auto-scout", step=step, Q=row["Q"], V=row["V"], kl=row["kl"], S=row["S"],
                                    probe={"prompts": row["n"], "tries": trainer.recipe.npo.max_tries,
                                           "tokens": row["tokens"]}))
        self._say(trainer, f"auto: scout step {step}: S = Q/V = {row['Q']:.3f}/{row['V']:.3f} = {row['S']:.3f}")
        best = scout_choice(self.scout, cfg.scout_patience, last, cfg.min_score)
        if best is None:
            if last:
                top = max((r["S"] for r in self.scout), default=0.0)
                return self._no_bootstrap(trainer, f"no check reached S >= min_score {cfg.min_score} (best "
                                          f"{top:.3f}) on its {len(self.early)} early mistakes by step {step}")
            return False
        ids = {m.step: m.id for m in trainer.store.lineage(trainer.head) if m.run == trainer.run}
        g = best["step"]
        if g != step and g not in ids:
            raise NpoError(f"auto.bootstrap: no checkpoint of step {g} on {trainer.run}/{trainer.branch}")
        # this step's checkpoint is not written yet: as the guide it is the checkpoint the branch stops at
        guide = None if g == step else ids[g]
        table = [{k: r[k] for k in ("step", "n", "Q", "kl", "V", "S")} | {"checkpoint": ids.get(r["step"])}
                 for r in self.scout]
        self.decision = Event(kind="auto-bootstrap", k=0, step=step, confirmed=True, fork_step=0,
                              fork=self._step0(trainer).id, guide=guide, guide_step=g, until=g, delta=g,
                              branch="auto-boot", pool=len(self.pool), S=best["S"], candidates=table)
        return self._decide(trainer)

    def _no_bootstrap(self, trainer, reason: str) -> bool:
        """End the scout without a restart: it goes on as the run (plateau watching)."""
        trainer.events.append(Event(kind="auto-bootstrap", k=0, step=trainer.step_num, confirmed=False,
                                    reason=reason, pool=len(self.pool), candidates=list(self.scout) or None))
        self._say(trainer, f"auto: step {trainer.step_num}: no bootstrap ({reason}); the scout goes on as the run")
        self.phase, self.early = "watching", []
        return False

    @staticmethod
    def _step0(trainer):
        """The run's step-0 checkpoint (pi_0) on this branch's lineage."""
        fork = next((m for m in trainer.store.lineage(trainer.head) if m.step == 0 and m.run == trainer.run), None)
        if fork is None:
            raise NpoError(f"auto.bootstrap: no step-0 checkpoint on {trainer.run}/{trainer.branch}")
        return fork

    def scout_check(self, trainer) -> dict:
        """S(L) of the scout's policy pi_L as a guide for pi_0 (NPO's scale): Q = the share of the early
        mistakes pi_L solves within npo.max_tries, V = exp(KL(pi_L || pi_0)) on those samples."""
        solved, rows, tokens = self._sample(trainer, self.early, "auto-scout")
        kl = self._kls(trainer, rows, [(0, self._step0(trainer).id)])[0]
        q, v = sum(solved.values()) / len(solved), math.exp(min(kl, 50.0))
        return {"step": trainer.step_num, "n": len(solved), "Q": q, "kl": kl, "V": v, "S": q / v, "tokens": tokens}

    # ---------------------------------------------------------------- confirmation and D*

    def candidates(self, trainer) -> list[tuple[int, str]]:
        """(step, checkpoint id) of the saved checkpoints t-D on this lineage that may be rolled back to."""
        t, cfg, seen, out = trainer.step_num, self.cfg, set(), []
        for m in trainer.store.lineage(trainer.head):
            if m.run != trainer.run or m.step in seen:
                continue
            seen.add(m.step)
            d = t - m.step
            if 0 < d <= cfg.delta_max and m.step >= self.floor and (cfg.deltas is None or d in cfg.deltas):
                out.append((m.step, m.id))
        return out

    def probe(self, trainer) -> Event:
        """Sample pi_t on the pool once; Q, V, S for every candidate; the decision event."""
        t, cfg, r = trainer.step_num, self.cfg, trainer.recipe
        d = Event(kind="auto", k=self.interventions + 1, step=t, confirmed=False, pool=len(self.pool),
                  signals={"reward_ema": self.reward_ema, "entropy_ema": self.entropy_ema, **self.signals})
        cands = self.candidates(trainer)
        if not cands:
            d.kind, d.reason = "auto-probe", f"no saved checkpoint within {cfg.delta_max} steps after step {self.floor}"
            return d
        groups = members(self.pool, [s for s, _ in cands], t, cfg.bucket, r.train.save_every)
        picks = spread(groups, cfg.probe_size)
        if not picks:
            d.kind, d.reason = "auto-probe", "no mistakes near the candidate checkpoints"
            return d
        solved, rows, tokens = self._sample(trainer, picks, "auto-probe")
        kls = self._kls(trainer, rows, cands)
        table = []
        for (step, cid), kl in zip(cands, kls):
            b = [solved[it["prompt"]] for it in groups[step] if it["prompt"] in solved]
            table.append({"step": step, "delta": t - step, "checkpoint": cid, "n": len(b),
                          "Q": sum(b) / len(b) if b else None, "kl": kl, "V": math.exp(min(kl, 50.0))})
        sel = select_delta(table, cfg.min_score)
        d.candidates, d.confirmed = sel["rows"], sel["confirmed"]
        d.probe = {"prompts": len(picks), "tries": r.npo.max_tries, "tokens": tokens,
                   "solved": sum(solved.values()) / len(solved)}
        best = sel["best"]
        if best is not None:
            d.delta, d.fork_step, d.fork, d.until = best["delta"], best["step"], best["checkpoint"], t
            d.branch, d.S = f"auto-{d.k}", best["S"]
        if not sel["confirmed"]:
            d.kind = "auto-probe"
            d.reason = ("no candidate with probed mistakes" if best is None else
                        f"best S={best['S']:.3f} < min_score {cfg.min_score}")
        return d

    def _sample(self, trainer, items: list[dict], tag: str) -> tuple[dict[str, bool], list, int]:
        """npo.max_tries samples of the current policy per item, in one generate call: whether each prompt is
        solved (one verified-correct sample: NPO's Q, a guide's chance to find a trajectory within max_tries),
        the first probe_samples of each prompt (the KL forwards' rows: their cost is bounded), and the tokens
        sampled (added to the compute spent)."""
        r = trainer.recipe
        problems = [Problem.from_json(it) for it in items]
        prompts = [format_prompt(r, trainer.tokenizer, p) for p in problems]
        # the training RNG stream does not see the probe
        with forked_rng(derive_seed(r.seed, trainer.run, tag, trainer.step_num)):
            sampled = trainer.backend.generate(prompts, r.npo.max_tries)
        oks = iter(score_batch(trainer.judge, [Call.of(p, ro) for p, g in zip(problems, sampled) for ro in g]))
        solved = {it["prompt"]: sum(next(oks) >= 1.0 for _ in g) > 0 for it, g in zip(items, sampled)}
        tokens = sum(len(ro.completion_ids) for g in sampled for ro in g)
        self.compute["probe_tokens"] += tokens
        return solved, [ro for g in sampled for ro in g[: self.cfg.probe_samples]], tokens

    def _kls(self, trainer, rows, cands) -> list[float]:
        """Mean per-token KL(pi_t || pi_c) on the probe trajectories (k3 estimator: they are pi_t's
        samples), one forward of pi_t and one of each candidate, in the sampling dtype."""
        r = trainer.recipe
        mbs, device = trainer.micro_batch or max(len(rows), 1), trainer.device
        batches = [collate(rows[s : s + mbs], trainer.pad_id, device) for s in range(0, len(rows), mbs)]

        def logps(model) -> list[torch.Tensor]:
            was = model.training
            model.eval()
            with torch.no_grad():
                out = [token_logprobs(model, b["input_ids"], b["attention_mask"], b["n_completion"],
                                         r.grpo.logprob_chunk, with_entropy=False,
                                         temperature=r.rollout.temperature)[0].float() for b in batches]
            model.train(was)
            return out

        cur = logps(trainer.backend.model)
        kls = []
        for _, cid in cands:
            old_model = load_model(trainer.store, cid, dtype=DTYPES[r.model.dtype], device=str(device))[0]
            tot = n = 0.0
            for b, lc, lo in zip(batches, cur, logps(old_model)):
                lr = (lo - lc).clamp(-20.0, 20.0)  # log pi_c / pi_t on pi_t's tokens
                k3 = (lr.exp() - 1 - lr) * b["mask"]
                tot, n = tot + float(k3.sum()), n + float(b["mask"].sum())
            del old_model
            kls.append(tot / max(n, 1.0))
        return kls

    # ---------------------------------------------------------------- after a rollback

    def begin_replay(self, prev: AutoController, d: Event, guide: str) -> None:
        """On the new branch (state restored from the fork): carry over what the run has learnt so far."""
        c = d.fork_step
        self.pool = [it for it in prev.pool if it["step"] < c]  # later ones belong to the abandoned stretch
        self.interventions = prev.interventions + (1 if d.kind == "auto" else 0)
        self.compute, self.floor = dict(prev.compute), prev.floor
        self.replay = {"k": d.k, "branch": d.branch, "start": c, "until": d.until, "guide": guide}
        self.phase, self.warned, self.decision = "replaying", 0, None
        self.low, self.early, self.scout = None, [], []  # a plateau on this branch follows its own progress


class AutoTrainer(Trainer):
    """The trainer with an AutoController: feeds it the mistakes (all-wrong groups) and every step."""

    def __init__(self, recipe, store, **kw):
        kw.setdefault("controller", AutoController(recipe.auto, store))
        super().__init__(recipe, store, **kw)

    def score(self, problems, prompts: list[str], sampled) -> list[Group]:
        groups = super().score(problems, prompts, sampled)
        # before any slot is mixed in: the policy's own failures (None: solved; kept for the global order)
        self._scored += [None if any(g.correct) else g.problem.to_json() for g in groups]
        return groups

    def step(self) -> dict[str, float]:
        before, step = self.tokens_generated, self.step_num
        self._scored = []
        m = super().step()
        # torchrun: every rank's groups in the global prompt order (rank r scored prompts r, r + W, ...)
        early = step < self.recipe.train.save_every  # a scout's early mistakes: made close to pi_0
        for x in dist.gather_strided(self._scored):
            if x is not None:
                self.controller.note_mistake(Problem.from_json(x), step, early)
        self.controller.observe(self, m, self.tokens_generated - before)
        return m


# --------------------------------------------------------------------------- the driver


def auto_chain(store: Store, run: str) -> list[str]:
    """Branches of an auto run in order, main first; the last one is live."""
    return ls_data(store, run)["runs"][0]["auto_chain"] or ["main"]


def rollback(store: Store, live: Recipe, from_branch: str, prev: AutoController, guide: str, console=None,
             force: bool = False) -> AutoTrainer:
    """Branch at the decision's fork, NPO from the fork to the guide's step, the guide cache pre-filled.
    `live` is the recipe of the branch that stopped (it carries every override so far). force: break the
    dead lease of a driver killed while it made this branch."""
    d, run = prev.decision, live.name
    fork = store.manifest(d.fork)
    have = store.branches(run).get(d.branch)
    if have is not None and have != fork.id:  # a branch made by a crashed driver is reused; not another
        raise NpoError(f"branch {run}/{d.branch} already exists and has moved on; resume it with "
                       + npo_command("auto", "--resume", f"{run}/{d.branch}", store=store.url))
    recipe = npo_recipe(live, guide, d.fork_step, d.until, live.auto.gate)
    guide_step = d.step if d.guide_step is None else d.guide_step  # a plateau's guide: the step it stopped at
    event = Event(kind="auto-branch", k=d.k, branch=d.branch, from_branch=from_branch, fork=fork.id,
                  fork_step=d.fork_step, guide=guide, guide_step=guide_step, until=d.until, delta=d.delta)

    def prepare(trainer: AutoTrainer) -> None:
        trainer.controller.begin_replay(prev, d, guide)
        event.prefill = prefill_mistakes(store, trainer, prev.pool, guide)
        trainer.controller.compute["guide_tokens"] += event.prefill["tokens"]

    trainer = fork_branch(store, fork, recipe, d.branch, event, trainer_cls=AutoTrainer, prepare=prepare,
                          console=console, force=force)
    if console is not None and recipe.logging.progress:
        pre = event.prefill
        console.print(f"auto: branch {run}/{d.branch} from step {d.fork_step}: NPO to step {d.until} with guide "
                      f"{store.describe(guide)}; guide cache pre-filled for {pre['found']}/{pre['prompts']} mistakes",
                      highlight=False, soft_wrap=True)
    return trainer


def prefill_mistakes(store: Store, trainer: AutoTrainer, pool: list[dict], guide: str) -> dict:
    """Guide trajectories for the replay's known mistakes (the same cache keys the NPO source reads): the
    replay meets exactly those prompts again. torchrun: each rank samples its share (its own seed: separate
    streams), rank 0 writes every entry, and share() returns once they are written, so no rank trains
    before the cache is complete."""
    recipe, replay = trainer.recipe, trainer.controller.replay
    todo = [it for it in pool if replay["start"] <= it["step"] < replay["until"]]
    items = [(format_prompt(recipe, trainer.tokenizer, p), p) for p in map(Problem.from_json, todo)]
    gen = GuideGenerator(store, guide, recipe)
    seed = dist.rank_seed(derive_seed(recipe.seed, gen.seed_id, "auto-prefill"))  # from the guide's weights
    mine = items[dist.rank() :: dist.world()]
    found = sum(e is not None for e in gen.get(mine, seed, engine=trainer.backend)) if mine else 0
    gen.unload()
    gen.share()
    found, tokens = dist.all_sum([found, gen.stats.tokens])
    return {"prompts": len(items), "found": int(found), "tokens": int(tokens)}


def auto_events(store: Store, run: str) -> list[tuple[str, Event]]:
    """(where, event) of every decision on the auto chain, in order; where is BRANCH@STEP."""
    out = []
    for b in auto_chain(store, run):
        # a damaged old checkpoint hides only its own events
        own, _, _ = branch_walk(store, store.resolve(f"{run}/{b}"), run, b)
        for m in reversed(own):
            out += [(f"{b}@{m.step}", e) for e in m.events if e.kind in DECISION_KINDS]
    return out


def check_new(recipe: Recipe) -> None:
    """What a new AutoNPO run's recipe must satisfy."""
    if recipe.npo.source != "none":
        raise NpoError("npo auto starts from plain GRPO (npo.source=none); it sets the NPO guide on its "
                       "replay branches itself")
    if recipe.auto.bootstrap and recipe.auto.scout_steps >= recipe.train.steps:
        raise NpoError(f"auto.scout_steps={recipe.auto.scout_steps} (the longest scout) must be below "
                       f"train.steps={recipe.train.steps}")


def resume(store: Store, ref: str, overrides: list[str], console=None, force: bool = False) -> AutoTrainer:
    """The trainer that continues AutoNPO run RUN (its live branch) or RUN/BRANCH; a run stopped between a
    decision and its branch makes the branch first."""
    if "@" in ref:
        raise NpoError(f"--resume takes RUN or RUN/BRANCH, not '{ref}'")
    run, _, branch = ref.partition("/")
    if run not in store.runs():
        raise NpoError(f"unknown run {run!r} in {store.url} (see npo ls)")
    branch = branch or auto_chain(store, run)[-1]
    man, stored = head_with_recipe(store, run, branch)
    live = build_recipe(stored, list(overrides))
    if not live.auto.enabled:
        raise NpoError(f"{run}/{branch} is not an AutoNPO run; continue it with "
                       + npo_command("run", "--resume", f"{run}/{branch}", store=store.url))
    if man.branch != branch:
        raise NpoError(f"branch {run}/{branch} was made but never trained; resume the run with "
                       + npo_command("auto", "--resume", run, store=store.url))
    if man.state.controller.get("phase") == "decided":  # stopped for a rollback that was not made yet
        prev = AutoController.from_state(live.auto, store, man.state.controller)
        return rollback(store, live, branch, prev, prev.decision.guide or man.id, console, force=force)
    return resume_trainer(store, f"{run}/{branch}", list(overrides), trainer_cls=AutoTrainer, console=console)


def drive(store: Store, trainer: AutoTrainer, console=None, progress: bool = True, force: bool = False) -> dict:
    """Train with the controller; on each decision branch, pre-fill, replay; until the live branch reaches
    train.steps. Returns the last branch's summary plus the run's AutoNPO record."""
    while True:
        show = progress and trainer.recipe.logging.progress
        res = trainer.train(progress=show, force=force)
        force = False
        if res["stopped_by"] != "controller":
            break
        prev, live, from_branch = trainer.controller, trainer.recipe, trainer.branch
        guide = prev.decision.guide or res["checkpoint"]  # a bootstrap's best check may predate the stop
        trainer = None  # free the old policy before loading the branch's
        trainer = rollback(store, live, from_branch, prev, guide, console if show else None)
    ctrl = trainer.controller
    res["auto"] = {"live": trainer.branch, "chain": auto_chain(store, trainer.run),
                   "interventions": ctrl.interventions, "phase": ctrl.phase, "compute": dict(ctrl.compute),
                   "compute_tokens": ctrl.total_tokens(),
                   "events": [{**e.model_dump(), "at": where} for where, e in auto_events(store, trainer.run)]}
    return res


def is_auto(store: Store, ref: str) -> bool:
    """Whether RUN / RUN/BRANCH is an AutoNPO run (its head's stored recipe has auto.enabled)."""
    run, _, branch = ref.partition("/")
    if run not in store.runs():
        return False
    head = store.head(run, branch or "main")
    if head is None:
        return False
    man = store.manifest(head)
    return bool(man.recipe and store.get_json(man.recipe).get("auto", {}).get("enabled"))
