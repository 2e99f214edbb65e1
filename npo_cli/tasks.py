"""Prompt sets: the built-in arithmetic family, JSONL/Parquet files at any fsspec URL, and any
`datasets.load_dataset` source (task.dataset).

`load_problems(task, split, seed)` returns a plain list; the trainer samples indices from it
with its own RNG, so the data position is just an index. Problem.prompt is the raw prompt text:
task.template and the chat template are applied by the trainer (`format_prompt`).

Splits are decided by a hash of the prompt text (10% eval), so train and eval are disjoint for
every seed and every setting, and the eval set does not depend on the run's seed; task.eval_path or
task.dataset.eval_split replace that split.

A record's other columns travel with its problem (Problem.columns) for reward functions that take them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import random
from dataclasses import dataclass, field
from typing import Any, Literal

from npo_cli.errors import NpoError
from npo_cli.objects import s3_endpoint
from npo_cli.recipe import ArithmeticConfig, DatasetConfig, TaskConfig

Split = Literal["train", "eval"]
EVAL_SHARE = 10  # 1 in 10 prompts is held out
EVAL_SEED = 20260420  # the eval list is the same for every run seed
ENUMERATE_UP_TO = 50_000  # smaller spaces are listed exhaustively, larger ones sampled


@dataclass(frozen=True)
class Problem:
    prompt: str  # the text task.template wraps; of a chat prompt, its last (user) turn
    answer: str
    tags: tuple[str, ...] = ()
    context: tuple[tuple[str, str], ...] = ()  # a chat prompt's earlier (role, content) turns
    record: int = field(default=0, compare=False)  # its prompt file's record number, for messages (0: generated)
    # the record's other columns (JSON values), for reward functions; not part of what the problem is
    columns: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "answer": self.answer, "tags": list(self.tags),
                **({"context": [list(t) for t in self.context]} if self.context else {}),
                **({"columns": self.columns} if self.columns else {})}

    @classmethod
    def from_json(cls, d: dict) -> Problem:
        return cls(d["prompt"], d["answer"], tuple(d.get("tags", ())), tuple(map(tuple, d.get("context", ()))),
                   columns=d.get("columns", {}))

    @property
    def key(self) -> str:
        """The whole prompt as one string (what the train/eval split and the resume check hash)."""
        return json.dumps([*self.context, self.prompt]) if self.context else self.prompt

    @property
    def name(self) -> str:
        """How a message names it: its record number, else (a generated problem) its text."""
        return f"record {self.record}" if self.record else repr(self.prompt[:30])


def first_few(names: list[str], k: int = 5) -> str:
    """'a, b, c' or 'a, b, c, d, e and 7 more': the start of a long list of offenders, for a one-line error."""
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def split_of(prompt: str) -> Split:
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    return "eval" if h % EVAL_SHARE == 0 else "train"


def load_problems(task: TaskConfig, split: Split, seed: int) -> list[Problem]:
    """Train: a list to sample from (arithmetic: up to task.arithmetic.train_size). Eval: up to eval_size."""
    if split not in ("train", "eval"):
        raise NpoError(f"split must be 'train' or 'eval', got '{split}'")
    if task.kind in ("file", "dataset"):
        out = _file_problems(task, split) if task.kind == "file" else _dataset_problems(task, split)
        return out if split == "train" else out[: task.eval_size]
    return _arithmetic(task.arithmetic, split, seed, task.eval_size)


# ---------------------------------------------------------------- arithmetic

def _value(nums: tuple[int, ...], ops: tuple[str, ...]) -> int:
    """Usual precedence: '*' binds tighter than '+' and '-'."""
    terms, signs = [nums[0]], [1]
    for op, x in zip(ops, nums[1:]):
        if op == "*":
            terms[-1] *= x
        else:
            terms.append(x)
            signs.append(1 if op == "+" else -1)
    return sum(s * t for s, t in zip(signs, terms))


def _make(nums: tuple[int, ...], ops: tuple[str, ...], tag: str) -> Problem:
    text = str(nums[0]) + "".join(f"{op}{x}" for op, x in zip(ops, nums[1:])) + "="
    return Problem(prompt=text, answer=str(_value(nums, ops)), tags=(tag,))


def space_size(cfg: ArithmeticConfig, tag: str) -> int:
    """Distinct problems of one difficulty class (before the train/eval split)."""
    n_ops = len(set(cfg.ops)) ** (cfg.terms - 1)
    easy = 10 ** (cfg.digits * cfg.terms)
    return n_ops * (easy if tag == "easy" else 10 ** (cfg.hard_digits * cfg.terms) - easy)


def _class_problems(cfg: ArithmeticConfig, tag: str, split: Split, count: int, rng: random.Random) -> list[Problem]:
    """Up to `count` distinct problems of one class in one split, in a seeded random order."""
    ops = list(dict.fromkeys(cfg.ops))
    top = 10 ** (cfg.digits if tag == "easy" else cfg.hard_digits)
    low = 10**cfg.digits  # a hard problem has at least one operand >= 10^digits

    def ok(nums):
        return tag == "easy" or max(nums) >= low

    if space_size(cfg, tag) <= ENUMERATE_UP_TO:
        every = [_make(n, o, tag) for n in itertools.product(range(top), repeat=cfg.terms) if ok(n)
                 for o in itertools.product(ops, repeat=cfg.terms - 1)]
        out = [p for p in every if split_of(p.prompt) == split]
        rng.shuffle(out)
        return out[:count]
    seen: dict[str, Problem] = {}
    for _ in range(50 * count + 1000):  # the space is > 50k here, so this fills up long before the cap
        if len(seen) >= count:
            break
        nums = tuple(rng.randrange(top) for _ in range(cfg.terms))
        if not ok(nums):
            continue
        p = _make(nums, tuple(rng.choice(ops) for _ in range(cfg.terms - 1)), tag)
        if split_of(p.prompt) == split:
            seen.setdefault(p.prompt, p)
    return list(seen.values())


def _arithmetic(cfg: ArithmeticConfig, split: Split, seed: int, eval_size: int) -> list[Problem]:
    if cfg.hard_fraction > 0 and cfg.hard_digits <= cfg.digits:
        raise NpoError(f"task.arithmetic.hard_digits ({cfg.hard_digits}) must exceed digits ({cfg.digits}) "
                       "when hard_fraction > 0")
    total = cfg.train_size if split == "train" else eval_size
    rng = random.Random(seed if split == "train" else EVAL_SEED)
    n_hard = round(total * cfg.hard_fraction)
    out: list[Problem] = []
    for tag, n in (("easy", total - n_hard), ("hard", n_hard)):
        if n == 0:
            continue
        distinct = _class_problems(cfg, tag, split, n, rng)
        if not distinct:
            raise NpoError(f"task.arithmetic has no {tag} {split} problems; raise digits")
        # eval and single-class train lists: distinct problems only (uniform sampling); a mixed train
        # list cycles a class smaller than its share so the hard share stays exact
        mixed = split == "train" and 0 < cfg.hard_fraction < 1
        out += [distinct[i % len(distinct)] for i in range(n)] if mixed else distinct
    rng.shuffle(out)
    return out


# ---------------------------------------------------------------- files

def read_records(url: str, fields: tuple[str, str]) -> list[dict]:
    import fsspec

    lower = url.lower().removesuffix(".gz").removesuffix(".bz2").removesuffix(".zst").removesuffix(".xz")
    is_parquet = lower.endswith((".parquet", ".pq"))
    if not is_parquet and not lower.endswith((".jsonl", ".json", ".ndjson")):
        raise NpoError(f"prompt file {url}: use a .jsonl or .parquet file")
    # s3:// files through the store's endpoint ($NPO_STORE's S3 and the prompts are usually the same place)
    opts = {"endpoint_url": s3_endpoint()} if url.startswith("s3://") and s3_endpoint() else {}
    try:
        with fsspec.open(url, "rb", compression=None if is_parquet else "infer", **opts) as f:
            if is_parquet:
                import pyarrow.parquet as pq

                pf = pq.ParquetFile(f)
                for name in fields:
                    if name not in pf.schema_arrow.names:
                        raise NpoError(f"prompt file {url} has no column '{name}' "
                                       f"(columns: {', '.join(pf.schema_arrow.names)})")
                return pf.read().to_pylist()  # every column: the others travel with the problems
            text = f.read().decode("utf-8-sig")  # -sig: a BOM (Windows editors) is not part of line 1
    except FileNotFoundError:
        raise NpoError(f"prompt file not found: {url}") from None
    except (ValueError, ImportError, OSError) as e:
        raise NpoError(f"cannot read prompt file {url}: {e}") from None
    if lower.endswith(".json") and text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise NpoError(f"prompt file {url} is not valid JSON") from None
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise NpoError(f"prompt file {url} line {i} is not valid JSON") from None
    return rows


def _chat(turns: list, task: TaskConfig) -> Problem:
    """TRL's conversational prompt, [{"role": ..., "content": ...}, ...], ending with the user's turn."""
    if not task.chat_template:
        raise NpoError("the prompt is a chat conversation; set task.chat_template: true")
    if not turns or not all(isinstance(t, dict) and isinstance(t.get("role"), str)
                            and isinstance(t.get("content"), str) for t in turns):
        raise NpoError("a chat prompt is a list of {role, content} messages with text content")
    if turns[-1]["role"] != "user":
        raise NpoError("a chat prompt must end with a user message (the model answers it)")
    return Problem(prompt=turns[-1]["content"], answer="",
                   context=tuple((t["role"], t["content"]) for t in turns[:-1]))


def _answer_text(value) -> str:
    """The answer a verifier gets: text as is; a list or mapping (test cases, several accepted answers) as
    JSON, not Python's repr; whole numbers that JSON / pandas wrote as floats (39.0) as 39."""
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _json_columns(row: dict, task: TaskConfig) -> dict[str, Any]:
    """The record's columns other than the prompt and the answer; those that are not JSON values (images,
    bytes, timestamps) are left out: problems are stored as JSON."""
    out = {}
    for k, v in row.items():
        if k not in (task.prompt_field, task.answer_field):
            try:
                json.dumps(v)
            except (TypeError, ValueError):
                continue
            out[k] = v
    return out


