"""Checkpoints in the store: save and load a model, optimizer and trainer state; export and import HF folders.

Every tensor (every row block of a large one, below) is its own object, a one-tensor safetensors file
(tensor name "t", no metadata), so identical tensors (unchanged weights, tied embeddings, re-saves) are
stored once. We write that file
format ourselves: the header is a few bytes and the data goes from the tensor's memory to the hash and
to the file without a copy. Reading hash-checks the bytes and views the tensor in the read buffer
without another copy. The files are ordinary safetensors (tests check `safetensors.torch.load` reads
them).

Large tensors ARE chunked: above CHUNK_BYTES (16 MiB) a tensor is stored as row blocks (views along
dim 0, each its own one-tensor safetensors object), because one SHA-256 stream runs at only 1.2-1.8 GB/s
and cannot be split across threads, so a single large tensor became the critical path of a parallel
save or load. Measured with `benchmarks/store_bench.py --chunking` (a 151936x896 bf16 embedding,
272 MB, page cache, medians of 5): on a 16-core machine, one object: save 0.281 s / load 0.211 s;
16 MiB blocks: 0.032 s / 0.036 s (8.8x / 5.9x). With 2 threads the gain is small (0.287 -> 0.152 s
save, 0.215 -> 0.189 s load). Cost: a chunked tensor is assembled by one copy into new memory on load
(a one-object tensor is a copy-on-write view of its mapped file), and a 7B model has a few thousand
objects instead of a few hundred. Blocks also dedup individually; training rarely leaves any unchanged.

Order of writes in `save_checkpoint`: tensor and file objects, then the manifest, then the ref.
"""

from __future__ import annotations

import copy
import glob
import json
import math
import os
import shutil
import struct
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from pydantic import BaseModel, ValidationError

from npo_cli.dist import StateView
from npo_cli.errors import NpoError, one_line
from npo_cli.lease import pid_alive
from npo_cli.manifest import BaseTensors, Event, Manifest, TensorEntry, TrainerState
from npo_cli.objects import check_name, is_oid
from npo_cli.recipe import LoraConfig
from npo_cli.store import Store

__all__ = [
    "DTYPES", "export", "host_copy", "import_hf", "is_lora", "load_config", "load_metrics", "load_model",
    "load_optimizer", "load_state_tensors", "load_tensors", "load_tokenizer", "lora_model", "save_checkpoint",
    "save_tensors", "save_tensors_stats",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # recipe names

_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}
_TORCH_DTYPES = {str(d).removeprefix("torch."): d for d in _ST_DTYPES}


def _threads(store: Store) -> int:
    # Threads overlap hashing (hashlib drops the GIL) and file writes: one per core on a local disk;
    # S3 round trips are latency-bound, so more there.
    if os.environ.get("NPO_STORE_THREADS"):
        return max(1, int(os.environ["NPO_STORE_THREADS"]))
    return max(2, min(16, os.cpu_count() or 2)) if store.io.local else 16


# ------------------------------------------------------------------------------------------ tensors

CHUNK_BYTES = 16 << 20  # tensors above this are stored as row blocks of at most this size (see the top)


def _prepare(t) -> torch.Tensor:
    if not torch.is_tensor(t):
        raise NpoError(f"expected a tensor, got a {type(t).__name__}")
    if t.layout != torch.strided:
        raise NpoError(f"cannot store a {t.layout} tensor; only dense tensors")
    if t.dtype not in _ST_DTYPES:
        raise NpoError(f"cannot store a tensor of dtype {t.dtype}")
    t = t.detach().to("cpu").contiguous()
    return t.resolve_conj().resolve_neg() if t.is_conj() or t.is_neg() else t


