"""The store knows it is a store: npo-store.json marks it, npo writes and deletes nowhere else, a newer
format is refused, a store made before the marker is adopted when all of it is npo's, and gc deletes only
objects and reports what it really deleted."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import copy_store, run_main

from npo_cli import gc
from npo_cli.errors import NpoError
from npo_cli.store import Store

ROOT = Path(__file__).resolve().parent.parent
MARKER = "npo-store.json"
OLD_STORE = Path(__file__).resolve().parent / "data" / "prev_version" / "store"  # made before the marker


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root: relative path -> SHA-256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), err


def marker(d: Path) -> dict:
    return json.loads((d / MARKER).read_text())


@pytest.fixture
def git_repo(tmp_path) -> Path:
    """A real git repository with loose objects (two commits), or where git is missing, git's layout."""
    repo = tmp_path / "repo"
    repo.mkdir()
    if shutil.which("git"):
        git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "init.defaultBranch=main"]
        subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
        for i in range(2):
            (repo / f"f{i}.txt").write_text(f"content {i}\n" * 50)
            subprocess.run([*git, "add", "."], cwd=repo, check=True)
            subprocess.run([*git, "commit", "-qm", f"c{i}"], cwd=repo, check=True)
    else:
        for name, data in [("HEAD", b"ref: refs/heads/main\n"), ("config", b"[core]\n"),
                           ("objects/ab/" + "c" * 38, b"x" * 100), ("objects/pack/pack-1.pack", b"PACK")]:
            (repo / ".git" / name).parent.mkdir(parents=True, exist_ok=True)
            (repo / ".git" / name).write_bytes(data)
    assert any(len(p.name) == 38 for p in (repo / ".git" / "objects").glob("??/*"))  # loose objects
    return repo


def test_gc_refuses_a_git_repository_and_deletes_nothing(git_repo, monkeypatch, capsys):
    before = snapshot(git_repo)
    for store in (git_repo, git_repo / ".git", git_repo / ".git" / "objects"):
        for cmd in (["gc", "--keep-recent", "0"], ["gc", "--keep-recent", "0", "--force"], ["verify"], ["ls"]):
            code, _, err = run_main([*cmd, "--store", str(store)], monkeypatch, capsys)
            one_line_error(code, err, f"{store} is not an npo store", MARKER)
    assert snapshot(git_repo) == before
    if shutil.which("git"):
        subprocess.run(["git", "fsck", "--strict"], cwd=git_repo, check=True, capture_output=True)


def test_commands_refuse_a_folder_without_the_marker(tmp_path, monkeypatch, capsys):
    """Every writer, before any work, and the readers too; the folder keeps every byte."""
    d = tmp_path / "mine"
    (d / "objects" / "ab").mkdir(parents=True)
    (d / "objects" / "ab" / ("0" * 62)).write_bytes(b"looks like an object")
    (d / "notes.txt").write_text("my notes")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\n")
    before = snapshot(d)
    for cmd in (["gc", "--keep-recent", "0"], ["import", str(hf), "--run", "x"], ["run", str(recipe)],
                ["auto", str(recipe)], ["rewind", "r@0"], ["intervene", "--run", "r", "--at", "0", "--guide", "r"],
                ["guide", "--guide", "r"], ["show", "r"], ["compare", "r"], ["eval", "r"],
                ["export", "r", str(tmp_path / "out")]):
        code, _, err = run_main([*cmd, "--store", str(d)], monkeypatch, capsys)
        one_line_error(code, err, f"{d} is not an npo store", "notes.txt")
    assert snapshot(d) == before


