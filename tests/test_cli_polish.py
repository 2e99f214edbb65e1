"""The command line as a newcomer meets it: -h, help at 80 columns, whole table cells in a pipe, NPO on the
progress line, a chart footnote that describes what is drawn."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import typer
from conftest import copy_store, open_store, run_main

from npo_cli import cli
from npo_cli.checkpoint import load_metrics
from npo_cli.recipe import build_recipe, schema_rows

RUN = "polish-run-with-a-rather-long-name"
BRANCH = "npo-at-2-with-a-long-branch-name"  # RUN/BRANCH is 67 characters: a cell cut at 80 columns shows "…"


def _commands(group, path=()):
    for name, cmd in group.commands.items():
        yield [*path, name]
        if hasattr(cmd, "commands"):  # npo recipe
            yield from _commands(cmd, [*path, name])


COMMANDS = [[], *_commands(typer.main.get_command(cli.app))]


def helps(monkeypatch, capsys, columns: int, flag: str = "--help") -> dict[str, str]:
    """`npo … --help` of every command at this terminal width: {command: output}."""
    monkeypatch.setenv("COLUMNS", str(columns))
    out = {}
    for argv in COMMANDS:
        code, text, err = run_main([*argv, flag], monkeypatch, capsys)
        assert code == 0 and err == "", (argv, err)
        out[" ".join(argv)] = text
    return out


def test_dash_h_is_help_everywhere(monkeypatch, capsys):
    assert helps(monkeypatch, capsys, 100, "-h") == helps(monkeypatch, capsys, 100)


def test_help_shows_metavars_and_no_types(monkeypatch, capsys):
    """Every option printed a Python type (`--json <bool>`, `--store <str>`)."""
    pages = helps(monkeypatch, capsys, 160)
    for text in pages.values():
        assert not re.search(r"<(bool|str|int|float|list)", text), text
    run, intervene = pages["run"], pages["intervene"]
    for opt, metavar in (("--store", "URL"), ("--set", "KEY=VALUE"), ("--resume", r"RUN\[/BRANCH\]")):
        assert re.search(rf"{opt} +{metavar} ", run), run
    assert re.search(r"--json +Machine-readable", run)  # a flag: nothing between the name and its help
    assert re.search(r"--at +\[RUN@\]STEP ", intervene) and re.search(r"--gate +ACC ", intervene)
    assert "compare [OPTIONS] {REF}..." in pages["compare"]  # (in-process the program is not named npo)


def test_help_reads_well_at_80_columns(monkeypatch, capsys):
    """`npo --help` listed compare's description in 9 lines broken where its docstring's lines broke."""
    pages = helps(monkeypatch, capsys, 80)
    for name, text in pages.items():
        lines = text.splitlines()
        assert all(len(line) <= 80 for line in lines), name
        # the description above the panels: a short line ends a paragraph, never breaks one
        prose = [line.strip() for line in lines[: next(i for i, x in enumerate(lines) if x.startswith("╭"))]]
        for line, after in itertools.pairwise(prose):
            assert len(line) >= 50 or not line or not after, (name, line)
    # the same in `npo --help`'s list of commands: a line that a row continues on is a full one
    listing = pages[""].splitlines()
    start = next(i for i, line in enumerate(listing) if "Commands" in line)
    rows = [line[2:-2].rstrip() for line in listing[start + 1:] if line.startswith("│")]
    for line, after in itertools.pairwise(rows):
        assert len(line) >= 60 or not after.startswith(" "), line


@pytest.fixture(scope="module")
def long_store(tmp_path_factory) -> Path:
    """RUN: the tiny model (untrained: no warm start needed), 4 GRPO steps of 2 prompts x 4, an eval and a
    checkpoint every step; RUN/BRANCH forked at step 2 with guide RUN@4."""
    from npo_cli.branching import new_trainer
    from npo_cli.commands import intervene
    from npo_cli.store import Store

    d = tmp_path_factory.mktemp("polish") / "store"
    recipe = build_recipe({
        "name": RUN, "seed": 0, "model": {"path": "tiny"}, "task": {"arithmetic": {"digits": 1}, "eval_size": 4},
        "rollout": {"prompts_per_step": 2, "group_size": 4, "max_new_tokens": 4}, "grpo": {"lr": 1e-3},
        "train": {"steps": 4, "save_every": 1, "eval_every": 1},
        "logging": {"progress": False, "metrics_jsonl": None},
    })
    new_trainer(recipe, Store.open(str(d))).train()
    intervene(str(d), run=RUN, at=2, guide="4", branch=BRANCH, progress=False)
    return d


def test_tables_in_a_pipe_keep_whole_cells(long_store, tmp_path, monkeypatch, capsys):
    """`npo compare > f` cut the curve's name to 'polish-run-with-a-rather-long-name/npo-at-2…' (80 columns)."""
    monkeypatch.setenv("COLUMNS", "80")  # what a pipe gets without a terminal
    copy_store(long_store, tmp_path, monkeypatch)
    ref = f"{RUN}/{BRANCH}"
    cid = open_store(long_store).resolve(ref)  # 64 hex digits
    for argv, whole in ((["ls"], BRANCH), (["compare", RUN, ref], ref), (["show", ref], cid)):
        code, out, err = run_main(argv, monkeypatch, capsys)
        assert code == 0, err
        assert "…" not in out and any(whole in line for line in out.splitlines()), out
    code, out, err = run_main(["recipe", "schema"], monkeypatch, capsys)
    lines = out.splitlines()
    for key, _, _, description in schema_rows():  # each row on one line, its description whole
        assert any(key in line and description in line for line in lines), key


def test_progress_lines_show_npo_gate_and_hit_rate(long_store, tmp_path, monkeypatch, capsys):
    copy_store(long_store, tmp_path, monkeypatch)
    code, out, err = run_main(["intervene", "--run", RUN, "--at", "2", "--guide", "4", "--branch", "again",
                               "--set", "logging.progress=true"], monkeypatch, capsys)
    assert code == 0, err
    steps = [line for line in out.splitlines() if line.startswith("step ")]
    assert [s.split()[1] for s in steps] == ["3/4", "4/4"], out  # both NPO steps (the window is 2..4)
    store = open_store(tmp_path / "store")
    rows = {r["step"]: r for m in store.lineage(f"{RUN}/again") for r in load_metrics(store, m)}
    for line in steps:  # the share of groups at or below the gate, and the guide's hit rate on those
        r = rows[int(line.split()[1].split("/")[0])]
        assert f"npo gated {r['npo/gated_frac']:.2f} hit {r['npo/hit_rate']:.2f}" in line, line


def test_chart_footnote_names_only_what_is_drawn(long_store, tmp_path):
    """The footnote explained dashed lines that were hidden under the parent's curve, or not drawn at all."""
    from npo_cli.compare import compare, plot

    store = open_store(long_store)

    def footnote(refs: list[str]) -> str:
        (text,) = plot(compare(store, refs), str(tmp_path / "c.png"))[0].figure.texts
        return text.get_text()

    both = footnote([RUN, f"{RUN}/{BRANCH}"])  # the branch's steps 1-2 lie under RUN's solid line
    assert "dot: the fork" in both and "dashed" not in both
    assert "dashed: the parent's curve up to the fork" in footnote([f"{RUN}/{BRANCH}"])
    assert not plot(compare(store, [RUN]), str(tmp_path / "r.png"))[0].figure.texts  # nothing to explain
