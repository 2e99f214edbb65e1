"""The checkpoint store: round trips, dedup, refs, leases, crash safety, corruption, gc, HF folders."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import random
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from npo_cli import gc
from npo_cli.checkpoint import (
    export,
    import_hf,
    load_metrics,
    load_model,
    load_optimizer,
    load_state_tensors,
    load_tensors,
    save_checkpoint,
    save_tensors,
)
from npo_cli.errors import NpoError
from npo_cli.manifest import Event, Manifest, TrainerState
from npo_cli.store import Ref, Store, parse_ref
from npo_cli.tiny import char_tokenizer, tiny_config

FORK = mp.get_context("fork")


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, for bitwise comparison (NaN payloads, -0.0 included)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def tiny_model(seed: int = 0, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config()).to(dtype)


def du(root: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(root) for f in fs)


@pytest.fixture
def store(tmp_path) -> Store:
    return Store.open(str(tmp_path / "store"))


@pytest.fixture(params=["local", "s3"])
def any_store(request, tmp_path) -> Store:
    if request.param == "local":
        return Store.open(str(tmp_path / "store"))
    return Store.open(request.getfixturevalue("s3_url"))


def save_tiny(store, run="r", branch="main", step=0, model=None, **kw) -> str:
    return save_checkpoint(store, run=run, branch=branch, step=step, model=model or tiny_model(step),
                           tokenizer=char_tokenizer(), **kw)


# ------------------------------------------------------------------------------------------ refs

def test_parse_ref_forms():
    assert parse_ref("run") == Ref("run")
    assert parse_ref("run@12") == Ref("run", step=12)
    assert parse_ref("run/rewind-3") == Ref("run", "rewind-3")
    assert parse_ref("run/b.x_1@0") == Ref("run", "b.x_1", 0)
    assert parse_ref("abcdef12").prefix == "abcdef12"
    assert parse_ref("ABCDEF").prefix == "abcdef"
    assert parse_ref("abcde").prefix is None  # too short to be an id prefix: just a run name


@pytest.mark.parametrize("bad", ["", "@3", "run@", "run@x", "run@-1", "run@1@2", "run/", "/abs", "../x", "a/../b",
                                 "run/a/b", "a..b", ".hidden", "run name", "run\n", "r@1.5", "r/b@", "-x", "é"])
def test_parse_ref_rejects(bad):
    with pytest.raises(NpoError) as e:
        parse_ref(bad)
    assert "\n" not in str(e.value)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=40), st.text(alphabet="ab01f@/._-:~ \n\\", max_size=24)))
def test_parse_ref_fuzz(text):
    try:
        r = parse_ref(text)
    except NpoError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert isinstance(r, Ref)
    assert parse_ref(str(r)) == r  # canonical form parses back to the same ref
    for name in (r.run, r.branch):
        assert name is None or ("/" not in name and ".." not in name and name[0].isalnum())


# ------------------------------------------------------------------------------------------ round trips

def test_tensor_round_trip_bitwise(any_store):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(33, 17, generator=g)
    x[0, 0], x[0, 1] = float("nan"), -0.0
    tensors = {
        "f32": x, "bf16": x.to(torch.bfloat16), "f16": x.to(torch.float16),
        "i64": torch.randint(-2**62, 2**62, (5, 7), generator=g), "u8": torch.get_rng_state(),
        "bool": x > 0, "scalar": torch.tensor(3.25), "empty": torch.zeros(0, 4), "noncontig": x.t(),
    }
    entries = save_tensors(any_store, tensors)
    back = load_tensors(any_store, entries)
    for k, t in tensors.items():
        assert same(back[k], t), k
    back["f32"].add_(1)  # loaded tensors are writable and private to the caller
    assert same(load_tensors(any_store, entries)["f32"], x)


def test_large_tensors_are_chunked_row_blocks(any_store, monkeypatch):
    import npo_cli.checkpoint as ck

    monkeypatch.setattr(ck, "CHUNK_BYTES", 1000)
    g = torch.Generator().manual_seed(1)
    tensors = {"emb": torch.randn(101, 7, generator=g).to(torch.bfloat16), "vec": torch.randn(999, generator=g),
               "small": torch.randn(3, 3, generator=g), "tied": None}
    tensors["tied"] = tensors["emb"]
    entries = save_tensors(any_store, tensors)
    e = entries["emb"]
    assert e.oid == "" and e.chunk_rows == 1000 // 14 and len(e.chunks) == 2
    assert len(entries["vec"].chunks) == 4 and not entries["small"].chunks
    assert entries["tied"] == e
    back = load_tensors(any_store, entries)
    for k, t in tensors.items():
        assert same(back[k], t), k
    assert back["tied"].data_ptr() != back["emb"].data_ptr()
    _, added = ck.save_tensors_stats(any_store, tensors)
    assert added == 0  # chunks dedup like whole tensors


def test_tensor_objects_are_safetensors_files(store):
    from safetensors.torch import load

    t = torch.randn(3, 5).to(torch.bfloat16)
    e = save_tensors(store, {"w": t})["w"]
    assert same(load(bytes(store.get_bytes(e.oid)))["t"], t)


def test_checkpoint_round_trip(any_store):
    model = tiny_model(1, torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(3, 100, (2, 9))
    model(x, labels=x).loss.backward()
    opt.step()
    rng = torch.get_rng_state()
    state = {"step": 7, "pos": 12, "nested": {"a": None, "b": "x"}}
    metrics = [{"step": 6, "reward": 0.25}, {"step": 7, "reward": 0.5}]
    cid = save_tiny(any_store, step=7, model=model, optimizer=opt, state=state, state_tensors={"torch_rng": rng},
                    metrics=metrics, summary={"reward": 0.5}, recipe={"name": "r", "seed": 3},
                    events=[{"kind": "test"}])
    assert any_store.resolve("r") == cid == any_store.resolve("r@7") == any_store.resolve(cid[:8])

    loaded, tok, man = load_model(any_store, "r/main@7")
    assert man.id == cid and man.state == TrainerState.model_validate(state) and man.summary == {"reward": 0.5}
    assert man.events == [Event(kind="test")]
    assert any_store.get_json(man.recipe) == {"name": "r", "seed": 3}
    ref_sd, got_sd = model.state_dict(), loaded.state_dict()
    assert ref_sd.keys() == got_sd.keys()
    for k in ref_sd:
        assert same(got_sd[k], ref_sd[k]), k
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied again after loading
    assert tok("12+3=")["input_ids"] == char_tokenizer()("12+3=")["input_ids"]
    assert tok.padding_side == "left" and tok.pad_token_id == 0 and tok.eos_token_id == 1

    opt2 = torch.optim.AdamW(loaded.parameters(), lr=5.0)
    load_optimizer(any_store, man, opt2)
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i, st_a in a["state"].items():
        for k, v in st_a.items():
            assert same(b["state"][i][k], v), (i, k)
    assert same(load_state_tensors(any_store, man)["torch_rng"], rng)
    assert load_metrics(any_store, man) == metrics
    assert gc.verify(any_store)["ok"]


KERNEL_FLAGS = ("foreach", "fused", "capturable", "differentiable")


@pytest.mark.parametrize("saved, new", [
    ({"foreach": False}, {}),  # a torchrun FSDP checkpoint resumed in one process
    ({"fused": True}, {"foreach": False}),  # a one-GPU checkpoint resumed under FSDP
])
def test_load_optimizer_keeps_the_new_optimizers_kernel_flags(store, saved, new):
    model = tiny_model(1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.9), weight_decay=0.05, **saved)
    x = torch.randint(3, 100, (2, 9))
    model(x, labels=x).loss.backward()
    opt.step()
    man = store.manifest(save_tiny(store, step=1, model=model, optimizer=opt))

    opt2 = torch.optim.AdamW(tiny_model(2).parameters(), lr=5.0, **new)
    want = [{k: g[k] for k in KERNEL_FLAGS} for g in opt2.param_groups]
    load_optimizer(store, man, opt2)
    a, b = opt.state_dict(), opt2.state_dict()
    assert [{k: g[k] for k in KERNEL_FLAGS} for g in b["param_groups"]] == want
    assert b["param_groups"][0]["lr"] == 1e-3 and b["param_groups"][0]["betas"] == (0.8, 0.9)
    assert [{k: v for k, v in g.items() if k not in KERNEL_FLAGS} for g in a["param_groups"]] == \
        [{k: v for k, v in g.items() if k not in KERNEL_FLAGS} for g in b["param_groups"]]
    for i, st_a in a["state"].items():
        for k, v in st_a.items():
            assert same(b["state"][i][k], v), (i, k)


def test_memory_store_round_trip():
    s = Store.open(f"memory://npo-test-{os.getpid()}-{random.random()}")
    cid = save_tiny(s, step=2)
    model, _, _ = load_model(s, "r@2")
    assert same(model.state_dict()["model.norm.weight"], tiny_model(2).state_dict()["model.norm.weight"])
    assert s.resolve("r") == cid and gc.verify(s)["ok"]


def test_load_model_dtype_and_non_float_state(store):
    save_tiny(store, step=0, model=tiny_model(0, torch.float16))
    m, _, _ = load_model(store, "r")
    assert m.dtype == torch.float16
    m32, _, _ = load_model(store, "r", dtype=torch.float32)
    assert m32.dtype == torch.float32


# ------------------------------------------------------------------------------------------ dedup

def test_dedup_resave_and_branch(store):
    model = tiny_model(0)
    save_tiny(store, step=0, model=model)
    before = store.objects()
    man = store.manifest(save_tiny(store, step=1, model=model))  # same tensors again
    new = set(store.objects()) - set(before)
    tensor_oids = {e.oid for e in man.model.values()}
    assert not (new & tensor_oids)  # 0 tensor bytes added
    assert new == {man.id}  # only the manifest (tokenizer, config, metrics dedup too)
    size = du(store.url)
    store.branch("r@0", "exp")
    assert 0 < du(store.url) - size < 4096
    assert store.resolve("r/exp") == store.resolve("r@0")
    with pytest.raises(NpoError, match="already exists"):
        store.branch("r@1", "exp")


# ------------------------------------------------------------------------------------------ resolve

def _colliding_manifests() -> tuple[bytes, bytes]:
    """Two manifest objects whose ids share their first 6 hex digits (found by brute force in memory)."""
    seen: dict[str, bytes] = {}
    for i in range(10**6):
        b = Manifest(run="r", branch="main", step=1000 + i, created="2026-01-01T00:00:00+00:00").to_bytes()
        h = hashlib.sha256(b).hexdigest()[:6]
        if h in seen:
            return seen[h], b
        seen[h] = b
    raise AssertionError("no collision")


def test_resolve_steps_branches_prefixes(store):
    m = tiny_model(0)
    ids = {s: save_tiny(store, step=s, model=m, summary={"reward": s / 100}) for s in (0, 10, 20)}
    store.branch("r@10", "rw")
    b20 = save_tiny(store, branch="rw", step=20, model=m, guide="r@20")
    b15 = save_tiny(store, branch="rw", step=25, model=m)
    assert store.resolve("r@20") == ids[20]  # main's lineage first
    assert store.resolve("r/rw@20") == b20 and store.resolve("r/rw@10") == ids[10]
    assert store.resolve("r@25") == b15  # not on main, unique on one branch
    assert [x.step for x in store.lineage("r/rw")] == [25, 20, 10, 0]
    assert store.manifest("r/rw@20").guide == ids[20]
    store.branch("r@0", "other")
    save_tiny(store, branch="other", step=25, model=tiny_model(5))
    with pytest.raises(NpoError, match="ambiguous"):
        store.resolve("r@25")
    with pytest.raises(NpoError, match="no checkpoint at step 15"):
        store.resolve("r@15")
    with pytest.raises(NpoError, match="unknown branch"):
        store.resolve("r/nope")
    with pytest.raises(NpoError, match="unknown run"):
        store.resolve("nope@3")
    a, b = _colliding_manifests()
    ida, idb = store.put_bytes(a), store.put_bytes(b)
    with pytest.raises(NpoError, match="ambiguous"):
        store.resolve(ida[:6])
    n = next(i for i in range(7, 65) if ida[:i] != idb[:i])
    assert store.resolve(ida[:n]) == ida
    tensor_oid = store.manifest("r").model["model.norm.weight"].oid
    with pytest.raises(NpoError, match="no run or checkpoint"):
        store.resolve(tensor_oid[:10])  # prefixes name checkpoints only


def test_resolve_fuzz_never_crashes(store):
    save_tiny(store, step=3)
    store.branch("r", "b")

    @settings(max_examples=150, deadline=None)
    @given(st.text(alphabet="rb@/0123abcdef.-_x", max_size=12))
    def check(text):
        try:
            cid = store.resolve(text)
        except NpoError as e:
            assert "\n" not in str(e)
            return
        assert store.manifest(cid).step == 3

    check()


# ------------------------------------------------------------------------------------------ crash safety

class ToyModel(torch.nn.Module):
    """Enough of a model for save_checkpoint, without importing transformers in the child."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(256, 256)
        self.b = torch.nn.Linear(256, 384)
        self.config = types.SimpleNamespace(to_json_string=lambda: '{"model_type": "toy"}')


