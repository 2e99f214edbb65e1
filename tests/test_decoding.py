"""npo's decoding loop (rollout.static_cache) on batches whose completion lengths spread wide: the rows that
have ended leave the batch every 32 tokens, and what the live rows sample and record stays exact."""

import copy
from types import SimpleNamespace

import pytest
import torch

from npo_cli.batch import collate
from npo_cli.grpo import token_logprobs
from npo_cli.recipe import RolloutConfig
from npo_cli.rollout import HFBackend, _decode_step
from npo_cli.tiny import char_tokenizer


def _random_tiny(init_range: float):
    from transformers import AutoModelForCausalLM, Qwen2Config

    tok = char_tokenizer()
    config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         initializer_range=init_range)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval(), tok


@pytest.fixture(scope="module")
def random_model():
    """A random-init tiny Qwen2 over the char tokenizer: it samples almost uniformly, so EOS (1 id of 99)
    ends a completion after ~99 tokens on average, from a few tokens to the limit."""
    return _random_tiny(0.02)


@pytest.fixture(scope="module")
def wild_model():
    """The same with weights 15x larger: its greedy continuations differ from prompt to prompt and reach
    EOS anywhere from the first token to past 150."""
    return _random_tiny(0.3)


@pytest.fixture
def rows_decoded(random_model):
    """The number of rows of each forward of the model after the prompt's (one per token)."""
    rows = []
    hook = random_model[0].register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    yield rows
    hook.remove()


def _backend(model, tok, drop: bool, **cfg) -> HFBackend:
    """An eager own-decoding backend (as on CPU)."""
    backend = HFBackend(model, tok, RolloutConfig(**{"batch_size": 64, "static_cache": True, **cfg}))
    backend.drop_finished = drop
    return backend


def _max_logprob_error(model, tok, rollouts, temperature: float) -> float:
    b = collate(rollouts, tok.pad_token_id, "cpu")
    with torch.no_grad():
        lp, _ = token_logprobs(model, b["input_ids"], b["attention_mask"], b["n_completion"], 0,
                               with_entropy=False, temperature=temperature)
    return float(((lp - b["old_logp"]).abs() * b["mask"]).max())


