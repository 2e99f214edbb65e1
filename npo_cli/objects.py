"""The object store: immutable content-addressed objects plus small mutable named refs, like git.

    npo-store.json     the marker: {"format": 1}, written with the store's first write; npo writes and
                       deletes only under a root that has it (see `ObjectStore.claim`)
    objects/ab/cdef…   an object; its name is the SHA-256 of its bytes
    <ref name>         a ref: a file holding one object id and a newline; names are '/'-separated
                       path components (letters, digits, '.', '_', '-'), outside objects/ and tmp/
    tmp/               local temp files, renamed into place when complete

The root is any fsspec URL: a path, file://, s3://bucket/prefix, memory://. Two small file layers
below (`_LocalFS`, `_RemoteFS`) give both the same methods; the store reaches them through `_Claimed`,
so nothing is written or deleted before `ObjectStore.claim` has checked the root. Every single write is
atomic: temp file + rename on a local disk, one PUT on S3 (objects above 100 MB go up as one multipart
upload, which S3 also makes visible only when it completes). We do not fsync: the store survives a killed process (the
page cache survives it) but not necessarily a power cut.

This module knows nothing of what objects hold or what refs mean (npo_cli/store.py: checkpoints and
branches; npo_cli/gc.py: what is reachable).
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import mmap
import os
import re
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any, TypeVar

from npo_cli.errors import NpoError, one_line, os_reason

OID_RE = re.compile(r"[0-9a-f]{64}")  # an object id
HEX_RE = re.compile(r"[0-9a-f]{6,64}")  # an object id or a prefix of one
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # one path component of a ref name
_RESERVED = ("objects", "tmp")  # top-level folders that hold no refs
MARKER = "npo-store.json"  # at the root of every store: {"format": STORE_FORMAT}
STORE_FORMAT = 1  # the layout this npo reads and writes; a store with a larger format is refused
_REHASH_UP_TO = 1 << 20  # bytes: an existing object this small is re-hashed before a save reuses it
_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # a write error that more room fixes
_S = TypeVar("_S", bound="ObjectStore")


def is_oid(s: object) -> bool:
    return isinstance(s, str) and OID_RE.fullmatch(s) is not None


def check_name(kind: str, name: str) -> str:
    """Run and branch names become path components: letters, digits, '.', '_', '-' only."""
    if not name:
        raise NpoError(f"empty {kind} name")
    if not _valid_name(name):
        raise NpoError(f"invalid {kind} name {name!r}: use letters, digits, '.', '_' and '-' "
                       "(start with a letter or digit, no '/' or '..', at most 100 characters)")
    return name


def _valid_name(name: str) -> bool:
    return NAME_RE.fullmatch(name) is not None and ".." not in name


def oid_at(path: str) -> str | None:
    """The object id a file under objects/ holds: 'ab/cdef…' (2 + 62 hex digits) -> 'abcdef…'; None for any
    other name (not an object: npo neither wrote it nor deletes it)."""
    folder, _, name = path.partition("/")
    return folder + name if len(folder) == 2 and is_oid(folder + name) else None


def now_iso() -> str:
    """The current UTC time, to the second, for records people read."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _ctx(context: str) -> str:
    return f" ({context})" if context else ""


