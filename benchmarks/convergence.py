"""The convergence study: NPO, AutoNPO and the baselines against GRPO, where NPO's preconditions hold.

Two regimes of the built-in task (one store, paired seeds: every arm of seed s shares the GRPO run's seed
and data order):
  bootstrap  recipes/sparse.yaml: a sparse start (base/primed, ~5% correct) that GRPO leaves within ~50-100
             steps: NPO bootstrapping forks at step 0 with a short scout as guide
  stall      recipes/stall.yaml: GRPO from base/weak is flat for ~200 steps, then takes off; NPO breakthrough
             rolls back to the stall's start (step 0) and replays it with a post-stall checkpoint as guide
In both, the GRPO run of a seed is the scout: its checkpoints are the candidate guides.

Per regime and seed:
  grpo    plain GRPO for T steps (it records its verified successes for RLEP)
  pilot   before any NPO arm: Q, V, S of every candidate guide for the fork point (benchmarks/pilot.py);
          the guide is argmax S (the paper's rule), chosen per seed
  npo     `npo intervene --at FORK --guide G* --until G*` on the GRPO run: NPO until the branch reaches the
          guide's step, GRPO after, to step T
  auto    `npo auto` with auto.bootstrap: scout length from measured S, then plateau watching
  luffy / exgrpo / rlep   the baselines, T steps each (LUFFY's teacher: the reference answers; RLEP replays
          the finished GRPO run's recorded successes, a cost reported apart)

Measures (benchmarks/results/convergence.{md,json} and four charts):
  steps and total tokens to thresholds on the 25-step moving mean of on-policy accuracy (ExGRPO: of its
  fresh prompts; its experience prompts were picked because it had solved them) (thresholds at 25 /
  50 / 75 % of GRPO's mean rise, fixed from the GRPO runs alone); per-seed GRPO / arm ratios, their geometric
  mean with a 95% bootstrap interval over seeds and a paired sign-flip test; held-out accuracy (task.eval_size
  problems) at equal total compute (GRPO's T-step tokens of the same seed) with paired Δ and intervals.
  Total compute counts every sampled token the arm needed: its scout (the GRPO steps up to the last pilot
  candidate), the pilot's sampling, guide sampling, AutoNPO's probes, pre-fills, replays and abandoned
  stretches.

    .venv/bin/python benchmarks/convergence.py                 # make bench-convergence (~40 min, 2 cores)
    .venv/bin/python benchmarks/convergence.py --report-only   # the report again, from the store
    .venv/bin/python benchmarks/convergence.py --quick         # smoke test: one seed, a few steps
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from npo_cli.errors import NpoError
from npo_cli.recipe import Recipe, build_recipe, load_recipe

NAMES = {"grpo": "GRPO", "npo": "NPO", "auto": "AutoNPO", "luffy": "LUFFY", "exgrpo": "ExGRPO", "rlep": "RLEP"}
TRAIN_ARMS = ("grpo", "npo", "auto", "luffy", "exgrpo", "rlep")
EVAL_SIZE = 1024  # held-out problems per eval
WINDOW = 25  # moving mean of on-policy accuracy (steps; --quick: 2)
FRACTIONS = (0.25, 0.5, 0.75)  # thresholds: shares of GRPO's mean rise
REGIMES = {
    "bootstrap": {"recipe": "recipes/sparse.yaml", "sets": [], "T": 150, "fork": 0, "candidates": [25, 50, 75, 100],
                  "eval_every": 25, "seeds": list(range(8)), "arms": list(TRAIN_ARMS),
                  "title": "sparse start, GRPO takes off within ~50-100 steps (bootstrapping)"},
    "stall": {"recipe": "recipes/stall.yaml", "sets": [], "T": 350, "fork": 0, "candidates": [100, 200, 250, 300],
              "eval_every": 50, "seeds": list(range(5)), "arms": ["grpo", "npo", "auto"],
              "title": "a ~200-step stall, then take-off (breakthrough: replay the stall with a post-stall guide)"},
}
QUICK = {"T": 8, "candidates": [4, 6], "eval_every": 2, "seeds": [0], "window": 2}


# --------------------------------------------------------------------------- the plan


def make_plan(a, store) -> dict:
    """OUT/plan.json: each regime's recipe (a dict), T, fork, candidates, seeds, arms."""
    out = Path(a.out).resolve()
    plan = {"out": str(out), "store": str(out / "store"), "quick": a.quick, "regimes": {}}
    for name in a.regimes:
        g = {**REGIMES[name], "window": WINDOW}
        if a.quick:
            g.update(QUICK)
        if a.seeds:
            g["seeds"] = a.seeds
        T = g["T"]
        every = math.gcd(*g["candidates"], g["fork"] or T, T)  # a checkpoint at every fork and candidate
        sets = [*g["sets"], f"model.store={store.url}", f"train.steps={T}", f"train.save_every={every}",
                f"task.eval_size={EVAL_SIZE}",
                f"train.eval_every={a.eval_every or g['eval_every']}", "logging.progress=false",
                f"logging.metrics_jsonl={out}/runs/{{run}}/{{branch}}/metrics.jsonl", *a.sets]
        if a.quick:
            sets += ["task.eval_size=16", "rollout.prompts_per_step=4", "rollout.group_size=4",
                     "auto.window=3", "auto.patience=1", "auto.min_gap=0", "auto.scout_steps=6"]
        r = load_recipe(str(ROOT / g["recipe"]), sets)
        plan["regimes"][name] = {**g, "recipe": r.model_dump(mode="json"), "recipe_path": g["recipe"],
                                 "teacher": str(out / f"teacher-{name}.jsonl")}
    return plan


