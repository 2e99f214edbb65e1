"""Rewards and the correctness judge: verifiers (prompt, completion, answer) -> float, and TRL reward functions.

`completion` is the decoded completion with special tokens skipped (Rollout.text). The built-in
verifiers also take `finished=` (Rollout.finished: the completion ended with EOS) for the optional
format term; user verifiers (`module:function`) are called with the three positional arguments.
task.rewards are TRL reward functions, called as GRPOTrainer calls them: `f(prompts=, completions=,
completion_ids=, trainer_state=None, log_extra=, log_metric=, **columns)` on a slice of the batch, returning
one float (or None: not applicable) per completion; the reward is their weighted sum.

`math`, user verifiers and rewards run in worker processes, so that every call has a timeout
(task.verifier_timeout: a hung worker is killed) and a call that raises or hangs costs its completions alone:
they score 0, the error is reported once, and the run stops only once more than task.verifier_max_failures
of the completions scored have failed. A reward that is not a number stops the run at once (a bug, not a
bad completion).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import math
import multiprocessing
import numbers
import os
import re
import signal
import sys
import threading
import time
import types
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from npo_cli.errors import NpoError, one_line

if TYPE_CHECKING:  # the worker processes import this module: they need no pydantic
    from npo_cli.recipe import TaskConfig

# End-of-sequence markers a completion may still carry when it was decoded with special tokens
# (e.g. LUFFY teacher files); everything after one is ignored.
EOS_MARKERS = ("<eos>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>")
BOXED = re.compile(r"\\boxed\s*\{")
MIN_CALLS = 20  # the failure share is judged over at least this many calls: a run's first failure never stops it
POLL_S = 0.1  # the parent waits on its workers in slices this long (timeouts, signals)


def _cut(completion: str) -> str:
    for m in EOS_MARKERS:
        completion = completion.split(m, 1)[0]
    return completion


def exact(prompt: str, completion: str, answer: str) -> float:
    """1.0 when the completion's first line (up to EOS / newline), stripped, equals the answer."""
    return float(_cut(completion).split("\n", 1)[0].strip() == answer.strip())


def math_score(completion: str, answer: str) -> float:
    """math-verify: the completion's final/boxed answer against the gold answer (no timeout)."""
    import math_verify.grader
    import math_verify.parser
    from math_verify import parse, verify

    # we enforce our own timeout, so math_verify's "timeout disabled" warning is noise
    math_verify.parser.TIMEOUT_WARNING_SHOWN = math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    gold_text = answer.split("####")[-1].strip()  # GSM8K: "reasoning #### 72"
    # A bare answer (2 sqrt 2, 6 - 5i in LaTeX) is read as one math expression: parsed as plain text,
    # math-verify keeps only its first number (2, 5) and would accept a boxed 2. A worked solution
    # (with $...$ or a boxed answer) is parsed as written, like a completion.
    delimited = any(m in gold_text for m in ("$", "\\boxed", "\\(", "\\["))
    gold = ((not delimited and parse(f"${gold_text}$", parsing_timeout=None))
            or parse(gold_text, parsing_timeout=None))
    pred = parse(_cut(completion), parsing_timeout=None)
    if not gold or not pred:
        return 0.0
    return float(verify(gold, pred, timeout_seconds=None))


def _math(prompt: str, completion: str, answer: str) -> float:
    try:
        return math_score(completion, answer)
    except Exception:  # noqa: BLE001  (a malformed expression is a wrong answer, not a failed call)
        return 0.0


# What GRPOTrainer passes besides the columns; npo has no TrainerState, and its logging hooks are no-ops.
TRL_KEYWORDS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")


def _ignore(*args, **kwargs) -> None:
    """TRL's log_extra / log_metric: accepted, so a reward that logs runs unchanged; npo does not record them."""


