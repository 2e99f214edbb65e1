"""Store throughput vs raw safetensors, on the same disk.

Saves and loads a ~100M-parameter fp32 state dict (GPT-2-small-like shapes, 410 MB) through a local
store (`save_tensors` / `load_tensors`: SHA-256 named and checked, one object per tensor, parallel)
and through `safetensors.torch.save_file` / `load_file` (one file, no hashing). The two alternate,
each run into a fresh directory; medians over --runs. Both write into the page cache (no fsync) and
read from it (the files were just written), so this measures the CPU path, not the disk.

`load_file` maps the file and returns before reading any tensor data, so it is reported three ways:
as is (lazy), followed by a first touch of every page (the bytes actually in memory, which is what
the store's load delivers, hash-checked), and with backend="pread" (an eager read).

Also: tensor bytes added by re-saving unchanged tensors and bytes written by a branch (both ~0), and
with --chunking, one 151936x896 bf16 embedding stored as one object vs as 16 MiB row-block objects
(the default, see npo_cli/checkpoint.py).

    .venv/bin/python benchmarks/store_bench.py [--runs 5] [--dir DIR] [--chunking] [--json] [--json-out F]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import torch
from safetensors.torch import load_file, save_file

import npo_cli.checkpoint as ck
from npo_cli.checkpoint import load_tensors, save_tensors_stats
from npo_cli.manifest import Manifest
from npo_cli.store import Store


def make_state(vocab: int = 32000, hidden: int = 768, layers: int = 11, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {"embed.weight": torch.randn(vocab, hidden, generator=g)}
    for i in range(layers):
        p = f"layers.{i}."
        for n in ("q", "k", "v", "o"):
            sd[p + f"attn.{n}.weight"] = torch.randn(hidden, hidden, generator=g)
            sd[p + f"attn.{n}.bias"] = torch.randn(hidden, generator=g)
        sd[p + "mlp.up.weight"] = torch.randn(4 * hidden, hidden, generator=g)
        sd[p + "mlp.down.weight"] = torch.randn(hidden, 4 * hidden, generator=g)
        sd[p + "norm1.weight"] = torch.ones(hidden) + i
        sd[p + "norm2.weight"] = torch.ones(hidden) - i
    sd["norm.weight"] = torch.ones(hidden) * 0.5
    return sd


def touch(tensors: dict[str, torch.Tensor]) -> None:
    """Read one byte of every 4 KiB page: faults a lazily mapped file into memory, cheaply."""
    for t in tensors.values():
        if t.numel():
            int(t.reshape(-1).view(torch.uint8)[::4096].sum())


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t, out


def load_touched(path: str) -> None:
    touch(load_file(path))


def bench_main(sd: dict[str, torch.Tensor], base: str, runs: int) -> tuple[dict[str, list[float]], dict]:
    times: dict[str, list[float]] = {k: [] for k in (
        "raw_save", "raw_load_lazy", "raw_load_touched", "raw_load_pread", "store_save", "store_load")}
    extra: dict = {}
    for i in range(runs):
        raw = os.path.join(base, f"raw-{i}.safetensors")
        times["raw_save"].append(timed(save_file, sd, raw)[0])
        dt, back = timed(load_file, raw)
        times["raw_load_lazy"].append(dt)
        del back
        times["raw_load_touched"].append(timed(load_touched, raw)[0])
        times["raw_load_pread"].append(timed(load_file, raw, backend="pread")[0])
        os.unlink(raw)

        store = Store.open(os.path.join(base, f"store-{i}"))
        dt, (entries, _) = timed(save_tensors_stats, store, sd)
        times["store_save"].append(dt)
        dt, back = timed(load_tensors, store, entries)
        times["store_load"].append(dt)
        assert all(torch.equal(back[k], sd[k]) for k in sd)
        del back
        if i < runs - 1:
            shutil.rmtree(store.url)

    # dedup, on the last store: re-save unchanged tensors, then branch a checkpoint of them
    before = du(store.url)
    _, extra["resave_tensor_bytes_added"] = save_tensors_stats(store, sd)
    extra["resave_disk_bytes"] = du(store.url) - before
    store.set_ref("bench", "main", store.put_bytes(Manifest(run="bench", branch="main", step=0,
                                                            model=entries).to_bytes()))
    before = du(store.url)
    store.branch("bench", "rewind-0")
    extra["branch_bytes"] = du(store.url) - before
    shutil.rmtree(store.url)
    return times, extra


def bench_chunking(base: str, runs: int) -> dict[str, dict[str, float]]:
    """One 272 MB tensor (Qwen2.5-0.5B's 151936x896 bf16 embedding) stored whole vs in row blocks."""
    emb = torch.randn(151936, 896).to(torch.bfloat16)
    default = ck.CHUNK_BYTES
    res: dict[str, dict[str, list[float]]] = {}
    try:
        for i in range(runs):
            for mode, limit in (("one object", 1 << 62), (f"{default >> 20} MiB blocks", default)):
                ck.CHUNK_BYTES = limit
                store = Store.open(os.path.join(base, f"chunk-{i}"))
                ds, (entries, _) = timed(save_tensors_stats, store, {"emb": emb})
                dl, _ = timed(load_tensors, store, entries)
                r = res.setdefault(mode, {"save": [], "load": []})
                r["save"].append(ds)
                r["load"].append(dl)
                shutil.rmtree(store.url)
    finally:
        ck.CHUNK_BYTES = default
    return {m: {k: statistics.median(v) for k, v in r.items()} for m, r in res.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default=None, help="Scratch directory (default: a temp dir on /tmp's disk).")
    ap.add_argument("--chunking", action="store_true", help="Also time one large tensor whole vs in blocks.")
    ap.add_argument("--json", action="store_true", help="Print JSON instead of the table.")
    ap.add_argument("--json-out", default=None, help="Also write the JSON to this file.")
    args = ap.parse_args()
    torch.set_num_threads(1)

    sd = make_state()
    params = sum(t.numel() for t in sd.values())
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    base = tempfile.mkdtemp(prefix="npo-bench-", dir=args.dir)
    try:
        times, extra = bench_main(sd, base, args.runs)
        chunking = bench_chunking(base, args.runs) if args.chunking else None
    finally:
        shutil.rmtree(base, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {  # store throughput / raw throughput (>= 1: the store is as fast)
        "save": med["raw_save"] / med["store_save"],
        "load_vs_lazy": med["raw_load_lazy"] / med["store_load"],
        "load_vs_touched": med["raw_load_touched"] / med["store_load"],
        "load_vs_pread": med["raw_load_pread"] / med["store_load"],
    }
    out = {"params": params, "bytes": nbytes, "runs": args.runs, "cpus": os.cpu_count(),
           "median_s": med, "all_s": times, "gb_per_s": {k: nbytes / v / 1e9 for k, v in med.items()},
           "ratio": ratios, **extra, "chunking_s": chunking}
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=1)
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"{params / 1e6:.1f}M fp32 parameters ({nbytes / 1e6:.0f} MB), {args.runs} runs each, medians, "
          f"{os.cpu_count()} CPUs")
    print(f"{'':34}{'seconds':>9}{'GB/s':>8}{'store/raw':>11}")
    rows = [("save  raw save_file", "raw_save", None), ("save  npo store", "store_save", "save"),
            ("load  raw load_file (lazy mmap)", "raw_load_lazy", None),
            ("load  raw load_file + touch pages", "raw_load_touched", None),
            ("load  raw load_file(pread)", "raw_load_pread", None),
            ("load  npo store (hash-checked)", "store_load", None)]
    for label, k, _ in rows:
        print(f"{label:34}{med[k]:9.3f}{nbytes / med[k] / 1e9:8.2f}"
              + (f"{ratios['save']:10.2f}x" if k == "store_save" else ""))
    print(f"load ratios (store/raw): vs lazy {ratios['load_vs_lazy']:.2f}x, vs touched "
          f"{ratios['load_vs_touched']:.2f}x, vs pread {ratios['load_vs_pread']:.2f}x")
    print(f"re-save of unchanged tensors: {extra['resave_tensor_bytes_added']} tensor bytes added "
          f"({extra['resave_disk_bytes']} bytes on disk); a branch: {extra['branch_bytes']} bytes written")
    if chunking:
        for mode, r in chunking.items():
            print(f"151936x896 bf16 embedding as {mode:>14}: save {r['save']:.3f} s, load {r['load']:.3f} s")


if __name__ == "__main__":
    main()
