"""`npo compare`: several branches' curves on one chart, final values, and when each reached a threshold.

A curve is one metric along a checkpoint's whole lineage, root first: a branch continues its parent's
curve up to the fork point (that part is "inherited"; the chart draws it dashed and marks the fork with
a dot). The x axis is the step, or the work done so far:

  updates  optimizer steps done (a replayed stretch counts twice)
  samples  completions sampled by the policy (prompts x group size per step, every source)
  tokens   tokens sampled: the policy's completions plus guide sampling (npo/guide_tokens) and
           AutoNPO's probes and guide-cache pre-fills (recorded in checkpoint events)
  wall     training wall time (sum of step_time; evals excluded)

Work on x counts everything a curve depended on: when a branch uses a guide of the same run that is not
in its own lineage (NPO's rolled-back stretch A..G, AutoNPO's rollbacks, a bootstrapping scout), that
guide's lineage is added once, at the point the branch starts using it (a horizontal jump on the chart).
Guides from other runs (a LUFFY teacher, RLEP's finished run) are external and not counted.

A REF may be a glob: 'grpo-s*' matches run names (each run's main branch), 'grpo-s*/npo-boot' matches
RUN/BRANCH with each side matched on its own ('*' never crosses '/'). Its matches (say, one per seed) become
one curve: the mean over members at the steps all of them have, with a ±1 std band (the sample std). When
members end at different steps (a seed crashed), every column, final value and work alike, is taken at the
last step they share, and the curve says so in its note. A group's steps to the threshold are where the
mean curve first reaches it. `LABEL=REF` names a curve. No torch here.

A damaged checkpoint manifest leaves out only what needs it: with x = step a curve whose older history cannot
be read is drawn from what can (its note says so); a curve with nothing readable, or any damaged history
on a work axis (the work so far would be wrong), goes to `unreadable`. Nothing readable at all is an error.
"""

from __future__ import annotations

import fnmatch
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from npo_cli.errors import NpoError
from npo_cli.manifest import Manifest
from npo_cli.recipe import RolloutConfig
from npo_cli.store import Damaged, Store

X_KINDS = ("step", "updates", "samples", "tokens", "wall")
WORK = ("updates", "samples", "tokens", "wall")
X_LABELS = {"step": "step", "updates": "optimizer steps done, replayed ones included (cumulative)",
            "samples": "completions sampled (cumulative)",
            "tokens": "tokens sampled, policy + guide (cumulative)", "wall": "training wall time, s (cumulative)"}
# sampling besides the policy's own rollouts: per step (guide generator), and in a checkpoint's events
# (AutoNPO's confirming probe and its guide-cache pre-fill: {"probe": {"tokens": N}}, {"prefill": ...})
EXTRA_TOKEN_KEYS = ("npo/guide_tokens",)
EVENT_TOKEN_KEYS = ("probe", "prefill")
GLOB_CHARS = "*?["


@dataclass
class Point:
    step: int
    x: float
    y: float
    inherited: bool  # before the fork: the parent's curve
    std: float | None = None  # groups only


@dataclass
class Curve:
    label: str
    refs: list[str]  # the member refs (one unless a glob)
    ids: list[str]
    points: list[Point]
    fork: dict[str, float] | None = None  # step, x (work at the fork), x_resume (after a guide's cost), y
    work: dict[str, float] = field(default_factory=dict)  # totals at the last point
    work_at: dict[int, dict[str, float]] = field(default_factory=dict)  # work done up to each point's step
    note: str | None = None  # groups: why the columns stop short of some members' ends


# --------------------------------------------------------------------------- work per step


