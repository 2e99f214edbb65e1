"""What the store needs, checked (`verify`) and kept (`collect`); everything else is garbage.

Reachability: every branch ref and every tag is a root. From a checkpoint, follow the other checkpoints it
links (`Manifest.links()`: parent and guide, recursively) and keep every object it names (`Manifest.objects()`:
tensors, recipe, metrics, model config, tokenizer files, extra objects; a LoRA checkpoint's `base` list is
read too, for the base tensors it names). One exception keeps stores small:
a checkpoint marked pruned (ref `pruned/<id>`, written by train.keep_last through `prune`) that is reached
only as a parent keeps its manifest and every object but its tensors (model, optimizer, state tensors);
reached as a root or a guide it is kept whole. Its lineage, metrics, recipe and events stay readable,
and verify does not count its tensors as missing. Named objects are kept as
leaves: their contents are not parsed, so whoever stores e.g. a replay buffer lists every object it
needs in the manifest's `extra_objects`. A ref under an owned folder, `<folder>/<owner id>/<key>`, is
attached to the object <owner>: it and the object it holds are kept while the owner is reachable, and
collect drops it once the owner is not, or once its own object is gone.

gc deletes only objects (files objects/ab/<62 hex digits> whose full name is their SHA-256), and only in
a store that has its npo-store.json (npo_cli/objects.py: `claim`); other files there are strays, which
verify lists and gc leaves alone.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

from pydantic import ValidationError

from npo_cli.errors import NpoError, one_line, os_reason
from npo_cli.lease import holder, lease_state, leases, npo_command
from npo_cli.manifest import BaseTensors
from npo_cli.store import Store, weights_only

GC_KEEP_RECENT = 3600.0  # seconds: gc keeps unreachable objects this young (their writer may be running)
OWNED = {"guides": "guide-cache entry"}  # folders of owned refs -> what one is called in messages


def _owned(who: str) -> bool:
    return who.split("/", 1)[0] in OWNED


def _what(name: str) -> str:
    """'guide-cache entry guides/<owner>/<key>' for an owned ref's name."""
    return f"{OWNED[name.split('/', 1)[0]]} {name}"


def reachable(store: Store) -> tuple[dict[str, str], list[str], dict[str, str | None]]:
    """(oid -> the checkpoint id or owned ref name that needs it, problems, every owned ref name -> the
    object it keeps, None when its owner is unreachable or it holds no object id): everything reachable
    from the branch refs."""
    need: dict[str, str] = {}
    problems: list[str] = []
    todo: list[tuple[str, str, bool]] = []  # (checkpoint id, how it was reached, whether it is kept whole)
    for run in store.runs():
        try:
            todo += [(cid, f"ref {run}/{b}", True) for b, cid in store.branches(run).items()]
        except NpoError as e:  # a damaged ref: a problem to report, not a reason to stop looking
            problems.append(str(e))
    for name in store.list_refs("tags"):
        try:
            todo += [(cid, f"tag {name}", True)] if (cid := store.read_ref(f"tags/{name}")) else []
        except NpoError as e:
            problems.append(str(e))
    pruned = store.pruned()
    whole: set[str] = set()  # checkpoints whose tensors are kept
    bases: set[str] = set()  # LoRA base tensor lists already read
    while todo:
        cid, via, keep_tensors = todo.pop()
        keep_tensors = keep_tensors or cid not in pruned
        first = cid not in need
        if not first and (cid in whole or not keep_tensors):
            continue
        need[cid] = cid
        try:
            m = store.manifest(cid)
        except NpoError as e:
            if first:
                problems.append(f"checkpoint {cid[:12]} (from {via}): {e}")
            continue
        tensors = m.tensor_oids()
        for oid in m.objects():
            if keep_tensors or oid not in tensors:
                need.setdefault(oid, cid)
        if keep_tensors and m.base and m.base not in bases:  # LoRA: the base tensors its list names
            bases.add(m.base)
            try:
                for e in BaseTensors.model_validate(store.get_json(m.base)).model.values():
                    for oid in e.oids():
                        need.setdefault(oid, cid)
            except (NpoError, ValidationError) as e:
                why = one_line(e) if isinstance(e, NpoError) else "not a list of tensors"
                problems.append(f"LoRA base {m.base[:16]} of checkpoint {store.describe(cid)}: {why}")
        if keep_tensors:
            whole.add(cid)
        if first:
            label = f"{m.run}/{m.branch}@{m.step}"
            todo += [(nxt, f"{what} of {label}", what == "guide") for nxt, what in m.links().items()]
    owned: dict[str, str | None] = {}
    for folder in OWNED:
        for owner in store.list_refs(folder):
            for key in store.list_refs(f"{folder}/{owner}"):
                name = f"{folder}/{owner}/{key}"
                owned[name] = None
                if owner not in need:
                    continue
                try:
                    owned[name] = store.read_ref(name)
                except NpoError:  # holds no object id: it reaches nothing
                    continue
                if owned[name]:
                    need.setdefault(owned[name], name)
    return need, problems, owned