def write_teacher(plan: dict, regime: str) -> None:
    """LUFFY's external teacher: every train problem's reference answer as its completion (JSONL)."""
    from npo_cli.tasks import load_problems

    g = plan["regimes"][regime]
    p = Path(g["teacher"])
    if p.exists():
        return
    r = build_recipe(g["recipe"])
    rows = {prob.prompt: prob.answer for prob in load_problems(r.task, "train", r.seed)}
    p.with_suffix(".tmp").write_text("".join(json.dumps({"prompt": k, "completion": v}) + "\n"
                                             for k, v in rows.items()))
    p.with_suffix(".tmp").rename(p)


# --------------------------------------------------------------------------- one task


def grpo_run(regime: str, seed: int) -> str:
    return f"{regime}-grpo-s{seed}"


def pilot_path(plan: dict, regime: str, seed: int) -> Path:
    return Path(plan["out"]) / "pilot" / f"{regime}-s{seed}.json"


def finish(store, ref: str, steps: int) -> bool:
    """True if RUN/BRANCH exists and is complete (resumed first if a killed process left it part-way)."""
    from npo_cli.branching import resume_trainer

    run, _, branch = ref.partition("/")
    head = store.head(run, branch or "main") if run in store.runs() else None
    if head is None:
        return False
    if store.manifest(head).step < steps:
        resume_trainer(store, ref).train(progress=False, force=True)  # this study is its only writer
    return True


def train_run(store, recipe: Recipe, name: str, seed: int, sets: list[str] = ()) -> None:
    from npo_cli.branching import new_trainer

    if finish(store, name, recipe.train.steps):
        return
    r = build_recipe(recipe.model_dump(mode="json"), [f"name={name}", f"seed={seed}", *sets])
    new_trainer(r, store).train(progress=False)


def run_task(plan: dict, regime: str, task: str, seed: int) -> None:
    from npo_cli.store import Store

    store = Store.open(plan["store"])
    g = plan["regimes"][regime]
    recipe, T, grpo = build_recipe(g["recipe"]), g["T"], grpo_run(regime, seed)
    if task == "grpo":
        train_run(store, recipe, grpo, seed, ["train.record_successes=true"])
    elif task == "pilot":
        from pilot import pilot

        path = pilot_path(plan, regime, seed)
        if not path.exists():
            run_recipe = build_recipe(g["recipe"], [f"seed={seed}"])
            res = pilot(store, run_recipe, f"{grpo}@{g['fork']}",
                        {c: f"{grpo}@{c}" for c in g["candidates"]}, seed)
            path.parent.mkdir(exist_ok=True)
            path.write_text(json.dumps(res, indent=1))
    elif task == "npo":
        from npo_cli.commands import intervene

        best = json.loads(pilot_path(plan, regime, seed).read_text())["best"]
        if best is None:
            raise NpoError(f"the pilot found no candidate guide with a verified trajectory (seed {seed})")
        if not finish(store, f"{grpo}/npo", T):
            intervene(store.url, run=grpo, at=g["fork"], guide=str(best["step"]), until=best["step"], gate=None,
                      branch="npo", overrides=["logging.progress=false", "train.record_successes=false"],
                      progress=False)
    elif task == "auto":
        run_auto(store, plan, regime, recipe, seed)
    elif task == "luffy":
        train_run(store, recipe, f"{regime}-luffy-s{seed}", seed,
                  ["npo.source=luffy", f"npo.teacher_path={g['teacher']}"])
    elif task == "exgrpo":
        train_run(store, recipe, f"{regime}-exgrpo-s{seed}", seed, ["npo.source=exgrpo"])
    elif task == "rlep":
        final = store.resolve(f"{grpo}@{T}")
        train_run(store, recipe, f"{regime}-rlep-s{seed}", seed, ["npo.source=rlep", f"npo.replay_from='{final}'"])
    else:
        raise NpoError(f"unknown task {task!r}")


