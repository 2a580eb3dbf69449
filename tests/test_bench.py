"""The benchmarks still run (smallest settings, no timing asserted: figures belong in bench/RESULTS.md)."""

import json
import subprocess
import sys

from conftest import REPO


def run_bench(script, tmp_path, *args) -> dict:
    out = tmp_path / "out.json"
    subprocess.run([sys.executable, str(REPO / "bench" / script), f"--out={out}", *args], check=True,
                   capture_output=True, text=True, cwd=REPO)
    return json.loads(out.read_text())


def test_dpo_throughput_runs(tmp_path):
    result = run_bench("dpo_throughput.py", tmp_path, "--compile=False", "--warmup=1", "--steps=1", "--pairs=2")
    for mode in ("live", "cached"):
        assert result[mode]["mode"] == mode and 0 < result[mode]["ratio"] and result[mode]["peak_rss_mb"] > 0


def test_generate_runs(tmp_path):
    result = run_bench("generate.py", tmp_path, "--repeats=1", "--batch=2", "--new_tokens=4")
    assert result["vs_no_cache"] > 0 and result["hf_generate_tokens_per_s"] > 0