def test_ended_rows_leave_the_batch_and_the_record_stays_exact(random_model, rows_decoded):
    """Sampled with rows dropping out: every completion still ends at its first EOS, its recorded log-probs
    equal the policy's own (so the moved KV caches kept each row's context), and each token is decoded for
    the rows still live at the last check only (eager: exactly those), not for all 32 to the end."""
    model, tok = random_model
    prompts = ["1+2=", "17+38=", "5*5=", "9-3="]
    work = {}
    for drop in (False, True):
        backend = _backend(model, tok, drop, max_new_tokens=200, temperature=0.9)
        torch.manual_seed(1)
        rows_decoded.clear()
        out = [r for g in backend.generate(prompts, 8) for r in g]
        rows = rows_decoded[1:]
        lengths = [len(r.completion_ids) for r in out]
        assert min(lengths) < 32 and max(lengths) == 200  # the spread this test needs
        for r in out:
            ends = [i for i, t in enumerate(r.completion_ids) if t == tok.eos_token_id]
            assert ends == ([len(r.completion_ids) - 1] if r.finished else [])
        assert _max_logprob_error(model, tok, out, 0.9) < 1e-5
        live_at = [sum(n > 32 * (t // 32) for n in lengths) for t in range(1, 200)]  # rows not ended at the check
        assert rows == (live_at if drop else [32] * 199)
        assert list(backend._caches) == [(32, 64 + 200)]  # eager: the smaller batches' caches are not kept
        work[drop] = sum(rows)
    assert work[True] < 0.7 * work[False]


def test_dropping_rows_leaves_greedy_tokens_unchanged(wild_model):
    """Greedy, where sampling noise cannot hide a mix-up: 48 rows ending at lengths from 1 to past 150 get
    the same tokens and log-probs with and without dropping the ended rows."""
    model, tok = wild_model
    prompts = [f"{a}+{b}=" for a in range(6) for b in range(0, 50, 7)]
    got = {}
    for drop in (False, True):
        backend = _backend(model, tok, drop, max_new_tokens=150)
        got[drop] = [g[0] for g in backend.generate(prompts, 1, greedy=True)]
    lengths = sorted(len(r.completion_ids) for r in got[True])
    assert lengths[0] < 32 and sum(32 < n < 150 for n in lengths) > 10 and lengths[-1] == 150
    for a, b in zip(got[False], got[True]):
        assert (a.completion_ids, a.finished) == (b.completion_ids, b.finished)
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5


def test_compiled_batches_shrink_by_halves():
    """Compiled, the live rows decode in the smallest half of the batch that holds them (at least 16 rows):
    few shapes, each compiled once. Eager, exactly the live rows."""
    assert HFBackend._live_batch(70, 128, compiled=True) == 128
    assert HFBackend._live_batch(64, 128, compiled=True) == 64
    assert HFBackend._live_batch(20, 128, compiled=True) == 32
    assert HFBackend._live_batch(3, 128, compiled=True) == 16
    assert HFBackend._live_batch(5, 192, compiled=True) == 24
    assert HFBackend._live_batch(5, 64, compiled=True) == 16
    assert HFBackend._live_batch(7, 40, compiled=False) == 7


@pytest.mark.heavy
def test_compiled_decoding_drops_rows_through_its_graphs(random_model):
    """The compiled step (inductor here, CUDA graphs on a GPU) over shrinking batches: the caches of 64, 32
    and 16 rows are made once and reused, and the sampled log-probs still equal the policy's own."""
    import torch._dynamo

    model, tok = random_model
    backend = HFBackend(model, tok, RolloutConfig(max_new_tokens=120, temperature=0.9, batch_size=64,
                                                  static_cache=True))
    torch._dynamo.reset()
    backend._step = torch.compile(_decode_step, fullgraph=True, dynamic=False)
    torch.manual_seed(3)
    out = [r for g in backend.generate(["1+2=", "17+38=", "5*5=", "9-3="], 8) for r in g]
    assert _max_logprob_error(model, tok, out, 0.9) < 1e-4
    L = 64 + 120
    assert set(backend._caches) <= {(64, L), (32, L), (16, L)} and len(backend._caches) >= 2
    again = [r for g in backend.generate(["3+4="], 8) for r in g]  # the same shapes: no new cache
    assert set(backend._caches) <= {(64, L), (32, L), (16, L)}
    assert _max_logprob_error(model, tok, again, 0.9) < 1e-4


def test_speed_settings_default_to_on_for_cuda_only(random_model):
    """rollout.static_cache and grpo.compile left unset: off on CPU (here), on for a model on CUDA; set, they
    are what the recipe says. A model torch cannot compile layer by layer trains uncompiled when compile was
    only the default, and stops with a one-line error when the recipe asked for it."""
    import torch._dynamo as dynamo

    from npo_cli.errors import NpoError
    from npo_cli.grpo import compile_layers
    from npo_cli.recipe import GRPOConfig

    model, tok = random_model
    assert RolloutConfig().static_cache is None and GRPOConfig().compile is None
    assert HFBackend(model, tok, RolloutConfig()).static_cache is False
    assert HFBackend(model, tok, RolloutConfig(static_cache=True)).own_decoding is True

    on_cuda = copy.deepcopy(model)  # what the backend reads of the model's device: its first parameter's
    on_cuda.parameters = lambda recurse=True: iter([SimpleNamespace(device=torch.device("cuda"))])
    assert HFBackend(on_cuda, tok, RolloutConfig()).static_cache is True
    assert HFBackend(on_cuda, tok, RolloutConfig(static_cache=False)).static_cache is False

    before = dynamo.config.suppress_errors
    no_layers = torch.nn.Linear(2, 2)
    try:
        compile_layers(no_layers, required=False)  # nothing to compile: stays as it is
        assert dynamo.config.suppress_errors is True  # the compiled head falls back to eager if it must
    finally:
        dynamo.config.suppress_errors = before
    with pytest.raises(NpoError, match="set grpo.compile=false"):
        compile_layers(no_layers, required=True)