def fill(model: torch.nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def _crash_writer(url: str, done_path: str, start: int) -> None:
    torch.set_num_threads(1)
    store, model = Store.open(url), ToyModel()
    opt = torch.optim.AdamW(model.parameters())
    with store.lease("crash", "main", force=True):  # the last child's lease is dead: break it
        step = start
        while True:
            step += 1
            fill(model, step)
            save_checkpoint(store, run="crash", branch="main", step=step, model=model, tokenizer=None,
                            optimizer=opt, state={"step": step}, state_tensors={"rng": torch.get_rng_state()},
                            metrics=[{"step": step}])
            with open(done_path, "a") as f:
                f.write(f"{step}\n")


def test_crash_sigkill_leaves_valid_store(tmp_path):
    url, done = str(tmp_path / "store"), str(tmp_path / "done.txt")
    store = Store.open(url)
    rnd = random.Random(0)
    expected_model = ToyModel()
    for _ in range(24):
        head = store.head("crash")
        start = store.manifest(head).step if head else 0
        p = FORK.Process(target=_crash_writer, args=(url, done, start))
        p.start()
        time.sleep(rnd.uniform(0.02, 0.5))
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        finished = [int(x) for x in Path(done).read_text().split()] if os.path.exists(done) else []
        head = Store.open(url).head("crash")
        if head is None:
            assert not finished
            continue
        man = Store.open(url).manifest(head)
        # the ref moves only after a complete save; the child may die before recording it
        assert man.step in ({finished[-1], finished[-1] + 1} if finished else {1})
        fill(expected_model, man.step)
        got = load_tensors(store, man.model)
        for k, v in expected_model.state_dict().items():
            assert same(got[k], v), k
    rep = gc.verify(Store.open(url))
    assert rep["ok"], rep["problems"]
    assert len(finished) >= 5  # the writer made progress across trials
    gc.collect(Store.open(url), force=True)  # drops the half-written objects of killed saves
    assert gc.verify(Store.open(url))["ok"]


def test_a_short_write_is_an_error_not_a_truncated_object(store):
    """Disk full or a file-size limit: a raw write may write part of its buffer. Before, the rest was
    dropped and the short file was stored under the full content's hash (a later exact resume reused it)."""
    code = ("import resource, sys\nfrom npo_cli.store import Store\ns = Store.open(sys.argv[1])\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"
            "try:\n    s.put_bytes(b'x' * 300_000)\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code, store.url], check=False, capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.startswith(f"NpoError cannot use store {store.url}: file too large; free space (or raise "
                                 "the file-size limit), then resume"), out.stdout + out.stderr
    assert not store.has(hashlib.sha256(b"x" * 300_000).hexdigest()) and gc.verify(store)["ok"]


@pytest.mark.parametrize("size", [3000, 3 << 20])  # re-hashed / size-checked
def test_a_save_rewrites_a_damaged_copy_instead_of_reusing_it(store, size):
    data = bytes(range(256)) * (size // 256)
    oid = store.put_bytes(data)
    path = os.path.join(store.url, "objects", oid[:2], oid[2:])
    if size < (1 << 20):
        Path(path).write_bytes(bytes([data[0] ^ 1]) + data[1:])  # a flipped bit
    else:
        Path(path).write_bytes(data[: size // 2])  # truncated by an old short write
    assert store.put_parts([data]) == (oid, True)
    assert store.get_bytes(oid) == data and gc.verify(store)["ok"]
    assert store.put_parts([data]) == (oid, False)  # an intact copy is reused


def test_gc_drops_guide_cache_entries_whose_object_is_gone(store):
    """gc racing a guide fill (before the grace period) left entries pointing at deleted objects: verify
    blamed the guide checkpoint and stayed broken, gc never cleaned them."""
    g = save_tiny(store, step=3)
    entry = store.put_json({"text": "x"})
    store.write_ref(f"guides/{g}/{'a' * 64}", entry)
    os.unlink(os.path.join(store.url, "objects", entry[:2], entry[2:]))
    problems = gc.verify(store)["problems"]
    assert problems == [(f"missing object {entry[:16]} of guide-cache entry guides/{g}/{'a' * 64} "
                         "(npo gc drops the entry)")]
    assert gc.collect(store)["stale_cache_entries"] == 1 and store.list_refs(f"guides/{g}") == []
    assert gc.verify(store)["ok"]


def test_a_damaged_old_manifest_does_not_hide_newer_steps(store):
    ids = [save_tiny(store, step=s) for s in (1, 2, 3)]
    path = os.path.join(store.url, "objects", ids[0][:2], ids[0][2:])
    Path(path).write_bytes(Path(path).read_bytes()[:-2] + b"xx")
    assert store.resolve("r@3") == ids[2] and store.resolve("r@2") == ids[1]  # rewind r@2 works
    with pytest.raises(NpoError, match=f"object {ids[0][:16]} is corrupt"):
        store.resolve("r@1")


def test_a_save_never_moves_a_branch_that_moved_under_it(store, monkeypatch):
    """A writer paused past its lease (SIGSTOP) used to finish its save and move the ref back over the
    steps of the process that had taken over; a second new run of the same name continued the first."""
    import npo_cli.checkpoint as ck

    a = save_tiny(store, step=1)
    b = save_tiny(store, step=2)  # another writer moved the branch on
    with pytest.raises(NpoError, match=f"branch r/main is at {b[:12]}, not where this process left it "
                                       f"\\({a[:12]}\\): another process writes it"):
        save_tiny(store, step=2, expect=a)
    with pytest.raises(NpoError, match=r"not where this process left it \(no such branch\)"):
        save_tiny(store, step=0, expect=None)
    real = ck.save_tensors

    def moved_meanwhile(s, named, branch="main", to=a):
        out = real(s, named)
        s.set_ref("r", branch, to)
        return out

    monkeypatch.setattr(ck, "save_tensors", moved_meanwhile)
    with pytest.raises(NpoError, match=f"branch r/main is at {a[:12]}"):
        save_tiny(store, step=3, expect=b)
    assert store.head("r", "main") == a
    monkeypatch.setattr(ck, "save_tensors", lambda s, named: moved_meanwhile(s, named, "new"))
    with pytest.raises(NpoError, match="branch r/new is at"):
        save_tiny(store, branch="new", step=0, expect=None)
    assert store.head("r", "new") == a and gc.verify(store)["ok"]


# ------------------------------------------------------------------------------------------ corruption
# ------------------------------------------------------------------------------------------ corruption
# ------------------------------------------------------------------------------------------ corruption

def test_flipped_byte_is_reported_and_refused(store):
    cid = save_tiny(store, step=1)
    oid = store.manifest(cid).model["model.embed_tokens.weight"].oid
    path = os.path.join(store.url, "objects", oid[:2], oid[2:])
    with open(path, "r+b") as f:
        f.seek(5000)
        b = f.read(1)
        f.seek(5000)
        f.write(bytes([b[0] ^ 0x10]))
    rep = gc.verify(store)
    assert not rep["ok"]
    assert any(oid[:16] in p and "corrupt" in p and "r/main@1" in p for p in rep["problems"])
    with pytest.raises(NpoError, match=f"object {oid[:16]} is corrupt.*r/main@1"):
        load_model(Store.open(store.url), "r")
    assert gc.collect(store)["objects"] == 0 and store.has(oid)  # never deletes reachable objects, even bad ones


def test_corrupt_chunk_is_refused(store, monkeypatch):
    import npo_cli.checkpoint as ck

    monkeypatch.setattr(ck, "CHUNK_BYTES", 4096)
    cid = save_tiny(store, step=1)
    e = store.manifest(cid).model["model.embed_tokens.weight"]
    assert len(e.chunks) == 16
    path = os.path.join(store.url, "objects", e.chunks[7][:2], e.chunks[7][2:])
    data = bytearray(Path(path).read_bytes())
    data[-1] ^= 1
    Path(path).write_bytes(data)
    assert any(e.chunks[7][:16] in p for p in gc.verify(store)["problems"])
    with pytest.raises(NpoError, match=f"object {e.chunks[7][:16]} is corrupt"):
        load_model(store, "r")


def test_corrupt_manifest_and_missing_object(store):
    cid = save_tiny(store, step=1)
    man = store.manifest(cid)
    os.unlink(os.path.join(store.url, "objects", man.metrics[:2], man.metrics[2:]))
    rep = gc.verify(store)
    assert any("missing object" in p and man.metrics[:16] in p for p in rep["problems"])
    path = os.path.join(store.url, "objects", cid[:2], cid[2:])
    data = bytearray(Path(path).read_bytes())
    data[-3] ^= 1
    Path(path).write_bytes(data)
    with pytest.raises(NpoError, match="corrupt"):
        Store.open(store.url).manifest("r")
    with pytest.raises(NpoError, match="damaged store"):  # its reachable set is unknown: delete nothing
        gc.collect(Store.open(store.url))


# ------------------------------------------------------------------------------------------ leases

def _lease_holder(url, go, out, hold):
    try:
        store = Store.open(url)
        go.wait(10)
        with store.lease("r", "main"):
            out.put(("ok", os.getpid()))
            time.sleep(hold)
    except NpoError as e:
        out.put(("refused", str(e)))


def test_two_processes_one_lease(store):
    go, out = FORK.Event(), FORK.Queue()
    procs = [FORK.Process(target=_lease_holder, args=(store.url, go, out, 1.5)) for _ in range(2)]
    for p in procs:
        p.start()
    go.set()
    results = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(10)
    assert sorted(r[0] for r in results) == ["ok", "refused"]
    winner = next(r[1] for r in results if r[0] == "ok")
    msg = next(r[1] for r in results if r[0] == "refused")
    assert f"pid {winner}" in msg and socket.gethostname() in msg and "since" in msg and "\n" not in msg
    assert store.read_lease("r", "main") is None  # released on exit


def _hold_lease_forever(url, ready):
    with Store.open(url).lease("r", "main"):
        ready.set()
        time.sleep(60)


def test_lease_blocks_other_writers_and_gc(store):
    save_tiny(store, step=0)
    ready = FORK.Event()
    p = FORK.Process(target=_hold_lease_forever, args=(store.url, ready))
    p.start()
    try:
        assert ready.wait(20)
        with pytest.raises(NpoError, match=f"pid {p.pid}"):
            save_tiny(store, step=1)
        with pytest.raises(NpoError, match="still running"):
            store.lease("r", "main", force=True).__enter__()
        with pytest.raises(NpoError, match="being written"):
            gc.collect(store)
        assert gc.collect(store, force=True)["objects"] == 0
    finally:
        p.kill()
        p.join()
    # holder dead (same host, pid gone): taken over without force
    assert gc.collect(store)["objects"] == 0  # a dead lease does not block gc
    with store.lease("r", "main"):
        save_tiny(store, step=1)  # the lease holder may write
        with pytest.raises(NpoError, match="this process already holds it"):
            store.lease("r", "main").__enter__()
    assert store.head("r") == store.resolve("r@1")


def test_expired_and_remote_leases(store):
    import json

    os.makedirs(os.path.join(store.url, "runs", "r", "leases"))
    path = os.path.join(store.url, "runs", "r", "leases", "main.json")
    Path(path).write_text(json.dumps(
        {"host": "elsewhere", "pid": 1, "since": "then", "expiry": time.time() - 1, "token": "x"}))
    with store.lease("r", "main"):  # expired: taken over without force
        pass
    Path(path).write_text(json.dumps(
        {"host": "elsewhere", "pid": 1, "since": "then", "expiry": time.time() + 300, "token": "x"}))
    with pytest.raises(NpoError, match="host elsewhere pid 1 since then.*--force"):
        store.lease("r", "main").__enter__()
    with store.lease("r", "main", force=True, ttl=0.3) as lease:
        time.sleep(0.5)  # renewed in the background, so still ours
        assert store.read_lease("r", "main")["token"] == lease.token


def test_lease_renewal_survives_a_store_hiccup(store, monkeypatch, capsys):
    """A failed renewal (network blip, full disk) is retried at the next tick: before, the renewal thread
    died with a traceback on stderr and the lease silently expired under a running writer."""
    write, fails = store.io.write, []

    def flaky(rel, parts, exclusive=False):
        if rel.endswith("leases/main.json") and not exclusive and len(fails) < 2:
            fails.append(rel)
            raise OSError(28, "No space left on device")
        return write(rel, parts, exclusive)

    monkeypatch.setattr(store.io, "write", flaky)
    with store.lease("r", "main", ttl=0.3) as lease:
        first = store.read_lease("r", "main")["expiry"]
        time.sleep(0.6)  # ticks every 0.1 s: two fail, the next ones renew
        assert len(fails) == 2 and store.read_lease("r", "main")["expiry"] > first and not lease.lost
        assert lease._thread.is_alive()
    assert "Traceback" not in capsys.readouterr().err


def test_lease_on_s3_is_exclusive(s3_url):
    s = Store.open(s3_url)
    with s.lease("r", "main"):
        assert not s.io.write("runs/r/leases/main.json", [b"{}"], exclusive=True)  # conditional PUT refused
    assert s.read_lease("r", "main") is None


# ------------------------------------------------------------------------------------------ gc

def test_gc_keeps_reachable_deletes_rest(any_store):
    s = any_store
    m = tiny_model(0)
    save_tiny(s, step=0, model=m)
    s.branch("r@0", "guide-src")
    g = save_tiny(s, branch="guide-src", step=30, model=tiny_model(30))
    keep_state, keep_event = s.put_bytes(b"trajectories-1"), s.put_bytes(b"trajectories-2")
    save_tiny(s, step=10, model=tiny_model(10), guide=g, extra_objects=[keep_state, keep_event])
    s.io.remove("runs/r/branches/guide-src")  # the guide stays reachable through the manifest
    orphan = s.put_bytes(b"orphan")
    orphan_ckpt = save_tiny(s, branch="tmp", step=5, model=tiny_model(5))
    s.io.remove("runs/r/branches/tmp")
    young = gc.collect(s)  # unreachable but just written: a writer may still be on its way to the ref
    assert young["objects"] == 0 and young["recent_objects"] >= 2 and s.has(orphan) and s.has(orphan_ckpt)
    dry = gc.collect(s, dry_run=True, keep_recent=0)
    assert dry["objects"] >= 2 and s.has(orphan)
    rep = gc.collect(s, keep_recent=0)
    assert rep["objects"] == dry["objects"] and rep["bytes"] > 0
    assert not s.has(orphan) and not s.has(orphan_ckpt)
    assert s.has(keep_state) and s.has(keep_event) and s.has(g)
    load_model(Store.open(s.url), g)
    assert gc.verify(s)["ok"]
    assert gc.collect(s)["objects"] == 0


# ------------------------------------------------------------------------------------------ bad input, S3

def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_s3_is_one_fast_line(monkeypatch):
    monkeypatch.setenv("NPO_S3_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    t = time.monotonic()
    with pytest.raises(NpoError, match="cannot reach the S3 store") as e:
        Store.open("s3://bucket/prefix")
    assert time.monotonic() - t < 15 and "\n" not in str(e.value)


def test_missing_bucket(s3_url):
    with pytest.raises(NpoError, match="not found"):
        Store.open("s3://no-such-bucket-npo/x")


@pytest.mark.parametrize("bad", ["../x", "/abs", "", "a/b", "x..y"])
def test_bad_names_touch_nothing(store, bad):
    with pytest.raises(NpoError):
        save_tiny(store, run=bad)
    with pytest.raises(NpoError):
        save_tiny(store, branch=bad)
    assert not os.path.exists(store.url)


# ------------------------------------------------------------------------------------------ HF folders

def test_export_generate_import_round_trip(store, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tiny_model(4)
    save_tiny(store, step=4, model=model)
    out = str(tmp_path / "hf")
    export(store, "r@4", out)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    hf = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok(["1+2=", "33+4="], return_tensors="pt", padding=True)
    gen = hf.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape == (2, enc["input_ids"].shape[1] + 4)
    for k, v in model.state_dict().items():
        assert same(hf.state_dict()[k], v), k
    with pytest.raises(NpoError, match="not empty"):
        export(store, "r@4", out)

    cid = import_hf(store, out, "imported")
    man = store.manifest("imported@0")
    assert man.id == cid and man.parent is None and man.branch == "main"
    back, tok2, _ = load_model(store, "imported")
    for k, v in model.state_dict().items():
        assert same(back.state_dict()[k], v), k
    assert tok2("7*8=")["input_ids"] == tok("7*8=")["input_ids"]
    with pytest.raises(NpoError, match="already exists"):
        import_hf(store, out, "imported")
    with pytest.raises(NpoError, match="not a Hugging Face model folder"):
        import_hf(store, str(tmp_path), "other")


def test_an_interrupted_export_leaves_no_folder(store, tmp_path, monkeypatch):
    """Killed between the weights and the tokenizer, export used to leave a folder with config.json and no
    weights under the asked-for name (a re-export was refused, an import failed)."""
    from transformers import PreTrainedTokenizerFast

    save_tiny(store, step=1)

    def killed(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        export(store, "r@1", str(tmp_path / "hf"))
    assert sorted(os.listdir(tmp_path)) == ["store"]
    monkeypatch.undo()
    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / f".hf.npo-{gone.pid}").mkdir()  # what a SIGKILLed export leaves: the next export removes it
    (tmp_path / "hf").mkdir()  # an empty folder the user made is fine
    export(store, "r@1", str(tmp_path / "hf"))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(tmp_path / "hf"))
    assert sorted(os.listdir(tmp_path)) == ["hf", "store"]


def test_export_takes_the_runs_model_dtype(store, tmp_path):
    """A bfloat16 run keeps fp32 master weights; before, its export was an fp32 model twice the size."""
    import json

    from safetensors import safe_open

    from npo_cli.recipe import build_recipe

    save_tiny(store, step=1, recipe=build_recipe({"model": {"dtype": "bfloat16"}}).model_dump(mode="json"))

    def dtypes(folder):
        with safe_open(f"{folder}/model.safetensors", "pt") as f:
            kinds = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        return kinds, json.loads((folder / "config.json").read_text())["dtype"]

    export(store, "r@1", str(tmp_path / "auto"))
    assert dtypes(tmp_path / "auto") == ({"BF16"}, "bfloat16")
    export(store, "r@1", str(tmp_path / "fp32"), dtype="float32")  # the master weights as trained
    assert dtypes(tmp_path / "fp32") == ({"F32"}, "float32")
    with pytest.raises(NpoError, match="--dtype must be auto or one of float32, bfloat16, float16"):
        export(store, "r@1", str(tmp_path / "x"), dtype="fp8")
