"""Smoke runs of the npo-vs-TRL benchmarks (the timings themselves are reported, not asserted)."""

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
        assert s["gradient_checkpointing"] is False
    assert res["trl"]["generation_batch_size"] == 128
    assert res["ratio_npo_over_trl"] > 0


@pytest.mark.heavy
@pytest.mark.parametrize("extra", [[], ["--compile"]])
def test_gpu_bench_small_on_cpu(tmp_path, extra):
    """The one-shot GPU script's whole path (vocab 151936, forced length, bf16, static cache) on CPU."""
    res = _run(["benchmarks/gpu_bench.py", "--small", "--no-trl-gc", *extra], tmp_path, timeout=600)
    assert "errors" not in res
    assert res["config"]["compile"] is bool(extra)
    for side in ("npo", "trl"):
        assert res[side]["mean_completion_len"] == 16  # EOS is outside the logits: never sampled
        assert res[side]["median_step_s"] > 0


@pytest.mark.timeout(120)
def test_decode_bench_small_on_cpu(tmp_path):
    """The GPU decoding comparison's path on CPU: HF generate's static cache and npo's loop, full-length."""
    res = _run(["benchmarks/decode_bench.py", "--small", "--calls", "1"], tmp_path, timeout=110)
    assert res["HF generate, static cache"]["own_decoding"] is False
    assert res["npo decoding"]["own_decoding"] is True and res["npo decoding"]["compile_error"] is None
    assert res["npo_over_hf_static"] > 0
