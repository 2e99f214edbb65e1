"""Convergence of every method on the built-in task, N seeds, one store: the project's results table.

Arms (seed s; T = train steps; one recipe for all):
  grpo         plain GRPO, run grpo-sS (the baseline; the other arms that need a run branch from it)
  npo-boot     NPO bootstrapping: `npo intervene --at 0 --guide SCOUT --until WINDOW` on grpo-sS (the
               scout is grpo-sS's own first SCOUT steps; its cost is counted in the compute columns)
  npo-plateau  NPO plateau breakthrough: `npo intervene --at A --guide G` on grpo-sS (roll back to A,
               replay A..G with the G checkpoint as guide, then GRPO to T; the abandoned A..G counts)
  auto         AutoNPO: `npo auto` (run auto-sS; its live branch; probes, pre-fills and replays count)
  luffy        LUFFY: run luffy-sS, an external teacher's trajectories (npo.teacher_path: the task's
               reference answers as completions, a perfect teacher), LUFFY shaping, for all T steps
  exgrpo       ExGRPO: run exgrpo-sS, replay of its own past successes, for all T steps
  rlep         RLEP: run rlep-sS, replays the successes of the finished grpo-sS from step 0 (the finished
               run it needs first is NOT counted in its compute: it is reported separately)

Results (benchmarks/results/ by default): convergence.md (mean ± std over seeds of the final held-out
accuracy, steps / optimizer updates / sampled tokens to reach the GRPO baseline's final accuracy of the same
seed, with replayed steps and guide sampling counted as `npo compare --x updates|tokens` counts them),
convergence.png (mean curves, `npo compare`'s chart), convergence_compute.png (the same on the tokens
axis) and convergence.json. Work (store, metrics.jsonl, logs) goes to --out.

Arms run as separate processes, at most --jobs (2) at a time, one torch thread each; arms already in
the store are reused (a killed run is resumed), so re-running the command finishes an interrupted one.

    .venv/bin/python benchmarks/convergence.py                      # README table: make bench-convergence
    .venv/bin/python benchmarks/convergence.py --report-only        # rewrite the report from the store
    .venv/bin/python benchmarks/convergence.py --quick --out /tmp/c # smoke test: tiny, 1 seed, < 1 min
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
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

from npo_evidence import base_recipe, branch, fmt, mean_sd, train_run

from npo_cli.errors import NpoError
from npo_cli.recipe import build_recipe

ARMS = ("grpo", "npo-boot", "npo-plateau", "auto", "luffy", "exgrpo", "rlep")
NAMES = {"grpo": "GRPO", "npo-boot": "NPO bootstrapping", "npo-plateau": "NPO plateau breakthrough",
         "auto": "AutoNPO", "luffy": "LUFFY", "exgrpo": "ExGRPO", "rlep": "RLEP"}
NEEDS_GRPO = ("npo-boot", "npo-plateau", "rlep")
ORDER = ("grpo", "auto", "exgrpo", "rlep", "npo-boot", "luffy", "npo-plateau")  # scheduling: long / unblocking first
DEFAULTS = {"steps": 300, "eval_every": 25}  # the committed results' settings: ~21 min on 2 cores
QUICK = {"steps": 8, "eval_every": 2}
DEFAULT_RECIPES = ("recipes/sparse.yaml", "recipes/quickstart.yaml")


# --------------------------------------------------------------------------- the plan


def make_plan(a, store) -> dict:
    """Everything a worker needs, written to OUT/plan.json: the recipe (as a dict) and the arms' settings."""
    sets = [f"train.steps={a.steps}", f"train.eval_every={a.eval_every}", "logging.progress=false",
            f"logging.metrics_jsonl={Path(a.out).resolve()}/runs/{{run}}/{{branch}}/metrics.jsonl"]
    if a.eval_size:
        sets.append(f"task.eval_size={a.eval_size}")
    if a.quick:
        sets += ["auto.window=3", "auto.patience=1", "auto.min_gap=0"]
    r = base_recipe(a.recipe, a.quick, store, sets + a.sets)
    T = r.train.steps
    scout = a.scout or max(2, T // 5)
    window = a.window or scout
    at = a.at if a.at is not None else T // 4
    guide = a.guide or T // 2
    # checkpoints exactly where arms fork or take guides (and AutoNPO's rollback candidates)
    r = build_recipe(r.model_dump(mode="json"), [f"train.save_every={math.gcd(scout, at, guide, T)}"])
    return {"recipe": r.model_dump(mode="json"), "T": T, "scout": scout, "window": window, "at": at,
            "guide": guide, "gate": a.gate, "seeds": a.seeds, "arms": a.arms, "out": str(Path(a.out).resolve()),
            "store": str(Path(a.out).resolve() / "store"), "teacher": str(Path(a.out).resolve() / "teacher.jsonl"),
            "quick": a.quick,
            "recipe_path": os.path.relpath(a.recipe, ROOT) if a.recipe else "inline tiny warm start (--quick)"}


def write_teacher(plan: dict) -> None:
    """LUFFY's external teacher: every train problem's reference answer as its completion (JSONL)."""
    from npo_cli.tasks import load_problems

    p = Path(plan["teacher"])
    if p.exists():
        return
    r = build_recipe(plan["recipe"])
    seen: dict[str, str] = {}
    for s in plan["seeds"]:
        for prob in load_problems(r.task, "train", s):
            seen.setdefault(prob.prompt, prob.answer)
    tmp = p.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"prompt": k, "completion": v}) + "\n" for k, v in seen.items()))
    tmp.rename(p)


