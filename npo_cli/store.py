"""The checkpoint store: an object store (npo_cli/objects.py) whose refs are branches of runs.

Layout under the store root (any fsspec URL: a path, file://, s3://bucket/prefix, memory://):

    npo-store.json                   the marker, {"format": 1}, written with a new store's first write:
                                     npo writes and deletes only under a root that has it. A store made
                                     before the marker gets it at its next write if it holds only these
                                     folders, and only object names under objects/ (npo_cli/objects.py)
    objects/ab/cdef…                 immutable; the name is the SHA-256 of the bytes. Tensors, JSON,
                                     and checkpoint manifests (npo_cli/manifest.py)
    runs/<run>/branches/<branch>     a ref: one line holding a checkpoint id (this module)
    runs/<run>/leases/<branch>.json  the writer's lease (npo_cli/lease.py)
    guides/<checkpoint>/<key>        refs owned by a checkpoint: its guide cache (npo_cli/guide.py)
    tags/<name>                      a ref: a checkpoint kept whole, like a branch head (`npo tag`)
    pruned/<checkpoint>              a mark (holding the checkpoint's id): "its tensors need not be kept".
                                     train.keep_last writes it (npo_cli/gc.py: `prune`); manifests stay
                                     immutable, and gc keeps such a checkpoint's tensors only when it is
                                     reached as a branch head, a tag or a guide, not as an ancestor
    tmp/                             local temp files, renamed into objects/ when complete

Crash safety comes from the write order (objects, then the manifest object, then the ref) and from
every single write being atomic. A killed writer therefore leaves at worst unreferenced objects, which
`npo gc` (npo_cli/gc.py, which also says what is reachable) removes.

Refs accepted wherever a checkpoint is named (`parse_ref` / `Store.resolve`):
    RUN               head of RUN's main branch
    RUN/BRANCH        head of that branch
    RUN/BRANCH@STEP   the newest checkpoint with that step on the branch's lineage (parent chain)
    RUN@STEP          the checkpoint at STEP on main's lineage; if main has none, the one checkpoint
                      at STEP on any branch of RUN (several different ones -> an error naming them)
    abc123…           a checkpoint id or a unique prefix of 6+ hex digits (an existing run of the
                      same name wins)
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from pydantic import ValidationError

from npo_cli.errors import NpoError, one_line
from npo_cli.lease import Lease, check_writer, leases, read_lease
from npo_cli.manifest import MANIFEST_MAGIC, Manifest
from npo_cli.objects import HEX_RE, ObjectStore, check_name, is_oid

_STEP = re.compile(r"[0-9]{1,12}")
REF_HELP = "RUN, RUN@STEP, RUN/BRANCH, RUN/BRANCH@STEP, or a checkpoint id prefix of 6+ hex digits"


# ------------------------------------------------------------------------------------------ refs

@dataclass(frozen=True)
class Ref:
    """A parsed ref. `prefix` is set when the text could also be a checkpoint id prefix."""

    run: str
    branch: str | None = None
    step: int | None = None
    prefix: str | None = None

    def __str__(self) -> str:
        s = self.run + (f"/{self.branch}" if self.branch else "")
        return s + (f"@{self.step}" if self.step is not None else "")


def parse_ref(text: str) -> Ref:
    """Parse RUN, RUN@STEP, RUN/BRANCH, RUN/BRANCH@STEP or a hex id prefix. Raises NpoError only."""
    if not isinstance(text, str) or not text:
        raise NpoError(f"empty ref; expected {REF_HELP}")
    base, at, step_s = text.partition("@")
    step = None
    if at:
        if not _STEP.fullmatch(step_s):
            raise NpoError(f"malformed ref {text!r}: STEP after '@' must be a number; expected {REF_HELP}")
        step = int(step_s)
    run, slash, branch = base.partition("/")
    try:
        check_name("run", run)
        if slash:
            check_name("branch", branch)
    except NpoError as e:
        raise NpoError(f"malformed ref {text!r}: {e}; expected {REF_HELP}") from None
    prefix = run.lower() if not slash and not at and HEX_RE.fullmatch(run.lower()) else None
    return Ref(run=run, branch=branch if slash else None, step=step, prefix=prefix)


# ------------------------------------------------------------------------------------------ store

class Damaged(NpoError):
    """A checkpoint manifest that cannot be read (corrupt, missing, invalid). Damage stays local: a walk
    back along the parents stops there, and what is newer stays usable."""

    def __init__(self, cid: str, reason: str, child: Manifest | None = None):
        self.id, self.reason, self.child = cid, reason, child
        of = f" (parent of {child.run}/{child.branch}@{child.step})" if child else ""
        super().__init__(f"checkpoint {cid[:12]}{of} is damaged: {reason}")

    def to_json(self) -> dict:
        c = self.child
        return {"id": self.id, "reason": self.reason, "parent_of": f"{c.run}/{c.branch}@{c.step}" if c else None}


class Store(ObjectStore):
    """Checkpoints: branch refs `runs/<run>/branches/<branch>` over manifests. Open with `Store.open(url)`."""

    ref_folders = ("runs", "guides", "tags", "pruned")

    def __init__(self, url: str, io):
        super().__init__(url, io)
        self._manifests: dict[str, Manifest] = {}  # content-addressed, so never stale

    # ---------------------------------------------------------------- branches

    def runs(self) -> list[str]:
        """Runs with at least one branch ref (listed, not read: one damaged ref must not hide every run)."""
        return [r for r in self.list_refs("runs") if self.list_refs(f"runs/{r}/branches")]

    def branches(self, run: str) -> dict[str, str]:
        check_name("run", run)
        out = {}
        for b in self.list_refs(f"runs/{run}/branches"):
            cid = self._read_ref(run, b)
            if cid:
                out[b] = cid
        return out

    def _read_ref(self, run: str, branch: str) -> str | None:
        cid = self._ref_text(f"runs/{run}/branches/{branch}")
        if cid is not None and not is_oid(cid):
            raise NpoError(f"ref {run}/{branch} is damaged (holds {cid[:20]!r}); write its last checkpoint's id "
                           f"into runs/{run}/branches/{branch} in the store (deleting the ref would let "
                           "npo gc remove the branch's history)")
        return cid

    def head(self, run: str, branch: str = "main") -> str | None:
        check_name("run", run)
        check_name("branch", branch)
        return self._read_ref(run, branch)

    def set_ref(self, run: str, branch: str, cid: str, create: bool = False) -> None:
        """Point run/branch at a checkpoint (atomic replace). create: NpoError if the branch exists."""
        check_name("run", run)
        check_name("branch", branch)
        if not is_oid(cid):
            raise NpoError(f"invalid checkpoint id {cid!r}")
        if not self.write_ref(f"runs/{run}/branches/{branch}", cid, create=create):
            raise NpoError(f"branch {run}/{branch} already exists; pick another name with --branch")

    def branch(self, ref: str, name: str, run: str | None = None) -> str:
        """New branch `run/name` whose head is `ref` (run defaults to the ref's run). Writes one ref."""
        check_name("branch", name)
        cid = self.resolve(ref)
        self.check_not_pruned(cid)
        run = run or self._ref_run(ref, cid)
        check_name("run", run)
        self.set_ref(run, name, cid, create=True)
        return cid

    def drop_branch(self, run: str, branch: str, cid: str) -> None:
        """Remove run/branch while it still points at `cid` (its objects are left to gc)."""
        if self.head(run, branch) == cid:
            self.remove_ref(f"runs/{run}/branches/{branch}")

    # ---------------------------------------------------------------- tags and pruned checkpoints

    def tags(self) -> dict[str, str]:
        """Tag name -> checkpoint id."""
        return {t: cid for t in self.list_refs("tags") if (cid := self.read_ref(f"tags/{t}"))}

    def tag(self, ref: str, name: str) -> str:
        """Tag the checkpoint `ref` as `name` (kept whole by gc); its id. A pruned checkpoint whose tensors
        are all still in the store is taken back (its mark removed); one whose tensors are gone is refused."""
        check_name("tag", name)
        m = self.manifest(ref)
        if m.id in self.pruned() and not all(map(self.has, m.tensor_oids())):
            self.check_not_pruned(m.id)  # its tensors are gone: refused
        if not self.write_ref(f"tags/{name}", m.id, create=True):
            raise NpoError(f"tag {name} already exists (on {self.describe(self.read_ref(f'tags/{name}') or '')}); "
                           f"pick another name, or remove it first with npo tag --delete {name}")
        self.remove_ref(f"pruned/{m.id}")  # after the tag: from here on gc keeps the tensors
        return m.id

    def untag(self, name: str) -> str:
        """Remove tag `name`; the checkpoint id it held."""
        check_name("tag", name)
        cid = self.read_ref(f"tags/{name}")
        if cid is None:
            raise NpoError(f"no tag {name} (tags: {', '.join(self.tags()) or 'none'})")
        self.remove_ref(f"tags/{name}")
        return cid

    def pruned(self) -> set[str]:
        """Ids of the checkpoints marked pruned (train.keep_last): their tensors need not be kept."""
        return set(self.list_refs("pruned"))

    def check_not_pruned(self, cid: str) -> None:
        """NpoError when checkpoint `cid` is pruned: nothing may load, fork from or guide with it."""
        if cid in self.pruned():
            raise NpoError(f"checkpoint {self.describe(cid)} was pruned by train.keep_last; its tensors are gone "
                           "(or go at the next npo gc), so it cannot be loaded, forked from or used as a guide; "
                           "pick a checkpoint npo ls does not mark pruned")

    def _ref_run(self, ref: str, cid: str) -> str:
        r = parse_ref(ref)
        if r.prefix is None or r.run in self.runs():
            return r.run
        return self.manifest(cid).run

    # ---------------------------------------------------------------- checkpoints

    def manifest(self, ref_or_id: str) -> Manifest:
        cid = ref_or_id if is_oid(ref_or_id) else self.resolve(ref_or_id)
        if cid in self._manifests:
            return self._manifests[cid]
        try:
            data = self.get_bytes(cid)
            if not bytes(data[:len(MANIFEST_MAGIC)]) == MANIFEST_MAGIC:
                raise NpoError(f"object {cid[:16]} is not a checkpoint manifest")
            m = Manifest.model_validate_json(bytes(data))
        except ValidationError as e:
            raise Damaged(cid, f"invalid manifest: {one_line(e)}") from None
        except NpoError as e:
            raise Damaged(cid, str(e)) from None
        m.id = cid
        self._manifests[cid] = m
        return m

    def lineage(self, ref: str) -> list[Manifest]:
        """The checkpoint and its ancestors, newest first; Damaged if one of them cannot be read."""
        return list(self.walk(self.resolve(ref)))

    def readable_lineage(self, ref: str) -> tuple[list[Manifest], Damaged | None]:
        """The checkpoint and its ancestors, newest first, up to the first one that cannot be read, and that
        damage (None when all of it reads). For what can do without the older history."""
        out: list[Manifest] = []
        try:
            out.extend(self.walk(self.resolve(ref)))
        except Damaged as e:
            return out, e
        return out, None

    def walk(self, cid: str | None) -> Iterator[Manifest]:
        """Manifests from cid back along the parents, each read only when the walk reaches it. A manifest
        that cannot be read raises Damaged (naming its child): what was yielded before it stays usable."""
        seen, child = set(), None
        while cid and cid not in seen:
            seen.add(cid)
            try:
                m = self.manifest(cid)
            except Damaged as e:
                raise Damaged(cid, e.reason, child) from None
            yield m
            child, cid = m, m.parent

    def resolve(self, ref: str) -> str:
        """Checkpoint id for a ref (see the module docstring); NpoError with what exists otherwise."""
        r = parse_ref(ref)
        runs = self.runs()
        if r.run not in runs:
            if r.prefix:
                return self._resolve_prefix(r.prefix)
            known = ", ".join(runs[:20]) or "none; the store is empty"
            raise NpoError(f"unknown run {r.run!r} in {self.url} (runs: {known})")
        branches = self.branches(r.run)
        if r.branch is not None and r.branch not in branches:
            raise NpoError(f"unknown branch {r.run}/{r.branch} (branches: {', '.join(branches)})")
        if r.step is None:
            branch = r.branch or "main"
            if branch not in branches:
                raise NpoError(f"run {r.run!r} has no main branch; name one: "
                               + ", ".join(f"{r.run}/{b}" for b in branches))
            return branches[branch]
        if r.branch is not None or "main" in branches:
            branch = r.branch or "main"
            hit = self._step_on(branches[branch], r.step)
            if hit:
                return hit
            if r.branch is not None:
                steps = sorted({m.step for m in self.lineage(branches[branch])})
                raise NpoError(f"no checkpoint at step {r.step} on {r.run}/{branch} (steps: {_steps(steps)})")
        # RUN@STEP not on main: the one checkpoint at STEP on any branch, if there is just one.
        hits: dict[str, list[str]] = {}
        for b, head in branches.items():
            cid = self._step_on(head, r.step)
            if cid:
                hits.setdefault(cid, []).append(b)
        if len(hits) == 1:
            return next(iter(hits))
        if not hits:
            steps = sorted({m.step for h in branches.values() for m in self.lineage(h)})
            raise NpoError(f"no checkpoint at step {r.step} in run {r.run!r} (steps: {_steps(steps)})")
        raise NpoError(f"{ref!r} is ambiguous: step {r.step} differs between branches; use one of "
                       + ", ".join(f"{r.run}/{bs[0]}@{r.step}" for bs in hits.values()))

    def _step_on(self, head: str, step: int) -> str | None:
        """The newest checkpoint at `step` walking back from head; stops there (a damaged older manifest
        does not hide a good newer one)."""
        return next((m.id for m in self.walk(head) if m.step == step), None)

    def _resolve_prefix(self, prefix: str) -> str:
        names = self.io.listdir(f"objects/{prefix[:2]}")
        cands = [prefix[:2] + n for n in names if (prefix[:2] + n).startswith(prefix)]
        cands = [c for c in cands if self._is_manifest(c)]
        if not cands:
            raise NpoError(f"no run or checkpoint named {prefix!r} in {self.url} (see npo ls)")
        if len(cands) > 1:
            desc = []
            for c in cands[:5]:
                m = self.manifest(c)
                desc.append(f"{c[:12]} ({m.run}/{m.branch}@{m.step})")
            raise NpoError(f"checkpoint id prefix {prefix!r} is ambiguous: {', '.join(desc)}; give more digits")
        return cands[0]

    def _is_manifest(self, oid: str) -> bool:
        try:
            return self.io.read_head(self._opath(oid), len(MANIFEST_MAGIC)) == MANIFEST_MAGIC
        except FileNotFoundError:
            return False

    def describe(self, cid: str) -> str:
        """'run/branch@step (id)' for messages."""
        try:
            m = self.manifest(cid)
            return f"{m.run}/{m.branch}@{m.step} ({cid[:12]})"
        except NpoError:
            return cid[:12]

    # ---------------------------------------------------------------- leases (npo_cli/lease.py)

    def lease(self, run: str, branch: str, force: bool = False, ttl: float | None = None) -> Lease:
        """Context manager: the one writer of run/branch. NpoError naming the holder if it is taken."""
        return Lease(self, run, branch, force=force, ttl=ttl)

    def read_lease(self, run: str, branch: str) -> dict | None:
        return read_lease(self, run, branch)

    def leases(self) -> list[tuple[str, str, dict]]:
        return leases(self)

    def check_writer(self, run: str, branch: str) -> None:
        """Refuse a save when another live process holds the branch lease (or ours was lost)."""
        check_writer(self, run, branch)


def weights_only(m: Manifest) -> bool:
    """A checkpoint saved without its optimizer state (train.save_optimizer_every): recorded in the state, since
    a checkpoint of step 0 has an empty optimizer state all the same."""
    return m.state.weights_only


def _steps(steps: list[int]) -> str:
    if not steps:
        return "none"
    s = ", ".join(map(str, steps[:12]))
    return s + (f", … {steps[-1]}" if len(steps) > 12 else "")