def _problem(row, task: TaskConfig, record: int) -> Problem:
    """One record as a problem; NpoError says what is wrong with it."""
    for name in (task.prompt_field, task.answer_field):
        if not isinstance(row, dict) or name not in row:
            raise NpoError(f"no field '{name}' (set task.prompt_field / task.answer_field)")
        value = row[name]
        if value is None or (isinstance(value, float) and math.isnan(value)):  # null, or pandas' NaN
            raise NpoError(f"field '{name}' is empty")
    prompt, answer = row[task.prompt_field], _answer_text(row[task.answer_field])
    if not answer.strip() and task.verifier in ("exact", "math"):  # every completion would score the same
        raise NpoError(f"field '{task.answer_field}' is empty and task.verifier={task.verifier} compares with it")
    columns = _json_columns(row, task)
    if isinstance(prompt, list):
        return dataclasses.replace(_chat(prompt, task), answer=answer, record=record, columns=columns)
    if isinstance(prompt, str) and prompt.strip():
        return Problem(prompt=prompt, answer=answer, record=record, columns=columns)
    raise NpoError(f"field '{task.prompt_field}' must be text or a list of chat messages"
                   + (", not empty" if isinstance(prompt, str) else f", not {type(prompt).__name__}"))


def _problems_from(rows: list, where: str, task: TaskConfig) -> list[Problem]:
    """Every record as a problem; the records that cannot be one are all named in one error."""
    out, bad = [], {}  # reason -> its record numbers
    for i, row in enumerate(rows, 1):
        try:
            out.append(_problem(row, task, i))
        except NpoError as e:
            bad.setdefault(str(e), []).append(i)
    if bad:
        n = sum(map(len, bad.values()))
        why = "; ".join(("record " if len(rs) == 1 else "records ") + first_few(list(map(str, rs))) + f": {reason}"
                        for reason, rs in bad.items())
        raise NpoError(f"{where}: {n} of {n + len(out)} records cannot be used: {why}; fix or drop them")
    if not out:
        raise NpoError(f"{where} has no records")
    return out


