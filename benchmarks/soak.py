"""Kill -9 soak: `npo run` and `npo intervene` killed at random moments, then resumed, many times over.

Each chain starts one command in a fresh store (a run from the recipe, or an intervention on a copy of a
finished run), kills it with SIGKILL at a random moment up to `--max-kills` times, checks the store after
every kill (`npo verify`), continues the way a user would (`npo run --resume …` once the branch exists,
else the first command again; never `--force` unless the plain command is refused for the lease), and
when the command finally finishes compares the head with an uninterrupted reference: the model,
optimizer and trainer-state tensors must be the same objects (content-addressed: bitwise equal).

    python benchmarks/soak.py --kills 50                 # local store: ~half run, ~half intervene
    python benchmarks/soak.py --kills 10 --s3            # the same on a moto S3 server on 127.0.0.1

Writes a JSON report (--out) and prints a one-screen summary: kills, stores left invalid, resumes that
needed --force, chains that ended bitwise equal.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
NPO = [sys.executable, "-m", "npo_cli"]
RUN = "soak"
STEPS, AT, GUIDE = 16, 4, 12
BRANCH = f"npo-{AT}-g{GUIDE}"
RECIPE = {
    "name": RUN, "seed": 0,
    "model": {"path": "base/moderate", "store": str(ROOT / "checkpoints.example")},
    "task": {"kind": "arithmetic", "arithmetic": {"digits": 2}, "eval_size": 64},
    "rollout": {"prompts_per_step": 8, "group_size": 8, "max_new_tokens": 8},
    "grpo": {"lr": 2.0e-4},
    "train": {"steps": STEPS, "save_every": 2, "eval_every": 8},
    "logging": {"progress": False},
}


def env(extra: dict | None = None) -> dict:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(extra or {})}
    e.pop("NPO_STORE", None)
    return e


def heads(store_url: str, extra_env: dict) -> dict[str, str]:
    """branch -> head id of RUN, read in a subprocess (S3 credentials live in its environment)."""
    code = ("import json,sys; from npo_cli.store import Store; s=Store.open(sys.argv[1]); "
            f"print(json.dumps(s.branches('{RUN}') if '{RUN}' in s.runs() else {{}}))")
    p = subprocess.run([sys.executable, "-c", code, store_url], capture_output=True, text=True, env=env(extra_env),
                       cwd=ROOT, check=False)
    if p.returncode:
        raise RuntimeError(f"cannot read {store_url}: {p.stderr.strip()[-300:]}")
    return json.loads(p.stdout)


def tensors(store_url: str, ref: str, extra_env: dict) -> dict:
    """The head's tensor objects (model, optimizer, trainer state) and step: equal means bitwise equal."""
    code = ("import json,sys; from npo_cli.store import Store; s=Store.open(sys.argv[1]); m=s.manifest(sys.argv[2]); "
            "print(json.dumps({'step': m.step, 'model': {k: v.oids() for k, v in m.model.items()}, "
            "'optimizer': {k: v.oids() for k, v in m.optimizer.items()}, "
            "'state': {k: v.oids() for k, v in m.state_tensors.items()}, 'optimizer_extra': m.optimizer_extra}))")
    p = subprocess.run([sys.executable, "-c", code, store_url, ref], capture_output=True, text=True,
                       env=env(extra_env), cwd=ROOT, check=True)
    return json.loads(p.stdout)