def run_auto(store, plan: dict, regime: str, recipe: Recipe, seed: int) -> None:
    import yaml

    from npo_cli.auto import auto_chain
    from npo_cli.commands import auto_run

    run = f"{regime}-auto-s{seed}"
    if run in store.runs():
        live = auto_chain(store, run)[-1]
        if store.manifest(store.head(run, live)).step < recipe.train.steps:
            auto_run(None, [], store.url, run, progress=False, force=True)
        return
    path = Path(plan["out"]) / "recipes" / f"{run}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    d = build_recipe(recipe.model_dump(mode="json"), [f"name={run}", f"seed={seed}", "auto.bootstrap=true"])
    path.write_text(yaml.safe_dump(d.model_dump(mode="json"), sort_keys=False))
    auto_run(str(path), [], store.url, None, progress=False)


# --------------------------------------------------------------------------- scheduling


def tasks_of(plan: dict) -> list[tuple[str, str, int]]:
    """Every (regime, task, seed), longest first within a dependency level."""
    out = []
    for level in (("grpo", "auto", "luffy", "exgrpo"), ("pilot", "rlep"), ("npo",)):
        for regime in sorted(plan["regimes"], key=lambda r: -plan["regimes"][r]["T"]):
            g = plan["regimes"][regime]
            arms = set(g["arms"]) | ({"pilot"} if "npo" in g["arms"] else set())
            out += [(regime, t, s) for t in level if t in arms for s in g["seeds"]]
    return out


NEEDS = {"pilot": "grpo", "rlep": "grpo", "npo": "pilot"}