class _Costs:
    """Per-step work (samples, tokens, wall) of a manifest's metrics rows; recipes and rows cached."""

    def __init__(self, store: Store):
        self.store = store
        self._rows: dict[str, list[dict]] = {}
        self._shape: dict[str | None, tuple[int, int]] = {}

    def rows(self, m: Manifest) -> list[dict]:
        if m.id not in self._rows:
            label = f"metrics of {m.run}/{m.branch}@{m.step}"
            self._rows[m.id] = self.store.get_json(m.metrics, label) if m.metrics else []
        return self._rows[m.id]

    def shape(self, m: Manifest) -> tuple[int, int]:
        """(prompts_per_step, group_size) from the manifest's recipe (defaults if none was stored)."""
        if m.recipe not in self._shape:
            ro = (self.store.get_json(m.recipe, "recipe") if m.recipe else {}).get("rollout", {})
            d = RolloutConfig()
            self._shape[m.recipe] = (int(ro.get("prompts_per_step", d.prompts_per_step)),
                                     int(ro.get("group_size", d.group_size)))
        return self._shape[m.recipe]

    def step_work(self, m: Manifest, row: dict) -> dict[str, float]:
        prompts, n = self.shape(m)
        # npo/replay_groups: ExGRPO groups sampled on top of the batch (runs of npo before ExGRPO's
        # experience took places in the batch; today's npo/replay_prompts are inside prompts_per_step)
        samples = (prompts + float(row.get("npo/replay_groups", 0.0))) * n
        tokens = float(row.get("response_length", 0.0)) * samples + sum(float(row.get(k, 0.0))
                                                                        for k in EXTRA_TOKEN_KEYS)
        return {"updates": 1.0, "samples": samples, "tokens": tokens, "wall": float(row.get("step_time", 0.0))}

    @staticmethod
    def event_tokens(m: Manifest) -> float:
        return float(sum((getattr(e, k) or {}).get("tokens", 0) for e in m.events for k in EVENT_TOKEN_KEYS))

    def total(self, m: Manifest) -> dict[str, float]:
        out = dict.fromkeys(WORK, 0.0)
        out["tokens"] = self.event_tokens(m)
        for row in self.rows(m):
            for k, v in self.step_work(m, row).items():
                out[k] += v
        return out


def _guide_closure(store: Store, guide: str, run: str, seen: set[str]) -> list[Manifest]:
    """The guide's lineage plus, recursively, the lineages of the guides it used (same run only)."""
    out = []
    try:
        g = store.manifest(guide)
    except NpoError:
        return out  # a guide that was garbage-collected: nothing to count
    if g.run != run:
        return out  # external guide (teacher, another run): not this curve's work
    for m in store.lineage(g.id):
        if m.id in seen:
            continue
        seen.add(m.id)
        out.append(m)
        if m.guide:
            out += _guide_closure(store, m.guide, run, seen)
    return out


# --------------------------------------------------------------------------- curves


def build_curve(store: Store, ref: str, metric: str, x: str = "step", label: str | None = None,
                costs: _Costs | None = None) -> Curve:
    """One checkpoint's metric along its lineage (root first), with the fork point of its branch."""
    if x not in X_KINDS:
        raise NpoError(f"--x must be one of {', '.join(X_KINDS)}, not {x!r}")
    costs = costs or _Costs(store)
    lin, damage = store.readable_lineage(ref)
    if damage and (not lin or x != "step"):  # work along the lineage is unknown without all of it
        raise damage
    note = f"only what is readable is drawn: {damage}" if damage else None
    lin.reverse()  # oldest first
    head = lin[-1]
    own_start = len(lin)
    while own_start > 0 and (lin[own_start - 1].run, lin[own_start - 1].branch) == (head.run, head.branch):
        own_start -= 1
    in_lineage = {m.id for m in lin}
    counted = set(in_lineage)  # guides' checkpoints already paid for
    cum = dict.fromkeys(WORK, 0.0)
    points: list[Point] = []
    work_at: dict[int, dict[str, float]] = {}
    fork = None
    for i, m in enumerate(lin):
        before = dict(cum)
        if m.guide:
            try:
                closure = _guide_closure(store, m.guide, m.run, counted)
            except Damaged as e:
                if x != "step":
                    raise
                closure, note = [], note or f"work leaves out a guide's history: {e}"
            for g in closure:
                for k, v in costs.total(g).items():
                    cum[k] += v
        if i == own_start and i > 0:
            last = next((p for p in reversed(points)), None)
            fork = {"step": lin[i - 1].step, "id": lin[i - 1].id,
                    "x": float(lin[i - 1].step) if x == "step" else before[x],
                    "x_resume": float(lin[i - 1].step) if x == "step" else cum[x],
                    "y": last.y if last else None}
        cum["tokens"] += costs.event_tokens(m)
        for row in costs.rows(m):
            for k, v in costs.step_work(m, row).items():
                cum[k] += v
            v = row.get(metric)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                step = int(row.get("step", m.step))
                points.append(Point(step=step, x=float(step) if x == "step" else cum[x], y=float(v),
                                    inherited=i < own_start))
                work_at[step] = dict(cum)
    if not points and damage:
        raise damage
    if not points:
        keys = sorted({k for m in lin for r in costs.rows(m) for k, v in r.items()
                       if isinstance(v, (int, float)) and k != "step"})
        hint = f"; metrics there: {', '.join(keys[:25])}" if keys else " (no metrics stored)"
        raise NpoError(f"{ref} has no '{metric}' values along its lineage{hint}")
    return Curve(label=label or ref, refs=[ref], ids=[head.id], points=points, fork=fork, work=dict(cum),
                 work_at=work_at, note=note)


