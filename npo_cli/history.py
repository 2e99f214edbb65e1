"""What the store holds, for `npo ls` and `npo show`: plain dicts (the CLI prints them or dumps --json).

No torch here: listing a store should not pay for importing it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from npo_cli.errors import NpoError
from npo_cli.lease import lease_state
from npo_cli.manifest import EVAL_STEP, Manifest
from npo_cli.recipe import recipe_diff
from npo_cli.store import Damaged, Store, weights_only

REWARD_KEY, EVAL_KEY = "reward", "eval/accuracy"  # the summary keys `npo ls` shows


def short_ref(store: Store, cid: str | None, run: str | None = None) -> str | None:
    """'branch@step' within `run`, else 'run/branch@step'; the id prefix if it is not a checkpoint."""
    if not cid:
        return None
    try:
        m = store.manifest(cid)
    except NpoError:
        return cid[:12]
    return f"{m.branch}@{m.step}" if m.run == run else f"{m.run}/{m.branch}@{m.step}"


def _metrics(store: Store, m: Manifest) -> list[dict]:
    return store.get_json(m.metrics, f"checkpoint {m.run}/{m.branch}@{m.step}") if m.metrics else []


def _eval_at_own_step(store: Store, m: Manifest) -> float | None:
    """The eval accuracy measured at this checkpoint's step, else None. The summary carries the last eval
    forward to later checkpoints; the metrics row of the step holds eval keys only if one ran there."""
    if EVAL_KEY not in m.summary:  # no eval yet: skip reading the metrics object
        return None
    if EVAL_STEP in m.summary:  # saved since the summary records its eval's step: no read at all
        return m.summary[EVAL_KEY] if int(m.summary[EVAL_STEP]) == m.step else None
    row = next((r for r in reversed(_metrics(store, m)) if r.get("step") == m.step), {})
    return row.get(EVAL_KEY)


def _eval_step(store: Store, m: Manifest) -> int | None:
    """The step the summary's eval numbers were measured at: the newest metrics row with an eval,
    in this checkpoint or its ancestors (a branch carries its fork point's eval); None if unknown."""
    if EVAL_KEY not in m.summary:
        return None
    if EVAL_STEP in m.summary:
        return int(m.summary[EVAL_STEP])
    for a in store.readable_lineage(m.id)[0]:
        row = next((r for r in reversed(_metrics(store, a)) if EVAL_KEY in r), None)
        if row is not None:
            return row.get("step")
    return None


def branch_walk(store: Store, head: str, run: str, branch: str) -> tuple[list[Manifest], Manifest | None,
                                                                           Damaged | None]:
    """The checkpoints written on run/branch walking back from `head` (newest first); the first ancestor that
    is not one of them, its fork point (None for a run's first branch); and the damaged manifest that ended
    the walk before the branch's start, if one did."""
    own: list[Manifest] = []
    try:
        for m in store.walk(head):
            if (m.run, m.branch) != (run, branch):
                return own, m, None
            own.append(m)
    except Damaged as e:
        return own, None, e
    return own, None, None


def _entry(store: Store, m: Manifest, marks: Marks) -> dict[str, Any]:
    return {"id": m.id, "step": m.step, "reward": m.summary.get(REWARD_KEY),
            "eval_accuracy": _eval_at_own_step(store, m), "size": m.tensor_bytes(), "guide": m.guide,
            "created": m.created, "pruned": m.id in marks.pruned, "weights_only": weights_only(m),
            "tags": marks.tags.get(m.id, [])}


@dataclass(frozen=True)
class Marks:
    """What `npo ls` shows beside a checkpoint: pruned (train.keep_last) and its tags."""

    pruned: set[str]
    tags: dict[str, list[str]]  # checkpoint id -> tag names

    @classmethod
    def of(cls, store: Store) -> Marks:
        tags: dict[str, list[str]] = {}
        for name, cid in store.tags().items():
            tags.setdefault(cid, []).append(name)
        return cls(store.pruned(), tags)


def ls_data(store: Store, run: str | None = None) -> dict[str, Any]:
    """Runs -> branches (fork point, guide, writer) -> the checkpoints written on each branch, oldest first;
    `damaged`: every branch whose walk back stopped at a manifest that cannot be read.

    A branch lists the checkpoints saved on it (run and branch match, walking back from its head); the
    first ancestor that is not is its fork point (none for a run's first branch). A damaged manifest on the
    way is the branch's `damaged` entry: what is older cannot be reached through it."""
    runs = store.runs()
    if run is not None:
        if run not in runs:
            raise NpoError(f"unknown run {run!r} in {store.url} (runs: {', '.join(runs) or 'none'})")
        runs = [run]
    writers = {(r, b): _writer(info) for r, b, info in store.leases()}
    marks = Marks.of(store)
    out = []
    for r in runs:
        try:
            out.append(_ls_run(store, r, writers, marks))
        except NpoError as e:  # a damaged ref: this run says so, the others still list
            out.append({"run": r, "branches": [], "auto_chain": [], "error": str(e)})
    damaged = [{"run": r["run"], "branch": b["branch"], **b["damaged"]}
               for r in out for b in r["branches"] if b["damaged"]]
    return {"store": store.url, "runs": out, "damaged": damaged}


def _writer(info: dict) -> dict[str, Any]:
    """A branch lease as `npo ls` shows it: live (a writer may be running), dead (its process is gone) or
    expired (not renewed)."""
    return {"state": lease_state(info), **{k: info.get(k) for k in ("host", "pid", "since")}}


def _ls_run(store: Store, r: str, writers: dict[tuple[str, str], dict], marks: Marks) -> dict[str, Any]:
    """One run of `ls_data`."""
    branches = store.branches(r)
    rows, is_auto = [], False
    for b in sorted(branches, key=lambda x: (x != "main", x)):
        own, fork, damage = branch_walk(store, branches[b], r, b)
        guide = next((m.guide for m in own if m.guide), None)
        rows.append({
            "branch": b, "head": branches[b],
            "fork": {"id": fork.id, "ref": short_ref(store, fork.id, r), "step": fork.step} if fork else None,
            "guide": {"id": guide, "ref": short_ref(store, guide, r)} if guide else None,
            "checkpoints": [_entry(store, m, marks) for m in reversed(own)],
            "damaged": damage.to_json() if damage else None,
            "auto": _auto_branch(own),
            "writer": writers.get((r, b)),
        })
        if b == "main":
            is_auto = any(m.state.controller.get("auto") for m in own)
    # a lease on a branch without a ref yet: a writer making it, or one that stopped before its first save
    rows += [{"branch": b, "head": None, "fork": None, "guide": None, "checkpoints": [], "damaged": None,
              "auto": None, "writer": w} for (wr, b), w in sorted(writers.items()) if wr == r and b not in branches]
    chain = _auto_chain(rows) if is_auto else []
    for row in rows:
        row["live"] = bool(chain) and row["branch"] == chain[-1]
    return {"run": r, "branches": rows, "auto_chain": chain}


def _auto_branch(own: list[Manifest]) -> dict | None:
    """The AutoNPO intervention that made this branch (its first checkpoint's auto-branch event)."""
    for m in reversed(own):
        for e in m.events:
            if e.kind == "auto-branch":
                return e.model_dump(include={"k", "from_branch", "fork_step", "guide_step", "delta", "until"})
    return None


def _auto_chain(rows: list[dict]) -> list[str]:
    """main -> the auto branch made from it -> ... (AutoNPO's rollbacks); the last one is live."""
    chain = ["main"]
    while True:
        nxt = [r for r in rows if r["auto"] and r["auto"]["from_branch"] == chain[-1] and r["branch"] not in chain]
        if not nxt:
            return chain
        chain.append(max(nxt, key=lambda r: r["checkpoints"][0]["created"] if r["checkpoints"] else "")["branch"])


def _numeric_summary(metrics: list[dict]) -> dict[str, dict[str, float]]:
    cols: dict[str, list[float]] = {}
    for row in metrics:
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                cols.setdefault(k, []).append(float(v))
    return {k: {"first": v[0], "last": v[-1], "mean": sum(v) / len(v), "min": min(v), "max": max(v)}
            for k, v in cols.items()}


def show_data(store: Store, ref: str) -> dict[str, Any]:
    """One checkpoint: manifest, metrics summary since its parent, recipe difference. A branch's recipe
    difference and its NPO figures belong to every checkpoint on it: the difference is against the checkpoint
    the branch started from (a run's first branch: the parent), the npo/* figures are over the branch's steps."""
    m = store.manifest(ref)
    label = f"checkpoint {m.run}/{m.branch}@{m.step}"
    metrics = _metrics(store, m)
    own, fork, damage = branch_walk(store, m.id, m.run, m.branch)
    base = fork or (own[1] if len(own) > 1 else None)
    diff: list[dict] | None = None
    diff_note = None
    if base is None:
        diff_note = f"parent {m.parent[:12]} is damaged" if damage else "no parent"
    elif m.recipe is None or base.recipe is None:
        diff_note = "recipe not stored"
    else:
        a, b = store.get_json(base.recipe, label), store.get_json(m.recipe, label)
        diff = [{"key": k, "parent": va, "this": vb} for k, va, vb in recipe_diff(a, b)]
    npo = None
    if m.guide:  # NPO's figures stop at npo.until, while later checkpoints of the branch keep its guide
        rows = [{k: v for k, v in r.items() if k.startswith("npo/")} for a in reversed(own) for r in _metrics(store, a)]
        rows = [r for r in rows if r]
        npo = {"steps": len(rows), "columns": _numeric_summary(rows)} if rows else None
    return {
        "id": m.id, "ref": f"{m.run}/{m.branch}@{m.step}",
        "parent": {"id": m.parent, "ref": short_ref(store, m.parent, m.run)} if m.parent else None,
        "guide": {"id": m.guide, "ref": short_ref(store, m.guide, m.run)} if m.guide else None,
        "size": m.tensor_bytes(),
        "tensors": {"model": len(m.model), "optimizer": len(m.optimizer), "state": len(m.state_tensors)},
        "summary": m.summary, "eval_step": _eval_step(store, m),
        "metrics": {"steps": len(metrics), "columns": _numeric_summary(metrics)},
        "recipe_base": {"id": base.id, "ref": short_ref(store, base.id, m.run), "fork": base is fork}
        if base else None,
        "recipe_diff": diff, "recipe_diff_note": diff_note,
        "npo_metrics": npo,
        "damaged": damage.to_json() if damage else None,
        "manifest": m.model_dump(mode="json", by_alias=True),
    }


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
