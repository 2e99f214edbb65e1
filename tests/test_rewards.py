"""task.rewards: TRL reward functions, called as GRPOTrainer calls them (prompts=, completions=,
completion_ids=, every dataset column as a keyword), weighted and summed, in the verifiers' timed worker pool;
task.correct names what decides correctness."""

from __future__ import annotations

import json
import textwrap

import pytest
import yaml
from conftest import run_main

from npo_cli import verifiers
from npo_cli.batch import score_groups
from npo_cli.errors import NpoError
from npo_cli.recipe import TaskConfig, build_recipe
from npo_cli.rollout import Rollout
from npo_cli.tasks import Problem
from npo_cli.verifiers import Call

REWARDS = '''
import time

def length(completions, **kwargs):
    return [float(len(c)) for c in completions]

def matches(prompts, completions, completion_ids, answer, **kwargs):
    return [float(c == a) for c, a in zip(completions, answer)]

def solved(completions, solution, **kwargs):
    return [float(c == s) for c, s in zip(completions, solution)]

def seen(prompts, completions, completion_ids, solution, level, trainer_state, log_metric, log_extra, **kwargs):
    log_metric("seen", 1.0)
    log_extra("seen", list(solution))
    return [float(len(ids)) + lv for ids, lv in zip(completion_ids, level)]

def chat(prompts, completions, **kwargs):
    return [float(p[0]["role"] == "system" and c[0]["role"] == "assistant") for p, c in zip(prompts, completions)]

async def length_async(completions, **kwargs):
    return [float(len(c)) for c in completions]

def odd_only(completions, **kwargs):
    return [1.0 if len(c) % 2 else None for c in completions]

def never(completions, **kwargs):
    return [None] * len(completions)

def hangs(completions, **kwargs):
    if "hang" in completions:
        time.sleep(60)
    return [1.0] * len(completions)

def raises(completions, **kwargs):
    if "boom" in completions:
        raise ValueError("no reward for boom")
    return [1.0] * len(completions)

def short(completions, **kwargs):
    return [1.0] * (len(completions) - 1)

def text(completions, **kwargs):
    return ["1.0"] * len(completions)

def by_level(prompts, completions, level, solution, **kwargs):
    assert all(s == p.replace("=", "") for p, s in zip(prompts, solution))
    return [float(lv) for lv in level]

def plain(prompt, completion, answer):
    return 1.0
'''


@pytest.fixture
def mod(tmp_path, monkeypatch):
    """The reward module `trl_rewards` in the working directory (where npo looks for it)."""
    (tmp_path / "trl_rewards.py").write_text(textwrap.dedent(REWARDS))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(verifiers, "pool_size", lambda: 2)  # two slices, whatever the core count
    verifiers.new_run()
    return "trl_rewards"


def task(*rewards, correct=None, **kw) -> TaskConfig:
    return TaskConfig(rewards=[r if isinstance(r, dict) else {"function": f"trl_rewards:{r}"} for r in rewards],
                      correct=correct and f"trl_rewards:{correct}", **kw)


def calls(*completions, answer="ab", **columns) -> list[Call]:
    p = Problem("q", answer, columns=columns)
    return [Call("q", c, answer, True, p, [7] * (i + 1)) for i, c in enumerate(completions)]


def test_weighted_sum_of_two_rewards(mod):
    t = task({"function": "trl_rewards:length_async", "weight": 0.5}, {"function": "trl_rewards:matches", "weight": 2.0},
             correct="matches")
    rewards, correct = verifiers.make_verifier(t).scores(calls("ab", "abcd", "x", "ab"))
    assert rewards == [0.5 * 2 + 2.0, 0.5 * 4, 0.5 * 1, 0.5 * 2 + 2.0]
    assert correct == [True, False, False, True]


def test_columns_and_ids_reach_reward_as_keywords(mod):
    """Every column of the record arrives as a list under its own name, with the token ids; the logging hooks
    and trainer_state are accepted."""
    rewards, _ = verifiers.make_verifier(task("seen", "solved", correct="solved")).scores(
        calls("zz", "s", "y", solution="s", level=10))
    assert rewards == [1 + 10 + 0, 2 + 10 + 1, 3 + 10 + 0]


def test_chat_prompts_and_completions_are_messages(mod):
    t = task("chat", correct="chat", chat_template=True)
    p = Problem("q", "a", context=(("system", "be brief"),))
    assert verifiers.make_verifier(t).batch([Call("q", "a", "a", True, p, [1])]) == [1.0]


def test_none_is_left_out_and_all_none_scores_zero(mod):
    rewards, correct = verifiers.make_verifier(task("odd_only", "never", correct="odd_only")).scores(
        calls("a", "ab", "abc"))
    assert rewards == [1.0, 0.0, 1.0]
    assert correct == [True, False, True]  # None is never correct


def test_hung_and_raising_slices_score_zero_and_warn_once(mod, capsys):
    """A slice that hangs costs its completions a timeout, one that raises scores 0; the run goes on."""
    hang = verifiers.make_verifier(task("hangs", correct="hangs", verifier_timeout=1.0, verifier_max_failures=1.0))
    assert hang.batch(calls("a", "hang", "c", "d")) == [0.0, 0.0, 1.0, 1.0]  # slices [a, hang] and [c, d]
    boom = verifiers.make_verifier(task("raises", correct="raises", verifier_max_failures=1.0))
    assert boom.batch(calls("boom", "b", "c", "d")) == [0.0, 0.0, 1.0, 1.0]
    assert boom.batch(calls("boom", "b")) == [0.0, 1.0]  # one completion a slice
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [("warning: reward 'trl_rewards:hangs' failed on prompt 'q': timed out after 1 s "
                        "(scored 0; not reported again)"),
                        ("warning: reward 'trl_rewards:raises' failed on prompt 'q': ValueError: no reward for boom "
                        "(scored 0; not reported again)")]