def expand(store: Store, pattern: str) -> list[str]:
    """Branch refs matching a glob: 'grpo-s*' matches runs (their main branch), 'grpo-s*/npo' branches;
    '@STEP' after the glob applies to every match."""
    pat, _, step = pattern.partition("@")
    # run and branch matched apart: fnmatch's '*' also matches '/', and 'g*' pulled in g0/npo-5-g10
    run_pat, slash, branch_pat = pat.partition("/")
    out = []
    for run in store.runs():
        if not fnmatch.fnmatchcase(run, run_pat):
            continue
        for b in store.branches(run):
            if fnmatch.fnmatchcase(b, branch_pat) if slash else b == "main":
                out.append((f"{run}/{b}" if slash else run) + (f"@{step}" if step else ""))
    if not out:
        raise NpoError(f"no branch in {store.url} matches {pattern!r} (see npo ls)")
    return sorted(out)


def average(curves: list[Curve], label: str) -> Curve:
    """Mean ± sample std over members at the steps all of them have (x = the members' mean x there); work
    at the last of those steps when members end at different steps."""
    if len(curves) == 1:
        c = curves[0]
        return Curve(label=label, refs=c.refs, ids=c.ids, points=c.points, fork=c.fork, work=c.work, note=c.note)
    by_step = [{p.step: p for p in c.points} for c in curves]
    steps = sorted(set.intersection(*(set(d) for d in by_step)))
    if not steps:
        raise NpoError(f"{label}: its {len(curves)} matches share no step with a value; compare them one by one")
    pts = []
    for s in steps:
        ps = [d[s] for d in by_step]
        ys = [p.y for p in ps]
        pts.append(Point(step=s, x=statistics.mean(p.x for p in ps), y=statistics.mean(ys),
                         inherited=all(p.inherited for p in ps), std=statistics.stdev(ys)))
    fork = None
    if all(c.fork for c in curves):
        fork = {k: statistics.mean(c.fork[k] for c in curves) for k in ("step", "x", "x_resume")}
        ys = [c.fork["y"] for c in curves if c.fork["y"] is not None]
        fork["y"] = statistics.mean(ys) if len(ys) == len(curves) else None
    ends, notes = sorted({c.points[-1].step for c in curves}), [f"{c.refs[0]}: {c.note}" for c in curves if c.note]
    works = [c.work for c in curves]
    if ends != [steps[-1]]:  # e.g. a seed that crashed: all columns at the step every member reached
        works = [c.work_at[steps[-1]] for c in curves]
        notes.append(f"members end at steps {', '.join(map(str, ends))}: final value and work are at step "
                     f"{steps[-1]}, the last step they share")
    note = "; ".join(notes) or None
    work = {k: statistics.mean(w.get(k, 0.0) for w in works) for k in WORK}
    return Curve(label=label, refs=[r for c in curves for r in c.refs], ids=[i for c in curves for i in c.ids],
                 points=pts, fork=fork, work=work, note=note)


def first_reach(points: list[Point], threshold: float) -> Point | None:
    return next((p for p in points if p.y >= threshold - 1e-12), None)


def compare(store: Store, refs: list[str], metric: str = "eval/accuracy", x: str = "step",
            threshold: float | None = None) -> dict[str, Any]:
    """The data behind `npo compare` (and its --json): curves, finals, steps to the threshold."""
    if not refs:
        raise NpoError("give at least one ref to compare")
    if x not in X_KINDS:
        raise NpoError(f"--x must be one of {', '.join(X_KINDS)}, not {x!r}")
    groups = []
    for item in refs:
        label, sep, ref = item.partition("=")
        if not sep:
            label, ref = item, item
        groups.append((label, expand(store, ref) if any(ch in ref for ch in GLOB_CHARS) else [ref]))
    return compare_groups(store, groups, metric, x, threshold)