def _import(path: str, kind: str = "verifier") -> Callable:
    """The function `path` names; `kind` "verifier" takes (prompt, completion, answer), "reward" TRL's keywords."""
    mod_name, _, fn_name = path.partition(":")
    # The `npo` script, unlike `python -m`, leaves the working directory off sys.path: a verifier module
    # next to the recipe is found there. Appended, so it never shadows an installed module.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError, ValueError) as e:
        raise NpoError(f"{kind} '{path}' not found: {e}") from None
    if not callable(fn):
        raise NpoError(f"{kind} '{path}' not found: {fn_name} is not a function")
    try:  # a function of the other kind fails here, not at the first step
        signature = inspect.signature(fn)
    except ValueError:  # no signature to inspect (some builtins): the call will tell
        return fn
    if kind == "reward" and not _takes_trl_keywords(signature):
        raise NpoError(f"reward '{path}' must take TRL's keywords (prompts, completions, **kwargs) and return "
                       "a list of floats; a (prompt, completion, answer) function goes in task.verifier")
    if kind == "verifier" and not _binds(signature, ("prompt", "completion", "answer"), {}):
        if _takes_trl_keywords(signature):
            raise NpoError(f"verifier '{path}' must take (prompt, completion, answer); a TRL-style batched reward "
                           "function (prompts, completions, **kwargs) goes in task.rewards, with task.correct")
        raise NpoError(f"verifier '{path}' must take (prompt, completion, answer) and return a float reward "
                       "(1.0 or more counts as correct)")
    return fn


def _takes_trl_keywords(signature: inspect.Signature) -> bool:
    """Whether GRPOTrainer's keywords bind, the parameters it names besides them taken for dataset columns."""
    columns = [n for n, p in signature.parameters.items()
               if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in TRL_KEYWORDS]
    return _binds(signature, (), dict.fromkeys([*columns, *TRL_KEYWORDS]))


def _binds(signature: inspect.Signature, args: tuple, kwargs: dict) -> bool:
    try:
        signature.bind(*args, **kwargs)
    except TypeError:
        return False
    return True


# --------------------------------------------------------------------------- the worker side


@dataclass
class Failed:
    """A call that raised: its error as `Type: message`."""

    error: str


@dataclass
class NotANumber:
    """A call that returned something other than a number: its type and a short repr."""

    type: str
    value: str


@dataclass
class WrongShape:
    """A reward call that did not return one value per completion: what it returned instead."""

    what: str


_progress = None  # shared with the parent: per slot, [start time of the running call (0: idle), its index]
_functions: dict[str, Callable] = {}


def _init_worker(progress, lifeline) -> None:
    global _progress
    _progress = progress
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle, not every worker's
    threading.Thread(target=_exit_with_parent, args=(lifeline,), daemon=True).start()


def _exit_with_parent(lifeline) -> None:
    """Ends the worker, even in a hung call, once the parent's end of `lifeline` closes (it exited or died)."""
    try:
        lifeline.recv_bytes()
    except (EOFError, OSError):
        pass
    os._exit(0)


def _number(x) -> float | NotANumber:
    if isinstance(x, numbers.Real):  # int, float, bool, numpy scalars, Fraction
        return float(x)
    try:
        v = x.item()  # a torch / numpy one-element tensor or array
    except Exception:  # noqa: BLE001  (no .item(), or not one element)
        v = None
    if isinstance(v, numbers.Real):
        return float(v)
    return NotANumber(type(x).__name__, repr(x)[:40])


def _load(name: str, kind: str, cwd: str, path: list[str]) -> Callable:
    """In a worker: the function, imported as the parent sees it (its working directory, sys.path)."""
    if name not in _functions:
        if name == "math":
            _functions[name] = _math
        else:
            if os.getcwd() != cwd:
                os.chdir(cwd)
            sys.path[:] = path
            importlib.invalidate_caches()
            _functions[name] = _import(name, kind)
    return _functions[name]


def _trl_call(fn: Callable, kwargs: dict) -> list | WrongShape:
    """A TRL reward's scores of one slice: per completion a float, None (not applicable) or NotANumber."""
    n = len(kwargs["completions"])
    got = fn(**kwargs, trainer_state=None, log_extra=_ignore, log_metric=_ignore)
    if inspect.iscoroutine(got):  # TRL also takes async reward functions
        got = asyncio.run(got)
    try:
        values = list(got)
    except TypeError:
        return WrongShape(f"a {type(got).__name__}")
    if len(values) != n:
        return WrongShape(f"{len(values)} values for {n} completions")
    return [None if v is None else _number(v) for v in values]


def _work(name: str, kind: str, cwd: str, path: list[str], slot: int, calls: list) -> list:
    """In a worker: run `calls` in order: a verifier's (prompt, completion, answer), each a float, Failed or
    NotANumber; a reward's keyword dicts (slices of the batch), each a list of scores, Failed or WrongShape.
    Marks in `_progress` which call runs since when, for the parent's timeout (the import counts as part of
    the first call)."""
    out = []
    for i, call in enumerate(calls):
        _progress[2 * slot] = time.time()
        _progress[2 * slot + 1] = i  # after the time: the parent reads index, time, index
        fn = _load(name, kind, cwd, path)  # one that fails here (the parent's import worked) stops the run
        try:
            out.append(_trl_call(fn, call) if kind == "reward" else _number(fn(*call)))
        except BaseException as e:  # noqa: BLE001  (a bug in the verifier costs this completion only)
            out.append(Failed(f"{type(e).__name__}: {one_line(e)}" if str(e).strip() else type(e).__name__))
    _progress[2 * slot] = 0.0
    return out