# ------------------------------------------------------------------------------------------ file layers
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

    def remove(self, rel: str) -> bool:
        """True if this call removed the file; False if it was not there."""
        try:
            os.unlink(self._p(rel))
            return True
        except FileNotFoundError:
            return False

    def objects(self) -> dict[str, tuple[int, float]]:
        """Every file under objects/, at any depth: its path there ('ab/cdef…') -> (size, mtime)."""
        base, out = self._p("objects"), {}
        for top, _, files in os.walk(base):
            rel = os.path.relpath(top, base).replace(os.sep, "/")
            for f in files:
                try:
                    st = os.stat(os.path.join(top, f), follow_symlinks=False)
                except FileNotFoundError:  # removed meanwhile (a concurrent gc)
                    continue
                out[f if rel == "." else f"{rel}/{f}"] = (st.st_size, st.st_mtime)
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
        return f"{self.root}/{rel}" if rel else self.root

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
        pass  # S3 has no cheap way to refresh an object's time (see npo_cli/gc.py)

    def listdir(self, rel: str) -> list[str]:
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._p(rel), detail=False))
        except FileNotFoundError:
            return []

    def remove(self, rel: str) -> bool:
        """True if this call removed the file; False if it was not there."""
        if self.size(rel) is None:  # S3 answers a DELETE of a missing key with success
            return False
        try:
            self.fs.rm_file(self._p(rel))
            return True
        except FileNotFoundError:
            return False

    def objects(self) -> dict[str, tuple[int, float]]:
        base = self._p("objects").split("://", 1)[-1].strip("/")
        try:
            found = self.fs.find(self._p("objects"), detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for path, info in found.items():
            rel = path.split("://", 1)[-1].strip("/")[len(base):].strip("/")
            if rel:
                when = info.get("LastModified") or info.get("created") or 0  # S3 / memory
                when = when.timestamp() if isinstance(when, dt.datetime) else float(when)
                out[rel] = (int(info.get("size") or 0), when)
        return out

    def clean_tmp(self, older_than: float) -> int:
        return 0  # remote writes never leave temp files


class _Claimed:
    """A file layer whose writes and deletes wait for `claim` (ObjectStore.claim): npo writes into, and
    deletes from, only a root that is an npo store. Everything else goes straight to the layer."""

    def __init__(self, layer, claim):
        self.layer, self._claim = layer, claim

    def __getattr__(self, name: str):
        return getattr(self.layer, name)

    def write(self, rel: str, parts: Iterable, exclusive: bool = False) -> bool:
        self._claim()
        return self.layer.write(rel, parts, exclusive)

    def remove(self, rel: str) -> bool:
        self._claim()
        return self.layer.remove(rel)

    def clean_tmp(self, older_than: float) -> int:
        self._claim()
        return self.layer.clean_tmp(older_than)


# ------------------------------------------------------------------------------------------ S3

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


# ------------------------------------------------------------------------------------------ the store

class ObjectStore:
    """Objects and refs under one root. Open with `ObjectStore.open(url)` (or a subclass's `open`)."""

    ref_folders: tuple[str, ...] = ()  # the top-level folders of refs a store of this kind writes

    def __init__(self, url: str, io):
        self.url, self.io = url, _Claimed(io, self.claim)
        self._claimed, self._claim_lock = False, threading.Lock()

    @classmethod
    def open(cls: type[_S], url: str | None = None, must_exist: bool = False) -> _S:  # noqa: PYI019  (Self: 3.11)
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
            store = cls(root, _LocalFS(root))
        elif url.startswith("s3://"):
            store = cls(url.rstrip("/"), _RemoteFS(_s3_fs(url), url.rstrip("/")))
        else:
            import fsspec

            try:
                fs, root = fsspec.core.url_to_fs(url)
            except (ImportError, ValueError) as e:
                raise NpoError(f"cannot open store {url!r}: {one_line(e)}") from None
            store = cls(url.rstrip("/"), _RemoteFS(fs, root))
        if store._marker() is None and (name := store._foreign(deep=False)):  # cheap: one read, one listing
            raise store._not_a_store(name)
        return store

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    # ---------------------------------------------------------------- the marker

    def claim(self) -> None:
        """Make sure this root is an npo store before the first write or delete (the file layer calls it).
        A root with npo-store.json is one (unless its format is newer: refused). An empty or new root
        becomes one: the marker is its first file. A root a store made before the marker existed is
        adopted (marked) when everything in it is npo's: only npo's top-level folders, and under
        objects/ only object names. Anything else is refused, and nothing is written or deleted there."""
        if self._claimed:
            return
        with self._claim_lock:
            if not self._claimed and self._marker() is None:
                if name := self._foreign(deep=True):
                    raise self._not_a_store(name)
                data = json.dumps({"format": STORE_FORMAT}).encode() + b"\n"
                if not self.io.layer.write(MARKER, [data], exclusive=True):
                    self._marker()  # another writer marked it meanwhile: check what it wrote
            self._claimed = True

    def _marker(self) -> int | None:
        """The store format npo-store.json records; None if there is none. NpoError if it is damaged or
        newer than this npo."""
        try:
            raw = bytes(self.io.read(MARKER))
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            fmt = json.loads(raw).get("format")
        except (ValueError, AttributeError):
            fmt = None
        if type(fmt) is not int or fmt < 1:
            raise NpoError(f"store {self.url}: {MARKER} is damaged (it should hold {{\"format\": {STORE_FORMAT}}}); "
                           "restore it")
        if fmt > STORE_FORMAT:
            raise NpoError(f"store {self.url} has format {fmt}, made by a newer npo (this one knows format "
                           f"{STORE_FORMAT}); upgrade npo to use it")
        return fmt

    def _foreign(self, deep: bool) -> str | None:
        """For a root without the marker: the first thing in it that npo did not write, or None (an empty
        root, or a store from before the marker). deep: also every name under objects/ (a full listing)."""
        ours = {MARKER, *_RESERVED, *self.ref_folders}
        top = [n for n in self.io.listdir("") if n not in ours]
        if top:
            return top[0]
        return next(iter(self.scan()[1]), None) if deep else None

    def _not_a_store(self, name: str) -> NpoError:
        fix = (f"if it is a store from an older npo, move {name} out of it; else pick" if name.startswith("objects/")
               else "pick an empty folder or")
        return NpoError(f"{self.url} is not an npo store (no {MARKER}, and npo did not write {name}); {fix} "
                        "another store with --store")

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
        # dedup: the same bytes are already stored, unless that copy is damaged (a short write, a
        # flipped bit); a small one is re-hashed, a large one only has its size checked
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
        if not is_oid(oid):
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

    def scan(self) -> tuple[dict[str, tuple[int, float]], list[str]]:
        """What is under objects/: (oid -> (size, mtime) of every object, the paths of the other files,
        e.g. 'objects/ab/x~': strays, which npo never deletes)."""
        found: dict[str, tuple[int, float]] = {}
        strays = []
        for path, info in self.io.objects().items():
            oid = oid_at(path)
            if oid:
                found[oid] = info
            else:
                strays.append(f"objects/{path}")
        return found, sorted(strays)

    def objects(self) -> dict[str, int]:
        """Every object in the store: oid -> size in bytes."""
        return {oid: size for oid, (size, _) in self.scan()[0].items()}

    def hash_object(self, oid: str) -> str:
        h = hashlib.sha256()
        for b in self.io.chunks(self._opath(oid)):
            h.update(b)
        return h.hexdigest()

    def delete_object(self, oid: str) -> bool:
        """Remove an object (gc's job: whatever still names it breaks). True if this call removed it."""
        if not is_oid(oid):
            raise NpoError(f"invalid object id {oid!r}")
        return self.io.remove(self._opath(oid))

    # ---------------------------------------------------------------- refs

    @staticmethod
    def _ref_path(name: str) -> str:
        parts = name.split("/") if isinstance(name, str) else [""]
        if not all(_valid_name(p) for p in parts) or parts[0] in _RESERVED:
            raise NpoError(f"invalid ref name {name!r}: '/'-separated names of letters, digits, '.', '_' "
                           f"and '-', outside {' and '.join(r + '/' for r in _RESERVED)}")
        return name

    def _ref_text(self, name: str) -> str | None:
        """What ref `name` holds (stripped), or None if there is no such ref."""
        try:
            return bytes(self.io.read(self._ref_path(name))).decode(errors="replace").strip()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            # NotADirectory: the path runs through a file; IsADirectory: a folder of refs, not a ref
            return None

    def read_ref(self, name: str) -> str | None:
        """The object id in ref `name`; None if there is no such ref; NpoError if it holds something else."""
        oid = self._ref_text(name)
        if oid is not None and not is_oid(oid):
            raise NpoError(f"ref {name} is damaged (holds {oid[:20]!r}); write an object id into it or "
                           "remove it")
        return oid

    def write_ref(self, name: str, oid: str, create: bool = False) -> bool:
        """Point ref `name` at object `oid` (atomic replace; write the object first). create: only if the
        ref does not exist yet (atomic create-if-absent); returns False, changing nothing, if it does."""
        if not is_oid(oid):
            raise NpoError(f"invalid object id {oid!r} for ref {name}")
        return self.io.write(self._ref_path(name), [f"{oid}\n".encode()], exclusive=create)

    def remove_ref(self, name: str) -> bool:
        """Remove ref `name` (nothing if it is absent; then False); the objects it reached are left to gc."""
        return self.io.remove(self._ref_path(name))

    def list_refs(self, prefix: str) -> list[str]:
        """The names directly under folder `prefix` (refs, or folders of refs), sorted; [] if none.
        E.g. list_refs("runs/r/branches") -> ["main", "rewind-3"]."""
        return [n for n in self.io.listdir(self._ref_path(prefix)) if _valid_name(n)]
