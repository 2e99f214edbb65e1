"""Smoke runs of the benchmarks (the timings themselves are reported, not asserted) and the convergence
study's statistics."""

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