def npo(args: list[str], extra_env: dict, kill_after: float | None = None) -> tuple[int | None, str, float]:
    """Run `npo ARGS`; with kill_after, SIGKILL it that many seconds in (None: it finished first).
    (exit code or None when killed, stderr, seconds)."""
    t0 = time.time()
    p = subprocess.Popen([*NPO, *args], cwd=ROOT, env=env(extra_env), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = p.communicate(timeout=kill_after)
        return p.returncode, err, time.time() - t0
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        return None, "", time.time() - t0


def verify(store_url: str, extra_env: dict) -> tuple[bool, str]:
    """(the store is valid, why not). A local store the kill came too early to create is valid: nothing was
    written, and the same command starts afresh."""
    if "://" not in store_url and not os.path.exists(store_url):
        return True, "not created yet"
    code, err, _ = npo(["verify", "--store", store_url], extra_env)
    return code == 0, err.strip()


def chain(kind: str, store_url: str, recipe_path: str, extra_env: dict, kills: int, span: float,
          rng: random.Random, ref_tensors: dict) -> dict:
    """Up to `kills` SIGKILLs of one command and its resumes, then one uninterrupted finish."""
    first = (["run", recipe_path, "--store", store_url] if kind == "run" else
             ["intervene", "--at", str(AT), "--guide", str(GUIDE), "--store", store_url])
    branch = "main" if kind == "run" else BRANCH
    out = {"kind": kind, "kills": [], "invalid": 0, "forced": 0, "errors": []}
    for k in range(kills + 1):
        args = (["run", "--resume", f"{RUN}/{branch}", "--store", store_url]
                if branch in heads(store_url, extra_env) else first)
        kill_after = rng.uniform(0.5, 0.9 * span) if k < kills else None
        code, err, _ = npo(args, extra_env, kill_after)
        if code is not None and code != 0 and "lease" in err and "--force" in err:
            out["forced"] += 1
            out["errors"].append(err.strip()[-300:])
            code, err, _ = npo([*args, "--force"], extra_env, kill_after)
        if code is None:
            ok, why = verify(store_url, extra_env)
            out["kills"].append({"after_s": round(kill_after, 2), "cmd": args[0] if args[0] != "run" or "--resume"
                                 not in args else "resume", "store_valid": ok, "verify": why[-200:]})
            if not ok:
                out["invalid"] += 1
                out["errors"].append(why[-300:])
            continue
        if code != 0 and f"is already at step {STEPS}" in err:  # the kill came after the last save
            break
        if code != 0:
            out["errors"].append(f"{' '.join(args[:3])}: exit {code}: {err.strip()[-300:]}")
            out["finished"] = False
            return out
        break  # finished before the kill came: the chain is done
    else:  # every attempt was killed: finish without a kill
        code, err, _ = npo(["run", "--resume", f"{RUN}/{branch}", "--store", store_url], extra_env)
        if code and f"is already at step {STEPS}" not in err:
            out["errors"].append(f"final resume: exit {code}: {err.strip()[-300:]}")
            out["finished"] = False
            return out
    out["finished"] = True
    got = tensors(store_url, f"{RUN}/{branch}", extra_env)
    out["bitwise_equal"] = got == ref_tensors[kind]
    out["step"] = got["step"]
    return out


def s3_setup() -> tuple[dict, object, callable]:
    """A moto S3 server on 127.0.0.1 and the environment that points npo at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    extra = {"AWS_ACCESS_KEY_ID": "soak", "AWS_SECRET_ACCESS_KEY": "soak", "AWS_DEFAULT_REGION": "us-east-1",
             "NPO_S3_ENDPOINT": endpoint}
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="soak",
                          aws_secret_access_key="soak")
    client.create_bucket(Bucket="soak")
    return extra, client, server.stop


def copy_store(src: str, dst: str, client) -> None:
    """A copy of a local store folder at dst (a folder, or s3://soak/prefix through the moto client)."""
    if not dst.startswith("s3://"):
        shutil.copytree(src, dst)
        return
    prefix = dst.removeprefix("s3://soak/")
    for p in Path(src).rglob("*"):
        if p.is_file() and "tmp" not in p.relative_to(src).parts[:1]:
            client.upload_file(str(p), "soak", f"{prefix}/{p.relative_to(src).as_posix()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=50, help="SIGKILLs in all (split between run and intervene).")
    ap.add_argument("--max-kills", type=int, default=3, help="Kills per chain before it is let finish.")
    ap.add_argument("--s3", action="store_true", help="Stores on a moto S3 server instead of local folders.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON report (default benchmarks/results/soak[_s3].json).")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    work = Path(tempfile.mkdtemp(prefix="npo-soak-"))
    recipe_path = str(work / "soak.yaml")
    Path(recipe_path).write_text(yaml.safe_dump(RECIPE))
    extra, client, stop = s3_setup() if a.s3 else ({}, None, lambda: None)
    t_start = time.time()
    try:
        # the uninterrupted references: a run, then an intervention on it (local; they are what S3 must match too)
        ref = str(work / "ref")
        code, err, span_run = npo(["run", recipe_path, "--store", ref], {})
        assert code == 0, err
        base = str(work / "base")
        shutil.copytree(ref, base)
        code, err, span_int = npo(["intervene", "--at", str(AT), "--guide", str(GUIDE), "--store", ref], {})
        assert code == 0, err
        ref_tensors = {"run": tensors(ref, f"{RUN}/main", {}), "intervene": tensors(ref, f"{RUN}/{BRANCH}", {})}
        chains, n = [], 0
        while n < a.kills:
            kind = "run" if len(chains) % 2 == 0 else "intervene"
            kills = min(a.max_kills, a.kills - n, rng.randint(1, a.max_kills))
            url = f"s3://soak/c{len(chains)}" if a.s3 else str(work / f"c{len(chains)}")
            if kind == "intervene":
                copy_store(base, url, client)
            res = chain(kind, url, recipe_path, extra, kills, span_run if kind == "run" else span_int, rng,
                        ref_tensors)
            n += len(res["kills"])
            if not res["kills"]:  # every command finished before its kill: the chain counted no kill
                res["note"] = "finished before the kill"
            chains.append(res)
            print(f"chain {len(chains):2d} {kind:9s} kills {len(res['kills'])} invalid {res['invalid']} "
                  f"forced {res['forced']} equal {res.get('bitwise_equal')} {'; '.join(res['errors'])[:200]}",
                  flush=True)
            if not a.s3:
                shutil.rmtree(url, ignore_errors=True)
    finally:
        stop()
        shutil.rmtree(work, ignore_errors=True)
    summary = {"store": "moto S3" if a.s3 else "local", "kills": n, "chains": len(chains),
               "run_kills": sum(len(c["kills"]) for c in chains if c["kind"] == "run"),
               "intervene_kills": sum(len(c["kills"]) for c in chains if c["kind"] == "intervene"),
               "stores_invalid": sum(c["invalid"] for c in chains),
               "needed_force": sum(c["forced"] for c in chains),
               "finished": sum(bool(c.get("finished")) for c in chains),
               "bitwise_equal": sum(bool(c.get("bitwise_equal")) for c in chains),
               "reference_seconds": {"run": round(span_run, 1), "intervene": round(span_int, 1)},
               "wall_minutes": round((time.time() - t_start) / 60, 1)}
    out = Path(a.out or ROOT / "benchmarks" / "results" / ("soak_s3.json" if a.s3 else "soak.json"))
    out.write_text(json.dumps({"summary": summary, "chains": chains}, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