def _hash_split(problems: list[Problem], split: Split, where: str, fix: str) -> list[Problem]:
    out = [p for p in problems if split_of(p.key) == split]
    if not out and split == "train":
        raise NpoError(f"all {len(problems)} prompts of {where} fell into the held-out split "
                       f"(1 in {EVAL_SHARE} by a hash of the prompt); give more prompts or set {fix}")
    return out


def _file_problems(task: TaskConfig, split: Split) -> list[Problem]:
    if not task.train_path:
        raise NpoError("task.kind=file needs task.train_path (a .jsonl or .parquet URL)")

    def read(url: str) -> list[Problem]:
        return _problems_from(read_records(url, (task.prompt_field, task.answer_field)), f"prompt file {url}", task)

    if split == "eval" and task.eval_path:
        return read(task.eval_path)
    rows = read(task.train_path)
    if split == "train" and task.eval_path:
        return rows
    return _hash_split(rows, split, task.train_path, "task.eval_path")


# ---------------------------------------------------------------- datasets

def read_dataset(cfg: DatasetConfig, split: str, fields: tuple[str, str]) -> list[dict]:
    """The records of one split of a `datasets` source: load_dataset's (a Hub name through the Hugging Face
    cache, a folder, a format with data_files), or load_from_disk's for a save_to_disk folder."""
    import datasets

    where = f"dataset {cfg.path}" + (f" ({cfg.name})" if cfg.name else "")
    saved = any(os.path.isfile(os.path.join(cfg.path, f)) for f in ("dataset_dict.json", "state.json"))
    try:
        if saved:
            ds = datasets.load_from_disk(cfg.path)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise NpoError(f"{where} has no split '{split}' (splits: {', '.join(ds)}); "
                                   "set task.dataset.split / eval_split")
                ds = ds[split]
            elif split != cfg.split:
                raise NpoError(f"{where} is one saved Dataset, so it has no split '{split}'; save a DatasetDict "
                               "or drop task.dataset.eval_split")
        else:
            ds = datasets.load_dataset(cfg.path, cfg.name, split=split, data_files=cfg.data_files)
    except ConnectionError as e:  # before the Hub's own errors: it is an OSError too
        if datasets.config.HF_HUB_OFFLINE:
            raise NpoError(f"{where} is not in the Hugging Face cache and HF_HUB_OFFLINE (or HF_DATASETS_OFFLINE) "
                           "is set: load it once with network access to cache it, or set task.dataset.path to a "
                           "local copy") from None
        raise NpoError(f"cannot reach {where}: {e}") from None
    except (datasets.exceptions.DatasetsError, OSError, ValueError) as e:
        raise NpoError(f"cannot load {where} split '{split}': {str(e).strip().splitlines()[0]}") from None
    for name in fields:
        if name not in ds.column_names:
            raise NpoError(f"{where} split '{split}' has no column '{name}' (columns: {', '.join(ds.column_names)}); "
                           "set task.prompt_field / task.answer_field")
    return ds.to_list()


def _dataset_problems(task: TaskConfig, split: Split) -> list[Problem]:
    cfg = task.dataset

    def read(name: str) -> list[Problem]:
        where = f"dataset {cfg.path} split '{name}'"
        return _problems_from(read_dataset(cfg, name, (task.prompt_field, task.answer_field)), where, task)

    if split == "eval" and cfg.eval_split:
        return read(cfg.eval_split)
    rows = read(cfg.split)
    if split == "train" and cfg.eval_split:
        return rows
    return _hash_split(rows, split, f"dataset {cfg.path} split '{cfg.split}'", "task.dataset.eval_split")