def test_a_new_store_gets_the_marker(tmp_path):
    for d in (tmp_path / "new" / "store", tmp_path / "empty"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        s = Store.open(str(d))
        assert not (d / MARKER).exists()  # opening writes nothing
        s.put_bytes(b"first")
        assert marker(d) == {"format": 1}
        Store.open(str(d), must_exist=True).put_bytes(b"second")  # a marked store opens and takes writes


def test_a_new_s3_store_gets_the_marker(s3_url, moto_endpoint):
    import boto3

    bucket, prefix = s3_url[len("s3://"):].split("/", 1)
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")

    def keys() -> set[str]:
        return {o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])}

    s = Store.open(s3_url)
    assert gc.verify(s)["ok"] and keys() == set()  # reading writes nothing
    oid = s.put_bytes(b"first")
    assert keys() == {f"{prefix}/{MARKER}", f"{prefix}/objects/{oid[:2]}/{oid[2:]}"}
    assert json.loads(client.get_object(Bucket=bucket, Key=f"{prefix}/{MARKER}")["Body"].read()) == {"format": 1}
    # a prefix holding something else is not a store: refused, for reading too, and left as it is
    client.put_object(Bucket=bucket, Key="other/report.csv", Body=b"a,b")
    with pytest.raises(NpoError, match=f"s3://{bucket}/other is not an npo store"):
        Store.open(f"s3://{bucket}/other")
    assert keys() == {f"{prefix}/{MARKER}", f"{prefix}/objects/{oid[:2]}/{oid[2:]}", "other/report.csv"}


def test_a_newer_format_is_refused(tmp_path, monkeypatch, capsys):
    d = tmp_path / "store"
    s = Store.open(str(d))
    orphan = s.put_bytes(b"unreachable")
    (d / MARKER).write_text('{"format": 2}')
    before = snapshot(d)
    for cmd in (["gc", "--keep-recent", "0"], ["verify"], ["ls"], ["rewind", "r@0"]):
        code, _, err = run_main([*cmd, "--store", str(d)], monkeypatch, capsys)
        one_line_error(code, err, "format 2", "newer npo", "upgrade npo")
    assert snapshot(d) == before and s.has(orphan)
    (d / MARKER).write_text("not json")
    code, _, err = run_main(["ls", "--store", str(d)], monkeypatch, capsys)
    one_line_error(code, err, f"{MARKER} is damaged")


def test_an_unmarked_store_of_npo_is_read_as_is_and_marked_by_its_next_write(tmp_path, monkeypatch, capsys):
    d = copy_store(OLD_STORE, tmp_path, monkeypatch)
    for cmd in (["ls"], ["verify"], ["show", "r"]):
        code, _, err = run_main([*cmd, "--store", str(d)], monkeypatch, capsys)
        assert code == 0, err
    assert not (d / MARKER).exists()  # reading leaves it as it is
    code, out, err = run_main(["gc", "--keep-recent", "0", "--store", str(d)], monkeypatch, capsys)
    assert code == 0 and "deleted 0 unreachable objects" in out, err
    assert marker(d) == {"format": 1}
    code, _, err = run_main(["rewind", "r@4", "--branch", "again", "--store", str(d)], monkeypatch, capsys)
    assert code == 0, err


def test_an_unmarked_store_with_a_foreign_file_is_not_written(tmp_path, monkeypatch, capsys):
    """Reads work (the top level is npo's), but npo writes and deletes only where all of it is npo's."""
    d = copy_store(OLD_STORE, tmp_path, monkeypatch)
    orphan = Store.open(str(d)).put_bytes(b"unreachable")  # the write marks it: unmark it again
    (d / MARKER).unlink()
    (d / "objects" / orphan[:2] / "notes.txt").write_text("not npo's")
    os.utime(d / "objects" / orphan[:2] / orphan[2:], (1, 1))
    before = snapshot(d)
    code, _, err = run_main(["ls", "--store", str(d)], monkeypatch, capsys)
    assert code == 0, err
    code, out, _ = run_main(["verify", "--store", str(d)], monkeypatch, capsys)
    assert code == 1 and f"stray file objects/{orphan[:2]}/notes.txt" in out
    for cmd in (["gc", "--keep-recent", "0"], ["rewind", "r@4", "--branch", "again"]):
        code, _, err = run_main([*cmd, "--store", str(d)], monkeypatch, capsys)
        one_line_error(code, err, "is not an npo store", f"objects/{orphan[:2]}/notes.txt")
    assert snapshot(d) == before


