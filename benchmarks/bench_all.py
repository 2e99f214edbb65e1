"""`make bench`: the store benchmark, the npo-vs-TRL throughput comparison and the quickstart's wall time,
each in its own process, summarised in one table (their full outputs are printed above it).

    .venv/bin/python benchmarks/bench_all.py [--quick] [--json out.json] [--table out.txt]

--quick: 1 store run, 1 timed step per trainer, the quickstart cut to 10 steps (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def sh(args: list[str], cwd: Path, timeout: int) -> tuple[int, float, str]:
    """Run, stream its output through, return (exit code, wall seconds, output)."""
    print(f"$ {' '.join(args)}", flush=True)
    t0 = time.perf_counter()
    p = subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout, check=False)
    dt = time.perf_counter() - t0
    print(p.stdout[-6000:], p.stderr[-2000:] if p.returncode else "", sep="", flush=True)
    return p.returncode, dt, p.stdout + p.stderr


def store_rows(tmp: Path, quick: bool) -> list[tuple[str, str, str]]:
    out = tmp / "store.json"
    rc, _, text = sh([PY, "benchmarks/store_bench.py", "--runs", "1" if quick else "5", "--dir", str(tmp),
                      "--json-out", str(out)], ROOT, 1800)
    if rc or not out.exists():
        return [("store", "failed", text.strip().splitlines()[-1] if text.strip() else f"exit {rc}")]
    r = json.loads(out.read_text())
    med, gb = r["median_s"], r["bytes"] / 1e9
    what = f"{r['params'] / 1e6:.0f}M fp32 params, {r['bytes'] / 1e6:.0f} MB, median of {r['runs']}"
    return [
        ("store", "save: store vs safetensors", (f"{med['store_save']:.3f} s vs {med['raw_save']:.3f} s "
         f"({gb / med['store_save']:.2f} vs {gb / med['raw_save']:.2f} GB/s); {what}")),
        ("store", "load (hash-checked) vs safetensors read", (f"{med['store_load']:.3f} s vs "
         f"{med['raw_load_pread']:.3f} s pread / {med['raw_load_touched']:.3f} s mmap+touch")),
        ("store", "bytes added by a re-save / a branch", (f"{r.get('resave_tensor_bytes_added', '-')} / "
         f"{r.get('branch_bytes', '-')} B")),
    ]


def throughput_rows(tmp: Path, quick: bool) -> list[tuple[str, str, str]]:
    out = tmp / "throughput.json"
    # hash reward: non-zero advantages, so both trainers do the backward pass (with the exact verifier every
    # reward of a random init is 0 and npo skips the whole update, which would flatter it)
    rc, _, text = sh([PY, "benchmarks/throughput.py", "--reward", "hash", "--json", str(out),
                      *(["--quick"] if quick else [])], ROOT, 1800)
    if rc or not out.exists():
        return [("TRL throughput", "failed", text.strip().splitlines()[-1] if text.strip() else f"exit {rc}")]
    r = json.loads(out.read_text())
    if "errors" in r:
        return [("TRL throughput", "failed", json.dumps(r["errors"])[:200])]
    n, t = r["npo"], r["trl"]
    cfg = "hidden 256, 4 layers, 16x8, 32 new tokens, hash reward, CPU 1 thread"
    timed = len(n["step_s_all"]) - len(n["warmup_s"])  # step_s_all holds the warm-up steps too
    return [
        ("TRL throughput", "median step: npo vs TRL GRPOTrainer", (f"{n['median_step_s']:.3f} s vs "
         f"{t['median_step_s']:.3f} s ({timed} timed steps each after {len(n['warmup_s'])} warm-up; {cfg})")),
        ("TRL throughput", "npo / TRL step time", f"{r['ratio_npo_over_trl']:.3f}"),
    ]


def quickstart_rows(tmp: Path, quick: bool) -> list[tuple[str, str, str]]:
    recipe = ROOT / "recipes" / "quickstart.yaml"
    if not recipe.is_file():
        return [("quickstart", "skipped", "recipes/quickstart.yaml does not exist")]
    # the newcomer's path, as from the repository root: the recipe reads ./checkpoints.example
    store = tmp / "checkpoints"
    if (ROOT / "checkpoints.example" / "runs").is_dir():
        shutil.copytree(ROOT / "checkpoints.example", tmp / "checkpoints.example")
    sets = ["--set", "train.steps=10"] if quick else []
    rc, wall, text = sh([PY, "-m", "npo_cli", "run", str(recipe), "--store", str(store), "--json", *sets], tmp, 1800)
    if rc:
        return [("quickstart", "failed", text.strip().splitlines()[-1] if text.strip() else f"exit {rc}")]
    r = json.loads(text[text.index("{"): text.rindex("}") + 1])
    s = r["summary"]
    acc = f", eval/accuracy {s['eval/accuracy']:.3f}" if "eval/accuracy" in s else ""
    return [("quickstart", f"npo run recipes/quickstart.yaml{' (10 steps)' if quick else ''}",
             (f"{wall:.1f} s wall incl. start-up; {r['wall_s']:.1f} s training, {r['step']} steps, "
             f"median {r['median_step_s']:.3f} s/step{acc}"))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke test (short versions of each)")
    ap.add_argument("--json", metavar="PATH", help="also write the table rows here")
    ap.add_argument("--table", metavar="PATH", help="also write the printed table here (plain text)")
    a = ap.parse_args()
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="npo-bench-") as d:
        tmp = Path(d)
        for part in (store_rows, throughput_rows, quickstart_rows):
            try:
                rows += part(tmp, a.quick)
            except Exception as e:  # noqa: BLE001 (one broken part must not hide the others)
                rows.append((part.__name__.replace("_rows", ""), "failed", f"{type(e).__name__}: {e}"[:200]))
    from rich.console import Console
    from rich.table import Table

    t = Table("benchmark", "measure", "result", title=f"npo benchmarks ({platform.machine()}, {os.cpu_count()} "
              f"cores{', --quick' if a.quick else ''})")
    for r in rows:
        t.add_row(*r)
    console = Console(width=160, record=True)
    console.print(t)
    if a.table:
        Path(a.table).write_text(console.export_text())
    if a.json:
        Path(a.json).write_text(json.dumps([dict(zip(("benchmark", "measure", "result"), r)) for r in rows], indent=1))
    return 1 if any(r[1] == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
