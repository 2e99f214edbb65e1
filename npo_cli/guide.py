"""The guide-rollout generator: verified-correct trajectories of a guide checkpoint, cached in the store.

For each prompt the guide samples (batched over prompts, `npo.guide_round` completions per prompt per
call) until a completion passes the task's verifier or `npo.max_tries` samples are spent. A found
trajectory keeps the guide's token ids and per-token log-probs (the behaviour policy of the NPO slot).

Cache: one JSON object per (guide checkpoint id, formatted prompt, answer, sampling settings), named
by an ordinary ref `guides/<guide id>/<key>` in the store (`cache_get` / `cache_put` below). The key hashes all
of those, and a read checks the entry's guide id, prompt and answer again, so a trajectory is never
used with another guide. A prompt the guide failed is cached too ("found": false, with its number of
tries) so it is not resampled unless max_tries grows. Entries stay while the guide checkpoint is
reachable (`npo gc` keeps them with it).

Sampling runs under a forked RNG (`seeds.forked_rng`), seeded from (recipe seed, guide weights, step), so the
trainer's RNG stream, and with it exact resume, do not depend on whether the cache was warm.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

from npo_cli import dist
from npo_cli.backend import make_backend
from npo_cli.batch import format_prompt
from npo_cli.checkpoint import DTYPES, load_model, load_tokenizer
from npo_cli.errors import NpoError
from npo_cli.model import resolve_device
from npo_cli.objects import is_oid
from npo_cli.progress import Progress
from npo_cli.recipe import build_recipe
from npo_cli.seeds import data_order, derive_seed, forked_rng
from npo_cli.tasks import load_problems
from npo_cli.verifiers import Call, make_judge, score_batch

CACHE_FORMAT = "npo-guide/1"


# --------------------------------------------------------------------------- the cache: refs guides/<guide>/<key>


def cache_get(store, guide: str, key: str) -> str | None:
    """Object id of guide checkpoint `guide`'s cache entry `key` (both 64-hex), or None (also for a damaged
    entry: it is resampled and rewritten)."""
    try:
        return store.read_ref(f"guides/{guide}/{key}")
    except NpoError:
        return None


def cache_put(store, guide: str, key: str, oid: str) -> None:
    """Point cache entry `key` of `guide` at object `oid` (write the object first)."""
    if not all(is_oid(x) for x in (guide, key, oid)):
        raise NpoError("guide cache names must be 64-hex ids")
    store.write_ref(f"guides/{guide}/{key}", oid)


def cache_entries(store, guide: str) -> dict[str, str]:
    """key -> entry object id, for one guide checkpoint."""
    out = {}
    for k in store.list_refs(f"guides/{guide}"):
        if is_oid(k) and (oid := cache_get(store, guide, k)):
            out[k] = oid
    return out


def sampling_settings(recipe) -> dict:
    """What, besides guide and prompt, decides which trajectories are valid cache hits."""
    r, t = recipe.rollout, recipe.task
    return {"temperature": r.temperature, "top_p": r.top_p, "max_new_tokens": r.max_new_tokens,
            "verifier": t.verifier, "chat_template": t.chat_template}


def cache_key(guide_id: str, prompt: str, answer: str, settings: dict) -> str:
    blob = json.dumps({"guide": guide_id, "prompt": prompt, "answer": answer, "settings": settings},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class GuideStats:
    hits: int = 0  # prompts answered from the cache
    sampled: int = 0  # prompts the guide sampled for
    found: int = 0  # of those, prompts with a verified trajectory
    samples: int = 0  # completions drawn
    tokens: int = 0  # completion tokens drawn
    seconds: float = 0.0  # wall time of sampling (model load included)


class GuideGenerator:
    """Verified trajectories of one guide checkpoint for (formatted prompt, Problem) pairs."""

    def __init__(self, store, guide: str, recipe, device: str | None = None):
        self.store, self.recipe = store, recipe
        self.manifest = store.manifest(guide)  # an id as it is, any other ref resolved
        self.guide_id = self.manifest.id
        # Seeds derive from the guide's weights, not its checkpoint id: the id covers the manifest's
        # creation time, so a re-run of the same experiment would sample different guide trajectories.
        self.seed_id = hashlib.sha256(json.dumps(sorted((k, e.oids()) for k, e in self.manifest.model.items()))
                                      .encode()).hexdigest()
        self.settings = sampling_settings(recipe)
        self.max_tries, self.round = recipe.npo.max_tries, recipe.npo.guide_round
        self.device = device
        self.judge = make_judge(recipe.task)  # a format bonus must not let a wrong answer in
        self.backend = None
        self.stats = GuideStats()
        self.unwritten: list[dict] = []

    def key(self, prompt: str, answer: str) -> str:
        return cache_key(self.guide_id, prompt, answer, self.settings)

    def correct(self, text: str, problem) -> bool:
        return self.judge.batch([Call(problem.prompt, text, problem.answer, problem=problem)])[0] >= 1.0

    # ---------------------------------------------------------------- cache

    def lookup(self, prompt: str, problem) -> dict | None:
        """The cached entry for this prompt (found or not), or None on a miss."""
        oid = cache_get(self.store, self.guide_id, self.key(prompt, problem.answer))
        if oid is None:
            return None
        try:
            e = self.store.get_json(oid, "guide cache entry")
        except NpoError:  # object collected or damaged: resample
            return None
        if (not isinstance(e, dict) or e.get("format") != CACHE_FORMAT or e.get("guide") != self.guide_id
                or e.get("prompt") != prompt or e.get("answer") != problem.answer):
            return None
        if e.get("found") and not self.correct(e.get("text", ""), problem):
            return None  # the verifier changed its mind: never hand out a wrong trajectory
        return e

    def write(self, entry: dict) -> None:
        """Cache one entry; under torchrun only rank 0 writes, the others keep theirs for `share`."""
        if not dist.is_main():
            self.unwritten.append(entry)
            return
        oid = self.store.put_json(entry)  # object first, then the ref
        cache_put(self.store, self.guide_id, self.key(entry["prompt"], entry["answer"]), oid)

    def take_unwritten(self) -> list[dict]:
        out, self.unwritten = self.unwritten, []
        return out

    def share(self) -> None:
        """torchrun: the other ranks' new entries go to rank 0, which writes them (a collective: every
        rank calls it). Only rank 0 writes: elsewhere write() would queue them to be sent again. On return
        every rank sees every entry, so none samples a prompt again whose entry is still being written."""
        if not dist.on():
            return
        shared = dist.gather_json(self.take_unwritten())
        if dist.is_main():
            for entries in shared[1:]:
                for e in entries:
                    self.write(e)
        dist.barrier()

    # ---------------------------------------------------------------- sampling

    def load(self, engine=None):
        """The guide's rollout backend, built on first use. engine: the policy's backend, whose vLLM
        engine a guide of the same model samples through (its weights swapped in)."""
        if self.backend is None:
            device = self.device or resolve_device(self.recipe.model)
            model, tok, _ = load_model(self.store, self.guide_id, dtype=DTYPES[self.recipe.model.dtype],
                                       device=device)
            if tok is None:
                raise NpoError(f"guide {self.store.describe(self.guide_id)} has no tokenizer")
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
            tok.padding_side = "left"
            self.backend = make_backend(model, tok, self.recipe.rollout,
                                        add_special_tokens=not self.recipe.task.chat_template, share=engine)
        return self.backend

    def unload(self) -> None:
        if hasattr(self.backend, "release"):
            self.backend.release()
        self.backend = None

    def get(self, items: list[tuple[str, object]], seed: int, engine=None) -> list[dict | None]:
        """For each (formatted prompt, Problem): its verified trajectory entry, or None when the guide
        found none in max_tries. Misses are sampled (batched) and written to the cache."""
        out: list[dict | None] = [None] * len(items)
        todo = []
        for i, (prompt, problem) in enumerate(items):
            e = self.lookup(prompt, problem)
            if e is not None and (e["found"] or e.get("tries", 0) >= self.max_tries):
                self.stats.hits += 1
                out[i] = e if e["found"] else None
            else:
                todo.append(i)
        if todo:
            for i, e in zip(todo, self._sample([items[i] for i in todo], seed, engine)):
                self.write(e)
                out[i] = e if e["found"] else None
        return out

    def _sample(self, items: list[tuple[str, object]], seed: int, engine=None) -> list[dict]:
        t0 = time.perf_counter()
        backend = self.load(engine)
        n = len(items)
        found: list = [None] * n
        tries, tokens = [0] * n, [0] * n
        with forked_rng(seed):
            left = list(range(n))
            while left:
                k = min(self.round, self.max_tries - tries[left[0]])  # every prompt left has the same tries
                groups = backend.generate([items[i][0] for i in left], k)
                # the round's completions judged in one batch (one trip to the verifier's worker processes)
                oks = iter(score_batch(self.judge, [Call.of(items[i][1], ro)
                                                    for i, rollouts in zip(left, groups) for ro in rollouts]))
                still = []
                for i, rollouts in zip(left, groups):
                    for j, ro in enumerate(rollouts):
                        tokens[i] += len(ro.completion_ids)
                        if next(oks) >= 1.0 and found[i] is None:
                            found[i] = (ro, tries[i] + j + 1)
                    tries[i] += k
                    if found[i] is None and tries[i] < self.max_tries:
                        still.append(i)
                self.stats.samples += k * len(left)
                left = still
        secs = time.perf_counter() - t0
        self.stats.sampled += n
        self.stats.found += sum(f is not None for f in found)
        self.stats.tokens += sum(tokens)
        self.stats.seconds += secs
        entries = []
        for i, (prompt, problem) in enumerate(items):
            e = {"format": CACHE_FORMAT, "guide": self.guide_id, "prompt": prompt, "answer": problem.answer,
                 "settings": self.settings, "found": found[i] is not None, "tries": tries[i],
                 "tokens": tokens[i], "seconds": secs / n}
            if found[i] is not None:
                ro, at = found[i]
                e.update(tries=at, prompt_ids=list(ro.prompt_ids), completion_ids=list(ro.completion_ids),
                         logprobs=[float(x) for x in ro.logprobs], text=ro.text, finished=bool(ro.finished))
            entries.append(e)
        return entries


# --------------------------------------------------------------------------- `npo guide`


def prefill(store, guide: str, prompts: str | None = None, split: str = "train", limit: int | None = None,
            from_step: int = 0, overrides: list[str] = (), console=None, progress: bool = True) -> dict:
    """`npo guide`: fill the cache of `guide` for a prompt file or the task's train/eval split.

    Settings (template, sampling, verifier, max_tries) come from the guide checkpoint's stored recipe
    plus overrides, i.e. the same keys a branch of that run computes. The train split goes in the
    trainer's order (epoch 0 of the run's seed), starting at `from_step`, so `--limit N` covers the
    prompts of the next N / prompts_per_step steps of an intervention at that step."""
    if split not in ("train", "eval"):
        raise NpoError(f"--split must be train or eval, not {split!r}")
    if limit is not None and limit < 1:
        raise NpoError("--limit must be >= 1")
    if from_step < 0:
        raise NpoError("--from-step must be >= 0")
    man = store.manifest(guide)
    recipe = build_recipe(store.get_json(man.recipe) if man.recipe else {}, list(overrides))
    if prompts:
        task = recipe.task.model_copy(update={"kind": "file", "train_path": prompts, "eval_path": prompts})
        problems = load_problems(task, "train", recipe.seed)
    else:
        problems = load_problems(recipe.task, split, recipe.seed)
        if split == "train":
            order = data_order(recipe.seed, 0, len(problems))
            start = from_step * recipe.rollout.prompts_per_step
            problems = [problems[i] for i in (order[start:] + order[:start])]
        elif split == "eval":
            problems = problems[: recipe.task.eval_size]
    problems = problems[:limit] if limit else problems
    if not problems:
        raise NpoError("no prompts to generate for")
    gen = GuideGenerator(store, man.id, recipe)
    tok = load_tokenizer(store, man) if recipe.task.chat_template else None
    items = [(format_prompt(recipe, tok, p), p) for p in problems]
    chunk = max(1, recipe.rollout.batch_size // max(1, recipe.npo.guide_round))
    found = 0
    with Progress(console, "guide", len(items), enabled=progress) as bar:
        for s in range(0, len(items), chunk):
            part = items[s : s + chunk]
            res = gen.get(part, derive_seed(recipe.seed, gen.seed_id, "prefill", s))
            found += sum(e is not None for e in res)
            st = gen.stats
            bar.update(s + len(part), f"found {found}/{s + len(part)}  cached {st.hits}  {st.tokens} tok")
    st = gen.stats
    return {"guide": gen.guide_id, "guide_ref": f"{man.run}/{man.branch}@{man.step}", "prompts": len(items),
            "found": found, "cache_hits": st.hits, "sampled": st.sampled, "samples": st.samples,
            "tokens": st.tokens, "seconds": st.seconds}
