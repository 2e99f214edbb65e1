"""Leases: one writer per branch of a run.

A lease is a JSON file `runs/<run>/leases/<branch>.json` in the store (host, pid, pid_ns, since, expiry,
token), created with an atomic create-if-absent write and renewed in the background while its holder
runs. It is not a ref (it names no object) and gc ignores it, except that gc refuses to run while any
lease is live (it would race the writer). A lease whose holder is provably gone (this host and pid
namespace, and its pid is absent or now names a process started after the lease) is taken over like an
expired one; one held on another host is broken only with --force.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shlex
import socket
import threading
import time
import uuid
from typing import Literal

from npo_cli.errors import NpoError
from npo_cli.objects import NAME_RE, ObjectStore, check_name, now_iso

_MY_LEASES: dict[tuple[str, str, str], str] = {}  # (store url, run, branch) -> token, held by this process
DEFAULT_TTL = 600.0  # seconds; the holder renews every ttl/3, so "expired" means the holder stopped
PID_REUSE_SLACK = 3.0  # seconds: `since` is whole seconds and /proc's boot time too; a holder starts before it


class LeaseHeldElsewhere(NpoError):
    """A live-looking lease held on another host: only --force breaks it (the CLI prints the command)."""


def npo_command(*args: str, store: str | None) -> str:
    """`npo ARGS --store STORE` quoted for a shell, to print as a hint that works as printed from this working
    directory; --store is left out only for ./checkpoints while $NPO_STORE is unset (what npo opens then)."""
    if store and not (store == os.path.abspath("checkpoints") and not os.environ.get("NPO_STORE")):
        args = (*args, "--store", store)
    return shlex.join(["npo", *args])


def _pid_namespace() -> str:
    """This kernel boot and pid namespace: where a lease's pid means a process (containers share hostnames)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f"{f.read().strip()} {os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


PID_NS = _pid_namespace()


def _path(run: str, branch: str) -> str:
    return f"runs/{run}/leases/{branch}.json"


def pid_alive(pid: int) -> bool:
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


def _started(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch; None where /proc cannot say)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[-1].split()[19])  # field 22, starttime: clock ticks after boot
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _on_this_host(info: dict) -> bool:
    """Whether the lease's pid names a process we can see (a lease written before pid_ns counts by host)."""
    return info.get("host") == socket.gethostname() and info.get("pid_ns", PID_NS) == PID_NS


def _holder_gone(info: dict) -> bool:
    """The holder on this host has exited: its pid is absent, or a process started after the lease reuses it."""
    pid = int(info.get("pid", -1))
    if not pid_alive(pid):
        return True
    try:
        since = dt.datetime.fromisoformat(str(info.get("since"))).timestamp()
    except ValueError:
        return False
    started = _started(pid)
    return started is not None and started > since + PID_REUSE_SLACK


def lease_state(info: dict) -> Literal["live", "dead", "expired"]:
    """live: a writer may be running. dead: its process on this host is gone. expired: not renewed."""
    if float(info.get("expiry", 0)) < time.time():
        return "expired"
    if _on_this_host(info) and _holder_gone(info):
        return "dead"
    return "live"


def holder(info: dict) -> str:
    return f"host {info.get('host')} pid {info.get('pid')} since {info.get('since')}"


def _fmt_ts(ts) -> str:
    try:
        return dt.datetime.fromtimestamp(float(ts), dt.timezone.utc).isoformat(timespec="seconds")
    except (TypeError, ValueError):
        return "?"


def read_lease(store: ObjectStore, run: str, branch: str) -> dict | None:
    """The lease record of run/branch, None if it has none."""
    try:
        return json.loads(bytes(store.io.read(_path(run, branch))))
    except FileNotFoundError:
        return None
    except ValueError:
        return {"host": "?", "pid": -1, "since": "?", "expiry": 0, "token": "damaged"}


def leases(store: ObjectStore) -> list[tuple[str, str, dict]]:
    """(run, branch, record) of every lease in the store, live or not."""
    out = []
    for run in store.io.listdir("runs"):
        if not NAME_RE.fullmatch(run):
            continue
        for f in store.io.listdir(f"runs/{run}/leases"):
            if f.endswith(".json"):
                info = read_lease(store, run, f[:-5])
                if info:
                    out.append((run, f[:-5], info))
    return out


