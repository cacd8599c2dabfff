"""The prepared GPU check script stays runnable: the same code path on CPU with the tiny preset."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_check(mode):
    cmd = [sys.executable, "scripts/gpu_check.py", "--preset", "tiny", "--device", "cpu", "--mode", mode,
           "--steps", "2", "--warmup", "1", "--batch", "2", "--seq", "32"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_gpu_check_reports_spes_and_full_node():
    spes, full = run_check("spes"), run_check("full")
    assert spes["total_params"] == full["total_params"] == full["trainable_params"]
    assert spes["trainable_params"] < full["trainable_params"]
    for r in (spes, full):
        assert r["tokens_per_step"] == 64 and r["tokens_per_s"] > 0 and r["peak_mem_gb"] > 0
