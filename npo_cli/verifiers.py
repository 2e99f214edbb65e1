"""Verifiers: (prompt, completion, answer) -> reward.

`completion` is the decoded completion with special tokens skipped (Rollout.text). The built-in
verifiers also take `finished=` (Rollout.finished: the completion ended with EOS) for the optional
format term; user verifiers (`module:function`) are called with the three positional arguments.

`math` and user verifiers run in worker processes, so that every call has a timeout (task.verifier_timeout:
a hung worker is killed) and a call that raises or hangs costs its completion alone: it scores 0, is
reported once per distinct error, and the run stops only once more than task.verifier_max_failures of the
calls have failed. A reward that is not a number stops the run at once (a bug, not a bad completion).
"""

from __future__ import annotations

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
from typing import TYPE_CHECKING

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


def _import(path: str) -> Callable[[str, str, str], float]:
    mod_name, _, fn_name = path.partition(":")
    # The `npo` script, unlike `python -m`, leaves the working directory off sys.path: a verifier module
    # next to the recipe is found there. Appended, so it never shadows an installed module.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError, ValueError) as e:
        raise NpoError(f"verifier '{path}' not found: {e}") from None
    if not callable(fn):
        raise NpoError(f"verifier '{path}' not found: {fn_name} is not a function")
    try:  # a TRL reward function (prompts, completions, **kw) fails here, not at the first step
        inspect.signature(fn).bind("prompt", "completion", "answer")
    except TypeError:
        raise NpoError(f"verifier '{path}' must take (prompt, completion, answer) and return a float reward "
                       "(1.0 or more counts as correct)") from None
    except ValueError:  # no signature to inspect (some builtins): the call will tell
        pass
    return fn


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


def _load(name: str, cwd: str, path: list[str]) -> Callable:
    """In a worker: the verifier function, imported as the parent sees it (its working directory, sys.path)."""
    if name not in _functions:
        if name == "math":
            _functions[name] = _math
        else:
            if os.getcwd() != cwd:
                os.chdir(cwd)
            sys.path[:] = path
            importlib.invalidate_caches()
            _functions[name] = _import(name)
    return _functions[name]


def _work(name: str, cwd: str, path: list[str], slot: int, calls: list[tuple[str, str, str]]) -> list:
    """In a worker: score `calls` in order, each a float, Failed or NotANumber. Marks in `_progress` which
    call runs since when, for the parent's timeout (the import counts as part of the first call)."""
    out = []
    for i, (p, c, a) in enumerate(calls):
        _progress[2 * slot] = time.time()
        _progress[2 * slot + 1] = i  # after the time: the parent reads index, time, index
        fn = _load(name, cwd, path)  # one that fails here (the parent's import worked) stops the run
        try:
            out.append(_number(fn(p, c, a)))
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
        self.size = max(1, min(4, os.cpu_count() or 1))
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


def new_run() -> None:
    """Count verifier failures afresh (a run, or a branch, starts)."""
    global _tally
    _tally = _Tally()