# --------------------------------------------------------------------------- the parent side


class _Pool:
    """The worker processes (started on first use) and the progress board they share with the parent."""

    def __init__(self, name: str):
        ctx = multiprocessing.get_context("forkserver")  # not fork: the parent runs torch threads
        # Workers fork from a server that has imported these (the first pool of a process decides).
        ctx.set_forkserver_preload([__name__, *(["math_verify"] if name == "math" else [])])
        self.size = pool_size()
        self.progress = ctx.RawArray("d", 2 * self.size)
        lifeline, self.lifeline = ctx.Pipe(duplex=False)  # the workers read; only this process holds the writer
        self.executor = ProcessPoolExecutor(self.size, ctx, initializer=_init_worker,
                                            initargs=(self.progress, lifeline))

    def submit(self, *args):
        # Workers start from a bare __main__: the `npo` script would be re-run in each one, importing torch.
        main = sys.modules["__main__"]
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            return self.executor.submit(_work, *args)
        finally:
            sys.modules["__main__"] = main

    def running(self, slot: int) -> tuple[int, float] | None:
        """(index, start time) of the call running in `slot`, or None."""
        i, t, j = self.progress[2 * slot + 1], self.progress[2 * slot], self.progress[2 * slot + 1]
        return (int(i), t) if t and i == j and i >= 0 else None

    def kill(self) -> None:
        """Stop every worker now: a running call cannot be cancelled, only its process ended."""
        for p in list((self.executor._processes or {}).values()):
            p.kill()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.lifeline.close()


class _Tally:
    """This run's verifier calls and failures, and the errors already reported."""

    def __init__(self):
        self.calls = self.failures = 0
        self.seen: set[str] = set()


_pool: _Pool | None = None
_tally = _Tally()


def pool_size() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def new_run() -> None:
    """Count verifier failures afresh (a run, or a branch, starts)."""
    global _tally
    _tally = _Tally()


def _scores(name: str, calls: list, timeout: float, max_failures: float, kind: str = "verifier") -> list:
    """Results of `calls` (see _work) by verifier `name` (math or module:function) or reward `name` in the
    worker processes, one chunk per worker. A call past `timeout` gets its worker killed and the pool
    replaced; calls it took down with it are run again."""
    global _pool
    out: list = [None] * len(calls)
    todo = list(range(len(calls)))
    while todo:
        if _pool is None:
            _pool = _Pool(name)
        pool, n = _pool, _pool.size
        chunks = [todo[k::n] for k in range(n) if todo[k::n]]
        for slot in range(len(chunks)):
            pool.progress[2 * slot], pool.progress[2 * slot + 1] = 0.0, -1
        results: dict[int, object] = {}
        try:
            futures = {pool.submit(name, kind, os.getcwd(), list(sys.path), s, [calls[i] for i in c]): c
                       for s, c in enumerate(chunks)}
            while True:  # short slices: a hung call is noticed, and the main thread's signal handlers run
                done, pending = wait(futures, timeout=POLL_S, return_when=FIRST_EXCEPTION)
                if any(f.exception() is not None for f in done):
                    break
                for slot, f in enumerate(futures):
                    r = pool.running(slot) if f in pending else None
                    if r is not None and time.time() - r[1] > timeout:
                        results[futures[f][r[0]]] = Failed(f"timed out after {timeout:g} s")
                if not pending or results:
                    break
            done = {f for f in futures if f.done()}  # a chunk may have finished since the wait
            for f in done:
                e = f.exception()
                if e is None:
                    results.update(zip(futures[f], f.result()))
                elif isinstance(e, NpoError):  # the worker could not import the verifier
                    raise NpoError(str(e)) from None
                elif isinstance(e, BrokenProcessPool):
                    raise NpoError(f"a worker process of {kind} '{name}' died: a {kind} must return a "
                                   "number or raise, never end its process")
                else:
                    raise NpoError(f"{kind} '{name}' could not be run: {type(e).__name__}: {one_line(e)}")
        except BaseException:
            pool.kill()  # a call left running would keep its worker, and the interpreter's exit, waiting
            _pool = None
            raise
        if len(done) < len(futures):  # a call timed out
            pool.kill()
            _pool = None
        _account(name, kind, calls, results, max_failures)
        out = [results.get(i, x) for i, x in enumerate(out)]
        todo = [i for i in todo if out[i] is None]
    return out


