"""The prepared GPU check script stays runnable: the same code path on CPU with the tiny preset."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_check(mode):
    cmd = [
        sys.executable,
        "scripts/gpu_check.py",
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--mode",
        mode,
        "--steps",
        "2",
        "--warmup",
        "1",
        "--batch",
        "2",
        "--seq",
        "32",
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_gpu_check_reports_spes_and_full_node():
    spes, full = run_check("spes"), run_check("full")
    assert spes["total_params"] == full["total_params"] == full["trainable_params"]
    assert spes["trainable_params"] < full["trainable_params"]
    for r in (spes, full):
        assert r["tokens_per_step"] == 64 and r["tokens_per_s"] > 0 and r["peak_mem_gb"] > 0


def test_gpu_check_times_a_node_round_without_flower(tmp_path):
    """--mode round runs the node's real round (kept in memory or rebuilt from disk, the state saved
    before or after the reply) and imports neither Flower nor Hydra: the GPU machine has neither."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('flwr', 'hydra', 'omegaconf', 'ray'):\n"
        "            raise ImportError('not on the GPU machine: ' + name)\n"
        "sys.meta_path.insert(0, _Block())\n"
    )
    cmd = [
        sys.executable,
        "scripts/gpu_check.py",
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--mode",
        "round",
        "--steps",
        "2",
        "--batch",
        "2",
        "--seq",
        "32",
        "--rounds",
        "3",
        "--workdir",
        str(tmp_path),
    ]
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    for k in ("resident", "resident_bg"):
        assert [x["resident"] for x in r[k]["rounds"]] == [False, True, True]
    for k in ("rebuilt", "rebuilt_bg"):
        assert [x["resident"] for x in r[k]["rounds"]] == [False, False, False]
    for k in ("resident", "rebuilt", "resident_bg", "rebuilt_bg"):
        v = r[k]
        assert all(x["round_s"] > x["train_s"] > 0 for x in v["rounds"])
        assert 0 < v["overhead_share_at_h100"] < v["overhead_share"] < 1
    assert r["fresh_process_s"] > 0
    for k in ("rebuilt", "rebuilt_bg"):  # deployment pays a fresh process every round on top
        assert r[k]["overhead_share_at_h100"] < r[k]["overhead_share_at_h100_fresh_process"] < 1
    assert list(tmp_path.iterdir()) == [blocker]  # the node's state went to a temporary directory, now gone


def test_gpu_page_tables_are_the_committed_measurements():
    """docs/gpu.md's generated block equals what scripts/gpu_report.py renders from benchmarks/gpu.json."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_report

    data = json.loads((ROOT / "benchmarks" / "gpu.json").read_text())
    page = ROOT / "docs" / "gpu.md"
    assert gpu_report.rewrite(page, data) == page.read_text(), "stale docs/gpu.md: python scripts/gpu_report.py"
    block = gpu_report.render(data)
    spes = next(r for r in data["runs"] if (r["size"], r.get("mode"), r.get("lean")) == ("1b", "spes", False))
    assert f"| 1b | SPES | 4 | {spes['tokens_per_s']:,.0f} | {spes['peak_mem_gb']:.2f} GB |" in block
    assert all(f"`{k}`" in block for k in data["ratios"])
