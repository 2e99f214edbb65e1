"""The checkpoint store: content-addressed objects plus a few mutable refs, like git.

Layout under the store root (any fsspec URL: a path, file://, s3://bucket/prefix, memory://):

    objects/ab/cdef…                 immutable; the name is the SHA-256 of the bytes
    runs/<run>/branches/<branch>     a ref: one line holding a checkpoint id
    runs/<run>/leases/<branch>.json  the writer's lease (host, pid, since, expiry, token)
    guides/<checkpoint>/<key>        guide cache (npo_cli/guide.py): a ref holding one trajectory object
    tmp/                             local temp files, renamed into objects/ when complete

Crash safety comes from the write order (objects, then the manifest object, then the ref) and from
every single write being atomic: temp file + rename on a local disk, one PUT on S3 (objects above
100 MB go up as one multipart upload, which S3 also makes visible only when it completes). A killed
writer therefore leaves at worst unreferenced objects, which `gc` removes. We do not fsync: the
store survives a killed process (the page cache survives it) but not necessarily a power cut.

Refs accepted wherever a checkpoint is named (`parse_ref` / `Store.resolve`):
    RUN               head of RUN's main branch
    RUN/BRANCH        head of that branch
    RUN/BRANCH@STEP   the newest checkpoint with that step on the branch's lineage (parent chain)
    RUN@STEP          the checkpoint at STEP on main's lineage; if main has none, the one checkpoint
                      at STEP on any branch of RUN (several different ones -> an error naming them)
    abc123…           a checkpoint id or a unique prefix of 6+ hex digits (an existing run of the
                      same name wins)

Reachability (what `gc` keeps and `verify` checks): start from every ref; from a checkpoint follow
`parent` and `guide` (both checkpoints, recursively) and keep every object the manifest names:
tensors (model, optimizer, state_tensors), recipe, metrics, model_config, tokenizer files, and every
oid listed in `state["objects"]` and in `events[i]["objects"]` (a list of oids, or a dict whose
values are oids). Listed objects are kept as leaves: their contents are not parsed, so whoever
stores e.g. guide trajectories must list every oid it needs there. Guide-cache entries
(`guides/<guide checkpoint id>/<key>` -> object) are kept while their guide checkpoint is reachable;
gc drops the others.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import mmap
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from npo_cli import __version__
from npo_cli.errors import NpoError, one_line, os_reason

MANIFEST_FORMAT = "npo-checkpoint/1"
_MANIFEST_MAGIC = b'{"format":"npo-checkpoint/'  # the first bytes of every manifest object
_HEX = re.compile(r"[0-9a-f]{6,64}")
_OID = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_REHASH_UP_TO = 1 << 20  # bytes: an existing object this small is re-hashed before a save reuses it
_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # a write error that more room fixes
GC_KEEP_RECENT = 3600.0  # seconds: gc keeps unreachable objects this young (their writer may be running)
_STEP = re.compile(r"[0-9]{1,12}")
REF_HELP = "RUN, RUN@STEP, RUN/BRANCH, RUN/BRANCH@STEP, or a checkpoint id prefix of 6+ hex digits"


# ------------------------------------------------------------------------------------------ manifest

class TensorEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    oid: str = Field("", description="Object holding the tensor as a one-tensor safetensors file "
                     "('' when the tensor is chunked).")
    dtype: str = Field(description="torch dtype name, e.g. 'float32'.")
    shape: list[int]
    nbytes: int = Field(description="Bytes of tensor data (without the safetensors header).")
    chunks: list[str] = Field(default_factory=list, description="A large tensor: objects holding row blocks "
                              "(slices along dim 0) of `chunk_rows` rows each, the last one shorter.")
    chunk_rows: int = 0

    def oids(self) -> list[str]:
        return self.chunks or [self.oid]


class Manifest(BaseModel):
    """A checkpoint. Stored as a JSON object; its id is the SHA-256 of that JSON (so `id` is not in it)."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants", protected_namespaces=(),
                              validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)
    # `format` is first so a manifest can be told from other objects by its first bytes.
    format: Literal["npo-checkpoint/1"] = MANIFEST_FORMAT
    id: str = Field("", exclude=True, description="Checkpoint id (set on load; not stored).")
    run: str
    branch: str = Field(description="Branch the checkpoint was written on.")
    step: int
    parent: str | None = Field(None, description="Parent checkpoint id (lineage).")
    recipe: str | None = Field(None, description="Object: the recipe as JSON.")
    model: dict[str, TensorEntry] = Field(default_factory=dict, description="model.state_dict() tensors.")
    optimizer: dict[str, TensorEntry] = Field(
        default_factory=dict, description="Optimizer state tensors, named state.<param index>.<key>.")
    optimizer_extra: dict[str, Any] = Field(
        default_factory=dict, description="Non-tensor optimizer state values, named like `optimizer`.")
    optimizer_groups: list[dict[str, Any]] = Field(default_factory=list, description="param_groups (JSON).")
    state: dict[str, Any] = Field(default_factory=dict, description="Trainer state (JSON).")
    state_tensors: dict[str, TensorEntry] = Field(default_factory=dict, description="e.g. RNG states.")
    metrics: str | None = Field(None, description="Object: JSON list of per-step dicts since the parent.")
    summary: dict[str, float] = Field(
        default_factory=dict, description="Headline numbers; `npo ls` shows 'reward' and 'eval/accuracy'.")
    guide: str | None = Field(None, description="Guide checkpoint id when NPO was on.")
    events: list[dict[str, Any]] = Field(default_factory=list, description="Decision records (AutoNPO...).")
    created: str = Field(default_factory=lambda: _now_iso(), description="UTC time of the save.")
    npo_version: str = __version__
    model_config_oid: str | None = Field(
        None, alias="model_config", description="Object: the HF model config JSON.")
    tokenizer: dict[str, str] = Field(default_factory=dict, description="Tokenizer file name -> object.")

    def tensor_bytes(self) -> int:
        return sum(e.nbytes for d in (self.model, self.optimizer, self.state_tensors) for e in d.values())

    def objects(self) -> dict[str, str]:
        """Every object this manifest names (oid -> what it is), excluding parent/guide checkpoints."""
        out: dict[str, str] = {}
        for kind, entries in (("model", self.model), ("optimizer", self.optimizer),
                              ("state_tensors", self.state_tensors)):
            for name, e in entries.items():
                for oid in e.oids():
                    out[oid] = f"{kind} tensor {name}"
        for what, oid in (("recipe", self.recipe), ("metrics", self.metrics),
                          ("model config", self.model_config_oid)):
            if oid:
                out[oid] = what
        for name, oid in self.tokenizer.items():
            out[oid] = f"tokenizer file {name}"
        for oid in _listed_oids(self.state.get("objects")):
            out[oid] = "object listed in state.objects"
        for i, ev in enumerate(self.events):
            for oid in _listed_oids(ev.get("objects") if isinstance(ev, dict) else None):
                out[oid] = f"object listed in events[{i}].objects"
        return out

    def to_bytes(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()


def _listed_oids(v) -> list[str]:
    vals = v.values() if isinstance(v, dict) else v if isinstance(v, list) else []
    return [x for x in vals if isinstance(x, str) and _OID.fullmatch(x)]


def _now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------ refs

def check_name(kind: str, name: str) -> str:
    """Run and branch names become path components: letters, digits, '.', '_', '-' only."""
    if not name:
        raise NpoError(f"empty {kind} name")
    if not _NAME.fullmatch(name) or ".." in name:
        raise NpoError(f"invalid {kind} name {name!r}: use letters, digits, '.', '_' and '-' "
                       "(start with a letter or digit, no '/' or '..', at most 100 characters)")
    return name


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
    prefix = run.lower() if not slash and not at and _HEX.fullmatch(run.lower()) else None
    return Ref(run=run, branch=branch if slash else None, step=step, prefix=prefix)


# ------------------------------------------------------------------------------------------ backends
# Two small file layers with the same methods. Paths are relative to the store root, '/'-separated.

class _LocalFS:
    """A directory on this machine: os calls directly (fast, and rename is atomic)."""

    local = True

    def __init__(self, root: str):
        self.root = root

    def _p(self, rel: str) -> str:
        return os.path.join(self.root, *rel.split("/"))

    def _tmp(self) -> str:
        d = os.path.join(self.root, "tmp")
        os.makedirs(d, exist_ok=True)
        return os.path.join(d, f"{os.getpid()}-{uuid.uuid4().hex}")

    def write(self, rel: str, parts: Iterable, exclusive: bool = False) -> bool:
        """Atomically create or replace `rel`. exclusive: fail (return False) if it already exists."""
        try:
            return self._write(rel, parts, exclusive)
        except OSError as e:  # not writable, not a folder, disk full: the user's choice of folder, not a bug
            fix = ("free space (or raise the file-size limit), then resume" if e.errno in _FULL else
                   "pick a writable folder with --store or NPO_STORE")
            raise NpoError(f"cannot use store {self.root}: {os_reason(e)}; {fix}") from None

    def _write(self, rel: str, parts: Iterable, exclusive: bool) -> bool:
        tmp, dst = self._tmp(), self._p(rel)
        try:
            with open(tmp, "wb", buffering=0) as f:
                for part in parts:  # a raw write may be short (disk full, a file-size limit): finish each
                    view = memoryview(part).cast("B")
                    while view:
                        n = f.write(view)
                        if not n:
                            raise OSError(errno.ENOSPC, "no space left on device")
                        view = view[n:]
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if exclusive:
                try:
                    os.link(tmp, dst)  # atomic create-if-absent, with the full content already there
                except FileExistsError:
                    return False
                return True
            os.replace(tmp, dst)
            return True
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def read(self, rel: str) -> bytes:
        with open(self._p(rel), "rb") as f:
            return f.read()

    def read_mapped(self, rel: str):
        """A private copy-on-write mapping of the file: no read copy, and page-cache pages are shared.
        Safe because objects are immutable and replaced only by rename (a mapping keeps its inode)."""
        with open(self._p(rel), "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return bytearray()
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)

    def read_head(self, rel: str, n: int) -> bytes:
        with open(self._p(rel), "rb") as f:
            return f.read(n)

    def chunks(self, rel: str, size: int = 8 << 20):
        with open(self._p(rel), "rb", buffering=0) as f:
            while b := f.read(size):
                yield b

    def size(self, rel: str) -> int | None:
        try:
            return os.stat(self._p(rel)).st_size
        except FileNotFoundError:
            return None

    def touch(self, rel: str) -> None:
        """A reused object is fresh again: gc keeps recent objects (a writer may not have written its ref)."""
        try:
            os.utime(self._p(rel))
        except OSError:
            pass

    def listdir(self, rel: str) -> list[str]:
        try:
            return sorted(os.listdir(self._p(rel)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def remove(self, rel: str) -> None:
        try:
            os.unlink(self._p(rel))
        except FileNotFoundError:
            pass

    def objects(self) -> dict[str, tuple[int, float]]:
        out = {}
        for d in self.listdir("objects"):
            with os.scandir(self._p(f"objects/{d}")) as it:
                for e in it:
                    st = e.stat()
                    out[d + e.name] = (st.st_size, st.st_mtime)
        return out

    def clean_tmp(self, older_than: float) -> int:
        n = 0
        for name in self.listdir("tmp"):
            p = self._p(f"tmp/{name}")
            try:
                if time.time() - os.stat(p).st_mtime > older_than:
                    os.unlink(p)
                    n += 1
            except FileNotFoundError:
                pass
        return n


class _RemoteFS:
    """Any other fsspec filesystem (S3, memory). Each write is one `pipe_file`: one PUT on S3."""

    local = False

    def __init__(self, fs, root: str):
        self.fs, self.root = fs, root.rstrip("/")
        self.s3 = "s3" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))

    def _p(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def write(self, rel: str, parts: Iterable, exclusive: bool = False) -> bool:
        data = b"".join(parts)  # one copy (memoryviews are joined directly)
        if exclusive:
            if self.s3:
                try:  # conditional PUT (If-None-Match: *): atomic create-if-absent on S3
                    self.fs.pipe_file(self._p(rel), data, mode="create")
                    return True
                except FileExistsError:
                    return False
            if self.fs.exists(self._p(rel)):
                return False
        self.fs.pipe_file(self._p(rel), data)
        return True

    def read(self, rel: str) -> bytes:
        return self.fs.cat_file(self._p(rel))

    def read_mapped(self, rel: str) -> bytearray:
        return bytearray(self.read(rel))  # writable, so tensors can view it

    def read_head(self, rel: str, n: int) -> bytes:
        return self.fs.cat_file(self._p(rel), start=0, end=n)

    def chunks(self, rel: str, size: int = 8 << 20):
        with self.fs.open(self._p(rel), "rb", block_size=size) as f:
            while b := f.read(size):
                yield b

    def size(self, rel: str) -> int | None:
        if self.s3:  # one HEAD; fs.exists / fs.size would also LIST to look for a "directory" of that name
            bucket, key, _ = self.fs.split_path(self._p(rel))
            try:
                return int(self.fs.call_s3("head_object", Bucket=bucket, Key=key)["ContentLength"])
            except FileNotFoundError:
                return None
        try:
            return int(self.fs.size(self._p(rel)))
        except FileNotFoundError:
            return None

    def touch(self, rel: str) -> None:
        pass  # S3 has no cheap way to refresh an object's time (see Store.gc)

    def listdir(self, rel: str) -> list[str]:
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._p(rel), detail=False))
        except FileNotFoundError:
            return []

    def remove(self, rel: str) -> None:
        try:
            self.fs.rm_file(self._p(rel))
        except FileNotFoundError:
            pass

    def objects(self) -> dict[str, int]:
        base = self._p("objects").split("://", 1)[-1].strip("/")
        try:
            found = self.fs.find(self._p("objects"), detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for path, info in found.items():
            rel = path.split("://", 1)[-1].strip("/")[len(base):].strip("/")
            if "/" in rel:
                when = info.get("LastModified") or info.get("created") or 0  # S3 / memory
                when = when.timestamp() if isinstance(when, dt.datetime) else float(when)
                out[rel.replace("/", "")] = (int(info.get("size") or 0), when)
        return out

    def clean_tmp(self, older_than: float) -> int:
        return 0  # remote writes never leave temp files


# ------------------------------------------------------------------------------------------ store

def s3_endpoint() -> str | None:
    """The S3 endpoint of every s3:// URL npo opens (stores, prompt and teacher files)."""
    return os.environ.get("NPO_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL") or None


def _s3_fs(url: str):
    import s3fs

    endpoint = s3_endpoint()
    # Small timeouts and one botocore attempt: an unreachable endpoint fails in about a second with
    # a clear message instead of minutes of retries. s3fs still retries transient errors itself.
    fs = s3fs.S3FileSystem(
        endpoint_url=endpoint or None, skip_instance_cache=True, use_listings_cache=False,
        config_kwargs={"connect_timeout": 3, "read_timeout": 60, "retries": {"max_attempts": 2}},
    )
    bucket = url[len("s3://"):].split("/", 1)[0]
    if not bucket:
        raise NpoError(f"store URL {url!r} names no bucket; use s3://BUCKET/PREFIX")
    where = f" at {endpoint}" if endpoint else ""
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:
        raise NpoError(f"S3 bucket {bucket!r} not found{where} (create it, or fix --store)") from None
    except PermissionError as e:
        raise NpoError(f"S3 bucket {bucket!r}{where}: access denied ({one_line(e)})") from None
    except Exception as e:  # noqa: BLE001  (connection refused, DNS, no credentials...)
        raise NpoError(f"cannot reach the S3 store {url}{where}: {one_line(e)} "
                       "(check $NPO_S3_ENDPOINT / $AWS_ENDPOINT_URL and credentials)") from None

    def quiet_orphans(loop, context):
        # requests abandoned when the endpoint went away die later in s3fs's loop; the error that stopped
        # the command already says so, and their tracebacks would bury it
        if context.get("message") != "Task exception was never retrieved":
            loop.default_exception_handler(context)

    fs.loop.set_exception_handler(quiet_orphans)
    return fs


class Store:
    """Objects, refs and leases under one root. Open with `Store.open(url)`."""

    def __init__(self, url: str, io):
        self.url, self.io = url, io
        self._manifests: dict[str, Manifest] = {}  # content-addressed, so never stale

    @classmethod
    def open(cls, url: str | None = None, must_exist: bool = False) -> Store:
        """None -> $NPO_STORE -> ./checkpoints. Paths, file://, s3://bucket/prefix, memory://, other fsspec.
        must_exist: a local folder that is not there is an error (a mistyped --store), not an empty store;
        for commands that only read. Remote stores are not checked (an S3 prefix exists once written)."""
        url = url or os.environ.get("NPO_STORE") or "./checkpoints"
        url = url.removeprefix("file://")
        if "://" not in url:
            root = os.path.abspath(os.path.expanduser(url))
            if os.path.exists(root) and not os.path.isdir(root):
                raise NpoError(f"store path {root} is a file, not a directory")
            if must_exist and not os.path.isdir(root):
                raise NpoError(f"no store at {root}; check --store / $NPO_STORE")
            return cls(root, _LocalFS(root))
        if url.startswith("s3://"):
            return cls(url.rstrip("/"), _RemoteFS(_s3_fs(url), url.rstrip("/")))
        import fsspec

        try:
            fs, root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as e:
            raise NpoError(f"cannot open store {url!r}: {one_line(e)}") from None
        return cls(url.rstrip("/"), _RemoteFS(fs, root))

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # ---------------------------------------------------------------- objects

    @staticmethod
    def _opath(oid: str) -> str:
        return f"objects/{oid[:2]}/{oid[2:]}"

    def has(self, oid: str) -> bool:
        return self.io.size(self._opath(oid)) is not None

    def put_parts(self, parts: list) -> tuple[str, bool]:
        """Store the concatenation of `parts` (bytes / memoryviews, not copied); -> (oid, newly written)."""
        h = hashlib.sha256()
        size = 0
        for p in parts:
            h.update(p)  # releases the GIL for large buffers: a thread pool hashes in parallel
            size += memoryview(p).nbytes
        oid = h.hexdigest()
        path = self._opath(oid)
        # dedup: the same bytes are already stored, unless that copy is damaged (a short write before
        # this version, a flipped bit); a small one is re-hashed, a large one only has its size checked
        if self.io.size(path) == size and (size > _REHASH_UP_TO or self.hash_object(oid) == oid):
            self.io.touch(path)
            return oid, False
        self.io.write(path, parts)
        return oid, True

    def put_bytes(self, b: bytes) -> str:
        return self.put_parts([b])[0]

    def put_json(self, obj: Any) -> str:
        return self.put_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())

    def get_bytes(self, oid: str, context: str = "", mapped: bool = False) -> bytes:
        """The object's bytes, after checking their SHA-256. context: e.g. 'checkpoint run@3' for errors.
        mapped: a writable buffer that may be a copy-on-write file mapping (local stores; for tensors)."""
        if not _OID.fullmatch(oid or ""):
            raise NpoError(f"invalid object id {oid!r}{_ctx(context)}")
        try:
            data = (self.io.read_mapped if mapped else self.io.read)(self._opath(oid))
        except FileNotFoundError:
            raise NpoError(f"object {oid[:16]} is missing from the store{_ctx(context)}; "
                           "run `npo verify`") from None
        if hashlib.sha256(data).hexdigest() != oid:
            raise NpoError(f"object {oid[:16]} is corrupt (SHA-256 mismatch){_ctx(context)}; refusing to "
                           "load it (run `npo verify`)")
        return data

    def get_json(self, oid: str, context: str = "") -> Any:
        data = self.get_bytes(oid, context)
        try:
            return json.loads(bytes(data))
        except ValueError:
            raise NpoError(f"object {oid[:16]} is not JSON{_ctx(context)}") from None

    def objects(self) -> dict[str, int]:
        """Every object in the store: oid -> size in bytes."""
        return {oid: size for oid, (size, _) in self.io.objects().items()}

    def hash_object(self, oid: str) -> str:
        h = hashlib.sha256()
        for b in self.io.chunks(self._opath(oid)):
            h.update(b)
        return h.hexdigest()

    # ---------------------------------------------------------------- refs

    def runs(self) -> list[str]:
        """Runs with at least one branch ref (listed, not read: one damaged ref must not hide every run)."""
        return [r for r in self.io.listdir("runs") if _NAME.fullmatch(r)
                and any(_NAME.fullmatch(b) for b in self.io.listdir(f"runs/{r}/branches"))]

    def branches(self, run: str) -> dict[str, str]:
        check_name("run", run)
        out = {}
        for b in self.io.listdir(f"runs/{run}/branches"):
            if _NAME.fullmatch(b):
                cid = self._read_ref(run, b)
                if cid:
                    out[b] = cid
        return out

    def _read_ref(self, run: str, branch: str) -> str | None:
        try:
            cid = bytes(self.io.read(f"runs/{run}/branches/{branch}")).decode().strip()
        except (FileNotFoundError, NotADirectoryError):  # NotADirectory: the store path runs through a file
            return None
        if not _OID.fullmatch(cid):
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
        if not _OID.fullmatch(cid):
            raise NpoError(f"invalid checkpoint id {cid!r}")
        if not self.io.write(f"runs/{run}/branches/{branch}", [f"{cid}\n".encode()], exclusive=create):
            raise NpoError(f"branch {run}/{branch} already exists; pick another name with --branch")

    def branch(self, ref: str, name: str, run: str | None = None) -> str:
        """New branch `run/name` whose head is `ref` (run defaults to the ref's run). Writes one ref."""
        check_name("branch", name)
        cid = self.resolve(ref)
        run = run or self._ref_run(ref, cid)
        check_name("run", run)
        self.set_ref(run, name, cid, create=True)
        return cid

    def drop_branch(self, run: str, branch: str, cid: str) -> None:
        """Remove run/branch while it still points at `cid` (its objects are left to gc)."""
        if self.head(run, branch) == cid:
            self.io.remove(f"runs/{run}/branches/{branch}")

    def _ref_run(self, ref: str, cid: str) -> str:
        r = parse_ref(ref)
        if r.prefix is None or r.run in self.runs():
            return r.run
        return self.manifest(cid).run

    # ---------------------------------------------------------------- checkpoints

    def manifest(self, ref_or_id: str) -> Manifest:
        cid = ref_or_id if _OID.fullmatch(ref_or_id or "") else self.resolve(ref_or_id)
        if cid in self._manifests:
            return self._manifests[cid]
        data = self.get_bytes(cid, f"checkpoint {cid[:12]}")
        if not bytes(data[:len(_MANIFEST_MAGIC)]) == _MANIFEST_MAGIC:
            raise NpoError(f"object {cid[:16]} is not a checkpoint manifest")
        try:
            m = Manifest.model_validate_json(bytes(data))
        except ValidationError as e:
            raise NpoError(f"checkpoint {cid[:12]} has an invalid manifest: {one_line(e)}") from None
        m.id = cid
        self._manifests[cid] = m
        return m

    def lineage(self, ref: str) -> list[Manifest]:
        """The checkpoint and its ancestors, newest first."""
        return list(self._walk(self.resolve(ref)))

    def _walk(self, cid: str | None) -> Iterator[Manifest]:
        """Manifests from cid back along the parents, each read only when the walk reaches it."""
        seen = set()
        while cid and cid not in seen:
            seen.add(cid)
            m = self.manifest(cid)
            yield m
            cid = m.parent

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
        return next((m.id for m in self._walk(head) if m.step == step), None)

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
            return self.io.read_head(self._opath(oid), len(_MANIFEST_MAGIC)) == _MANIFEST_MAGIC
        except FileNotFoundError:
            return False

    def describe(self, cid: str) -> str:
        """'run/branch@step (id)' for messages."""
        try:
            m = self.manifest(cid)
            return f"{m.run}/{m.branch}@{m.step} ({cid[:12]})"
        except NpoError:
            return cid[:12]

    # ---------------------------------------------------------------- leases

    def lease(self, run: str, branch: str, force: bool = False, ttl: float | None = None) -> Lease:
        """Context manager: the one writer of run/branch. NpoError naming the holder if it is taken."""
        return Lease(self, run, branch, force=force, ttl=ttl)

    def read_lease(self, run: str, branch: str) -> dict | None:
        try:
            return json.loads(bytes(self.io.read(f"runs/{run}/leases/{branch}.json")))
        except FileNotFoundError:
            return None
        except ValueError:
            return {"host": "?", "pid": -1, "since": "?", "expiry": 0, "token": "damaged"}

    def leases(self) -> list[tuple[str, str, dict]]:
        out = []
        for run in self.io.listdir("runs"):
            if not _NAME.fullmatch(run):
                continue
            for f in self.io.listdir(f"runs/{run}/leases"):
                if f.endswith(".json"):
                    info = self.read_lease(run, f[:-5])
                    if info:
                        out.append((run, f[:-5], info))
        return out

    def check_writer(self, run: str, branch: str) -> None:
        """Refuse a save when another live process holds the branch lease (or ours was lost)."""
        info = self.read_lease(run, branch)
        mine = _MY_LEASES.get((self.url, run, branch))
        if mine is not None and (info is None or info.get("token") != mine):
            raise NpoError(f"lost the lease on {run}/{branch}" + (f" to {_holder(info)}" if info else "")
                           + "; stopping without writing")
        if info and mine is None and lease_state(info) == "live":
            raise NpoError(f"branch {run}/{branch} is being written by {_holder(info)}; "
                           "wait for it to finish or use another branch")

    # ---------------------------------------------------------------- guide cache (npo_cli/guide.py)

    def cache_get(self, guide: str, key: str) -> str | None:
        """Object id of guide checkpoint `guide`'s cache entry `key` (both 64-hex), or None."""
        try:
            oid = bytes(self.io.read(f"guides/{guide}/{key}")).decode().strip()
        except FileNotFoundError:
            return None
        return oid if _OID.fullmatch(oid) else None

    def cache_put(self, guide: str, key: str, oid: str) -> None:
        """Point cache entry `key` of `guide` at object `oid` (atomic replace; write the object first)."""
        if not all(_OID.fullmatch(x or "") for x in (guide, key, oid)):
            raise NpoError("guide cache names must be 64-hex ids")
        self.io.write(f"guides/{guide}/{key}", [f"{oid}\n".encode()])

    def cache_entries(self, guide: str) -> dict[str, str]:
        """key -> entry object id, for one guide checkpoint."""
        out = {}
        for k in self.io.listdir(f"guides/{guide}"):
            if _OID.fullmatch(k) and (oid := self.cache_get(guide, k)):
                out[k] = oid
        return out

    # ---------------------------------------------------------------- gc / verify

    def reachable(self) -> tuple[dict[str, str], list[str], dict[str, str]]:
        """(oid -> a checkpoint that needs it, problems, guide-cache entry path -> oid): everything
        reachable from the refs."""
        need: dict[str, str] = {}
        problems: list[str] = []
        todo: list[tuple[str, str]] = []
        for run in self.runs():
            try:
                todo += [(cid, f"ref {run}/{b}") for b, cid in self.branches(run).items()]
            except NpoError as e:  # a damaged ref: a problem to report, not a reason to stop looking
                problems.append(str(e))
        while todo:
            cid, via = todo.pop()
            if cid in need:
                continue
            need[cid] = cid
            try:
                m = self.manifest(cid)
            except NpoError as e:
                problems.append(f"checkpoint {cid[:12]} (from {via}): {e}")
                continue
            for oid in m.objects():
                need.setdefault(oid, cid)
            label = f"{m.run}/{m.branch}@{m.step}"
            for what, nxt in (("parent", m.parent), ("guide", m.guide)):
                if nxt:
                    todo.append((nxt, f"{what} of {label}"))
        # guide-cache entries live as long as their guide checkpoint is reachable
        cache = {f"guides/{g}/{k}": oid for g in self.io.listdir("guides") if g in need
                 for k, oid in self.cache_entries(g).items()}
        for path, oid in cache.items():
            need.setdefault(oid, path)
        return need, problems, cache

    def verify(self) -> dict:
        """Re-hash every object and check every reachable manifest's references."""
        need, problems, _ = self.reachable()
        present = self.objects()
        for oid, who in need.items():
            if oid not in present:
                problems.append(f"missing object {oid[:16]} of guide-cache entry {who} (npo gc drops the entry)"
                                if who.startswith("guides/") else
                                f"missing object {oid[:16]} needed by {self.describe(who)}")
        names = sorted(present)
        problems += [f"stray file objects/{o[:2]}/{o[2:]} (not an object name)" for o in names
                     if not _OID.fullmatch(o)]
        names = [o for o in names if _OID.fullmatch(o)]

        def bad(oid: str) -> bool:
            try:
                return self.hash_object(oid) != oid
            except FileNotFoundError:  # removed meanwhile (a concurrent gc)
                return False

        with ThreadPoolExecutor(max(2, min(16, os.cpu_count() or 2))) as ex:  # hashlib drops the GIL
            for oid, is_bad in zip(names, ex.map(bad, names)):
                if is_bad:
                    who = ("unreferenced" if oid not in need else f"guide-cache entry {need[oid]}"
                           if need[oid].startswith("guides/") else f"needed by checkpoint {self.describe(need[oid])}")
                    problems.append(f"corrupt object {oid[:16]}: SHA-256 mismatch ({who})")
        checkpoints = sum(1 for oid, who in need.items() if oid == who)
        return {"ok": not problems, "objects": len(present), "checkpoints": checkpoints,
                "bytes": sum(present.values()), "problems": problems}

    def gc(self, dry_run: bool = False, force: bool = False, keep_recent: float = GC_KEEP_RECENT) -> dict:
        """Delete objects no ref reaches and older than keep_recent seconds. Refuses while any lease is live
        unless force.

        keep_recent protects writers that hold no lease (import, guide-cache fills, a save between its
        objects and its ref): as in git, young unreachable objects are kept, and a save that reuses an
        object refreshes its time (local stores; on S3 a reused object that gc deletes in the moment
        between the save's check and its ref is the remaining race)."""
        live = [(r, b, i) for r, b, i in self.leases() if lease_state(i) == "live"]
        if live and not force:
            r, b, i = live[0]
            raise NpoError(f"{len(live)} branch(es) are being written ({r}/{b} by {_holder(i)}); "
                           "gc would race them; retry later or pass --force")
        need, problems, cache = self.reachable()
        if problems:
            raise NpoError(f"refusing to gc a damaged store: {problems[0]} (see npo verify)")
        found = self.io.objects()
        now = time.time()
        unreachable = {oid: size for oid, (size, _) in found.items() if oid not in need}
        doomed = {oid: size for oid, size in unreachable.items() if now - found[oid][1] >= keep_recent}
        stale = [path for path, oid in cache.items() if oid not in found]  # a cache entry whose object is gone
        if not dry_run:
            for oid in doomed:
                self.io.remove(self._opath(oid))
            for path in stale:
                self.io.remove(path)
            for g in self.io.listdir("guides"):  # caches of guides that are gone
                if g not in need:
                    for k in self.io.listdir(f"guides/{g}"):
                        self.io.remove(f"guides/{g}/{k}")
            # temp files of killed writers; a young one may belong to a writer without a lease (import)
            self.io.clean_tmp(older_than=min(keep_recent, 0 if force else 3600))
        total = sum(size for size, _ in found.values())
        return {"dry_run": dry_run, "objects": len(doomed), "bytes": sum(doomed.values()),
                "recent_objects": len(unreachable) - len(doomed), "stale_cache_entries": len(stale),
                "kept_objects": len(found) - len(doomed), "kept_bytes": total - sum(doomed.values())}