def compare_groups(store: Store, groups: list[tuple[str, list[str]]], metric: str = "eval/accuracy",
                   x: str = "step", threshold: float | None = None) -> dict[str, Any]:
    """compare() with the curves given as (label, member refs): members are averaged."""
    if x not in X_KINDS:
        raise NpoError(f"--x must be one of {', '.join(X_KINDS)}, not {x!r}")
    costs = _Costs(store)
    curves, unreadable = [], []
    for label, members in groups:
        built = []
        for r in members:
            try:
                built.append(build_curve(store, r, metric, x, costs=costs))
            except Damaged as e:  # a damaged checkpoint leaves out what needs it; the other curves go on
                why = str(e) + ("; the work along it cannot be counted (--x step draws what is readable)"
                                if x != "step" and e.child else "")
                unreadable.append({"label": label, "ref": r, "id": e.id, "error": why})
        if built:
            curves.append(average(built, label))
    if not curves:
        raise NpoError("nothing to compare: " + "; ".join(f"{u['ref']}: {u['error']}" for u in unreadable))
    if threshold is None:
        threshold = curves[0].points[-1].y
    rows = []
    for c in curves:
        hit = first_reach(c.points, threshold)
        rows.append({
            "label": c.label, "refs": c.refs, "ids": c.ids, "members": len(c.refs), "fork": c.fork,
            "points": [{k: v for k, v in asdict(p).items() if v is not None or k != "std"} for p in c.points],
            "final": {k: v for k, v in asdict(c.points[-1]).items() if k != "inherited"},
            "to_threshold": {"step": hit.step, "x": hit.x} if hit else None,
            "work": c.work, "note": c.note,
        })
    return {"store": store.url, "metric": metric, "x": x, "x_label": X_LABELS[x], "threshold": threshold,
            "curves": rows, "unreadable": unreadable}


# --------------------------------------------------------------------------- the chart


def plot(data: dict[str, Any], path: str, title: str | None = None, bands: bool = True) -> list:
    """Write the chart (PNG, headless Agg canvas); returns the Line2D of each curve's own (solid) part.
    Earlier curves are drawn on top (the first is usually the baseline); bands: ±1 std of groups."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.5, 5.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    lines, drawn = [], set()  # drawn: the marks the footnote explains (only those that show)
    solid = {(p["x"], p["y"]) for c in data["curves"] for p in c["points"] if not p["inherited"]}
    n = len(data["curves"])
    for i, c in enumerate(data["curves"]):
        color, z = f"C{i % 10}", 2 + (n - i) / (n + 1)
        pts = c["points"]
        inh = [p for p in pts if p["inherited"]]
        own = [p for p in pts if not p["inherited"]]
        f = c["fork"]
        if inh:
            ax.plot([p["x"] for p in inh], [p["y"] for p in inh], color=color, lw=1.0, ls="--", alpha=0.8, zorder=z)
            if len(inh) > 1 and not all((p["x"], p["y"]) in solid for p in inh):  # not hidden under the parent's
                drawn.add("dashed")
        xs, ys = [p["x"] for p in own], [p["y"] for p in own]
        if f and f.get("y") is not None:
            if f["x_resume"] != f["x"]:  # work the branch paid for its guide (rolled-back steps)
                ax.plot([f["x"], f["x_resume"]], [f["y"], f["y"]], color=color, lw=1.0, ls=":", alpha=0.8)
                drawn.add("dotted")
            ax.plot([f["x"]], [f["y"]], "o", color=color, ms=6, mec="black", mew=0.8, zorder=4)
            drawn.add("dot")
            xs, ys = [f["x_resume"], *xs], [f["y"], *ys]
        elif f and xs:  # no value at the fork (e.g. a fork at step 0, before any eval): a hollow dot
            ax.plot([xs[0]], [ys[0]], "o", mfc="white", mec=color, ms=6, mew=1.5, zorder=4)
            drawn.add("hollow")
        label = c["label"] + (f" (fork @{f['step']:g})" if f else "")
        (line,) = ax.plot(xs, ys, color=color, lw=2.0, label=label, marker="." if len(xs) < 30 else None, zorder=z)
        lines.append(line)
        band = [p for p in own if p.get("std") is not None] if bands else []
        if band:
            lo = [p["y"] - p["std"] for p in band]
            hi = [p["y"] + p["std"] for p in band]
            ax.fill_between([p["x"] for p in band], lo, hi, color=color, alpha=0.12, lw=0)
    if data.get("threshold") is not None:
        ax.axhline(data["threshold"], color="0.5", ls=":", lw=0.8, label=f"threshold {data['threshold']:.3f}")
    ax.set_title(title or f"{data['metric']} vs {data['x']}")
    ax.set_xlabel(data["x_label"])
    ax.set_ylabel(data["metric"])
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    marks = {"dashed": "dashed: the parent's curve up to the fork", "dot": "dot: the fork",
             "hollow": "hollow dot: the first value after a fork that has none",
             "dotted": "dotted: the work that made the guide, added at the fork"}
    notes = [text for mark, text in marks.items() if mark in drawn]
    if any(c["members"] > 1 for c in data["curves"]):
        notes.append("band: ±1 std over members" if bands else "curves: means over members")
    if notes:
        fig.text(0.01, 0.005, "; ".join(notes), fontsize=7, color="0.4")
    fig.savefig(path, bbox_inches="tight")
    return lines