# --------------------------------------------------------------------------- one arm


def run_arm(plan: dict, arm: str, seed: int) -> None:
    from npo_cli.store import Store

    store = Store.open(plan["store"])
    recipe = build_recipe(plan["recipe"])
    T, grpo = plan["T"], f"grpo-s{seed}"
    extra = [f"npo.gate={plan['gate']}"] if plan["gate"] is not None else []
    extra.append(f"train.save_every={max(recipe.train.save_every, T // 4)}")  # nothing forks from these runs
    if arm == "grpo":
        train_run(store, recipe, grpo, seed)
    elif arm == "npo-boot":
        branch(store, grpo, "npo-boot", 0, plan["scout"], plan["window"], plan["gate"])
    elif arm == "npo-plateau":
        branch(store, grpo, "npo-plateau", plan["at"], plan["guide"], plan["guide"], plan["gate"])
    elif arm == "luffy":
        train_run(store, recipe, f"luffy-s{seed}", seed,
                  ["npo.source=luffy", f"npo.teacher_path={plan['teacher']}", *extra])
    elif arm == "exgrpo":
        train_run(store, recipe, f"exgrpo-s{seed}", seed, ["npo.source=exgrpo", *extra])
    elif arm == "rlep":
        final = store.resolve(f"{grpo}@{T}")
        train_run(store, recipe, f"rlep-s{seed}", seed, ["npo.source=rlep", f"npo.replay_from='{final}'", *extra])
    elif arm == "auto":
        run_auto(store, plan, recipe, seed)
    else:
        raise NpoError(f"unknown arm {arm!r}")


def run_auto(store, plan: dict, recipe, seed: int) -> None:
    import yaml

    try:
        from npo_cli.commands import auto_run
    except ImportError as e:  # without npo_cli.auto the arm is skipped
        raise SkipArm(f"npo_cli.auto is not available ({e})") from None
    run = f"auto-s{seed}"
    if run in store.runs():
        from npo_cli.auto import auto_chain

        live = auto_chain(store, run)[-1]
        if store.manifest(store.head(run, live)).step >= plan["T"]:
            print(f"  {run}: in the store, reused", flush=True)
            return
        auto_run(None, [], store.url, run, progress=False, force=True)
        return
    path = Path(plan["out"]) / "recipes" / f"{run}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    sets = [f"name={run}", f"seed={seed}"] + ([f"npo.gate={plan['gate']}"] if plan["gate"] is not None else [])
    d = build_recipe(recipe.model_dump(mode="json"), sets).model_dump(mode="json")
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    t0 = time.perf_counter()
    res = auto_run(str(path), [], store.url, None, progress=False)
    a = res["auto"]
    print(f"  {run}: {plan['T']} steps in {time.perf_counter() - t0:.0f} s; chain {' -> '.join(a['chain'])}, "
          f"{a['interventions']} interventions", flush=True)


class SkipArm(Exception):
    """An arm that cannot run here (AutoNPO without npo_cli.auto): reported, not an error."""


def worker(out: str, arm: str, seed: int) -> int:
    plan = json.loads((Path(out) / "plan.json").read_text())
    torch.set_num_threads(1)
    os.chdir(plan["out"])
    try:
        run_arm(plan, arm, seed)
    except SkipArm as e:
        print(f"SKIP: {e}", flush=True)
        return 3
    return 0


# --------------------------------------------------------------------------- scheduling