def test_gc_deletes_only_object_names(tmp_path):
    """A stray whose folder and name together read as 64 hex digits is not an object (the old gc deleted it)."""
    d = tmp_path / "store"
    s = Store.open(str(d))
    orphan = s.put_bytes(b"unreachable")
    (d / "objects" / orphan[:2] / orphan[2:]).unlink()
    look_alikes = [d / "objects" / orphan[:3] / orphan[3:], d / "objects" / orphan[:2] / orphan[2:] / "x",
                   d / "objects" / "ab" / ("c" * 38)]
    for p in look_alikes:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"not an object")
        os.utime(p, (1, 1))
    rep = gc.collect(s, keep_recent=0)
    assert (rep["objects"], rep["bytes"], rep["stray_files"]) == (0, 0, 3) and all(p.exists() for p in look_alikes)
    assert sorted(gc.verify(s)["problems"]) == sorted(
        f"stray file {p.relative_to(d).as_posix()} (not an object name; npo gc leaves it)" for p in look_alikes)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_delete_that_finds_nothing_says_so(where, tmp_path, request):
    s = Store.open(str(tmp_path / "store") if where == "local" else request.getfixturevalue("s3_url"))
    oid = s.put_bytes(b"x")
    s.write_ref("runs/r/branches/b", oid)
    assert s.delete_object(oid) is True and s.delete_object(oid) is False
    assert s.remove_ref("runs/r/branches/b") is True and s.remove_ref("runs/r/branches/b") is False


def test_gc_reports_what_it_deleted_not_what_it_planned(tmp_path):
    """One object cannot be deleted (its folder is read-only): the report counts the others and names it.
    gc runs in a process that the folder's permissions bind (root drops its override of them)."""
    prefix = ["setpriv", "--bounding-set", "-dac_override,-fowner"] if os.geteuid() == 0 else []
    if prefix and (not shutil.which("setpriv") or subprocess.run([*prefix, "true"], check=False).returncode):
        pytest.skip("root that cannot drop its override of permissions: a read-only folder does not stop it")
    d = tmp_path / "store"
    s = Store.open(str(d))
    stuck = s.put_bytes(b"stuck")
    for i in range(3):
        s.put_bytes(b"orphan %d" % i)
    sizes = s.objects()
    for oid in sizes:
        os.utime(d / "objects" / oid[:2] / oid[2:], (1, 1))
    folder = d / "objects" / stuck[:2]
    folder.chmod(0o555)
    try:
        code = ("import json, sys; from npo_cli import gc; from npo_cli.store import Store; "
                "print(json.dumps(gc.collect(Store.open(sys.argv[1]), keep_recent=0)))")
        proc = subprocess.run([*prefix, sys.executable, "-c", code, str(d)], check=True, capture_output=True,
                              text=True, timeout=120)
    finally:
        folder.chmod(0o755)
    rep = json.loads(proc.stdout)
    kept = [oid for oid in sizes if oid[:2] == stuck[:2]]  # the stuck one, and any other in its folder
    gone = [oid for oid in sizes if oid not in kept]
    assert gone and (rep["objects"], rep["bytes"]) == (len(gone), sum(sizes[o] for o in gone))
    assert rep["failed"] == [f"objects/{o[:2]}/{o[2:]}: permission denied" for o in kept]
    assert rep["kept_objects"] == len(kept) and all(map(s.has, kept)) and not any(map(s.has, gone))


def test_the_example_store_is_marked():
    assert marker(ROOT / "checkpoints.example") == {"format": 1}
    assert "base" in Store.open(str(ROOT / "checkpoints.example")).runs()