def _safetensors_parts(t: torch.Tensor) -> list:
    """A contiguous CPU tensor as safetensors bytes: [header, view of the data] (the data is not copied)."""
    nbytes = t.numel() * t.element_size()
    header = json.dumps({"t": {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                               "data_offsets": [0, nbytes]}}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # 8-byte aligned data, as safetensors does: views need it
    data = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if nbytes else b""
    return [struct.pack("<Q", len(header)) + header, data]


def _row_blocks(t: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    """(views along dim 0 of at most CHUNK_BYTES, rows per block); ([t], 0) for a small tensor."""
    nbytes = t.numel() * t.element_size()
    if nbytes <= CHUNK_BYTES or t.dim() == 0 or t.shape[0] < 2:
        return [t], 0
    rows = max(1, CHUNK_BYTES // (nbytes // t.shape[0]))
    return list(t.split(rows)), rows


def _put_block(store: Store, b: torch.Tensor) -> tuple[str, int]:
    oid, new = store.put_parts(_safetensors_parts(b))
    return oid, (b.numel() * b.element_size() if new else 0)


def save_tensors(store: Store, tensors: dict[str, torch.Tensor]) -> dict[str, TensorEntry]:
    """Store each tensor as an object (a large one as row-block objects), in parallel; name -> entry."""
    return save_tensors_stats(store, tensors)[0]


def save_tensors_stats(store: Store, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, TensorEntry], int]:
    """(name -> entry, tensor bytes newly written). A tensor stored under two names is hashed once."""
    prepared: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        try:
            prepared[name] = _prepare(t)
        except NpoError as e:
            raise NpoError(f"tensor {name}: {e}") from None
    if not prepared:
        return {}, 0
    jobs: dict[tuple, torch.Tensor] = {}  # one per distinct block; `prepared` keeps the memory alive
    plan: dict[str, tuple[list[tuple], int]] = {}
    for name, t in prepared.items():
        blocks, rows = _row_blocks(t)
        keys = [(b.data_ptr(), b.dtype, tuple(b.shape)) for b in blocks]
        for k, b in zip(keys, blocks):
            jobs.setdefault(k, b)
        plan[name] = (keys, rows)
    # largest first, so a big block does not start last and trail the others
    order = sorted(jobs, key=lambda k: -jobs[k].numel() * jobs[k].element_size())
    with ThreadPoolExecutor(min(_threads(store), len(order))) as ex:
        done = dict(zip(order, ex.map(lambda k: _put_block(store, jobs[k]), order)))
    out = {}
    for name, t in prepared.items():
        keys, rows = plan[name]
        oids = [done[k][0] for k in keys]
        out[name] = TensorEntry(oid=oids[0] if not rows else "", chunks=oids if rows else [], chunk_rows=rows,
                                dtype=str(t.dtype).removeprefix("torch."), shape=list(t.shape),
                                nbytes=t.numel() * t.element_size())
    return out, sum(n for _, n in done.values())


def _get_block(store: Store, oid: str, dtype: torch.dtype, shape: list[int], context: str) -> torch.Tensor:
    """The tensor in a one-tensor safetensors object, hash-checked, viewing the read buffer (no copy)."""
    buf = store.get_bytes(oid, context, mapped=True)
    try:
        (n,) = struct.unpack("<Q", bytes(buf[:8]))
        info = json.loads(bytes(buf[8:8 + n]))["t"]
        start, end = (8 + n + x for x in info["data_offsets"])
        ok = info["dtype"] == _ST_DTYPES[dtype] and list(info["shape"]) == list(shape)
    except (ValueError, KeyError, TypeError, struct.error):
        raise NpoError(f"object {oid[:16]} is not a tensor ({context})") from None
    if not ok or end - start != math.prod(shape) * dtype.itemsize or end > len(buf):
        raise NpoError(f"object {oid[:16]} does not match its manifest entry ({context})")
    if end == start:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(buf, dtype=torch.uint8)[start:end]
    if start % dtype.itemsize:  # not aligned for a view (never for files we write)
        raw = raw.clone()
    return raw.view(dtype).reshape(shape)


def load_tensors(store: Store, entries: dict[str, TensorEntry], context: str = "") -> dict[str, torch.Tensor]:
    """name -> tensor, read and hash-checked in parallel. Names sharing an object get separate copies.

    A one-object tensor views its (copy-on-write mapped) object; a chunked one is assembled in new memory."""
    out: dict[str, torch.Tensor] = {}
    whole: dict[str, tuple[torch.dtype, list[int]]] = {}  # oid -> how to read it
    jobs: list[tuple[int, Any]] = []  # (bytes, thunk)
    for name, e in entries.items():
        dtype = _TORCH_DTYPES.get(e.dtype)
        if dtype is None:
            raise NpoError(f"tensor {name} has unknown dtype {e.dtype!r} ({context})")
        if not e.chunks:
            if e.oid not in whole:
                whole[e.oid] = (dtype, e.shape)
                jobs.append((e.nbytes, (e.oid, dtype, e.shape, None)))
            continue
        rows = e.chunk_rows
        if rows < 1 or not e.shape or len(e.chunks) != -(-e.shape[0] // rows):
            raise NpoError(f"tensor {name} has a malformed chunk list ({context})")
        dest = out[name] = torch.empty(e.shape, dtype=dtype)
        for i, oid in enumerate(e.chunks):
            part = dest[i * rows:(i + 1) * rows]
            jobs.append((part.numel() * dtype.itemsize, (oid, dtype, list(part.shape), part)))

    def run(job):
        oid, dtype, shape, dest = job
        t = _get_block(store, oid, dtype, shape, context)
        if dest is None:
            return oid, t
        dest.copy_(t)  # into this block's rows of the assembled tensor
        return oid, None

    jobs.sort(key=lambda j: -j[0])  # largest first
    loaded: dict[str, torch.Tensor] = {}
    if jobs:
        with ThreadPoolExecutor(min(_threads(store), len(jobs))) as ex:
            for oid, t in ex.map(run, [j for _, j in jobs]):
                if t is not None:
                    loaded[oid] = t
    used: set[str] = set()
    for name, e in entries.items():
        if not e.chunks:
            # never hand out one tensor under two names: loading with assign=True would alias parameters
            out[name] = loaded[e.oid].clone() if e.oid in used else loaded[e.oid]
            used.add(e.oid)
    return {name: out[name] for name in entries}


# ------------------------------------------------------------------------------------------ LoRA

def is_lora(model) -> bool:
    """A peft model: a base with a LoRA adapter (peft is imported only by whoever wraps a model)."""
    return "peft" in sys.modules and isinstance(model, sys.modules["peft"].PeftModel)


def lora_model(model, lora: LoraConfig):
    """`model` with a LoRA adapter (peft): the base weights frozen, only the adapter's trainable."""
    import peft

    cfg = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=lora.target_modules)
    try:
        return peft.get_peft_model(model, cfg)
    except ValueError as e:  # no module of that name
        raise NpoError(f"model.lora.target_modules {lora.target_modules}: {one_line(e)[:200]}; name linear "
                       "modules of the model (e.g. [q_proj, v_proj]) or use all-linear") from None


def _is_adapter(name: str) -> bool:
    return ".lora_" in name  # peft's adapter tensors: lora_A, lora_B (the base's are base_layer.*)


def _lora_of(model) -> LoraConfig:
    c = model.peft_config["default"]
    tm = c.target_modules
    return LoraConfig(r=c.r, alpha=float(c.lora_alpha), dropout=float(c.lora_dropout),
                      target_modules=tm if isinstance(tm, str) else sorted(tm))


def _save_base(store: Store, model, tensors: dict[str, torch.Tensor]) -> str:
    """The object listing the frozen base tensors. The base does not change while the adapter trains, so
    it is hashed and written at this model's first save in this store and named again by every later save
    (remembered on the peft model's tuner, which a host copy of the model passes through)."""
    tuner = model.base_model
    known = getattr(tuner, "_npo_base", None)
    if known and known[0] == store.url and store.has(known[1]):
        return known[1]
    oid = store.put_json(BaseTensors(model=save_tensors(store, tensors)).model_dump(mode="json"))
    tuner._npo_base = (store.url, oid)
    return oid


def _base_entries(store: Store, m: Manifest) -> dict[str, TensorEntry]:
    return _valid(f"{_label(m)}: LoRA base", BaseTensors, store.get_json(m.base, _label(m))).model


# ------------------------------------------------------------------------------------------ save

def _jsonable(what: str, obj: Any) -> Any:
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError) as e:
        raise NpoError(f"{what} must be JSON-serialisable: {e}") from None


def tokenizer_files(tokenizer) -> dict[str, bytes]:
    """The files save_pretrained writes for a tokenizer: name -> bytes."""
    with tempfile.TemporaryDirectory(prefix="npo-tok-") as d:
        tokenizer.save_pretrained(d)
        out = {}
        for root, _, files in os.walk(d):
            for f in sorted(files):
                p = os.path.join(root, f)
                with open(p, "rb") as fh:
                    out[os.path.relpath(p, d).replace(os.sep, "/")] = fh.read()
        return out


def _tokenizer_objects(store: Store, tokenizer) -> dict[str, str]:
    files = tokenizer if isinstance(tokenizer, dict) else tokenizer_files(tokenizer)
    return {name: store.put_bytes(data) for name, data in files.items()}


def _optimizer_parts(optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[dict]]:
    sd = optimizer.state_dict()
    tensors, extra = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            name = f"state.{idx}.{k}"
            if torch.is_tensor(v):
                tensors[name] = v
            else:
                extra[name] = _jsonable(f"optimizer state {name}", v)
    return tensors, extra, _jsonable("optimizer param_groups", sd["param_groups"])


def host_copy(model, optimizer, tokenizer) -> tuple:
    """(model, optimizer, tokenizer) to pass to save_checkpoint in place of the live ones: their state taken
    now, tensors copied to host memory, so a save in a background thread writes this moment while training
    changes the originals (in place). Tensors that share memory (tied embeddings) share one copy; frozen
    parameters (a LoRA base) are not copied: training does not change them."""
    copies: dict[tuple, torch.Tensor] = {}
    frozen = {p.data_ptr() for p in model.parameters() if not p.requires_grad}

    def host(t):
        if not torch.is_tensor(t) or t.data_ptr() in frozen:
            return t
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if key not in copies:
            copies[key] = t.detach().to("cpu", copy=True)
        return copies[key]

    msd = {k: host(v) for k, v in model.state_dict().items()}
    osd = None
    if optimizer is not None:
        sd = optimizer.state_dict()  # its per-parameter dicts are the optimizer's own: copied too
        osd = {"state": {i: {k: host(v) for k, v in st.items()} for i, st in sd["state"].items()},
               "param_groups": copy.deepcopy(sd["param_groups"])}
    return (StateView(model, msd), StateView(optimizer, osd) if optimizer is not None else None,
            tokenizer_files(tokenizer) if tokenizer is not None else None)


def save_checkpoint(store: Store, *, run: str, branch: str, step: int, model, tokenizer, optimizer=None,
                    state: TrainerState | dict | None = None,
                    state_tensors: dict[str, torch.Tensor] | None = None,
                    metrics: list[dict] | None = None, summary: dict[str, float] | None = None,
                    recipe: dict | None = None, guide: str | None = None,
                    events: list[Event | dict] | None = None, extra_objects: list[str] | None = None,
                    parent: str | None = "head", expect: str | None = "any") -> str:
    """Save a checkpoint on run/branch and move the branch to it; returns its id.

    parent: "head" (the branch's current head, none for a new branch), None (a root), or any ref.
    tokenizer: a tokenizer, or its files (name -> bytes, as `host_copy` takes them).
    guide: a ref or id of the guide checkpoint. Refused if another live process holds the branch lease.
    extra_objects: other objects the checkpoint needs (already in the store), kept with it by gc.
    expect: the branch head this writer last saw (None: the branch must not exist yet); the save is
    refused, and the branch left alone, when the branch is elsewhere before or after the objects are written.
    """
    check_name("run", run)
    check_name("branch", branch)
    if not isinstance(step, int) or step < 0:
        raise NpoError(f"step must be a non-negative integer, not {step!r}")
    store.check_writer(run, branch)
    before = store.head(run, branch)
    if expect != "any" and before != expect:
        raise _moved(run, branch, before, expect)
    # a checkpoint id is taken as it is (the trainer passes ids); any other ref is resolved
    parent_id = before if parent == "head" else (store.manifest(parent).id if parent else None)
    guide_id = store.manifest(guide).id if guide else None
    # validated (and made JSON) before anything is written
    state = _valid("state", TrainerState,
                   _jsonable("state", state.model_dump() if isinstance(state, TrainerState) else state or {}))
    events = [_valid(f"events[{i}]", Event, e) for i, e in enumerate(
        _jsonable("events", [e.model_dump() if isinstance(e, Event) else e for e in events or []]))]
    bad = [oid for oid in extra_objects or [] if not is_oid(oid)]
    if bad:
        raise NpoError(f"extra_objects must be object ids, not {bad[0]!r}")
    summary = {str(k): float(v) for k, v in (summary or {}).items()}

    opt_tensors, opt_extra, groups = _optimizer_parts(optimizer) if optimizer is not None else ({}, {}, [])
    model_sd, base, lora = model.state_dict(), None, None
    if hasattr(model, "peft_config") and any(map(_is_adapter, model_sd)):  # LoRA (or a host copy of it):
        # the adapter's tensors in `model`, the base's once, in an object of their own
        base = _save_base(store, model, {k: v for k, v in model_sd.items() if not _is_adapter(k)})
        model_sd, lora = {k: v for k, v in model_sd.items() if _is_adapter(k)}, _lora_of(model)
    named = {f"model/{k}": v for k, v in model_sd.items()}
    named |= {f"optimizer/{k}": v for k, v in opt_tensors.items()}
    named |= {f"state/{k}": v for k, v in (state_tensors or {}).items()}
    entries = save_tensors(store, named)

    def pick(prefix: str) -> dict[str, TensorEntry]:
        return {k[len(prefix):]: e for k, e in entries.items() if k.startswith(prefix)}

    man = Manifest(
        run=run, branch=branch, step=step, parent=parent_id,
        recipe=store.put_json(_jsonable("recipe", recipe)) if recipe is not None else None,
        model=pick("model/"), base=base, lora=lora,
        optimizer=pick("optimizer/"), optimizer_extra=opt_extra, optimizer_groups=groups,
        state=state, state_tensors=pick("state/"),
        metrics=store.put_json(_jsonable("metrics", metrics or [])),
        summary=summary, guide=guide_id, events=events, extra_objects=list(extra_objects or []),
        model_config=store.put_bytes(model.config.to_json_string().encode()),
        tokenizer=_tokenizer_objects(store, tokenizer) if tokenizer is not None else {},
    )
    cid = store.put_bytes(man.to_bytes())
    # Again, just before the ref: a writer paused past its lease (SIGSTOP, a stall) must not move a branch
    # that another process has taken over and moved on since.
    store.check_writer(run, branch)
    now = store.head(run, branch)
    if now != before:
        raise _moved(run, branch, now, before)
    store.set_ref(run, branch, cid, create=before is None)  # last: until here a crash leaves unreferenced objects
    return cid


def _valid(what: str, model: type[BaseModel], value: Any) -> Any:
    """`value` as a `model`; NpoError naming the field when it is not one."""
    try:
        return model.model_validate(value)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(map(str, err["loc"]))
        raise NpoError(f"{what}{'.' + where if where else ''}: {err['msg']}") from None


def _moved(run: str, branch: str, now: str | None, expected: str | None) -> NpoError:
    where = f"at {now[:12]}" if now else "gone"
    seen = f"{expected[:12]}" if expected else "no such branch"
    return NpoError(f"branch {run}/{branch} is {where}, not where this process left it ({seen}): another "
                    "process writes it; stopping without moving it")


# ------------------------------------------------------------------------------------------ load

def _label(m: Manifest) -> str:
    return f"checkpoint {m.run}/{m.branch}@{m.step} {m.id[:12]}"


def load_config(store: Store, m: Manifest):
    from transformers import CONFIG_MAPPING

    if not m.model_config_oid:
        raise NpoError(f"{_label(m)} has no model config")
    data = store.get_json(m.model_config_oid, _label(m))
    mtype = data.get("model_type")
    if mtype not in CONFIG_MAPPING:
        raise NpoError(f"{_label(m)}: unknown model_type {mtype!r} for this transformers version")
    return CONFIG_MAPPING[mtype].from_dict(data)


def load_tokenizer(store: Store, m: Manifest):
    from transformers import AutoTokenizer

    if not m.tokenizer:
        return None
    with tempfile.TemporaryDirectory(prefix="npo-tok-") as d:
        _write_files(store, m, d)
        return AutoTokenizer.from_pretrained(d)


def _write_files(store: Store, m: Manifest, out_dir: str) -> None:
    for name, oid in m.tokenizer.items():
        parts = name.split("/")
        if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise NpoError(f"{_label(m)}: unsafe tokenizer file name {name!r}")
        p = os.path.join(out_dir, *parts)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(store.get_bytes(oid, _label(m)))


def load_model(store: Store, ref: str, dtype: torch.dtype | None = None, device: str = "cpu"):
    """(model, tokenizer, manifest) for a ref: the model class comes from the stored config, the
    tensors are loaded strictly with their stored dtypes (then cast to `dtype` if given). A LoRA
    checkpoint gives a peft model: its base with the adapter."""
    from transformers import AutoModelForCausalLM

    m = store.manifest(ref)
    store.check_not_pruned(m.id)  # one line naming train.keep_last, not a missing object
    config = load_config(store, m)
    try:
        from transformers.initialization import no_init_weights  # skip random init: we overwrite it all
    except ImportError:  # older transformers
        from contextlib import nullcontext as no_init_weights
    # fork_rng: the adapter's init (overwritten below) must not move the sampling stream of a run that
    # loads a LoRA guide
    with no_init_weights(), torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config)
        if m.lora is not None:
            model = lora_model(model, m.lora)
    entries = m.model
    if m.base:  # LoRA: base and adapter, in the model's order, as a full checkpoint lists them: of two names
        # sharing an object (tied embeddings) the first keeps the read buffer, and where the tied weight lives
        # changes the CPU kernels' rounding (a resume would not sample bitwise the same)
        entries = {**_base_entries(store, m), **m.model}
        entries = {k: entries[k] for k in model.state_dict() if k in entries} | entries
    tensors = load_tensors(store, entries, _label(m))
    try:
        model.load_state_dict(tensors, strict=True, assign=True)  # assign: use the read buffers as-is
    except RuntimeError as e:
        raise NpoError(f"{_label(m)} does not fit its model class {type(model).__name__}: "
                       f"{' '.join(str(e).split())[:300]}") from None
    model.tie_weights()  # assign=True replaced the tied parameter objects; tie them again
    if dtype is not None:
        model.to(dtype)
    model.to(device)
    model.eval()
    return model, load_tokenizer(store, m), m