def _account(name: str, kind: str, calls: list, results: dict, max_failures: float) -> None:
    """Count finished completions (failures score 0, in place), report each new error once, and stop the run
    when a reward is not a number or more than max_failures of this run's completions have failed."""
    t, new, last = _tally, [], None
    for i, r in results.items():
        n, prompt = (len(calls[i]["completions"]), calls[i]["prompts"][0]) if kind == "reward" else (1, calls[i][0])
        if isinstance(r, WrongShape):
            raise NpoError(f"reward '{name}' returned {r.what}; a TRL reward function returns a list with one "
                           "float (or None) per completion")
        t.calls += n
        if isinstance(r, Failed):
            t.failures += n
            results[i], last = [0.0] * n if kind == "reward" else 0.0, r.error
            if r.error not in t.seen:
                t.seen.add(r.error)
                new.append((r.error, prompt if isinstance(prompt, str) else prompt[-1]["content"]))
            continue
        for x in r if kind == "reward" else [r]:
            if isinstance(x, NotANumber):  # a bug, not a bad completion: never scored as a failure
                raise NpoError(f"{kind} '{name}' returned a {x.type} ({x.value}); a reward must be a number "
                               "(int, float or bool)" + (" or None" if kind == "reward" else ""))
            if x is not None and not math.isfinite(x):  # a NaN reward would turn the advantages into NaN
                raise NpoError(f"{kind} '{name}' returned {x}; a reward must be a finite number")
    if last is not None and t.failures > max_failures * max(t.calls, MIN_CALLS):
        raise NpoError(f"{kind} '{name}' failed: {last} (on {t.failures} of {t.calls} "
                       f"{'completions' if kind == 'reward' else 'calls'}, more than "
                       f"task.verifier_max_failures={max_failures:g}; fix the {kind} or raise that share)")
    for error, prompt in new:
        p = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        print(f"warning: {kind} '{name}' failed on prompt {p!r}: {error} (scored 0; not reported again)",
              file=sys.stderr)


# --------------------------------------------------------------------------- the reward function


class Call(NamedTuple):
    """One completion to score. A TRL reward also gets `problem`'s chat turns and dataset columns and the
    completion's token ids; without a problem it sees the answer column alone."""

    prompt: str
    completion: str
    answer: str
    finished: bool | None = None
    problem: Any = None  # a tasks.Problem (this module is imported by the workers, which need no tasks)
    completion_ids: Sequence[int] = ()

    @classmethod
    def of(cls, problem, rollout) -> Call:
        return cls(problem.prompt, rollout.text, problem.answer, rollout.finished, problem, rollout.completion_ids)


