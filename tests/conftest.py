import os

import torch

# 2 shared cores: more than one thread stalls steps 20-50x when another process runs.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---------------------------------------------------------------- S3 through a local moto server
import pytest


@pytest.fixture(scope="session")
def moto_endpoint():
    """A moto S3 server on 127.0.0.1 (a free port), for the whole session: its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_url(moto_endpoint, monkeypatch):
    """A fresh bucket on the moto server: 's3://bucket/prefix', with NPO_S3_ENDPOINT and fake credentials set."""
    import uuid

    import boto3

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "NPO_S3_ENDPOINT": moto_endpoint}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    bucket = f"npo-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/store"


# ---------------------------------------------------------------- a warm-started tiny policy


@pytest.fixture(scope="session")
def npo_base_store(tmp_path_factory):
    """A store with run 'base' step 0: the tiny model after a short SFT on 1-digit sums (~30% sampled
    accuracy, so groups both fail and succeed). Deterministic; built once per session (~3 s)."""
    from npo_cli.example import quick_warm_start
    from npo_cli.store import Store

    d = tmp_path_factory.mktemp("npo_base") / "store"
    quick_warm_start(Store.open(str(d)))
    return d


def open_store(d):
    from npo_cli.store import Store

    return Store.open(str(d))


def dead_lease(store, run: str, branch: str) -> None:
    """The lease a writer killed mid-save leaves: this host, a pid that is gone, not expired."""
    import json
    import socket
    import subprocess
    import time

    gone = subprocess.Popen(["true"])
    gone.wait()
    store.io.write(f"runs/{run}/leases/{branch}.json", [json.dumps(
        {"host": socket.gethostname(), "pid": gone.pid, "since": "", "expiry": time.time() + 600,
         "token": "killed"}).encode()])


def copy_store(src, tmp_path, monkeypatch):
    """A test's own copy of a session store at tmp_path/store, with the test working in tmp_path (metrics
    files land there) and NPO_STORE pointing at the copy (CLI calls without --store use it)."""
    import shutil

    d = tmp_path / "store"
    shutil.copytree(src, d)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NPO_STORE", str(d))
    return d


def run_main(argv, monkeypatch, capsys):
    """`npo ARGV…` in-process through the console entry point: (exit code, stdout, stderr)."""
    import sys

    from npo_cli.cli import main

    monkeypatch.setattr(sys, "argv", ["npo", *argv])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err