_KERNEL_FLAGS = ("foreach", "fused", "capturable", "differentiable")


def load_optimizer(store: Store, manifest: Manifest, optimizer) -> None:
    """Restore the optimizer state and hyperparameters in place (param order = the order the optimizer
    was built with); its kernel flags (foreach, fused, ...) are kept."""
    state: dict[int, dict[str, Any]] = {}
    tensors = load_tensors(store, manifest.optimizer, _label(manifest))
    for name, v in list(tensors.items()) + list(manifest.optimizer_extra.items()):
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = v
    groups = json.loads(json.dumps(manifest.optimizer_groups))
    for g, cur in zip(groups, optimizer.param_groups):
        for k, v in cur.items():  # JSON turned tuples (betas) into lists
            if isinstance(v, tuple) and isinstance(g.get(k), list):
                g[k] = tuple(g[k])
        # the kernel flags say how this process runs the update (FSDP stores foreach=False, one GPU
        # fused=True); they are not the checkpoint's hyperparameters, so the optimizer's own stay
        g.update({k: cur[k] for k in _KERNEL_FLAGS if k in cur})
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as e:
        raise NpoError(f"{_label(manifest)}: optimizer state does not fit this optimizer: {e}") from None


def load_state_tensors(store: Store, manifest: Manifest) -> dict[str, torch.Tensor]:
    return load_tensors(store, manifest.state_tensors, _label(manifest))