def _scores(name: str, calls: list[tuple[str, str, str]], timeout: float, max_failures: float) -> list[float]:
    """Scores of `calls` by verifier `name` (math or module:function) in the worker processes, one chunk per
    worker. A call past `timeout` gets its worker killed and the pool replaced; calls it took down with it
    are run again."""
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
            futures = {pool.submit(name, os.getcwd(), list(sys.path), s, [calls[i] for i in c]): c
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
                    raise NpoError(f"a worker process of verifier '{name}' died: a verifier must return a "
                                   "number or raise, never end its process")
                else:
                    raise NpoError(f"verifier '{name}' could not be run: {type(e).__name__}: {one_line(e)}")
        except BaseException:
            pool.kill()  # a call left running would keep its worker, and the interpreter's exit, waiting
            _pool = None
            raise
        if len(done) < len(futures):  # a call timed out
            pool.kill()
            _pool = None
        _account(name, calls, results, max_failures)
        out = [results.get(i, x) for i, x in enumerate(out)]
        todo = [i for i in todo if out[i] is None]
    return out


def _account(name: str, calls: list[tuple[str, str, str]], results: dict, max_failures: float) -> None:
    """Count finished calls (failures score 0, in place), report each new error once, and stop the run when a
    reward is not a number or more than max_failures of this run's calls have failed."""
    t, new, last = _tally, [], None
    for i, r in results.items():
        if isinstance(r, NotANumber):  # a bug, not a bad completion: never scored as a failure
            raise NpoError(f"verifier '{name}' returned a {r.type} ({r.value}); a reward must be a number "
                           "(int, float or bool)")
        if isinstance(r, Failed):
            t.failures += 1
            results[i], last = 0.0, r.error
            if r.error not in t.seen:
                t.seen.add(r.error)
                new.append((r.error, calls[i][0]))
        elif not math.isfinite(r):  # a NaN reward would turn the advantages, then the weights, into NaN
            raise NpoError(f"verifier '{name}' returned {r}; a reward must be a finite number")
    t.calls += len(results)
    if last is not None and t.failures > max_failures * max(t.calls, MIN_CALLS):
        raise NpoError(f"verifier '{name}' failed: {last} (on {t.failures} of {t.calls} calls, more than "
                       f"task.verifier_max_failures={max_failures:g}; fix the verifier or raise that share)")
    for error, prompt in new:
        p = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        print(f"warning: verifier '{name}' failed on prompt {p!r}: {error} (scored 0; not reported again)",
              file=sys.stderr)


# --------------------------------------------------------------------------- the reward function


class Verifier:
    """A task's reward: `v(prompt, completion, answer, finished=None)` scores one completion,
    `v.batch(calls)` many, in one round trip to the worker processes. task.format_reward is added to a
    well-formed completion: not known to be unfinished (finished is not False) and, for `exact`, a single
    non-empty line; for `math`, a \\boxed{...} answer; for a user verifier, finished alone."""

    def __init__(self, task: TaskConfig):
        self.name, self.bonus = task.verifier, task.format_reward
        self.timeout, self.max_failures = task.verifier_timeout, task.verifier_max_failures
        if self.name == "exact":
            self.shape = lambda c: bool(c.strip()) and "\n" not in c.strip()
        elif self.name == "math":
            self.shape = lambda c: BOXED.search(c) is not None
        elif ":" in self.name:
            _import(self.name)  # a missing or misshapen verifier fails here, before any model is loaded
            self.shape = lambda c: True
        else:
            raise NpoError(f"unknown verifier '{self.name}': use 'exact', 'math' or 'module:function'")

    def __call__(self, prompt: str, completion: str, answer: str, finished: bool | None = None) -> float:
        return self.batch([(prompt, completion, answer, finished)])[0]

    def batch(self, calls: Sequence[tuple[str, str, str, bool | None]]) -> list[float]:
        """Rewards of (prompt, completion, answer, finished) calls, in order."""
        if not calls:
            return []
        if self.name == "exact":  # cannot raise or hang: no need for a worker
            scores = [exact(p, c, a) for p, c, a, _ in calls]
        else:
            scores = _scores(self.name, [(p, c, a) for p, c, a, _ in calls], self.timeout, self.max_failures)
        return [s + self.bonus if self.bonus and f is not False and self.shape(_cut(c)) else s
                for s, (_, c, _, f) in zip(scores, calls)]


def make_verifier(task: TaskConfig) -> Verifier:
    """The reward function named by task.verifier, plus task.format_reward when well-formed."""
    return Verifier(task)


def make_judge(task: TaskConfig) -> Verifier:
    """The verifier without the format term: correctness alone, for deciding whether a completion
    counts as solved (pass rates, evaluation), so a format bonus never lets a wrong answer through."""
    return Verifier(task.model_copy(update={"format_reward": 0.0}))


def score_batch(fn: Callable[..., float], calls: Sequence[tuple[str, str, str, bool | None]]) -> list[float]:
    """Rewards of (prompt, completion, answer, finished) calls: in one batch for a Verifier; any other reward
    function (prompt, completion, answer) is called once per completion."""
    if isinstance(fn, Verifier):
        return fn.batch(calls)
    return [float(fn(p, c, a)) for p, c, a, _ in calls]