def _lost(run: str, branch: str, info: dict | None) -> NpoError:
    return NpoError(f"lost the lease on {run}/{branch}" + (f" to {holder(info)}" if info else "")
                    + "; stopping without writing")


def check_writer(store: ObjectStore, run: str, branch: str) -> None:
    """Refuse a save when another live process holds the branch lease (or ours was lost)."""
    info = read_lease(store, run, branch)
    mine = _MY_LEASES.get((store.url, run, branch))
    if mine is not None and (info is None or info.get("token") != mine):
        raise _lost(run, branch, info)
    if info and mine is None and lease_state(info) == "live":
        raise NpoError(f"branch {run}/{branch} is being written by {holder(info)}; "
                       "wait for it to finish or use another branch")


class Lease:
    """One writer per branch. `with Lease(store, run, branch):` acquires, renews in the background,
    and releases on exit. An expired or dead lease (this host, its process gone) is taken over; one held
    on another host is broken only with force; a live process on this host is never overridden."""

    def __init__(self, store: ObjectStore, run: str, branch: str, force: bool = False,
                 ttl: float | None = None):
        self.store, self.force = store, force
        self.run, self.branch = check_name("run", run), check_name("branch", branch)
        self.ttl = float(ttl or os.environ.get("NPO_LEASE_TTL") or DEFAULT_TTL)
        self.rel = _path(run, branch)
        self.token = uuid.uuid4().hex
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "pid_ns": PID_NS, "since": self.since,
                "expiry": time.time() + self.ttl, "token": self.token}

    def _read(self) -> dict | None:
        return read_lease(self.store, self.run, self.branch)

    def acquire(self) -> Lease:
        self.since = now_iso()
        key = (self.store.url, self.run, self.branch)
        for _ in range(3):
            data = json.dumps(self._record()).encode()
            if self.store.io.write(self.rel, [data], exclusive=True):
                held = self._read()
                if held and held.get("token") == self.token:  # guards backends without atomic create
                    _MY_LEASES[key] = self.token
                    return self
                continue
            info = self._read()
            if info is None:
                continue  # released meanwhile: try again
            state = lease_state(info)
            who = f"branch {self.run}/{self.branch} is leased by {holder(info)}"
            if info.get("token") == _MY_LEASES.get(key):
                raise NpoError(f"{who} (this process already holds it)")
            if state == "live" and _on_this_host(info):
                raise NpoError(f"{who}, which is still running; stop it first")
            if state == "live" and not self.force:
                raise LeaseHeldElsewhere(f"{who} (expires {_fmt_ts(info.get('expiry'))}); if that process "
                                         "is gone, break the lease with --force")
            # expired, dead (its process is gone), or elsewhere with force: break it, then race for a fresh
            # exclusive create
            if self._read() == info:
                self.store.io.remove(self.rel)
        raise NpoError(f"could not take the lease on {self.run}/{self.branch} (another writer keeps "
                       "taking it); retry")

    def check(self) -> None:
        """Raise unless the store still holds this lease (a writer paused past its lease lost it)."""
        info = self._read()
        if self.lost or not info or info.get("token") != self.token:
            self.lost = True
            raise _lost(self.run, self.branch, info)

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                info = self._read()
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
        info = self._read()
        if info and info.get("token") == self.token:
            self.store.io.remove(self.rel)

    def __enter__(self) -> Lease:  # noqa: PYI034  (typing.Self needs Python 3.11)
        self.acquire()
        self._thread = threading.Thread(target=self._renew, daemon=True, name=f"lease-{self.run}/{self.branch}")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if exc[1] is not None and not hasattr(exc[1], "npo_writing"):
            # the branch this error stopped writing, for the CLI's resume hint (a store that went away)
            with contextlib.suppress(AttributeError):
                exc[1].npo_writing = (self.store.url, self.run, self.branch)
        try:
            self.release()
        except Exception:
            if exc[0] is None:
                raise
            # The store failed under the writer (network, disk): the error that stopped it says why;
            # the lease left behind expires, or --force breaks it.