def schedule(plan: dict, jobs: int) -> dict[str, dict]:
    """Run every task, at most `jobs` processes at a time, a task after the one it needs."""
    status: dict[str, dict] = {}
    logs = Path(plan["out"]) / "logs"
    logs.mkdir(exist_ok=True)

    def key(regime, t, s):
        return f"{regime}:{t}:{s}"

    pending, running = tasks_of(plan), {}
    while pending or running:
        for t in list(pending):
            if len(running) >= jobs:
                break
            need = NEEDS.get(t[1])
            st = status.get(key(t[0], need, t[2]), {}).get("state") if need else "ok"
            if st in (None, "running"):
                continue
            pending.remove(t)
            if st != "ok":
                status[key(*t)] = {"state": "blocked", "note": f"{need} {st}"}
                continue
            log = (logs / f"{t[0]}-{t[1]}-s{t[2]}.log").open("w")
            p = subprocess.Popen([sys.executable, __file__, "--worker", *map(str, t), "--out", plan["out"]],
                                 stdout=log, stderr=subprocess.STDOUT, cwd=plan["out"],
                                 env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
            running[key(*t)] = (p, log, time.perf_counter())
            status[key(*t)] = {"state": "running"}
        for k, (p, log, t0) in list(running.items()):
            if p.poll() is None:
                continue
            log.close()
            del running[k]
            tail = Path(log.name).read_text()[-300:].strip().splitlines()
            status[k] = ({"state": "ok", "seconds": time.perf_counter() - t0} if p.returncode == 0 else
                         {"state": "failed", "note": f"exit {p.returncode}: {tail[-1] if tail else ''}"})
            print(f"[{k}] {status[k]['state']} in {time.perf_counter() - t0:.0f} s", flush=True)
        time.sleep(0.5)
    return status


def worker(out: str, regime: str, task: str, seed: int) -> int:
    plan = json.loads((Path(out) / "plan.json").read_text())
    torch.set_num_threads(1)
    os.chdir(plan["out"])
    try:
        run_task(plan, regime, task, seed)
    except Exception:  # noqa: BLE001 (the scheduler reports it; the other tasks go on)
        traceback.print_exc()
        return 1
    return 0


# --------------------------------------------------------------------------- curves


def lineage_rows(store, ref: str) -> list[dict]:
    """Per-step metrics along ref's lineage, oldest first (a fork's rows: the parent's up to the fork)."""
    from npo_cli.checkpoint import load_metrics

    return [m for man in reversed(store.lineage(ref)) for m in load_metrics(store, man)]


def step_tokens(row: dict, rows_per_step: int) -> float:
    """Tokens a step sampled: the policy's rollouts plus the guide generator's."""
    return float(row.get("response_length", 0.0)) * rows_per_step + float(row.get("npo/guide_tokens", 0.0))


def arm_curve(store, plan: dict, regime: str, arm: str, seed: int) -> dict | None:
    """{steps, acc (on-policy), mm (moving mean), tokens (cumulative total compute), evals [(step, acc,
    tokens)], extra (tokens outside the lineage), ref} or None when the arm is not in the store."""
    from npo_cli.auto import auto_chain

    g = plan["regimes"][regime]
    r = build_recipe(g["recipe"])
    per_step = r.rollout.prompts_per_step * r.rollout.group_size
    grpo, runs = grpo_run(regime, seed), store.runs()
    extra_at, extra = None, 0.0
    if arm == "grpo":
        ref = grpo if grpo in runs else None
    elif arm == "npo":
        ref = f"{grpo}/npo" if grpo in runs and "npo" in store.branches(grpo) else None
        if ref:  # the scout (GRPO steps after the fork, up to the last candidate) and the pilot's sampling
            pil = json.loads(pilot_path(plan, regime, seed).read_text())
            scout = [m for m in lineage_rows(store, f"{grpo}@{max(g['candidates'])}") if m["step"] > g["fork"]]
            extra_at, extra = g["fork"], sum(step_tokens(m, per_step) for m in scout) + pil["tokens"]
    else:
        run = f"{regime}-{arm}-s{seed}"
        ref = None if run not in runs else f"{run}/{auto_chain(store, run)[-1]}" if arm == "auto" else run
    if ref is None:
        return None
    rows = lineage_rows(store, ref)
    steps, acc, tokens, cum, evals = [], [], [], 0.0, []
    for m in rows:
        cum += step_tokens(m, per_step)
        total = float(m["auto/compute_tokens"]) if arm == "auto" and "auto/compute_tokens" in m else \
            cum + (extra if extra_at is not None and m["step"] > extra_at else 0.0)
        steps.append(int(m["step"]))
        acc.append(float(m.get("npo/fresh_accuracy", m["accuracy"])))  # ExGRPO: its fresh prompts only
        tokens.append(total)
        if "eval/accuracy" in m:
            evals.append((int(m["step"]), float(m["eval/accuracy"]), total))
    w = g["window"]
    mm = [statistics.mean(acc[i + 1 - w : i + 1]) if i + 1 >= w else None for i in range(len(acc))]
    return {"ref": ref, "steps": steps, "acc": acc, "mm": mm, "tokens": tokens, "evals": evals,
            "extra": extra}


def reach(c: dict, level: float, after: int) -> tuple[int, float] | None:
    """(step, total tokens) where the moving mean first reaches level, after step `after`."""
    for s, m, t in zip(c["steps"], c["mm"], c["tokens"]):
        if s > after and m is not None and m >= level:
            return s, t
    return None


def at_compute(c: dict, budget: float) -> tuple[float, float] | None:
    """(step, held-out accuracy) at the total-compute budget, linear between the two evals around it (the
    last eval when the arm spent less in all); None when the budget ends before the arm's first eval."""
    ev = c["evals"]
    for (s0, a0, t0), (s1, a1, t1) in itertools.pairwise(ev):
        if t0 <= budget <= t1:
            w = (budget - t0) / (t1 - t0) if t1 > t0 else 1.0
            return s0 + w * (s1 - s0), a0 + w * (a1 - a0)
    if ev and budget >= ev[-1][2] * (1 - 1e-9):
        return ev[-1][0], ev[-1][1]
    if ev and budget >= ev[0][2]:
        return ev[0][0], ev[0][1]
    return None


# --------------------------------------------------------------------------- statistics


def boot_ci(xs: list[float], stat, n: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of stat over resampled seeds."""
    rng = random.Random(seed)
    vals = sorted(stat([rng.choice(xs) for _ in xs]) for _ in range(n))
    return vals[int(0.025 * n)], vals[int(0.975 * n) - 1]


def sign_flip_p(xs: list[float]) -> float:
    """Two-sided paired sign-flip test of mean(xs) = 0 (exact over every sign pattern)."""
    obs = abs(statistics.mean(xs))
    pats = list(itertools.product((1, -1), repeat=len(xs)))
    return sum(abs(statistics.mean([s * x for s, x in zip(p, xs)])) >= obs - 1e-12 for p in pats) / len(pats)


def geo(xs: list[float]) -> float:
    return math.exp(statistics.mean(math.log(x) for x in xs))


def paired(values: list[float], kind: str) -> dict:
    """kind ratio: geometric mean with interval and p (on logs); kind diff: mean Δ with interval and p."""
    if not values:
        return {"n": 0}
    if kind == "ratio":
        logs = [math.log(v) for v in values]
        lo, hi = boot_ci(values, geo) if len(values) > 1 else (values[0], values[0])
        return {"n": len(values), "mean": geo(values), "lo": lo, "hi": hi,
                "p": sign_flip_p(logs) if len(values) > 1 else None, "values": values}
    lo, hi = boot_ci(values, statistics.mean) if len(values) > 1 else (values[0], values[0])
    return {"n": len(values), "mean": statistics.mean(values), "lo": lo, "hi": hi,
            "p": sign_flip_p(values) if len(values) > 1 else None, "values": values}


# --------------------------------------------------------------------------- analysis


def analyse_regime(store, plan: dict, regime: str) -> dict:
    g = plan["regimes"][regime]
    fork, _T = g["fork"], g["T"]
    curves = {arm: {s: c for s in g["seeds"] if (c := arm_curve(store, plan, regime, arm, s))}
              for arm in g["arms"]}
    base = curves.get("grpo", {})
    out = {"pilot": {}, "thresholds": [], "steps": {}, "compute": {}, "final": {}, "at_compute": {},
           "auto": {}, "grpo_final_mm": None}
    for s in g["seeds"]:
        p = pilot_path(plan, regime, s)
        if p.exists():
            out["pilot"][s] = json.loads(p.read_text())
    if not base:
        return {**out, "curves": curves}
    start = statistics.mean(statistics.mean(c["acc"][fork : fork + g["window"]]) for c in base.values())
    end = statistics.mean(c["mm"][-1] for c in base.values())
    out["thresholds"] = [start + f * (end - start) for f in FRACTIONS]
    out["start"], out["grpo_final_mm"] = start, end
    for arm, cs in curves.items():
        out["steps"][arm], out["compute"][arm] = [], []
        for level in out["thresholds"]:
            st, cm, hits = [], [], {}
            for s, c in cs.items():
                a, b = reach(c, level, fork), reach(base[s], level, fork) if s in base else None
                hits[s] = a
                if a and b:
                    st.append((b[0] - fork) / (a[0] - fork))
                    cm.append(b[1] / a[1])
            out["steps"][arm].append({"level": level, "ratio": paired(st, "ratio"),
                                      "reached": sum(h is not None for h in hits.values()), "of": len(cs),
                                      "mean_steps": statistics.mean([h[0] for h in hits.values() if h])
                                      if any(hits.values()) else None})
            out["compute"][arm].append({"level": level, "ratio": paired(cm, "ratio")})
        finals, eq, dfin, deq = [], [], [], []
        for s, c in cs.items():
            fin = c["evals"][-1][1] if c["evals"] else None
            budget = base[s]["tokens"][-1] if s in base else None
            e = at_compute(c, budget) if budget else None
            finals.append(fin)
            eq.append(e[1] if e else None)
            if s in base and fin is not None and base[s]["evals"]:
                dfin.append(fin - base[s]["evals"][-1][1])
                if e:
                    deq.append(e[1] - base[s]["evals"][-1][1])
        out["final"][arm] = {"mean": mean_of(finals), "delta": paired(dfin, "diff"),
                             "total_tokens": mean_of([c["tokens"][-1] for c in cs.values()])}
        out["at_compute"][arm] = {"mean": mean_of(eq), "delta": paired(deq, "diff"),
                                  "steps": mean_of([at_compute(c, base[s]["tokens"][-1])[0]
                                                    for s, c in cs.items() if s in base
                                                    and at_compute(c, base[s]["tokens"][-1])])}
    for s in curves.get("auto", {}):
        out["auto"][s] = auto_decisions(store, f"{regime}-auto-s{s}")
    return {**out, "curves": curves}


def mean_of(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else None


def auto_decisions(store, run: str) -> list[dict]:
    """AutoNPO's decisions, in order: where, kind, D*, S (and Q, V of the chosen row)."""
    from npo_cli.auto import auto_events

    out = []
    for where, e in auto_events(store, run):
        d = {"at": where, "kind": e.kind, "delta": e.delta, "S": e.S, "guide_step": e.guide_step,
             "reason": e.reason, "confirmed": e.confirmed}
        for k in ("Q", "V"):
            if getattr(e, k, None) is not None:
                d[k] = getattr(e, k)
        out.append({k: v for k, v in d.items() if v is not None})
    return out


# --------------------------------------------------------------------------- report


def f3(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def ci(r: dict, d: int = 2, unit: str = "") -> str:
    if not r or not r.get("n"):
        return "-"
    p = "" if r.get("p") is None else f", p={r['p']:.3f}"
    return f"{r['mean']:.{d}f}{unit} [{r['lo']:.{d}f}, {r['hi']:.{d}f}]{p} (n={r['n']})"


def report(plan: dict, res: dict, status: dict, meta: dict) -> str:
    L = ["# Convergence study", "",
         f"Produced by `{meta['command']}` on {meta['machine']} in {meta['wall_min']:.1f} min ({meta['date']}).",
         "", ("Paired seeds (every arm shares its GRPO run's seed and data order). Thresholds: 25/50/75 % of "
         "GRPO's mean rise of the 25-step moving mean of on-policy accuracy. Ratios are GRPO's / the arm's "
         "(> 1: the arm got there faster), geometric mean over seeds where both reached the threshold, 95% "
         "bootstrap interval, two-sided paired sign-flip p. Total compute = every sampled token an arm needed "
         "(scout, pilot, guide sampling, AutoNPO's probes, pre-fills, replays and abandoned stretches). Equal "
         "compute = an arm's held-out accuracy at the GRPO run's total tokens (same seed), linear between the two "
         "evals around it. With 5 seeds the exact sign-flip test cannot go below p = 0.0625 (2/32), with 8 below "
         "0.0078.")]
    for regime, r in res.items():
        g = plan["regimes"][regime]
        n_eval = build_recipe(g["recipe"]).task.eval_size
        L += ["", f"## {regime}: {g['title']}", "",
              (f"`{g['recipe_path']}`{' with ' + ', '.join(g['sets']) if g['sets'] else ''}; T={g['T']} steps, "
              f"fork at step {g['fork']}, candidate guides at steps {g['candidates']}, seeds {g['seeds']}, "
              f"held-out eval on {n_eval} problems every {g['recipe']['train']['eval_every']} steps.")]
        L += ["", "### Pilot: Q, V, S of the candidate guides (mean over seeds; D = 0 is the fork's own retry)", "",
              "| D | Q | V | S | chosen (seeds) |", "|---:|---:|---:|---:|---:|"]
        pil = r["pilot"]
        if pil:
            for d in sorted({row["delta"] for p in pil.values() for row in p["rows"]}):
                rows = [row for p in pil.values() for row in p["rows"] if row["delta"] == d]
                chosen = sum(1 for p in pil.values() if p["best"] and p["best"]["delta"] == d)
                L.append(f"| {d} | {f3(mean_of([x['Q'] for x in rows]))} | {f3(mean_of([x['V'] for x in rows]))} | "
                         f"{f3(mean_of([x['S'] for x in rows]))} | {chosen}/{len(pil)} |")
            L.append("")
            L.append(f"Failing prompts per seed (of {next(iter(pil.values()))['prompts']}): "
                     + ", ".join(f"s{s} {p['failing']}" for s, p in pil.items()))
        if r["thresholds"]:
            L += ["", f"GRPO moving mean: {f3(r['start'])} at the start, {f3(r['grpo_final_mm'])} at T; thresholds "
                  + ", ".join(f3(x) for x in r["thresholds"]) + ".", "",
                  "### Steps and total compute to the thresholds (GRPO / arm)", "",
                  "| arm | threshold | reached | mean steps | steps ratio | total-compute ratio |",
                  "|---|---:|---:|---:|---:|---:|"]
            for arm in g["arms"]:
                for st, cm in zip(r["steps"].get(arm, []), r["compute"].get(arm, [])):
                    L.append(f"| {NAMES[arm]} | {f3(st['level'])} | {st['reached']}/{st['of']} | "
                             f"{'-' if st['mean_steps'] is None else round(st['mean_steps'])} | "
                             f"{ci(st['ratio'], unit='×') if arm != 'grpo' else '1'} | "
                             f"{ci(cm['ratio'], unit='×') if arm != 'grpo' else '1'} |")
            L += ["", "### Held-out accuracy: at T, and at equal total compute", "",
                  ("| arm | at T | Δ vs GRPO at T | total tokens | at GRPO's compute | its step there | "
                  "Δ vs GRPO at equal compute |"), "|---|---:|---:|---:|---:|---:|---:|"]
            for arm in g["arms"]:
                fi, eq = r["final"].get(arm, {}), r["at_compute"].get(arm, {})
                L.append(f"| {NAMES[arm]} | {f3(fi.get('mean'))} | {ci(fi.get('delta'), 3) if arm != 'grpo' else '-'}"
                         f" | {fi.get('total_tokens') or 0:.3g} | "
                         f"{f3(eq.get('mean')) if eq.get('mean') is not None else 'over budget before its first eval'} | "
                         f"{'-' if eq.get('steps') is None else round(eq['steps'])} | "
                         f"{ci(eq.get('delta'), 3) if arm != 'grpo' else '-'} |")
            order = sorted((a for a in g["arms"] if r["at_compute"].get(a, {}).get("mean") is not None),
                           key=lambda a: -r["at_compute"][a]["mean"])
            L += ["", "Order at equal compute here: " + " > ".join(NAMES[a] for a in order) + "."]
        if r["auto"]:
            L += ["", "### AutoNPO's decisions per seed", ""]
            for s, ds in r["auto"].items():
                L.append(f"- seed {s}: " + ("; ".join(
                    f"{d['at']} {d['kind']}" + (f" D={d['delta']}" if "delta" in d else "")
                    + (f" S={d['S']:.3f}" if "S" in d else "") + (f" ({d['reason']})" if "reason" in d else "")
                    for d in ds) or "no decision"))
        L += ["", f"![{regime} vs steps](convergence_{regime}.png)",
              f"![{regime} vs total compute](convergence_{regime}_compute.png)"]
    bad = {k: v for k, v in status.items() if v.get("state") not in ("ok", None)}
    if bad:
        L += ["", "Not run: " + "; ".join(f"{k} {v['state']} ({v.get('note', '')})" for k, v in bad.items())]
    L += ["", ("The paper's order (Qwen3-VL-8B, 8 benchmarks): AutoNPO > NPO > RLEP > ExGRPO > GRPO > LUFFY, and "
          "about 2x faster early convergence.")]
    return "\n".join(L) + "\n"


def charts(plan: dict, res: dict, results: Path) -> None:
    """Mean held-out accuracy per arm vs steps and vs total compute, one pair of charts per regime."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    for regime, r in res.items():
        for x, suffix in (("step", ""), ("tokens", "_compute")):
            fig = Figure(figsize=(8, 5), dpi=110)
            FigureCanvasAgg(fig)
            ax = fig.subplots()
            for i, (arm, cs) in enumerate(r["curves"].items()):
                if not cs:
                    continue
                n = min(len(c["evals"]) for c in cs.values())
                xs = [statistics.mean(c["evals"][k][0 if x == "step" else 2] for c in cs.values()) for k in range(n)]
                ys = [statistics.mean(c["evals"][k][1] for c in cs.values()) for k in range(n)]
                # AutoNPO without an intervention trains exactly as GRPO (same seed and data): dashed, on top
                ax.plot(xs, ys, marker=".", color=f"C{i}", lw=2 if arm in ("grpo", "npo", "auto") else 1,
                        ls="--" if arm == "auto" else "-", zorder=3 if arm == "auto" else 2,
                        label=f"{NAMES[arm]} ({len(cs)} seeds)")
            ax.set_xlabel("step" if x == "step" else "total sampled tokens (scouts, pilots, guides, probes included)")
            ax.set_ylabel("held-out accuracy (mean over seeds)")
            ax.set_title(f"{regime}: {plan['regimes'][regime]['title']}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.savefig(results / f"convergence_{regime}{suffix}.png")


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default: each regime's own")
    ap.add_argument("--eval-every", type=int, default=None)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="recipe override, every arm")
    ap.add_argument("--jobs", type=int, default=2, help="tasks at once (one torch thread each)")
    ap.add_argument("--out", default=None, help="work folder (default out/convergence; --quick: a temp folder)")
    ap.add_argument("--results", default=None, help="report folder (default benchmarks/results; --quick: --out)")
    ap.add_argument("--example", default=str(ROOT / "checkpoints.example"), help="store copied into OUT/store")
    ap.add_argument("--quick", action="store_true", help="smoke test: one seed, a few steps")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--worker", nargs=3, metavar=("REGIME", "TASK", "SEED"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.worker:
        return worker(a.out, a.worker[0], a.worker[1], int(a.worker[2]))
    from npo_cli.store import Store

    t0 = time.perf_counter()
    if a.out is None:
        import tempfile

        a.out = tempfile.mkdtemp(prefix="npo-convergence-") if a.quick else str(ROOT / "out" / "convergence")
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = Path(a.results).resolve() if a.results else (out if a.quick else ROOT / "benchmarks" / "results")
    results.mkdir(parents=True, exist_ok=True)
    if not (out / "store").exists():
        if not Path(a.example, "runs").is_dir():
            raise NpoError(f"no example store at {a.example}; build it with make example")
        shutil.copytree(a.example, out / "store")
    store = Store.open(str(out / "store"))
    os.chdir(out)
    if a.report_only:
        plan = json.loads((out / "plan.json").read_text())
        status = json.loads((out / "status.json").read_text()) if (out / "status.json").exists() else {}
    else:
        plan = make_plan(a, store)
        prev = json.loads((out / "plan.json").read_text()) if (out / "plan.json").exists() else None
        if prev and any(prev["regimes"].get(k, {}).get("recipe") not in (None, v["recipe"])
                        for k, v in plan["regimes"].items()):
            raise NpoError(f"{out} holds runs made with other settings; pass another --out or delete it")
        (out / "plan.json").write_text(json.dumps(plan, indent=1))
        for regime, g in plan["regimes"].items():
            if "luffy" in g["arms"]:
                write_teacher(plan, regime)
        status = schedule(plan, a.jobs)
        (out / "status.json").write_text(json.dumps(status, indent=1))
    res = {regime: analyse_regime(store, plan, regime) for regime in plan["regimes"]}
    meta = {"command": " ".join(["python benchmarks/convergence.py", *sys.argv[1:]]),
            "wall_min": (time.perf_counter() - t0) / 60, "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, 1 torch thread per task, "
                       f"{a.jobs} task(s) at a time, torch {torch.__version__}"}
    if a.report_only and (results / "convergence.json").exists():  # the run's own command, time and machine
        meta = json.loads((results / "convergence.json").read_text()).get("meta", meta)
    text = report(plan, res, status, meta)
    (results / "convergence.md").write_text(text)
    public = {r: {k: v for k, v in x.items() if k != "curves"} for r, x in res.items()}
    for r, x in res.items():  # the curves at eval points, enough to redraw the charts
        public[r]["evals"] = {arm: {s: c["evals"] for s, c in cs.items()} for arm, cs in x["curves"].items()}
    plan_public = json.loads(json.dumps(plan).replace(str(out), "OUT"))
    (results / "convergence.json").write_text(json.dumps({"plan": plan_public, "status": status, "meta": meta,
                                                          "results": public}, indent=1, default=str))
    charts(plan, res, results)
    print(text)
    return 1 if any(v.get("state") in ("failed", "blocked") for v in status.values()) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except NpoError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
