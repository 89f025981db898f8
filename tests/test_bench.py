"""The benchmark runner's quick mode runs every section on tiny shapes and writes its JSON.

No timing thresholds: the numbers depend on the machine and its load (docs/PERFORMANCE.md has
the measured ones); this only checks that each section produces positive numbers.
"""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_run_all_quick_writes_every_section(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "run_all.py"), "--quick", f"--json={out}"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MFU" in proc.stdout
    r = json.loads(out.read_text())
    assert {"machine", "train", "encoder", "data", "sampler", "memory"} <= set(r)

    (step,) = r["train"]
    for key in ("flops_per_step", "step_s_median", "achieved_gflops", "peak_gflops", "mfu_median",
                "mfu_best", "examples_per_s"):
        assert step[key] > 0, key
    assert 0 < step["mfu_median"] < 1.5  # a ratio, not an absolute number
    assert step["compiled_bytes_per_device"]["temp"] > 0

    assert r["encoder"]["rows"][0]["images_per_s"] > 0
    assert r["encoder"]["caching"]["speedup"] > 0
    assert {s["sampler"] for s in r["sampler"]} == {"ddpm", "ddim"}
    assert {s["num_steps"] for s in r["sampler"]} == {256, 50}
    assert all(s["images_per_s"] > 0 for s in r["sampler"])
    assert r["memory"]["runs"][0]["peak_rss_mib"] > 0
    assert r["memory"]["compiled"][0]["temp"] > 0
    assert "skipped" in r["data"] or r["data"]
