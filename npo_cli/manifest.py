"""The checkpoint schema: a manifest is a JSON object in the store naming everything a checkpoint is made of.

A checkpoint's id is the SHA-256 of its stored manifest bytes; ids are never recomputed, so a manifest
loads however it was serialised, and every manifest an earlier version wrote must keep loading (unknown
keys in `state` and `events` are kept; the older way of listing extra objects is moved on load, below).

What a manifest names:
    model, optimizer, state_tensors   tensors, each one object or row-block objects (`TensorEntry`)
    base, lora                        a LoRA checkpoint: `model` holds the adapter's tensors only, `base` an
                                      object listing the frozen base model's (`BaseTensors`, written once
                                      and named by every checkpoint of the run), `lora` the adapter's shape
    recipe, metrics, model_config     JSON objects
    tokenizer                         tokenizer files, one object each
    extra_objects                     other objects the checkpoint needs (a replay buffer, a mistake pool),
                                      kept with it by gc and not parsed
    parent, guide                     other checkpoints (`links()`)
    state                             what a resume needs besides tensors (`TrainerState`)
    events                            decision records stored with the checkpoint (`Event`)
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from npo_cli import __version__
from npo_cli.objects import is_oid, now_iso
from npo_cli.recipe import LoraConfig

MANIFEST_FORMAT = "npo-checkpoint/1"
MANIFEST_MAGIC = b'{"format":"npo-checkpoint/'  # the first bytes of every manifest object
EVAL_STEP = "eval/step"  # summary key: the step its eval numbers were measured at (the trainer writes it)


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


class BaseTensors(BaseModel):
    """The object a LoRA checkpoint's `base` names: the frozen base model's tensors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    format: Literal["npo-base/1"] = "npo-base/1"
    model: dict[str, TensorEntry]


class TrainerState(BaseModel):
    """What a resume needs besides tensors. Unknown keys load and are kept (older and newer writers)."""

    model_config = ConfigDict(extra="allow", ser_json_inf_nan="constants")
    step: int | None = None
    epoch: int = 0
    pos: int = Field(0, description="Position in the epoch's data order.")
    train_sha: str | None = Field(None, description="Hash of the training problems the position counts in.")
    samples_seen: int = 0
    tokens_generated: int = 0
    last_eval: dict[str, float] = Field(default_factory=dict, description="The latest eval's numbers.")
    source: dict[str, Any] = Field(default_factory=dict, description="The off-policy source's JSON state.")
    controller: dict[str, Any] = Field(default_factory=dict, description="The controller's own JSON state.")
    successes: str | None = Field(
        None, description="train.record_successes: object holding the verified on-policy successes sampled "
        "since the parent checkpoint (npo-successes/1), also in `extra_objects`.")
    imported_from: str | None = Field(None, description="The folder `npo import` read.")
    weights_only: bool = Field(False, exclude_if=lambda v: not v, description="Saved without the optimizer "
                               "state (train.save_optimizer_every): a resume needs a checkpoint that has it.")


