"""Smoke runs of the benchmarks (the timings themselves are reported, not asserted) and the convergence
study's statistics."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], tmp_path: Path, timeout: int) -> dict:
    out = tmp_path / "res.json"
    env = {**os.environ, "OUT": "", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, *args, "--json", str(out)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout, check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.timeout(120)
def test_throughput_quick(tmp_path):
    res = _run(["benchmarks/throughput.py", "--quick"], tmp_path, timeout=110)
    assert "errors" not in res
    for side in ("npo", "trl"):
        s = res[side]
        assert len(s["step_s_all"]) == 2 and s["median_step_s"] > 0
        assert 1 <= s["mean_completion_len"] <= 32
        assert s["completion_len_p10"] <= s["completion_len_p90"] <= s["completion_len_max"] <= 32
        assert s["useful_tokens"] > 0 and s["useful_tok_per_s_generate"] > 0
        assert s["gradient_checkpointing"] is False
    assert res["trl"]["generation_batch_size"] == 128
    assert list(res["paths"]) == ["dynamic"] and res["paths"]["dynamic"]["trl"] == res["trl"]
    assert res["ratio_npo_over_trl"] == res["paths"]["dynamic"]["ratio_npo_over_trl"] > 0


def _sides(res: dict):
    """(name, summary) of every side of a run: npo pooled, and per TRL path both TRL's and npo's alongside it."""
    yield "npo", res["npo"]
    for p, e in res["paths"].items():
        yield f"trl {p}", e["trl"]
        yield f"npo with {p}", e["npo"]


@pytest.mark.heavy
@pytest.mark.timeout(900)
@pytest.mark.parametrize("extra", [[], ["--compile"]])
def test_gpu_bench_small_on_cpu(tmp_path, extra):
    """The one-shot GPU script's whole path on CPU: both shapes (forced length at vocab 151936; natural EOS from a
    stop set, geometric lengths) against all three TRL generation paths, bf16, npo's static cache."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from grpo_bench import TRL_PATHS

    out = _run(["benchmarks/gpu_bench.py", "--small", *extra], tmp_path, timeout=870)
    assert set(out) == {"forced", "reasoning"}
    for shape, res in out.items():
        assert "errors" not in res, (shape, res.get("errors"))
        cfg = res["config"]
        assert cfg["compile"] is bool(extra) and list(cfg["trl_paths"]) == ["dynamic", "static", "paged"]
        assert list(res["paths"]) == ["dynamic", "static", "paged"]
        for p, e in res["paths"].items():
            assert e["trl_config"] == TRL_PATHS[p]
            assert e["ratio_npo_over_trl"] > 0
            assert e["trl"]["tokens_after_eos"] == 0  # each path stops (or cuts) at the first EOS of the set
        assert res["trl"] == res["paths"]["dynamic"]["trl"]
        rows, new = cfg["prompts"] * cfg["group"], cfg["new_tokens"]
        for name, s in _sides(res):
            assert s["median_step_s"] > 0, (shape, name)
            assert s["useful_tok_per_s_generate"] > 0 and s["useful_tok_per_s_step"] > 0, (shape, name)
            if shape == "forced":  # EOS is outside the logits: never sampled
                assert s["mean_completion_len"] == new == 16, (shape, name)
                assert s["completion_len_p10"] == s["completion_len_max"] == new, (shape, name)
                assert s["useful_tokens"] == rows * new and s["finished_frac"] == 0, (shape, name)
            else:  # geometric with mean 32, cut at 128: the mean lands near 32 (EOS counted)
                assert cfg["mean_length"] == 32 and new == 128 and res["stop_ids"] == 128
                assert 0.5 * 32 <= s["mean_completion_len"] <= 1.6 * 32, (shape, name, s["mean_completion_len"])
                assert 1 <= s["completion_len_p10"] < s["completion_len_p90"] <= s["completion_len_max"] <= new
                assert s["finished_frac"] > 0.8, (shape, name)  # P(no stop in 128 tokens) = (31/32)^128 = 2%
                assert 0 < s["useful_tokens"] < rows * new, (shape, name)
        assert res["paths"]["paged"]["trl"]["cb_setup_s"]  # continuous batching ran (its set-up timed per call)