def load_metrics(store: Store, manifest: Manifest) -> list[dict]:
    return store.get_json(manifest.metrics, _label(manifest)) if manifest.metrics else []


# ------------------------------------------------------------------------------------------ HF folders

def export(store: Store, ref: str, out_dir: str, dtype: str = "auto", merge: bool = False) -> str:
    """Write a plain Hugging Face folder (config.json, model.safetensors, tokenizer files).

    A LoRA checkpoint gives peft's adapter folder (adapter_config.json, adapter_model.safetensors) and the
    tokenizer files; its adapter_config names the base: the run's model.path when that is a model folder
    here, else the base written to DIR/base. merge: the adapter merged into the base, a plain folder.
    dtype "auto": the run's model.dtype (a bf16 run trains fp32 master weights but is a bf16 model),
    the stored dtype for a checkpoint without a recipe; or float32 / bfloat16 / float16."""
    if dtype != "auto" and dtype not in DTYPES:
        raise NpoError(f"--dtype must be auto or one of {', '.join(DTYPES)}, not {dtype!r}")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise NpoError(f"{out_dir} exists and is not empty; choose a new folder")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NpoError(f"{out_dir} is a file; choose a new folder")
    model, tokenizer, man = load_model(store, ref)
    if man.lora is not None and merge:
        model = model.merge_and_unload()
    run_model = store.get_json(man.recipe).get("model", {}) if man.recipe else {}
    if dtype == "auto" and man.recipe:
        dtype = run_model.get("dtype", "auto")
    if dtype in DTYPES:
        model.to(DTYPES[dtype])
    base = None  # LoRA without merge: the folder of the base the adapter applies to
    if man.lora is not None and not merge:
        folder = os.path.expanduser(run_model.get("path") or "")
        base = os.path.abspath(folder) if os.path.isfile(os.path.join(folder, "config.json")) else None
        model.peft_config["default"].base_model_name_or_path = base or os.path.join(os.path.abspath(out_dir), "base")
    # written next to out_dir, then renamed: a killed export leaves no half folder under the name asked for
    out = os.path.abspath(out_dir)
    tmp = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.npo-{os.getpid()}")
    for left in glob.glob(os.path.join(os.path.dirname(out), f".{glob.escape(os.path.basename(out))}.npo-*")):
        pid = left.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):  # a killed export's folder (SIGKILL skips the finally)
            shutil.rmtree(left, ignore_errors=True)
    try:
        # save_embedding_layers: peft would look for the base's config at the final path, not written yet
        model.save_pretrained(tmp, **({"save_embedding_layers": False} if man.lora is not None and not merge else {}))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if man.lora is not None and not merge and base is None:  # the base too, for PeftModel.from_pretrained
            model.unload().save_pretrained(os.path.join(tmp, "base"))
            if tokenizer is not None:
                tokenizer.save_pretrained(os.path.join(tmp, "base"))
        if os.path.isdir(out):
            os.rmdir(out)  # the empty folder the user made
        os.rename(tmp, out)
    except OSError as e:  # name the folder asked for, not the temporary one
        raise OSError(e.errno, e.strerror, out_dir) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def import_hf(store: Store, hf_dir: str, run: str, branch: str = "main") -> str:
    """A step-0 checkpoint on run/branch from a Hugging Face model folder; returns its id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_name("run", run)
    check_name("branch", branch)
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise NpoError(f"{hf_dir} is not a Hugging Face model folder (no config.json)")
    if run in store.runs():
        raise NpoError(f"run {run!r} already exists in the store; pick another --run name")
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    src = os.path.abspath(hf_dir)
    return save_checkpoint(store, run=run, branch=branch, step=0, model=model, tokenizer=tokenizer,
                           parent=None, state=TrainerState(imported_from=src),
                           events=[Event(kind="import", source=src)])
