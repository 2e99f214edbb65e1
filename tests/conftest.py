import os

import torch

# 2 shared cores: more than one thread stalls steps 20-50x when another process runs.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---------------------------------------------------------------- S3 through a local moto server (helper STORE)
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


# ---------------------------------------------------------------- a warm-started tiny policy (helper NPO)


@pytest.fixture(scope="session")
def npo_base_store(tmp_path_factory):
    """A store with run 'base' step 0: the tiny model after a short SFT on 1-digit sums (~30% sampled
    accuracy, so groups both fail and succeed). Deterministic; built once per session (~3 s)."""
    import random

    from transformers import AutoModelForCausalLM

    from npo_cli.checkpoint import save_checkpoint
    from npo_cli.recipe import Recipe, build_recipe
    from npo_cli.store import Store
    from npo_cli.tasks import load_problems
    from npo_cli.tiny import char_tokenizer, tiny_config

    task = {"arithmetic": {"digits": 1}, "eval_size": 16}
    d = tmp_path_factory.mktemp("npo_base") / "store"
    torch.manual_seed(0)
    model, tok = AutoModelForCausalLM.from_config(tiny_config()), char_tokenizer()
    problems = load_problems(build_recipe({"task": task}).task, "train", 0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(0)
    for _ in range(150):
        batch = [rng.choice(problems) for _ in range(32)]
        rows = [(tok(p.prompt)["input_ids"], tok(p.answer)["input_ids"] + [tok.eos_token_id]) for p in batch]
        L = max(len(a) + len(b) for a, b in rows)
        x = torch.tensor([a + b + [0] * (L - len(a) - len(b)) for a, b in rows])
        y = torch.tensor([[-100] * len(a) + b + [-100] * (L - len(a) - len(b)) for a, b in rows])
        model(input_ids=x, labels=y).loss.backward()
        opt.step()
        opt.zero_grad()
    save_checkpoint(Store.open(str(d)), run="base", branch="main", step=0, model=model, tokenizer=tok,
                    recipe=Recipe(name="base", task=task).model_dump(mode="json"))
    return d