def test_failure_share_stops_the_run(mod):
    boom = verifiers.make_verifier(task("raises", correct="raises"))
    with pytest.raises(NpoError, match=r"reward 'trl_rewards:raises' failed: ValueError: no reward for boom "
                                       r"\(on 4 of 8 completions, more than task.verifier_max_failures=0.1"):
        boom.batch(calls("boom", *"bcdefgh"))  # 4 failed of at least 20: more than 10%


@pytest.mark.parametrize("name, expect", [
    ("short", ("reward 'trl_rewards:short' returned 1 values for 2 completions; a TRL reward function returns a list "
              "with one float (or None) per completion")),
    ("text", ("reward 'trl_rewards:text' returned a str ('1.0'); a reward must be a number (int, float or bool) "
             "or None")),
])
def test_wrong_list_is_refused(mod, name, expect):
    with pytest.raises(NpoError) as e:
        verifiers.make_verifier(task(name, correct=name)).batch(calls("a", "b", "c", "d"))
    assert str(e.value) == expect


def test_correct_names_the_deciding_reward(mod):
    """The same rewards, two judges: the groups' correctness (accuracy) follows task.correct."""
    problem = Problem("q", "ab")
    rollouts = [Rollout([1], [2] * len(t), [0.0] * len(t), t, True) for t in ("ab", "abc", "abcd")]
    by = {}
    for correct in ("matches", "length"):
        t = task("matches", "length", correct=correct, correct_threshold=3.0)
        (group,) = score_groups([problem], ["q"], [rollouts], verifiers.make_verifier(t))
        assert group.rewards == [3.0, 3.0, 4.0]
        by[correct] = (group.correct, verifiers.make_judge(t).batch([Call.of(problem, r) for r in rollouts]))
    assert by["matches"] == ([False, False, False], [0.0, 0.0, 0.0])  # 1.0 < 3.0
    assert by["length"] == ([False, True, True], [0.0, 1.0, 1.0])


def test_correct_verifier_judges_while_rewards_reward(mod):
    """The verifier may stay the judge: the rewards are the reward, `exact` decides correctness."""
    t = TaskConfig(rewards=[{"function": "trl_rewards:length"}], correct="verifier", verifier="exact")
    rewards, correct = verifiers.make_verifier(t).scores(calls("ab", "abc"))
    assert (rewards, correct) == ([2.0, 3.0], [True, False])


@pytest.mark.parametrize("task_, expect", [
    ({"rewards": [{"function": "trl_rewards:length"}]},
     ("task.rewards needs task.correct: 'verifier' or the module:function of the reward whose score decides "
     "correctness")),
    ({"rewards": [{"function": "trl_rewards:length"}], "correct": "trl_rewards:matches"},
     "task.correct must be 'verifier' or one of task.rewards (trl_rewards:length), not 'trl_rewards:matches'"),
])
def test_correct_must_be_named(task_, expect):
    with pytest.raises(NpoError) as e:
        build_recipe({"task": task_})
    assert expect in str(e.value)


def test_trl_function_as_verifier_points_to_rewards(mod):
    with pytest.raises(NpoError, match=r"^verifier 'trl_rewards:length' must take \(prompt, completion, answer\); "
                                       r"a TRL-style batched reward function .* goes in task.rewards, with task.correct"):
        verifiers.make_verifier(TaskConfig(verifier="trl_rewards:length"))
    with pytest.raises(NpoError, match=r"^reward 'trl_rewards:plain' must take TRL's keywords"):
        verifiers.make_verifier(task("plain", correct="plain"))


def test_run_with_a_column_reward(tmp_path, mod, monkeypatch, capsys):
    """A 2-step run on a JSONL file whose extra columns reach the reward; accuracy follows task.correct."""
    monkeypatch.setenv("NPO_STORE", str(tmp_path / "store"))
    rows = [("1+2=", "3", 1), ("2+2=", "4", 0), ("4+5=", "9", 1), ("3+3=", "6", 1)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": a, "solution": p[:-1], "level": lv})
                                              + "\n" for p, a, lv in rows))
    recipe = {"name": "t", "model": {"path": "tiny"},
              "task": {"kind": "file", "train_path": "p.jsonl", "eval_path": "p.jsonl", "eval_size": 4,
                       "rewards": [{"function": "trl_rewards:by_level", "weight": 2.0}],
                       "correct": "trl_rewards:by_level"},
              "rollout": {"prompts_per_step": 4, "group_size": 2, "max_new_tokens": 3},
              "train": {"steps": 2, "save_every": 1, "eval_every": 2}, "logging": {"progress": False}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    code, _, err = run_main(["run", "r.yaml", "--json"], monkeypatch, capsys)
    assert code == 0, err
    lines = [json.loads(x) for x in next((tmp_path / "runs").rglob("metrics.jsonl")).read_text().splitlines()]
    steps = [m for m in lines if "reward" in m]
    assert [(m["reward"], m["accuracy"]) for m in steps] == [(1.5, 0.75)] * 2
    assert [m["eval/accuracy"] for m in lines if "eval/accuracy" in m] == [0.75]
