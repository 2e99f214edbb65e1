"""Evidence for NPO's two interventions against plain GRPO, over several seeds.

(1) sparse regime (bootstrapping): a GRPO baseline of T steps; its checkpoint at step s is the scout,
    so `npo intervene --run grpo --at 0 --guide s --until W` restarts from the initial policy with the
    scout as guide (NPO for steps 0..W, then GRPO to T). Reported: held-out accuracy at equal steps,
    and steps to reach the baseline's final accuracy (the scout's s steps are listed separately: they
    are the baseline's own first s steps, so they cost nothing extra here).
(2) plateau regime (breakthrough): a GRPO baseline of T steps; `npo intervene --at A --guide G`
    rolls back to the plateau start A and replays A..G with the post-plateau checkpoint G as guide,
    then GRPO to T. Reported: accuracy at equal total steps (A..T) and at T.

Each seed's runs go into one store (a copy of checkpoints.example, or a fresh one), so the curves
stay inspectable with `npo ls` / `npo compare`. Runs that are already in the store are not redone,
so several processes (one per seed, same --out) can run at once and a final `--report-only` call
writes the table from everything stored.

    .venv/bin/python benchmarks/npo_evidence.py --seeds 0 1 2 --out evidence
    .venv/bin/python benchmarks/npo_evidence.py --seeds 0 1 2 --out evidence --report-only
    .venv/bin/python benchmarks/npo_evidence.py --quick --out /tmp/ev      # a 2-minute smoke test

Defaults: recipes/sparse.yaml and recipes/plateau.yaml with checkpoints.example when present;
--quick without them SFTs a tiny warm start inline and runs a few steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from npo_cli.errors import NpoError
from npo_cli.recipe import Recipe, build_recipe, load_recipe

NPO_KEYS = ("npo/hit_rate", "npo/Q", "npo/V", "npo/S", "npo/guide_clip_frac", "npo/guide_outside",
            "npo/guide_pos_adv_share")


# --------------------------------------------------------------------------- setup


def quick_base(store, name: str = "base") -> str:
    """A tiny warm start (1-digit sums, ~30% accuracy) as run `name` step 0, for --quick without recipes."""
    from npo_cli.example import quick_warm_start

    if name not in store.runs():
        quick_warm_start(store, run=name, task={"arithmetic": {"digits": 1}, "eval_size": 32})
    return f"{name}@0"


def quick_recipe() -> dict:
    return {"task": {"arithmetic": {"digits": 1}, "eval_size": 32},
            "rollout": {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 4},
            "grpo": {"lr": 1e-3}, "train": {"steps": 6, "save_every": 2, "eval_every": 2},
            "logging": {"progress": False}}


QUICK_SETS = ["train.steps=6", "train.save_every=2", "train.eval_every=2", "rollout.prompts_per_step=4",
              "rollout.group_size=4", "task.eval_size=32", "logging.progress=false"]


def base_recipe(path: str | None, quick: bool, store, sets: list[str]) -> Recipe:
    if path and Path(path).is_file():
        # the example store was copied into `store`: the recipe's model ref resolves there (a recipe's
        # own model.store, e.g. the relative checkpoints.example, would not from the work folder)
        return load_recipe(path, [f"model.store={store.url}"] + (QUICK_SETS if quick else []) + sets)
    if not quick:
        raise NpoError(f"recipe {path} not found; give --sparse-recipe/--plateau-recipe or use --quick")
    d = quick_recipe()
    d["model"] = {"path": quick_base(store)}
    return build_recipe(d, sets)


def with_saves(recipe: Recipe, steps: list[int]) -> Recipe:
    """Checkpoints at every step an intervention forks from or uses as guide."""
    every = recipe.train.save_every
    for s in steps:
        if s > 0:
            every = math.gcd(every, s)
    return build_recipe(recipe.model_dump(mode="json"), [f"train.save_every={every}"])


def _finish(store, run: str, branch: str, steps: int) -> bool:
    """True if run/branch is complete; resumes it first when a killed process left it part-way."""
    from npo_cli.branching import resume_trainer

    head = store.head(run, branch)
    if head is None:
        return False
    if store.manifest(head).step < steps:
        print(f"  {run}/{branch}: resuming at step {store.manifest(head).step}", flush=True)
        resume_trainer(store, f"{run}/{branch}").train(progress=False, force=True)  # we are its only writer
    return True


def train_run(store, recipe: Recipe, name: str, seed: int, sets: list[str] = ()) -> None:
    """A new run `name` from `recipe` (plus overrides); reused (or finished) if it is in the store."""
    from npo_cli.branching import new_trainer

    if name in store.runs() and _finish(store, name, "main", recipe.train.steps):
        print(f"  {name}: in the store, reused", flush=True)
        return
    r = build_recipe(recipe.model_dump(mode="json"),
                     [f"name={name}", f"seed={seed}", "logging.progress=false", *sets])
    t0 = time.perf_counter()
    new_trainer(r, store).train(progress=False)
    print(f"  {name}: {r.train.steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)


def branch(store, run: str, name: str, at: int, guide: int, until: int, gate: float | None) -> None:
    from npo_cli.commands import intervene

    if name in store.branches(run):
        steps = store.get_json(store.manifest(store.head(run, name)).recipe)["train"]["steps"]
        _finish(store, run, name, steps)
        print(f"  {run}/{name}: in the store, reused", flush=True)
        return
    t0 = time.perf_counter()
    intervene(store.url, run=run, at=at, guide=str(guide), until=until, gate=gate, branch=name,
              overrides=["logging.progress=false"], progress=False)
    print(f"  {run}/{name}: NPO {at}..{until} with guide @{guide} in {time.perf_counter() - t0:.0f} s", flush=True)


# --------------------------------------------------------------------------- reading results


def curve(store, ref: str) -> tuple[dict[int, float], list[dict]]:
    """(step -> held-out accuracy, all per-step metrics) along the lineage of ref."""
    from npo_cli.checkpoint import load_metrics

    rows = [m for man in reversed(store.lineage(ref)) for m in load_metrics(store, man)]
    acc = {int(m["step"]): float(m["eval/accuracy"]) for m in rows if "eval/accuracy" in m}
    return acc, rows


def first_reach(acc: dict[int, float], target: float) -> int | None:
    return next((s for s in sorted(acc) if acc[s] >= target - 1e-12), None)


def mean_sd(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.3f}" + (f" ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else "")


def diag(rows: list[dict]) -> dict[str, float]:
    out = {}
    for k in NPO_KEYS:
        vals = [m[k] for m in rows if k in m]
        if vals:
            out[k] = statistics.mean(vals)
    return out


def fmt(x, d: int = 3) -> str:
    return "-" if x is None else f"{x:.{d}f}" if isinstance(x, float) else str(x)


# --------------------------------------------------------------------------- the two regimes


def sparse(store, recipe: Recipe, seeds: list[int], scout: int, window: int, gate, report_only: bool) -> dict:
    T = recipe.train.steps
    recipe = with_saves(recipe, [scout])
    res = {"seeds": {}, "T": T, "scout": scout, "window": window}
    for seed in seeds:
        run = f"sparse-grpo-s{seed}"
        if not report_only:
            train_run(store, recipe, run, seed)
            branch(store, run, "npo-boot", 0, scout, window, gate)
        if run not in store.runs() or "npo-boot" not in store.branches(run):
            continue
        base, _ = curve(store, run)
        npo, rows = curve(store, f"{run}/npo-boot")
        final = base.get(T)
        res["seeds"][seed] = {
            "grpo": base, "npo": npo, "grpo_final": final,
            "grpo_steps_to_final": first_reach(base, final) if final is not None else None,
            "npo_steps_to_grpo_final": first_reach(npo, final) if final is not None else None,
            "npo_final": npo.get(T), "diag": diag(rows),
        }
    return res


def plateau(store, recipe: Recipe, seeds: list[int], at: int, guide: int, gate, report_only: bool) -> dict:
    T = recipe.train.steps
    recipe = with_saves(recipe, [at, guide])
    res = {"seeds": {}, "T": T, "at": at, "guide": guide}
    for seed in seeds:
        run = f"plateau-grpo-s{seed}"
        if not report_only:
            train_run(store, recipe, run, seed)
            branch(store, run, "npo-replay", at, guide, guide, gate)
        if run not in store.runs() or "npo-replay" not in store.branches(run):
            continue
        base, _ = curve(store, run)
        npo, rows = curve(store, f"{run}/npo-replay")
        res["seeds"][seed] = {"grpo": base, "npo": npo, "at_A": base.get(at), "at_G": base.get(guide),
                              "grpo_final": base.get(T), "npo_final": npo.get(T), "diag": diag(rows)}
    return res


def equal_steps_table(seeds: dict, lo: int = 0) -> list[str]:
    steps = sorted({s for r in seeds.values() for s in r["grpo"] if s >= lo} &
                   {s for r in seeds.values() for s in r["npo"] if s >= lo})
    out = ["| step | GRPO | NPO | Δ (NPO − GRPO) |", "|---:|---:|---:|---:|"]
    for s in steps:
        g = [r["grpo"].get(s) for r in seeds.values()]
        n = [r["npo"].get(s) for r in seeds.values()]
        d = [b - a for a, b in zip(g, n) if a is not None and b is not None]
        out.append(f"| {s} | {mean_sd(g)} | {mean_sd(n)} | {mean_sd(d)} |")
    return out


def report(sp: dict | None, pl: dict | None, meta: dict) -> str:
    L = ["# NPO evidence", "", (f"store: `{meta['store']}`; seeds: {meta['seeds']}; "
         f"held-out accuracy = sampled `eval/accuracy` on the task's eval split (mean ± sd over seeds)."), ""]
    if sp is not None:
        L += [(f"## Sparse regime: GRPO vs bootstrapping NPO (scout = GRPO@{sp['scout']}, NPO for steps "
              f"0..{sp['window']}, T = {sp['T']})"), "",
              "| seed | GRPO final | NPO @T | GRPO steps to its final | NPO steps to GRPO final | speed-up |",
              "|---:|---:|---:|---:|---:|---:|"]
        for seed, r in sp["seeds"].items():
            a, b = r["grpo_steps_to_final"], r["npo_steps_to_grpo_final"]
            speed = f"{a / b:.2f}×" if a and b else "-"
            L.append(f"| {seed} | {fmt(r['grpo_final'])} | {fmt(r['npo_final'])} | {fmt(a)} | {fmt(b)} | {speed} |")
        L += ["", "Accuracy at equal steps:", ""] + equal_steps_table(sp["seeds"])
        L += ["", "NPO diagnostics (means over NPO steps): " + json.dumps(
            {k: round(statistics.mean([r["diag"][k] for r in sp["seeds"].values() if k in r["diag"]]), 3)
             for k in NPO_KEYS if any(k in r["diag"] for r in sp["seeds"].values())}), ""]
    if pl is not None:
        L += [(f"## Plateau regime: continue GRPO vs roll back to {pl['at']} and replay with guide "
              f"GRPO@{pl['guide']} (T = {pl['T']})"), "",
              "| seed | GRPO @A | GRPO @G | GRPO @T | replay @T | Δ @T |", "|---:|---:|---:|---:|---:|---:|"]
        for seed, r in pl["seeds"].items():
            d = r["npo_final"] - r["grpo_final"] if None not in (r["npo_final"], r["grpo_final"]) else None
            L.append(f"| {seed} | {fmt(r['at_A'])} | {fmt(r['at_G'])} | {fmt(r['grpo_final'])} | "
                     f"{fmt(r['npo_final'])} | {fmt(d)} |")
        L += ["", "Accuracy at equal total steps (from the rollback point):", ""]
        L += equal_steps_table(pl["seeds"], lo=pl["at"])
        L += ["", "NPO diagnostics (means over NPO steps): " + json.dumps(
            {k: round(statistics.mean([r["diag"][k] for r in pl["seeds"].values() if k in r["diag"]]), 3)
             for k in NPO_KEYS if any(k in r["diag"] for r in pl["seeds"].values())}), ""]
    return "\n".join(L)


def open_out(a: argparse.Namespace) -> tuple[object, Path, list[int]]:
    """(store, its folder, seeds) for a study's --out / --example / --seeds / --quick; works inside --out.

    One thread (NPO_THREADS to change); OUT/store starts as a copy of the example store; a quick run
    takes seed 0 unless --seeds is given."""
    torch.set_num_threads(int(os.environ.get("NPO_THREADS", "1")))
    from npo_cli.store import Store

    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sdir = out / "store"
    if not sdir.exists() and Path(a.example, "runs").is_dir():
        shutil.copytree(a.example, sdir)
    os.chdir(out)  # metrics.jsonl files go under OUT/runs/
    return Store.open(str(sdir)), sdir, a.seeds if not (a.quick and "--seeds" not in sys.argv) else [0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="evidence", help="Folder: store/, evidence.md, evidence.json.")
    ap.add_argument("--example", default=str(ROOT / "checkpoints.example"), help="Store copied into OUT/store.")
    ap.add_argument("--sparse-recipe", default=str(ROOT / "recipes" / "sparse.yaml"))
    ap.add_argument("--plateau-recipe", default=str(ROOT / "recipes" / "plateau.yaml"))
    ap.add_argument("--regimes", nargs="+", default=["sparse", "plateau"], choices=["sparse", "plateau"])
    ap.add_argument("--scout", type=int, default=None, help="Sparse: scout length s (default T/5).")
    ap.add_argument("--window", type=int, default=None, help="Sparse: NPO window 0..W (default s).")
    ap.add_argument("--at", type=int, default=None, help="Plateau: rollback step A (default T/4).")
    ap.add_argument("--guide", type=int, default=None, help="Plateau: guide step G (default T/2).")
    ap.add_argument("--gate", type=float, default=None, help="npo.gate (default: the recipe's).")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="Recipe override for both regimes.")
    ap.add_argument("--quick", action="store_true", help="Smoke test: 6 steps of 4x4, one seed unless given.")
    ap.add_argument("--report-only", action="store_true", help="Only read the store and write the report.")
    a = ap.parse_args()
    a.sparse_recipe, a.plateau_recipe = (str(Path(x).resolve()) for x in (a.sparse_recipe, a.plateau_recipe))
    store, sdir, seeds = open_out(a)
    sp = pl = None
    if "sparse" in a.regimes:
        r = base_recipe(a.sparse_recipe, a.quick, store, a.sets)
        T = r.train.steps
        s = a.scout or max(1, T // 5 if not a.quick else 2)
        print(f"sparse regime: T={T}, scout {s}, window {a.window or s}", flush=True)
        sp = sparse(store, r, seeds, s, a.window or s, a.gate, a.report_only)
    if "plateau" in a.regimes:
        r = base_recipe(a.plateau_recipe, a.quick, store, a.sets)
        T = r.train.steps
        at, g = a.at if a.at is not None else (T // 4 if not a.quick else 2), a.guide or (T // 2 if not a.quick else 4)
        print(f"plateau regime: T={T}, rollback {at}, guide {g}", flush=True)
        pl = plateau(store, r, seeds, at, g, a.gate, a.report_only)
    text = report(sp, pl, {"store": f"{sdir.name}/", "seeds": seeds})  # next to evidence.md
    Path("evidence.md").write_text(text)
    Path("evidence.json").write_text(json.dumps({"sparse": sp, "plateau": pl}, indent=1, default=str))
    print(text)


if __name__ == "__main__":
    try:
        main()
    except NpoError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