class Verifier:
    """A task's reward: `v(prompt, completion, answer, finished=None)` scores one completion,
    `v.batch(calls)` many, in one round trip to the worker processes per function, and `v.scores(calls)`
    gives the rewards with each completion's correctness.

    The reward is task.verifier's score, or with task.rewards their weighted sum (a None term is left out; a
    completion all of whose terms are None scores 0). task.format_reward is added to a well-formed
    completion: not known to be unfinished (finished is not False) and, for `exact`, a single non-empty
    line; for `math`, a \\boxed{...} answer; for a user verifier or task.rewards, finished alone.
    Correct: the score of task.correct ("verifier" or one of the rewards) is at least task.correct_threshold.
    A judge (`judge=True`) scores 1.0 for a correct completion and 0.0 otherwise, never a format bonus."""

    def __init__(self, task: TaskConfig, judge: bool = False):
        self.name, self.bonus, self.judge = task.verifier, 0.0 if judge else task.format_reward, judge
        self.timeout, self.max_failures = task.verifier_timeout, task.verifier_max_failures
        self.rewards = [(r.function, r.weight) for r in task.rewards]
        self.correct, self.threshold = task.correct or "verifier", task.correct_threshold
        self.answer_field, self.chat = task.answer_field, task.chat_template
        shapes = {"exact": lambda c: bool(c.strip()) and "\n" not in c.strip(),
                  "math": lambda c: BOXED.search(c) is not None}
        if not self.rewards or self.correct == "verifier":  # the verifier is used
            if ":" in self.name:
                _import(self.name)  # a missing or misshapen verifier fails here, before any model is loaded
            elif self.name not in shapes:
                raise NpoError(f"unknown verifier '{self.name}': use 'exact', 'math' or 'module:function'")
        self.shape = shapes.get(self.name, lambda c: True) if not self.rewards else lambda c: True
        for function, _ in self.rewards:
            _import(function, "reward")

    def __call__(self, prompt: str, completion: str, answer: str, finished: bool | None = None) -> float:
        return self.batch([(prompt, completion, answer, finished)])[0]

    def batch(self, calls: Sequence[tuple]) -> list[float]:
        """Rewards of Calls (or (prompt, completion, answer, finished) tuples), in order; a judge's 1.0 / 0.0."""
        rewards, correct = self._score(calls, reward=not self.judge, correct=self.judge)
        return [float(ok) for ok in correct] if self.judge else rewards

    def scores(self, calls: Sequence[tuple]) -> tuple[list[float], list[bool]]:
        """The rewards of `calls` and whether each is correct, every function called once per completion."""
        return self._score(calls, reward=True, correct=True)

    def _score(self, calls: Sequence[tuple], reward: bool, correct: bool) -> tuple[list[float], list[bool]]:
        calls = [Call(*c) for c in calls]
        terms = ([f for f, _ in self.rewards] or ["verifier"]) if reward else []
        terms = list(dict.fromkeys([*terms, *([self.correct] if correct else [])]))
        values = {t: self._verify(calls) if t == "verifier" else self._reward(t, calls) for t in terms}
        rewards = []
        if reward:
            rewards = ([sum(w * values[f][i] for f, w in self.rewards if values[f][i] is not None)
                        for i in range(len(calls))] if self.rewards else values["verifier"])
            rewards = [s + self.bonus if self.bonus and c.finished is not False and self.shape(_cut(c.completion))
                       else s for s, c in zip(rewards, calls)]
        oks = [v is not None and v >= self.threshold for v in values[self.correct]] if correct else []
        return rewards, oks

    def _verify(self, calls: list[Call]) -> list[float]:
        if not calls:
            return []
        if self.name == "exact":  # cannot raise or hang: no need for a worker
            return [exact(c.prompt, c.completion, c.answer) for c in calls]
        return _scores(self.name, [(c.prompt, c.completion, c.answer) for c in calls], self.timeout,
                       self.max_failures)

    def _reward(self, function: str, calls: list[Call]) -> list[float | None]:
        """TRL reward `function`'s scores: the batch split in one slice per worker, each slice one call."""
        if not calls:
            return []
        k = -(-len(calls) // pool_size())
        slices = [self._trl_kwargs(calls[i : i + k]) for i in range(0, len(calls), k)]
        return [x for got in _scores(function, slices, self.timeout, self.max_failures, "reward") for x in got]

    def _trl_kwargs(self, calls: list[Call]) -> dict:
        """GRPOTrainer's keywords for a slice: every column as a list (the answer under task.answer_field), a
        chat prompt as its messages and a completion as one assistant message when task.chat_template is on."""
        rows = [{self.answer_field: c.answer, **(c.problem.columns if c.problem is not None else {})}
                for c in calls]
        columns = {k: [r.get(k) for r in rows] for k in dict.fromkeys(k for r in rows for k in r)
                   if k not in ("prompt", "completion", "completion_ids")}  # as TRL: they come as prompts, ...
        if self.chat:
            prompts = [[*({"role": r, "content": t} for r, t in (c.problem.context if c.problem else ())),
                        {"role": "user", "content": c.prompt}] for c in calls]
            completions = [[{"role": "assistant", "content": c.completion}] for c in calls]
        else:
            prompts, completions = [c.prompt for c in calls], [c.completion for c in calls]
        return {**columns, "prompts": prompts, "completions": completions,
                "completion_ids": [list(c.completion_ids) for c in calls]}


def make_verifier(task: TaskConfig) -> Verifier:
    """The task's reward (task.verifier or task.rewards), plus task.format_reward when well-formed."""
    return Verifier(task)


def make_judge(task: TaskConfig) -> Verifier:
    """Correctness alone (task.correct), 1.0 or 0.0, for deciding whether a completion counts as solved
    (pass rates, evaluation), so a format bonus never lets a wrong answer through."""
    return Verifier(task, judge=True)


def score_batch(fn: Callable[..., float], calls: Sequence[tuple]) -> list[float]:
    """Rewards of Calls (or (prompt, completion, answer, finished) tuples): in one batch for a Verifier; any
    other reward function (prompt, completion, answer) is called once per completion."""
    if isinstance(fn, Verifier):
        return fn.batch(calls)
    return [float(fn(p, c, a)) for p, c, a, *_ in calls]
