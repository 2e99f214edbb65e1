"""Built-in arithmetic problems and prompt files: splits, determinism, space size, errors."""

import json
import re
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from npo_cli.errors import NpoError
from npo_cli.recipe import TaskConfig
from npo_cli.tasks import Problem, _value, load_problems, space_size, split_of


def arith(**kw) -> TaskConfig:
    extra = {k: kw.pop(k) for k in ("eval_size",) if k in kw}
    return TaskConfig(arithmetic=kw, **extra)


def test_default_space_is_large_and_splits_disjoint():
    task = arith(eval_size=100_000)
    assert space_size(task.arithmetic, "easy") == 10_000  # 2-digit operands: 100 x 100 sums
    train, ev = load_problems(task, "train", 0), load_problems(task, "eval", 0)
    tr, ev_set = {p.prompt for p in train}, {p.prompt for p in ev}
    assert not tr & ev_set
    assert len(tr) + len(ev_set) == 10_000  # the whole space, nothing lost between the splits
    assert 800 < len(ev_set) < 1200  # ~10% held out
    assert len(ev) == len(ev_set)  # eval problems are distinct


def test_problem_text_answers_and_tags():
    p = load_problems(arith(), "train", 0)[0]
    assert p.prompt.endswith("=") and p.tags == ("easy",)
    a, b = p.prompt[:-1].split("+")
    assert p.answer == str(int(a) + int(b))
    assert _value((2, 3, 4), ("+", "*")) == 14  # '*' binds tighter: 2+3*4
    assert _value((9, 12), ("-",)) == -3
    assert _value((5, 2, 3, 4), ("*", "-", "*")) == -2  # 5*2-3*4


def test_determinism_and_seeds():
    task = arith(ops=["+", "-", "*"], terms=3)
    assert load_problems(task, "train", 7) == load_problems(task, "train", 7)
    assert load_problems(task, "train", 7) != load_problems(task, "train", 8)
    # the eval set does not depend on the run seed, so seeds are compared on the same problems
    assert load_problems(task, "eval", 7) == load_problems(task, "eval", 8)


def test_large_sampled_space_disjoint_and_distinct():
    task = arith(digits=3, ops=["+", "*"], train_size=3000)  # 2 * 10^6 problems: sampled, not listed
    train, ev = load_problems(task, "train", 1), load_problems(task, "eval", 1)
    assert len(train) == 3000 and len({p.prompt for p in train}) == 3000
    assert not {p.prompt for p in train} & {p.prompt for p in ev}
    assert all(split_of(p.prompt) == "eval" for p in ev)


def test_plateau_mix_easy_and_hard():
    task = arith(digits=1, hard_digits=2, hard_fraction=0.25, train_size=1000, eval_size=200)
    train = load_problems(task, "train", 0)
    hard = [p for p in train if "hard" in p.tags]
    assert len(train) == 1000 and len(hard) == 250
    for p in hard:  # a hard problem has an operand with more than `digits` digits
        assert max(int(x) for x in p.prompt[:-1].split("+")) >= 10
    easy = {p.prompt for p in train if "easy" in p.tags}
    assert len(easy) <= 100  # the single-digit class is tiny and repeats to fill its 75% share
    ev = load_problems(task, "eval", 0)
    assert len({p.prompt for p in ev}) == len(ev) and sum("hard" in p.tags for p in ev) == 50
    with pytest.raises(NpoError, match="hard_digits"):
        load_problems(arith(digits=2, hard_digits=2, hard_fraction=0.5), "train", 0)


# ---------------------------------------------------------------- files

ROWS = [{"question": f"q{i}?", "solution": i * 2} for i in range(200)]


def write_jsonl(url: str, rows=ROWS):
    with fsspec.open(url, "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")