def test_bench_stop_set_and_trl_paths_tiny(tmp_path, monkeypatch):
    """The reasoning-shaped rollout at a tiny shape: the stop set in the saved generation_config, honoured by npo
    and by each TRL path (built with the settings TRL's docs recommend), all three timed in one run."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from dataclasses import replace

    import grpo_bench as gb
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from npo_cli.rollout import eos_ids
    from npo_cli.tiny import CHARS

    cfg = gb.BenchConfig(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, vocab=512, prompts=2, group=4,
                         new_tokens=32, mean_length=8, micro_batch=8, warmup=0, steps=1, reward="hash",
                         trl_paths=("dynamic", "static", "paged"))
    path, _ = gb.make_model_dir(cfg, str(tmp_path))
    stops = gb.stop_ids(512, 8)
    first = 2 + len(CHARS)  # after pad, unk and the prompt characters
    assert len(stops) == 64 == len(set(stops)) and stops[0] == first and stops[-1] < 512
    assert {b - a for a, b in itertools.pairwise(stops)} <= {(512 - first) // 64, (512 - first) // 64 + 1}
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    assert model.generation_config.eos_token_id == stops
    assert tok.eos_token_id == 512 and tok.pad_token_id == 0  # the tokenizer's EOS is outside the logits
    assert eos_ids(model, tok) == [*stops, 512]  # npo ends a completion at any of them
    with pytest.raises(ValueError, match="force_length"):
        gb.make_model_dir(replace(cfg, force_length=True), str(tmp_path / "x"))

    # each TRL path gets its recommended settings and the stop set
    side = gb.Side("trl")
    for p in ("dynamic", "static", "paged"):
        tr = gb.make_trl(cfg, path, str(tmp_path / f"trl-{p}"), False, 1, [], side, p)
        assert set(stops) <= set(tr.eos_token_ids)
        assert tr.use_transformers_continuous_batching is (p == "paged")
        if p == "paged":
            cb = tr.continuous_batching_config
            assert cb.use_cuda_graph is False and cb.max_memory_percent == 0.4
        else:
            assert tr.generation_config.cache_implementation == ("static" if p == "static" else None)
            assert tr.generation_config.disable_compile is True
        del tr

    # all three in one run; continuous batching with a small fixed cache (its recommended max_memory_percent
    # sizes the cache from free host memory on CPU: 15-35 s of set-up per generate call here)
    paged = {**gb.TRL_PATHS["paged"], "transformers_continuous_batching_config": {
        **gb.TRL_PATHS["paged"]["transformers_continuous_batching_config"], "num_blocks": 16,
        "max_batch_tokens": 256}}
    monkeypatch.setitem(gb.TRL_PATHS, "paged", paged)
    res = gb.run(cfg, log=lambda s: None)
    assert "errors" not in res, res.get("errors")
    assert list(res["paths"]) == ["dynamic", "static", "paged"] and res["stop_ids"] == 64
    for p, e in res["paths"].items():
        assert e["ratio_npo_over_trl"] > 0 and e["trl_config"] == gb.TRL_PATHS[p]
        for s in (e["trl"], e["npo"]):
            # geometric lengths with mean 8: with the stop set ignored every row would run to 32 unfinished
            assert s["finished_frac"] >= 0.5 and s["completion_len_max"] <= 32, (p, s)
            assert s["useful_tokens"] > 0 and s["useful_tok_per_s_generate"] > 0
        assert e["trl"]["tokens_after_eos"] == 0 and e["trl"]["eos_ids"] == 65
    assert res["paths"]["paged"]["trl"]["cb_setup_s"]
    assert res["npo"]["timed_steps"] == 3 and res["trl"] == res["paths"]["dynamic"]["trl"]
    text = gb.table(res)
    for p in ("dynamic", "static", "paged"):
        assert f"trl {p}" in text and f"npo / TRL {p} step time:" in text


@pytest.mark.timeout(170)
def test_decode_bench_small_on_cpu(tmp_path):
    """The GPU decoding comparison's path on CPU, both shapes: HF generate (dynamic and static cache), HF
    continuous batching and npo's loop with and without dropping the rows that have ended, all sampling the
    same model."""
    res = _run(["benchmarks/decode_bench.py", "--small", "--calls", "1"], tmp_path, timeout=160)
    for shape in ("forced", "reasoning"):
        r = res[shape]
        assert not [k for k, v in r.items() if isinstance(v, dict) and "error" in v]
        assert r["HF generate, static cache"]["own_decoding"] is False
        assert r["npo decoding"]["own_decoding"] is True and r["npo decoding"]["compile_error"] is None
        assert r["npo decoding"]["drop_finished"] and not r["npo decoding, every row to the end"]["drop_finished"]
        assert r["npo_over_hf_static"] > 0 and r["npo_drop_speedup"] > 0 and r["npo_over_hf_continuous_batching"] > 0
    forced, reasoning = res["forced"], res["reasoning"]
    assert all(forced[k]["mean_completion_len"] == 16 for k in forced if isinstance(forced[k], dict) and "s" in forced[k])
    for k in ("HF generate, dynamic cache", "npo decoding, every row to the end", "npo decoding",
              "HF continuous batching"):
        assert 8 < reasoning[k]["mean_completion_len"] < 80  # natural EOS, mean 32, cut at 128
        assert reasoning[k]["useful_tokens_per_s"] > 0


def _convergence():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import convergence

    return convergence


def test_convergence_statistics():
    """The study's statistics on hand-checked cases: thresholds on the moving mean, paired tests, intervals."""
    c = _convergence()
    assert c.sign_flip_p([1.0, 2.0, 3.0]) == pytest.approx(2 / 8)  # only all-positive / all-negative as extreme
    assert c.sign_flip_p([1.0, -1.0]) == 1.0
    lo, hi = c.boot_ci([1.0, 1.0, 1.0], c.statistics.mean)
    assert lo == hi == 1.0
    r = c.paired([2.0, 2.0, 2.0, 2.0], "ratio")
    assert r["mean"] == pytest.approx(2.0) and r["lo"] == pytest.approx(2.0) and r["p"] == pytest.approx(2 / 16)
    d = c.paired([0.1, -0.1], "diff")
    assert d["mean"] == pytest.approx(0.0) and d["p"] == 1.0 and d["lo"] < 0 < d["hi"]
    # a curve: on-policy accuracy 0 for 30 steps, then 1; moving mean (25) crosses 0.5 at step 43
    acc = [0.0] * 30 + [1.0] * 30
    mm = [sum(acc[i - 24 : i + 1]) / 25 if i >= 24 else None for i in range(60)]
    curve = {"steps": list(range(1, 61)), "mm": mm, "tokens": [10.0 * s for s in range(1, 61)],
             "evals": [(20, 0.1, 200.0), (40, 0.5, 400.0), (60, 0.9, 600.0)]}
    assert c.reach(curve, 0.5, 0) == (43, 430.0)
    assert c.reach(curve, 0.5, 50) == (51, 510.0)  # only after the fork
    assert c.reach(curve, 1.01, 0) is None
    assert c.at_compute(curve, 500.0) == pytest.approx((50, 0.7)) and c.at_compute(curve, 100.0) is None
    assert c.at_compute(curve, 900.0) == (60, 0.9) and c.at_compute(curve, 400.0) == pytest.approx((40, 0.5))