def schedule(plan: dict, jobs: int) -> dict[str, dict]:
    """Run every (arm, seed); GRPO first, the arms that branch from it after. Returns status per task."""
    tasks = [(arm, s) for arm in ORDER if arm in plan["arms"] for s in plan["seeds"]]
    tasks.sort(key=lambda t: (t[0] != "grpo", ORDER.index(t[0]), t[1]))
    status: dict[str, dict] = {}
    logs = Path(plan["out"]) / "logs"
    logs.mkdir(exist_ok=True)

    def key(arm, s):
        return f"{arm}:{s}"

    def ready(arm, s):
        if arm in NEEDS_GRPO and "grpo" in plan["arms"]:
            st = status.get(key("grpo", s), {}).get("state")
            return "wait" if st in (None, "running") else ("go" if st == "ok" else "blocked")
        return "go"

    running: dict[str, tuple] = {}
    pending = list(tasks)
    while pending or running:
        for t in list(pending):
            if len(running) >= jobs > 1:
                break
            r = ready(*t)
            if r == "wait":
                continue
            pending.remove(t)
            if r == "blocked":
                status[key(*t)] = {"state": "blocked", "note": f"grpo-s{t[1]} failed"}
                continue
            t0 = time.perf_counter()
            if jobs <= 1:  # in this process (--quick, --jobs 1)
                try:
                    run_arm(plan, *t)
                    status[key(*t)] = {"state": "ok", "seconds": time.perf_counter() - t0}
                except SkipArm as e:
                    status[key(*t)] = {"state": "skipped", "note": str(e)}
                except Exception as e:  # noqa: BLE001 (an arm's failure is reported, the rest go on)
                    traceback.print_exc()
                    status[key(*t)] = {"state": "failed", "note": f"{type(e).__name__}: {e}"[:300]}
                print(f"[{key(*t)}] {status[key(*t)]['state']}", flush=True)
                continue
            log = logs / f"{t[0]}-s{t[1]}.log"
            f = open(log, "w")  # noqa: SIM115 (closed when the process ends)
            p = subprocess.Popen([sys.executable, __file__, "--worker", t[0], str(t[1]), "--out", plan["out"]],
                                 stdout=f, stderr=subprocess.STDOUT, cwd=plan["out"],
                                 env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
            running[key(*t)] = (p, f, t0, log)
            status[key(*t)] = {"state": "running"}
            print(f"[{key(*t)}] started (log {log})", flush=True)
        for k, (p, f, t0, log) in list(running.items()):
            rc = p.poll()
            if rc is None:
                continue
            f.close()
            del running[k]
            dt = time.perf_counter() - t0
            tail = log.read_text()[-400:].strip().splitlines()
            if rc == 0:
                status[k] = {"state": "ok", "seconds": dt}
            elif rc == 3:
                status[k] = {"state": "skipped", "note": tail[-1] if tail else ""}
            else:
                status[k] = {"state": "failed", "note": f"exit {rc}: {tail[-1] if tail else ''}"[:300]}
            print(f"[{k}] {status[k]['state']} in {dt:.0f} s", flush=True)
        if running:
            time.sleep(1.0)
    return status


# --------------------------------------------------------------------------- the report


def arm_refs(store, plan: dict, arm: str, seed: int) -> str | None:
    """The ref of an arm's curve, or None if it is not in the store."""
    grpo = f"grpo-s{seed}"
    runs = store.runs()
    if arm == "grpo":
        return grpo if grpo in runs else None
    if arm in ("npo-boot", "npo-plateau"):
        return f"{grpo}/{arm}" if grpo in runs and arm in store.branches(grpo) else None
    run = f"{arm}-s{seed}"
    if run not in runs:
        return None
    if arm == "auto":
        from npo_cli.auto import auto_chain

        return f"{run}/{auto_chain(store, run)[-1]}"
    return run


def analyse(store, plan: dict) -> dict:
    from npo_cli.compare import _Costs as Costs
    from npo_cli.compare import build_curve, first_reach

    costs = Costs(store)
    T, out = plan["T"], {}
    targets = {}
    for seed in plan["seeds"]:
        ref = arm_refs(store, plan, "grpo", seed)
        if ref:
            targets[seed] = build_curve(store, ref, "eval/accuracy", "step", costs=costs).points[-1].y
    for arm in ARMS:
        if arm not in plan["arms"]:
            continue
        rows = {}
        for seed in plan["seeds"]:
            ref = arm_refs(store, plan, arm, seed)
            if ref is None:
                continue
            c = {x: build_curve(store, ref, "eval/accuracy", x, costs=costs) for x in ("step", "updates", "tokens")}
            last = c["step"].points[-1]
            row = {"ref": ref, "final_step": last.step, "final": last.y, "complete": last.step >= T,
                   "work": c["tokens"].work, "target": targets.get(seed)}
            if seed in targets:
                for x in ("step", "updates", "tokens"):
                    hit = first_reach(c[x].points, targets[seed])
                    row[f"{x}_to_target"] = hit.x if hit else None
            rows[seed] = row
        out[arm] = {"name": NAMES[arm], "seeds": rows}
    return {"arms": out, "targets": targets}


def ratio(arm: dict, base: dict, key: str) -> list[float]:
    """Per-seed base/arm ratios of a to-target measure (> 1: the arm got there with less)."""
    out = []
    for seed, r in arm["seeds"].items():
        b = base["seeds"].get(seed, {}).get(key)
        if r.get(key) and b:
            out.append(b / r[key])
    return out


def eval_count(plan: dict) -> int:
    """Held-out problems each arm is evaluated on (task.eval_size is a cap: a small task has fewer)."""
    from npo_cli.tasks import load_problems

    r = build_recipe(plan["recipe"])
    return len(load_problems(r.task, "eval", r.seed)[: r.task.eval_size])


def report(plan: dict, res: dict, status: dict, meta: dict) -> str:
    arms = res["arms"]
    base = arms.get("grpo", {"seeds": {}})
    n = len(plan["seeds"])
    n_eval = eval_count(plan)
    head = (f"Produced by `{meta['command']}` on {meta['machine']} in {meta['wall_min']:.1f} min "
            f"({meta['date']}).")
    setup = (f"Recipe: `{meta['recipe']}` with train.steps={plan['T']}, eval every "
             f"{plan['recipe']['train']['eval_every']} steps on {n_eval} held-out "
             f"problems; seeds {plan['seeds']}. NPO bootstrapping: scout = GRPO@{plan['scout']}, NPO on steps "
             f"0..{plan['window']}. NPO plateau: roll back to {plan['at']}, replay to {plan['guide']} with guide "
             f"GRPO@{plan['guide']}.")
    legend = ("Target = the GRPO baseline's final held-out accuracy (same seed). *updates* = optimizer steps "
              "done, replayed steps and the scout/guide stretches an arm needed included; *tokens* = tokens "
              "sampled (policy rollouts + guide sampling + AutoNPO probes and pre-fills). To-target columns: "
              "mean ± std over the seeds that reached the target (k/N); speed-up = GRPO's / the arm's, per seed.")
    cols = ("| method | final held-out acc | Δ vs GRPO | reached | steps to target | updates to target | "
            "tokens to target | speed-up (updates) | speed-up (tokens) | total updates | total tokens |")
    L = ["# Convergence on the built-in task", "", head, "", setup, "", legend, "", cols,
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for arm in ARMS:
        if arm not in plan["arms"]:
            continue
        a = arms.get(arm)
        states = {status.get(f"{arm}:{s}", {}).get("state") for s in plan["seeds"]}
        if not a or not a["seeds"]:
            note = next((status[k].get("note", "") for k in status if k.startswith(f"{arm}:")
                         and status[k].get("note")), "not run")
            L.append(f"| {NAMES[arm]} | {'skipped' if 'skipped' in states else 'missing'}: {note} |" + " |" * 10)
            continue
        rs = list(a["seeds"].values())
        finals = [r["final"] for r in rs]
        deltas = [r["final"] - base["seeds"][s]["final"] for s, r in a["seeds"].items() if s in base["seeds"]]
        reached = [r for r in rs if r.get("step_to_target") is not None]
        incomplete = [r["ref"] for r in rs if not r["complete"]]
        su = [ratio(a, base, f"{x}_to_target") for x in ("updates", "tokens")]
        L.append(f"| {NAMES[arm]}{' (incomplete: ' + ', '.join(incomplete) + ')' if incomplete else ''} | "
                 f"{mean_sd(finals)} | {mean_sd(deltas) if arm != 'grpo' else '-'} | {len(reached)}/{len(rs)} | "
                 f"{msd([r['step_to_target'] for r in reached])} | "
                 f"{msd([r['updates_to_target'] for r in reached])} | "
                 f"{sci([r['tokens_to_target'] for r in reached])} | "
                 f"{ratios(su[0]) if arm != 'grpo' else '1'} | {ratios(su[1]) if arm != 'grpo' else '1'} | "
                 f"{msd([r['work']['updates'] for r in rs])} | {sci([r['work']['tokens'] for r in rs])} |")
    order = sorted((a for a in arms.values() if a["seeds"]),
                   key=lambda a: -statistics.mean(r["final"] for r in a["seeds"].values()))
    paper = ("The paper's (Qwen3-VL-8B, 8 benchmarks): AutoNPO 63.15 > NPO early+late 62.84 > NPO early 62.12 > "
             "RLEP 61.48 > ExGRPO 61.16 > GRPO 60.25 > LUFFY 58.68, and about 2x faster early convergence.")
    notes = (f"RLEP replays a finished GRPO run ({plan['T']} updates per seed, not counted above). LUFFY's "
             f"teacher is the task's reference answers (external, free here). With {n} seed(s) and "
             f"{n_eval} eval problems, differences within about one std are noise.")
    L += ["", "Ordering by mean final held-out accuracy here: " + " > ".join(a["name"] for a in order) + ".",
          paper, "", notes, "", "![convergence](convergence.png)", "",
          "![convergence on the tokens axis](convergence_compute.png)", "",
          "Per seed (final accuracy / steps to target):", "",
          "| method | " + " | ".join(f"seed {s}" for s in plan["seeds"]) + " |", "|---|" + "---:|" * n]
    for arm in ARMS:
        a = arms.get(arm)
        if not a or not a["seeds"]:
            continue
        cells = [f"{fmt(a['seeds'][s]['final'])} / {msd([a['seeds'][s].get('step_to_target')])}"
                 if s in a["seeds"] else "-" for s in plan["seeds"]]
        L.append(f"| {a['name']} | " + " | ".join(cells) + " |")
    failed = {k: v for k, v in status.items() if v.get("state") in ("failed", "blocked", "skipped")}
    if failed:
        L += ["", "Not run: " + "; ".join(f"{k} {v['state']} ({v.get('note', '')})" for k, v in failed.items())]
    return "\n".join(L) + "\n"


def ratios(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.2f}×" + (f" ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else "")


def msd(xs: list[float | None]) -> str:
    """Mean ± std of step counts, no decimals."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.0f}" + (f" ± {statistics.stdev(xs):.0f}" if len(xs) > 1 else "")


def sci(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.3g}" + (f" ± {statistics.stdev(xs):.2g}" if len(xs) > 1 else "")


def plots(store, plan: dict, res: dict, results: Path) -> None:
    from npo_cli.compare import compare_groups, plot

    groups = []
    for arm in ARMS:
        refs = [r["ref"] for r in res["arms"].get(arm, {"seeds": {}})["seeds"].values()]
        if refs:
            groups.append((NAMES[arm], refs))
    if not groups:
        return
    target = statistics.mean(res["targets"].values()) if res["targets"] else None
    n = len(plan["seeds"])
    for x, name in (("step", "convergence.png"), ("tokens", "convergence_compute.png")):
        data = compare_groups(store, groups, "eval/accuracy", x, threshold=target)
        plot(data, str(results / name), bands=len(groups) <= 3,
             title=f"held-out eval/accuracy vs {x}, mean over {n} seed{'s' if n > 1 else ''} "
                   f"(threshold: GRPO's final)")


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--quick: 0)")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--recipe", default=None, help=f"default: the first of {', '.join(DEFAULT_RECIPES)}; "
                    "--quick without it: an inline tiny warm start")
    ap.add_argument("--example", default=str(ROOT / "checkpoints.example"), help="Store copied into OUT/store.")
    ap.add_argument("--steps", type=int, default=None, help=f"train.steps T (default {DEFAULTS['steps']})")
    ap.add_argument("--eval-every", type=int, default=None, help=f"default {DEFAULTS['eval_every']}")
    ap.add_argument("--eval-size", type=int, default=None, help="task.eval_size (default: the recipe's)")
    ap.add_argument("--scout", type=int, default=None, help="bootstrapping scout length (default T/5)")
    ap.add_argument("--window", type=int, default=None, help="bootstrapping NPO window 0..W (default: scout)")
    ap.add_argument("--at", type=int, default=None, help="plateau rollback step A (default T/4)")
    ap.add_argument("--guide", type=int, default=None, help="plateau guide step G (default T/2)")
    ap.add_argument("--gate", type=float, default=None, help="npo.gate for every source (default: the recipe's)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="recipe override, every arm")
    ap.add_argument("--jobs", type=int, default=None, help="arms at once (default 2; --quick: 1, in-process)")
    ap.add_argument("--out", default=None, help="work folder: store, logs (default out/convergence; "
                    "--quick: a temp folder)")
    ap.add_argument("--results", default=None, help="where the report goes (default benchmarks/results; "
                    "--quick: --out)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 8 steps of 4x4, 1 seed, in one process")
    ap.add_argument("--report-only", action="store_true", help="only read the store and write the report")
    ap.add_argument("--worker", nargs=2, metavar=("ARM", "SEED"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.worker:
        return worker(a.out, a.worker[0], int(a.worker[1]))
    from npo_cli.store import Store

    t_start = time.perf_counter()
    cmd = "python benchmarks/convergence.py " + " ".join(sys.argv[1:])
    d = QUICK if a.quick else DEFAULTS
    a.steps, a.eval_every = a.steps or d["steps"], a.eval_every or d["eval_every"]
    a.seeds = a.seeds or ([0] if a.quick else [0, 1, 2])
    a.jobs = a.jobs or (1 if a.quick else 2)
    if a.quick and not a.eval_size:
        a.eval_size = 16
    if a.out is None:
        if a.quick:
            import tempfile

            a.out = tempfile.mkdtemp(prefix="npo-convergence-")
        else:
            a.out = str(ROOT / "out" / "convergence")
    replot = a.report_only and Path(a.out, "plan.json").exists()  # the plan names the recipe
    if a.recipe is None and not a.quick and not replot:
        a.recipe = next((str(ROOT / p) for p in DEFAULT_RECIPES if (ROOT / p).is_file()), None)
        if a.recipe is None:
            raise NpoError(f"no recipe: none of {', '.join(DEFAULT_RECIPES)} exists; pass --recipe")
    if a.recipe:
        a.recipe = str(Path(a.recipe).resolve())
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = Path(a.results).resolve() if a.results else (out if a.quick else ROOT / "benchmarks" / "results")
    results.mkdir(parents=True, exist_ok=True)
    sdir = out / "store"
    if not sdir.exists() and Path(a.example, "runs").is_dir() and not (a.quick and a.recipe is None):
        shutil.copytree(a.example, sdir)
    store = Store.open(str(sdir))
    os.chdir(out)
    if replot:
        plan = json.loads((out / "plan.json").read_text())
        status = json.loads((out / "status.json").read_text()) if (out / "status.json").exists() else {}
    else:
        plan = make_plan(a, store)
        # runs in the store are reused by name: ones made under other settings would be mixed into the table
        prev = json.loads((out / "plan.json").read_text()) if (out / "plan.json").exists() else {}
        other = [k for k in ("recipe", "T", "scout", "window", "at", "guide", "gate") if k in prev and prev[k] != plan[k]]
        if other:
            raise NpoError(f"{out} holds runs made with other settings ({', '.join(other)} differ); "
                           "pass --out with another folder, or delete it")
        (out / "plan.json").write_text(json.dumps(plan, indent=1))
        print(f"convergence: T={plan['T']}, seeds {plan['seeds']}, arms {', '.join(plan['arms'])}, "
              f"{a.jobs} job(s); store {sdir}", flush=True)
        if "luffy" in plan["arms"]:
            write_teacher(plan)
        status = {} if a.report_only else schedule(plan, a.jobs)
        (out / "status.json").write_text(json.dumps(status, indent=1))
    res = analyse(store, plan)
    wall = (time.perf_counter() - t_start) / 60
    meta = {"command": cmd, "wall_min": wall, "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, 1 torch thread per arm, "
                       f"{a.jobs} arm(s) at a time, torch {torch.__version__}",
            "recipe": plan.get("recipe_path", "?")}
    text = report(plan, res, status, meta)
    (results / "convergence.md").write_text(text)
    # the work folder's paths are this machine's: the results name them OUT/...
    public = json.loads(json.dumps(plan).replace(json.dumps(str(out))[1:-1], "OUT"))
    (results / "convergence.json").write_text(json.dumps({"plan": public, "status": status, "meta": meta, **res},
                                                         indent=1, default=str))
    plots(store, plan, res, results)
    print(text)
    print(f"wrote {results / 'convergence.md'}, convergence.png, convergence_compute.png ({wall:.1f} min)")
    bad = [k for k, v in status.items() if v.get("state") in ("failed", "blocked")]
    return 1 if bad else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except NpoError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