def write_parquet(url: str, rows=ROWS):
    with fsspec.open(url, "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows), f)


def file_task(url: str, **kw) -> TaskConfig:
    fields = {"prompt_field": "question", "answer_field": "solution", "eval_size": 1000} | kw
    return TaskConfig(kind="file", train_path=url, **fields)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
@pytest.mark.parametrize("where", ["local", "memory"])
def test_file_prompts_hash_split(tmp_path, fmt, where):
    url = (f"{tmp_path}/p.{fmt}" if where == "local" else f"memory://npo-tasks-{fmt}/p.{fmt}")
    (write_jsonl if fmt == "jsonl" else write_parquet)(url)
    task = file_task(url)
    train, ev = load_problems(task, "train", 0), load_problems(task, "eval", 0)
    assert len(train) + len(ev) == 200 and 5 <= len(ev) <= 40
    assert not {p.prompt for p in train} & {p.prompt for p in ev}
    first = next(r for r in ROWS if split_of(r["question"]) == "train")  # answers come back as text
    assert train[0] == Problem(prompt=first["question"], answer=str(first["solution"]))
    assert load_problems(task, "train", 5) == train  # file order, seed-independent


def test_file_prompts_on_s3_use_the_store_endpoint(s3_url):
    """NPO_S3_ENDPOINT (set by the fixture; AWS_ENDPOINT_URL unset) reaches prompt files too, not only the
    store: s3:// prompt files must not go to AWS."""
    import boto3

    from npo_cli.objects import s3_endpoint

    bucket = s3_url.split("/")[2]
    boto3.client("s3", endpoint_url=s3_endpoint(), region_name="us-east-1").put_object(
        Bucket=bucket, Key="data/p.jsonl", Body="\n".join(json.dumps(r) for r in ROWS).encode())
    task = file_task(f"s3://{bucket}/data/p.jsonl")
    assert len(load_problems(task, "train", 0)) + len(load_problems(task, "eval", 0)) == 200


def test_file_eval_path_and_eval_size(tmp_path):
    write_jsonl(f"{tmp_path}/train.jsonl")
    write_jsonl(f"{tmp_path}/test.jsonl", ROWS[:30])
    task = file_task(f"{tmp_path}/train.jsonl", eval_path=f"{tmp_path}/test.jsonl")
    assert len(load_problems(task, "train", 0)) == 200
    assert len(load_problems(task, "eval", 0)) == 30
    assert len(load_problems(task.model_copy(update={"eval_size": 10}), "eval", 0)) == 10


def test_file_errors(tmp_path):
    with pytest.raises(NpoError, match="not found: .*missing.jsonl"):
        load_problems(file_task(f"{tmp_path}/missing.jsonl"), "train", 0)
    with pytest.raises(NpoError, match="not found: memory://nowhere/x.parquet"):
        load_problems(file_task("memory://nowhere/x.parquet"), "train", 0)
    write_jsonl(f"{tmp_path}/p.jsonl")
    with pytest.raises(NpoError, match="no field 'prompt'"):
        load_problems(TaskConfig(kind="file", train_path=f"{tmp_path}/p.jsonl"), "train", 0)
    write_parquet(f"{tmp_path}/p.parquet")
    with pytest.raises(NpoError, match="no column 'answer'"):
        load_problems(file_task(f"{tmp_path}/p.parquet", answer_field="answer"), "train", 0)
    (tmp_path / "bad.jsonl").write_text('{"question": "a", "solution": 1}\n{oops\n')
    with pytest.raises(NpoError, match="line 2 is not valid JSON"):
        load_problems(file_task(f"{tmp_path}/bad.jsonl"), "train", 0)
    with pytest.raises(NpoError, match="jsonl or .parquet"):
        load_problems(file_task(f"{tmp_path}/p.csv"), "train", 0)
    with pytest.raises(NpoError, match="train_path"):
        load_problems(TaskConfig(kind="file"), "train", 0)


@pytest.mark.parametrize("row, match", [
    ({"question": "a", "solution": None}, "record 1: field 'solution' is empty"),
    ({"question": "a", "solution": float("nan")}, "record 1: field 'solution' is empty"),  # pandas' NaN
    ({"question": "  ", "solution": 1}, "field 'question' must be text or a list of chat messages, not empty"),
    ({"question": 5, "solution": 1}, "must be text or a list of chat messages, not int"),
    ({"question": [{"role": "user", "content": "hi"}], "solution": 1}, "set task.chat_template: true"),
])
def test_file_record_errors_name_the_field(tmp_path, row, match):
    (tmp_path / "p.jsonl").write_text(json.dumps(row) + "\n")  # json writes NaN as NaN, which it reads back
    with pytest.raises(NpoError, match=re.escape(match)):
        load_problems(file_task(f"{tmp_path}/p.jsonl"), "train", 0)


def test_file_bom_whole_float_answers_and_all_held_out(tmp_path):
    """A BOM is not part of line 1; 39.0 (JSON/pandas floats) is the answer 39; a file whose every prompt
    hashes into the held-out split says so."""
    rows = [{"question": f"q{i}", "solution": float(i)} for i in range(30)] + [{"question": "x", "solution": 0.5}]
    (tmp_path / "p.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in rows).encode())
    probs = load_problems(file_task(f"{tmp_path}/p.jsonl"), "train", 0) + load_problems(
        file_task(f"{tmp_path}/p.jsonl"), "eval", 0)
    assert {p.prompt: p.answer for p in probs} == {r["question"]: str(r["solution"]).removesuffix(".0") for r in rows}
    (tmp_path / "tests.jsonl").write_text(json.dumps({"question": "f", "solution": {"cases": [[1, 2]], "ok": True}}))
    [p] = load_problems(file_task(f"{tmp_path}/tests.jsonl", eval_path=f"{tmp_path}/tests.jsonl"), "train", 0)
    assert json.loads(p.answer) == {"cases": [[1, 2]], "ok": True}  # JSON for the verifier, not a Python repr
    held = next(f"q{i}" for i in range(1000) if split_of(f"q{i}") == "eval")
    (tmp_path / "one.jsonl").write_text(json.dumps({"question": held, "solution": 1}))
    with pytest.raises(NpoError, match="all 1 prompts of .* fell into the held-out split .* set task.eval_path"):
        load_problems(file_task(f"{tmp_path}/one.jsonl"), "train", 0)


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1="},
        {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2="}]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_chat_prompts_keep_their_turns(tmp_path, fmt):
    """TRL's conversational format: the list goes through the chat template as messages (system turn
    included), its last user turn through task.template; not str(list)."""
    from npo_cli.batch import format_prompt
    from npo_cli.recipe import build_recipe
    from npo_cli.tiny import char_tokenizer

    rows = [{"prompt": CHAT, "answer": "4"}] + [{"prompt": [{"role": "user", "content": f"{i}+0="}], "answer": i}
                                                for i in range(40)]
    url = f"{tmp_path}/c.{fmt}"
    if fmt == "jsonl":
        Path(url).write_text("\n".join(json.dumps(r) for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist([{**r, "answer": str(r["answer"])} for r in rows]), url)
    tok = char_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    recipe = build_recipe({"task": {"kind": "file", "train_path": url, "eval_path": url, "chat_template": True,
                                    "template": "Q: {prompt}", "system_prompt": "Be exact."}})
    problems = load_problems(recipe.task, "train", 0)
    assert problems[0] == Problem(prompt="2+2=", answer="4", context=(("system", "Be brief."), ("user", "1+1="),
                                                                      ("assistant", "2")))
    assert Problem.from_json(json.loads(json.dumps(problems[0].to_json()))) == problems[0]  # stored pools, buffers
    assert format_prompt(recipe, tok, problems[0]) == (
        "<system>Be brief.\n<user>1+1=\n<assistant>2\n<user>Q: 2+2=\n<assistant>")  # the file's system turn wins
    assert format_prompt(recipe, tok, problems[1]) == "<system>Be exact.\n<user>Q: 0+0=\n<assistant>"
    for bad, match in ([[{"role": "assistant", "content": "x"}], "must end with a user message"],
                       [[{"role": "user", "content": ["x"]}], "list of {role, content} messages with text"]):
        Path(f"{tmp_path}/bad.jsonl").write_text(json.dumps({"prompt": bad, "answer": 1}))
        with pytest.raises(NpoError, match=re.escape(match)):
            load_problems(recipe.task.model_copy(update={"train_path": f"{tmp_path}/bad.jsonl"}), "train", 0)


def test_system_prompt_needs_the_chat_template():
    from npo_cli.recipe import build_recipe

    with pytest.raises(NpoError, match="system_prompt needs task.chat_template: true"):
        build_recipe({"task": {"system_prompt": "Be brief."}})
