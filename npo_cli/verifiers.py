"""Verifiers: (prompt, completion, answer) -> reward.

`completion` is the decoded completion with special tokens skipped (Rollout.text). The built-in
verifiers also take `finished=` (Rollout.finished: the completion ended with EOS) for the optional
format term; user verifiers (`module:function`) are called with the three positional arguments.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import re
import sys
import threading
from collections.abc import Callable

from npo_cli.errors import NpoError
from npo_cli.recipe import TaskConfig

# End-of-sequence markers a completion may still carry when it was decoded with special tokens
# (e.g. LUFFY teacher files); everything after one is ignored.
EOS_MARKERS = ("<eos>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>")
BOXED = re.compile(r"\\boxed\s*\{")


def _cut(completion: str) -> str:
    for m in EOS_MARKERS:
        completion = completion.split(m, 1)[0]
    return completion


def exact(prompt: str, completion: str, answer: str) -> float:
    """1.0 when the completion's first line (up to EOS / newline), stripped, equals the answer."""
    return float(_cut(completion).split("\n", 1)[0].strip() == answer.strip())


def _run_with_timeout(fn: Callable[[], float], seconds: float) -> float:
    """fn() in a daemon thread; 0.0 if it raises or outlives `seconds`.

    math_verify's own timeouts use signal.alarm (main thread only, Unix only), so they are off and
    this bounds the call instead. A stuck sympy call is abandoned (daemon: it cannot block exit).
    """
    box: list[float] = []

    def target():
        try:
            box.append(fn())
        except Exception:  # noqa: BLE001  (a malformed expression is a wrong answer, not a crash)
            box.append(0.0)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    return box[0] if box else 0.0


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


def make_verifier(task: TaskConfig) -> Callable[..., float]:
    """The reward function named by task.verifier, plus task.format_reward when well-formed.

    Well-formed: not known to be unfinished (finished is not False) and, for `exact`, a single
    non-empty line; for `math`, a \\boxed{...} answer; for a user verifier, finished alone.
    """
    name = task.verifier
    if name == "exact":
        core, shape = exact, lambda c: bool(c.strip()) and "\n" not in c.strip()
    elif name == "math":
        timeout = task.verifier_timeout

        def core(prompt: str, completion: str, answer: str) -> float:
            return _run_with_timeout(lambda: math_score(completion, answer), timeout)

        def shape(c: str) -> bool:
            return BOXED.search(c) is not None
    elif ":" in name:
        user = _import(name)

        def core(prompt: str, completion: str, answer: str) -> float:
            try:
                r = float(user(prompt, completion, answer))
            except Exception as e:  # noqa: BLE001  (any user bug -> one-line error naming the verifier)
                raise NpoError(f"verifier '{name}' failed: {type(e).__name__}: {e}") from None
            if not math.isfinite(r):  # a NaN reward would turn the advantages, then the weights, into NaN
                raise NpoError(f"verifier '{name}' returned {r}; a reward must be a finite number")
            return r

        def shape(c: str) -> bool:
            return True
    else:
        raise NpoError(f"unknown verifier '{name}': use 'exact', 'math' or 'module:function'")

    bonus = task.format_reward

    def verify(prompt: str, completion: str, answer: str, finished: bool | None = None) -> float:
        score = core(prompt, completion, answer)
        if bonus and finished is not False and shape(_cut(completion)):
            score += bonus
        return score

    return verify


def make_judge(task: TaskConfig) -> Callable[..., float]:
    """The verifier without the format term: correctness alone, for deciding whether a completion
    counts as solved (pass rates, evaluation), so a format bonus never lets a wrong answer through."""
    return make_verifier(task.model_copy(update={"format_reward": 0.0}))
