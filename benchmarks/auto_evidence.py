"""Evidence for AutoNPO against GRPO at equal total compute, over several seeds.

Per seed, in one store (a copy of checkpoints.example, or a fresh one):
  1. AutoNPO: `npo auto` with the recipe (run auto-sSEED) until its live branch reaches train.steps = T.
     Its compute C is every generated token: rollouts of every branch (the abandoned stretches and the
     replays), guide sampling (pre-fill and on demand) and probe sampling (`auto/compute_tokens`).
  2. GRPO: the same recipe without the controller (run grpo-sSEED) to T, then extended (resume with a
     larger train.steps) until its own generated tokens reach C: equal total compute.
Reported: held-out accuracy at the end of each (GRPO also at T, equal steps), the interventions
(step, D*), and the compute (generated tokens) each needed to first reach GRPO's final accuracy.
Training FLOPs scale with the same tokens (one forward/backward per generated token, the probe's
forwards of old checkpoints excepted), so tokens are the compute unit.

    .venv/bin/python benchmarks/auto_evidence.py --seeds 0 1 2 --out auto-evidence
    .venv/bin/python benchmarks/auto_evidence.py --quick --out /tmp/auto-ev     # a smoke test

Default recipe: recipes/plateau.yaml (with checkpoints.example) when present, else --recipe PATH. --quick without
a recipe SFTs a tiny warm start inline and forces an early intervention with loose thresholds.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from npo_evidence import base_recipe, fmt, mean_sd, open_out

from npo_cli.errors import NpoError
from npo_cli.recipe import Recipe, build_recipe

QUICK_AUTO = ["auto.window=3", "auto.slope_eps=1.0", "auto.entropy_drop=-1.0", "auto.patience=1", "auto.min_gap=2",
              "auto.max_interventions=1", "auto.min_score=0.0", "auto.probe_size=16"]


# --------------------------------------------------------------------------- runs


def run_auto(store, recipe: Recipe, name: str, seed: int) -> None:
    from npo_cli.auto import auto_chain
    from npo_cli.commands import auto_run

    T = recipe.train.steps
    if name in store.runs():
        live = auto_chain(store, name)[-1]
        if store.manifest(store.head(name, live)).step >= T:
            print(f"  {name}: in the store, reused", flush=True)
            return
        print(f"  {name}: resuming {live}", flush=True)
        auto_run(None, [], store.url, name, progress=False, force=True)
        return
    path = Path(f"{name}.json")
    path.write_text(json.dumps(recipe.model_dump(mode="json")))  # JSON is YAML
    t0 = time.perf_counter()
    res = auto_run(str(path), [f"name={name}", f"seed={seed}", "logging.progress=false"], store.url, None,
                   progress=False)
    print(f"  {name}: {res['auto']['compute']['steps']} steps trained ({' -> '.join(res['auto']['chain'])}) in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)


def auto_tokens(store, run: str) -> int:
    """Total compute of an auto run: the controller's count on its live head (all branches)."""
    from npo_cli.auto import auto_chain

    c = store.manifest(store.head(run, auto_chain(store, run)[-1])).state.controller["compute"]
    return int(c["rollout_tokens"] + c["guide_tokens"] + c["probe_tokens"])


def run_grpo(store, recipe: Recipe, name: str, seed: int, tokens: int) -> None:
    """GRPO to T, then extended until its generated tokens reach `tokens` (equal compute)."""
    from npo_cli.branching import new_trainer, resume_trainer

    t0 = time.perf_counter()
    if name not in store.runs():
        r = build_recipe(recipe.model_dump(mode="json"),
                         [f"name={name}", f"seed={seed}", "logging.progress=false", "auto.enabled=false"])
        new_trainer(r, store).train(progress=False)
    for _ in range(5):  # the step count needed is estimated from the tokens per step so far
        man = store.manifest(store.head(name))
        have = man.state.tokens_generated
        if have >= tokens:
            break
        steps = max(man.step + 1, math.ceil(man.step * tokens / max(have, 1)))
        resume_trainer(store, name, [f"train.steps={steps}"]).train(progress=False, force=True)
    print(f"  {name}: {store.manifest(store.head(name)).step} steps in {time.perf_counter() - t0:.0f} s",
          flush=True)


# --------------------------------------------------------------------------- reading results


def curve(store, ref: str, compute_key: str | None, rows_per_step: int) -> list[tuple[int, float, float]]:
    """(step, compute tokens so far, held-out accuracy) at every eval along the lineage of ref."""
    from npo_cli.checkpoint import load_metrics

    out, total = [], 0.0
    for man in reversed(store.lineage(ref)):
        for m in load_metrics(store, man):
            total += m["response_length"] * rows_per_step
            c = m[compute_key] if compute_key else total
            if "eval/accuracy" in m:
                out.append((int(m["step"]), float(c), float(m["eval/accuracy"])))
    return out


def first_reach(points: list[tuple[int, float, float]], target: float) -> float | None:
    return next((c for _, c, a in points if a >= target - 1e-12), None)