def _ctx(context: str) -> str:
    return f" ({context})" if context else ""


def _steps(steps: list[int]) -> str:
    if not steps:
        return "none"
    s = ", ".join(map(str, steps[:12]))
    return s + (f", … {steps[-1]}" if len(steps) > 12 else "")


# ------------------------------------------------------------------------------------------ leases

_MY_LEASES: dict[tuple[str, str, str], str] = {}  # (store url, run, branch) -> token, held by this process
DEFAULT_TTL = 600.0  # seconds; the holder renews every ttl/3, so "expired" means the holder stopped


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed but unreaped child is a zombie: gone for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def lease_state(info: dict) -> Literal["live", "dead", "expired"]:
    """live: a writer may be running. dead: its process on this host is gone. expired: not renewed."""
    if float(info.get("expiry", 0)) < time.time():
        return "expired"
    if info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", -1))):
        return "dead"
    return "live"


def _holder(info: dict) -> str:
    return f"host {info.get('host')} pid {info.get('pid')} since {info.get('since')}"


class Lease:
    """One writer per branch. `with store.lease(run, branch):` acquires, renews in the background,
    and releases on exit. An expired lease is taken over; a dead one (same host, process gone) or one
    held on another host is broken only with force; a live process on this host is never overridden."""

    def __init__(self, store: Store, run: str, branch: str, force: bool = False, ttl: float | None = None):
        self.store, self.force = store, force
        self.run, self.branch = check_name("run", run), check_name("branch", branch)
        self.ttl = float(ttl or os.environ.get("NPO_LEASE_TTL") or DEFAULT_TTL)
        self.rel = f"runs/{run}/leases/{branch}.json"
        self.token = uuid.uuid4().hex
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "since": self.since,
                "expiry": time.time() + self.ttl, "token": self.token}

    def acquire(self) -> Lease:
        self.since = _now_iso()
        key = (self.store.url, self.run, self.branch)
        for _ in range(3):
            data = json.dumps(self._record()).encode()
            if self.store.io.write(self.rel, [data], exclusive=True):
                held = self.store.read_lease(self.run, self.branch)
                if held and held.get("token") == self.token:  # guards backends without atomic create
                    _MY_LEASES[key] = self.token
                    return self
                continue
            info = self.store.read_lease(self.run, self.branch)
            if info is None:
                continue  # released meanwhile: try again
            state = lease_state(info)
            who = f"branch {self.run}/{self.branch} is leased by {_holder(info)}"
            if info.get("token") == _MY_LEASES.get(key):
                raise NpoError(f"{who} (this process already holds it)")
            if state == "live" and info.get("host") == socket.gethostname():
                raise NpoError(f"{who}, which is still running; stop it first")
            if state == "live" and not self.force:
                raise NpoError(f"{who} (expires {_fmt_ts(info.get('expiry'))}); if that process is gone, "
                               "pass --force to break the lease")
            if state == "dead" and not self.force:
                raise NpoError(f"{who}, but that process is gone; pass --force to break the lease")
            # expired, or dead/remote with force: break it, then race for a fresh exclusive create
            if self.store.read_lease(self.run, self.branch) == info:
                self.store.io.remove(self.rel)
        raise NpoError(f"could not take the lease on {self.run}/{self.branch} (another writer keeps "
                       "taking it); retry")

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                info = self.store.read_lease(self.run, self.branch)
                if not info or info.get("token") != self.token:
                    self.lost = True
                    return
                self.store.io.write(self.rel, [json.dumps(self._record()).encode()])
            except Exception:  # noqa: BLE001, S112  a store hiccup (network, full disk): retry at the next tick.
                continue  # If it outlasts the lease and another writer takes over, the check above sees it.

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        _MY_LEASES.pop((self.store.url, self.run, self.branch), None)
        info = self.store.read_lease(self.run, self.branch)
        if info and info.get("token") == self.token:
            self.store.io.remove(self.rel)

    def __enter__(self) -> Lease:  # noqa: PYI034  (typing.Self needs Python 3.11)
        self.acquire()
        self._thread = threading.Thread(target=self._renew, daemon=True, name=f"lease-{self.run}/{self.branch}")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.release()
        except Exception:
            if exc[0] is None:
                raise
            # The store failed under the writer (network, disk): the error that stopped it says why;
            # the lease left behind expires, or --force breaks it.


def _fmt_ts(ts) -> str:
    try:
        return dt.datetime.fromtimestamp(float(ts), dt.timezone.utc).isoformat(timespec="seconds")
    except (TypeError, ValueError):
        return "?"