class Event(BaseModel):
    """A record stored with a checkpoint (a run's start, an import, an intervention, an AutoNPO decision).
    Each kind uses a few of the optional fields; the others are None and left out of the JSON."""

    model_config = ConfigDict(extra="allow", ser_json_inf_nan="constants", protected_namespaces=())
    kind: str
    step: int | None = None
    k: int | None = Field(None, description="AutoNPO: the intervention number (0: the bootstrap).")
    model: str | None = Field(None, description="start: the recipe's model.path.")
    checkpoint: str | None = Field(None, description="start: the checkpoint the run started from.")
    revision: str | None = Field(None, description="start: the Hugging Face Hub commit of model.path (a Hub id).")
    source: str | None = Field(None, description="import: the folder read.")
    at: int | None = None
    fork: str | None = Field(None, description="Checkpoint id the branch starts from.")
    fork_step: int | None = None
    guide: str | None = Field(None, description="Guide checkpoint id.")
    guide_step: int | None = None
    until: int | None = Field(None, description="Last step of the guided stretch.")
    gate: float | None = None
    same_lineage: bool | None = None
    branch: str | None = None
    from_branch: str | None = None
    delta: int | None = None
    confirmed: bool | None = None
    reason: str | None = None
    signals: dict[str, float | None] | None = None
    pool: int | None = None
    probe: dict[str, Any] | None = None
    candidates: list[dict[str, Any]] | None = None
    S: float | None = None
    Q: float | None = Field(None, description="auto-scout: share of the early mistakes the scout solves.")
    V: float | None = Field(None, description="auto-scout: exp(KL(scout || step-0 policy)).")
    kl: float | None = None
    prefill: dict[str, Any] | None = None

    @model_serializer(mode="wrap")
    def _without_none(self, handler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}

    def __repr_args__(self):
        return [(k, v) for k, v in super().__repr_args__() if v is not None]


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
    model: dict[str, TensorEntry] = Field(default_factory=dict, description="model.state_dict() tensors "
                                          "(a LoRA checkpoint: the adapter's only).")
    # left out of the JSON when unset, so a full checkpoint's manifest (and id) is what it was before LoRA
    base: str | None = Field(None, exclude_if=lambda v: v is None,
                             description="LoRA: object holding the frozen base tensors (`BaseTensors`).")
    lora: LoraConfig | None = Field(None, exclude_if=lambda v: v is None,
                                    description="LoRA: the adapter (rank, alpha, dropout, target modules).")
    optimizer: dict[str, TensorEntry] = Field(
        default_factory=dict, description="Optimizer state tensors, named state.<param index>.<key>.")
    optimizer_extra: dict[str, Any] = Field(
        default_factory=dict, description="Non-tensor optimizer state values, named like `optimizer`.")
    optimizer_groups: list[dict[str, Any]] = Field(default_factory=list, description="param_groups (JSON).")
    state: TrainerState = Field(default_factory=TrainerState, description="Trainer state.")
    state_tensors: dict[str, TensorEntry] = Field(default_factory=dict, description="e.g. RNG states.")
    extra_objects: list[str] = Field(
        default_factory=list, description="Other objects this checkpoint needs (a replay buffer, a mistake "
        "pool); gc keeps them with it.")
    metrics: str | None = Field(None, description="Object: JSON list of per-step dicts since the parent.")
    summary: dict[str, float] = Field(
        default_factory=dict, description="Headline numbers; `npo ls` shows 'reward' and 'eval/accuracy'.")
    guide: str | None = Field(None, description="Guide checkpoint id when NPO was on.")
    events: list[Event] = Field(default_factory=list, description="Decision records (AutoNPO...).")
    created: str = Field(default_factory=now_iso, description="UTC time of the save.")
    npo_version: str = __version__
    model_config_oid: str | None = Field(
        None, alias="model_config", description="Object: the HF model config JSON.")
    tokenizer: dict[str, str] = Field(default_factory=dict, description="Tokenizer file name -> object.")

    @model_validator(mode="before")
    @classmethod
    def _listed_objects(cls, data: Any) -> Any:
        """Manifests written before `extra_objects` listed those objects under state["objects"] and
        events[i]["objects"] (a list of oids, or a dict whose values are oids): move them there."""
        if not isinstance(data, dict):
            return data
        found: list[str] = []
        if isinstance(data.get("state"), dict) and "objects" in data["state"]:
            state = dict(data["state"])
            found += _oids_in(state.pop("objects"))
            data = {**data, "state": state}
        if isinstance(data.get("events"), list):
            events = [dict(e) if isinstance(e, dict) else e for e in data["events"]]
            for e in events:
                if isinstance(e, dict) and "objects" in e:
                    found += _oids_in(e.pop("objects"))
            data = {**data, "events": events}
        if found:
            data = {**data, "extra_objects": list(dict.fromkeys([*(data.get("extra_objects") or []), *found]))}
        return data

    def tensor_bytes(self) -> int:
        return sum(e.nbytes for d in (self.model, self.optimizer, self.state_tensors) for e in d.values())

    def tensor_oids(self) -> set[str]:
        """The objects holding this checkpoint's tensors (model, optimizer, state; not a LoRA base's)."""
        return {oid for d in (self.model, self.optimizer, self.state_tensors) for e in d.values() for oid in e.oids()}

    def objects(self) -> dict[str, str]:
        """Every object this manifest names (oid -> what it is), excluding other checkpoints (`links`)."""
        out: dict[str, str] = {}
        for kind, entries in (("model", self.model), ("optimizer", self.optimizer),
                              ("state_tensors", self.state_tensors)):
            for name, e in entries.items():
                for oid in e.oids():
                    out[oid] = f"{kind} tensor {name}"
        for what, oid in (("recipe", self.recipe), ("metrics", self.metrics),
                          ("model config", self.model_config_oid), ("LoRA base tensor list", self.base)):
            if oid:
                out[oid] = what
        for name, oid in self.tokenizer.items():
            out[oid] = f"tokenizer file {name}"
        for oid in self.extra_objects:
            out.setdefault(oid, "extra object")
        return out

    def links(self) -> dict[str, str]:
        """The other checkpoints this one names (id -> 'parent' / 'guide')."""
        return {cid: what for what, cid in (("parent", self.parent), ("guide", self.guide)) if cid}

    def to_bytes(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()


def _oids_in(v: Any) -> list[str]:
    vals = v.values() if isinstance(v, dict) else v if isinstance(v, list) else []
    return [x for x in vals if is_oid(x)]
