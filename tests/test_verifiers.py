"""Verifiers: exact, math (math-verify with our own timeout), user module:function, format term."""

import sys

import pytest

from npo_cli import verifiers
from npo_cli.errors import NpoError
from npo_cli.recipe import TaskConfig


def make(**kw):
    return verifiers.make_verifier(TaskConfig(**kw))


def test_exact():
    v = make(verifier="exact")
    assert v("2+3=", "5", "5") == 1.0
    assert v("2+3=", " 5 \n garbage", "5") == 1.0  # up to the newline
    assert v("2+3=", "5<eos>7", "5") == 1.0  # up to an EOS marker left in the text
    assert v("2+3=", "55", "5") == 0.0
    assert v("2+3=", "", "5") == 0.0


def test_exact_format_reward():
    v = make(verifier="exact", format_reward=0.1)
    assert v("p", "5", "5", finished=True) == pytest.approx(1.1)
    assert v("p", "7", "5", finished=True) == pytest.approx(0.1)  # well-formed but wrong
    assert v("p", "5", "5", finished=False) == 1.0  # ran out of tokens: no format term
    assert v("p", "5\nmore", "5", finished=True) == 1.0  # not a single line



def test_judge_ignores_format_reward():
    """A well-formed wrong answer earns the format bonus from the reward, never a pass from the judge."""
    task = TaskConfig(verifier="exact", format_reward=1.0)
    reward, judge = verifiers.make_verifier(task), verifiers.make_judge(task)
    assert reward("p", "7", "5", finished=True) == pytest.approx(1.0)  # wrong, but the bonus reaches 1.0
    assert judge("p", "7", "5", finished=True) < 1.0
    assert judge("p", "5", "5", finished=True) >= 1.0
    assert task.format_reward == 1.0  # the recipe's task is left as it was

def test_math_boxed_fraction_vs_decimal():
    v = make(verifier="math")
    assert v("q", "so the answer is \\boxed{1/2}", "0.5") == 1.0
    assert v("q", "so the answer is \\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert v("q", "\\boxed{0.6}", "0.5") == 0.0
    assert v("q", "Half of 144 is 72.", "She sold 48 + 24 = 72 clips.\n#### 72") == 1.0  # GSM8K gold
    assert v("q", "\\boxed{1+x}", "x+1") == 1.0  # symbolic gold without $...$
    assert v("q", "no idea", "3") == 0.0


@pytest.mark.parametrize("gold", ["2\\sqrt{2}", "6 - 5i", "4x^2 - 9", "5\\pi", "2^{10}", "3x+2", "p - q",
                                  "\\left( 3, \\frac{\\pi}{2} \\right)", "\\text{Evelyn}", "1,000"])
def test_math_bare_latex_gold(gold):
    """MATH-style answer columns: bare LaTeX is one expression, not its first number."""
    v = make(verifier="math")
    assert v("q", f"The final answer is \\boxed{{{gold}}}.", gold) == 1.0
    wrong = "\\boxed{99}" if gold == "1,000" else "\\boxed{" + ("2" if gold[0].isdigit() else "3") + "}"
    assert v("q", wrong, gold) == 0.0


def test_math_worked_solution_gold():
    """A solution column (text with $...$ and a boxed answer) is read as written."""
    v = make(verifier="math")
    sol = "We have $x^2 = 8$, so $x = 2\\sqrt{2}$ and the answer is $\\boxed{2\\sqrt{2}}$."
    assert v("q", "\\boxed{2\\sqrt{2}}", sol) == 1.0
    assert v("q", "\\boxed{2}", sol) == 0.0


def test_math_format_reward():
    v = make(verifier="math", format_reward=0.5)
    assert v("q", "\\boxed{2}", "3", finished=True) == 0.5
    assert v("q", "2", "2", finished=True) == 1.0  # correct, but no boxed answer


def test_math_batch_runs_in_workers():
    """One batch, one trip to the worker processes; a malformed expression is a wrong answer, not a failure."""
    verifiers.new_run()
    v = make(verifier="math")
    assert v.batch([("q", "\\boxed{1/2}", "0.5", None), ("q", "\\boxed{\\frac{", "1", None)] * 3) == [1.0, 0.0] * 3
    assert verifiers._tally.failures == 0


def test_custom_verifier(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def score(prompt, completion, answer):\n"
        "    return 0.25 if answer in completion else 0.0\n"
        "def broken(prompt, completion, answer):\n"
        "    raise KeyError('x')\n"
        "NOT_FN = 3\n"
        "def nan(prompt, completion, answer):\n"
        "    return float('nan')\n"
        "def trl_style(prompts, completions, **kwargs):\n"
        "    return [0.0 for _ in completions]\n"
        "def flexible(*args, **kwargs):\n"
        "    return 1.0\n"
    )
    # found in the working directory, as the `npo` script runs it (sys.path does not hold the folder)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    v = make(verifier="my_rewards:score", format_reward=0.5)
    assert v("p", "it is 42", "42") == 0.75  # finished unknown -> format term applies
    assert v("p", "it is 41", "42", finished=False) == 0.0
    assert make(verifier="my_rewards:broken")("p", "c", "a") == 0.0  # a failed call scores 0 (counted, warned)
    with pytest.raises(NpoError, match="not a function"):
        make(verifier="my_rewards:NOT_FN")
    with pytest.raises(NpoError, match="verifier 'my_rewards:nan' returned nan; a reward must be a finite number"):
        make(verifier="my_rewards:nan")("p", "c", "a")
    # a TRL reward function is refused when the recipe is read, not at the first step
    with pytest.raises(NpoError, match=r"verifier 'my_rewards:trl_style' must take \(prompt, completion, answer\)"):
        make(verifier="my_rewards:trl_style")
    assert make(verifier="my_rewards:flexible")("p", "c", "a") == 1.0


@pytest.mark.parametrize("path", ["no_such_module_xyz:f", "json:no_such_fn", ":f"])
def test_bad_verifier_paths(path):
    with pytest.raises(NpoError, match=f"verifier '{path}' not found: "):
        make(verifier=path)


def test_unknown_verifier_name():
    with pytest.raises(NpoError, match="unknown verifier 'fuzzy'"):
        make(verifier="fuzzy")