def prune(store: Store, run: str, branch: str, keep_last: int) -> list[str]:
    """train.keep_last: mark pruned the checkpoints of run/branch older than its last `keep_last`, except those
    whose tensors something may still load: every branch head, tagged checkpoint and guide-cache owner, a
    checkpoint any manifest names as its guide, a fork point (the first checkpoint of a branch's lineage that
    is not the branch's own), and the newest checkpoint of this branch with optimizer state (what a resume
    after a crash at a weights-only save goes back to). Returns the ids newly marked."""
    heads = [(r, b, cid) for r in store.runs() for b, cid in store.branches(r).items()]
    heads += [(None, None, cid) for cid in store.tags().values()]
    keep = {cid for _, _, cid in heads} | set(store.list_refs("guides"))
    own: list = []
    seen: set[str] = set()
    for r, b, head in heads:
        on_branch = True
        try:
            for m in store.walk(head):
                if on_branch and (m.run, m.branch) != (r, b):
                    on_branch = False
                    keep.add(m.id)  # the fork point
                if (r, b) == (run, branch) and on_branch:
                    own.append(m)
                elif m.id in seen:  # its ancestors were walked already
                    break
                seen.add(m.id)
                if m.guide:
                    keep.add(m.guide)
        except NpoError:  # a damaged manifest: what lies behind it is neither walked nor pruned
            continue
    full = next((m for m in own if not weights_only(m)), None)
    keep |= {full.id} if full else set()
    marked = store.pruned()
    doomed = [m.id for m in own[keep_last:] if m.id not in keep and m.id not in marked]
    for cid in doomed:
        store.write_ref(f"pruned/{cid}", cid)
    return doomed


def verify(store: Store) -> dict:
    """Re-hash every object and check every reachable manifest's references."""
    need, problems, _ = reachable(store)
    found, strays = store.scan()
    present = {oid: size for oid, (size, _) in found.items()}
    for oid, who in need.items():
        if oid not in present:
            problems.append(f"missing object {oid[:16]} of {_what(who)} (npo gc drops the entry)"
                            if _owned(who) else
                            f"missing object {oid[:16]} needed by {store.describe(who)}")
    problems += [f"stray file {path} (not an object name; npo gc leaves it)" for path in strays]
    names = sorted(present)

    def bad(oid: str) -> bool:
        try:
            return store.hash_object(oid) != oid
        except FileNotFoundError:  # removed meanwhile (a concurrent gc)
            return False

    with ThreadPoolExecutor(max(2, min(16, os.cpu_count() or 2))) as ex:  # hashlib drops the GIL
        for oid, is_bad in zip(names, ex.map(bad, names)):
            if is_bad:
                who = need.get(oid)
                who = ("unreferenced" if who is None else _what(who) if _owned(who)
                       else f"needed by checkpoint {store.describe(who)}")
                problems.append(f"corrupt object {oid[:16]}: SHA-256 mismatch ({who})")
    checkpoints = sum(1 for oid, who in need.items() if oid == who)
    return {"ok": not problems, "objects": len(present), "checkpoints": checkpoints,
            "bytes": sum(present.values()), "problems": problems}


def collect(store: Store, dry_run: bool = False, force: bool = False,
            keep_recent: float = GC_KEEP_RECENT) -> dict:
    """Delete objects no ref reaches and older than keep_recent seconds, and owned refs whose owner or
    object is gone. Refuses while any lease is live unless force.

    keep_recent protects writers that hold no lease (import, guide-cache fills, a save between its
    objects and its ref): as in git, young unreachable objects are kept, and a save that reuses an
    object refreshes its time (local stores; on S3 a reused object that gc deletes in the moment
    between the save's check and its ref is the remaining race).

    The report counts what this call deleted: an object already gone (a concurrent gc) is not counted, and
    one it could not delete is listed under "failed" ("objects/ab/cd…: reason")."""
    if not dry_run:
        store.claim()  # an npo store (marked now if it is an unmarked one of npo's), or NpoError
    live = [(r, b, i) for r, b, i in leases(store) if lease_state(i) == "live"]
    if live and not force:
        r, b, i = live[0]
        raise NpoError(f"{len(live)} branch(es) are being written ({r}/{b} by {holder(i)}); "
                       "gc would race them; retry when they have finished, or break in with "
                       + npo_command("gc", "--force", store=store.url))
    need, problems, owned = reachable(store)
    if problems:
        raise NpoError(f"refusing to gc a damaged store: {problems[0]} (see npo verify)")
    found, strays = store.scan()
    now = time.time()
    unreachable = {oid: size for oid, (size, _) in found.items() if oid not in need}
    doomed = {oid: size for oid, size in unreachable.items() if now - found[oid][1] >= keep_recent}
    stale = [name for name, oid in owned.items() if oid and oid not in found]  # its object is gone
    orphans = [name for name in owned if name.split("/")[1] not in need]  # its owner is gone
    deleted: dict[str, int] = dict(doomed) if dry_run else {}
    failed: dict[str, str] = {}  # oid -> why it could not be deleted
    if not dry_run:
        for oid, size in doomed.items():
            try:
                if store.delete_object(oid):  # False: already gone (a concurrent gc), not ours to count
                    deleted[oid] = size
            except OSError as e:  # e.g. a read-only folder: the others still go, and the report says so
                failed[oid] = os_reason(e)
        stale = [name for name in stale if store.remove_ref(name)]
        for name in orphans:
            store.remove_ref(name)
        for cid in store.pruned() - need.keys():  # marks of checkpoints that are gone
            store.remove_ref(f"pruned/{cid}")
        # temp files of killed writers; a young one may belong to a writer without a lease (import)
        store.io.clean_tmp(older_than=min(keep_recent, 0 if force else 3600))
    kept = {oid: size for oid, (size, _) in found.items() if oid not in doomed or oid in failed}
    return {"dry_run": dry_run, "objects": len(deleted), "bytes": sum(deleted.values()),
            "failed": [f"objects/{oid[:2]}/{oid[2:]}: {why}" for oid, why in failed.items()],
            "recent_objects": len(unreachable) - len(doomed), "stale_cache_entries": len(stale),
            "kept_objects": len(kept), "kept_bytes": sum(kept.values()), "stray_files": len(strays)}