def seed_result(store, recipe: Recipe, seed: int) -> dict | None:
    from npo_cli.auto import auto_chain, auto_events

    a, g = f"auto-s{seed}", f"grpo-s{seed}"
    if a not in store.runs() or g not in store.runs():
        return None
    T, rows = recipe.train.steps, recipe.rollout.prompts_per_step * recipe.rollout.group_size
    live = auto_chain(store, a)[-1]
    auto_pts = curve(store, f"{a}/{live}", "auto/compute_tokens", rows)
    grpo_pts = curve(store, g, None, rows)
    C = float(auto_tokens(store, a))
    g_final = grpo_pts[-1][2]
    g_at_T = next((acc for s, _, acc in grpo_pts if s == T), None)
    inter = [(e.step, e.delta) for _, e in auto_events(store, a) if e.kind == "auto"]
    return {"live": live, "interventions": inter, "auto_final": auto_pts[-1][2], "grpo_final": g_final,
            "grpo_at_T": g_at_T, "compute": C, "grpo_compute": grpo_pts[-1][1], "grpo_steps": grpo_pts[-1][0],
            "auto_to_grpo_final": first_reach(auto_pts, g_final), "grpo_to_grpo_final": first_reach(grpo_pts, g_final),
            "auto_curve": auto_pts, "grpo_curve": grpo_pts}


def report(results: dict[int, dict], meta: dict) -> str:
    head = (f"recipe: `{meta['recipe']}`; store: `{meta['store']}`; seeds: {meta['seeds']}; T = {meta['T']} steps "
            "on the live branch. Compute = generated tokens (rollouts of every branch incl. replays and abandoned "
            "stretches, guide and probe sampling); GRPO runs until it has spent the same. Accuracy = held-out "
            "`eval/accuracy`.")
    cols = ("| seed | interventions (step: D*) | AutoNPO final | GRPO final (equal compute) | GRPO @T (equal steps) | "
            "compute C (tokens) | GRPO steps | AutoNPO compute to GRPO final | GRPO compute to its final |")
    L = ["# AutoNPO evidence", "", head, "", cols, "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]

    def frac(c, total):
        return "-" if c is None else f"{c:.0f} ({c / total:.2f} C)"

    for seed, r in results.items():
        inter = ", ".join(f"{s}: {d}" for s, d in r["interventions"]) or "none"
        L.append(f"| {seed} | {inter} | {fmt(r['auto_final'])} | {fmt(r['grpo_final'])} | {fmt(r['grpo_at_T'])} | "
                 f"{r['compute']:.0f} | {r['grpo_steps']} | {frac(r['auto_to_grpo_final'], r['compute'])} | "
                 f"{frac(r['grpo_to_grpo_final'], r['compute'])} |")
    rs = list(results.values())
    if rs:
        rel = [r["auto_to_grpo_final"] / r["compute"] if r["auto_to_grpo_final"] else None for r in rs]
        L.append(f"| mean | | {mean_sd([r['auto_final'] for r in rs])} | {mean_sd([r['grpo_final'] for r in rs])} | "
                 f"{mean_sd([r['grpo_at_T'] for r in rs])} | | | {mean_sd(rel)} C | |")
        L += ["", f"AutoNPO reached GRPO's final accuracy in {sum(r is not None for r in rel)}/{len(rs)} seeds."]
    return "\n".join(L) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="auto-evidence", help="Folder: store/, auto_evidence.md, auto_evidence.json.")
    ap.add_argument("--example", default=str(ROOT / "checkpoints.example"), help="Store copied into OUT/store.")
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "plateau.yaml"))
    ap.add_argument("--set", dest="sets", action="append", default=[], help="Recipe override (both methods).")
    ap.add_argument("--quick", action="store_true", help="Smoke test: 10 steps of 4x4, forced early intervention.")
    ap.add_argument("--report-only", action="store_true", help="Only read the store and write the report.")
    a = ap.parse_args()
    recipe_path = str(Path(a.recipe).resolve())
    store, sdir, seeds = open_out(a)
    # the recipe's model resolves in OUT/store (a copy of the example store); --quick: short, forced intervention
    recipe = base_recipe(recipe_path, a.quick, store, (QUICK_AUTO + ["train.steps=10"] if a.quick else []) + a.sets)
    if not Path(recipe_path).is_file():
        recipe_path = "(quick, inline)"
    print(f"AutoNPO vs GRPO: T={recipe.train.steps}, seeds {seeds}", flush=True)
    results = {}
    for seed in seeds:
        if not a.report_only:
            run_auto(store, recipe, f"auto-s{seed}", seed)
            run_grpo(store, recipe, f"grpo-s{seed}", seed, auto_tokens(store, f"auto-s{seed}"))
        r = seed_result(store, recipe, seed)
        if r is not None:
            results[seed] = r
    shown = Path(recipe_path).relative_to(ROOT) if Path(recipe_path).is_relative_to(ROOT) else recipe_path
    text = report(results, {"recipe": str(shown), "store": f"{sdir.name}/", "seeds": seeds,  # next to the report
                            "T": recipe.train.steps})
    Path("auto_evidence.md").write_text(text)
    Path("auto_evidence.json").write_text(json.dumps(results, indent=1))
    print(text)


if __name__ == "__main__":
    try:
        main()
    except NpoError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
