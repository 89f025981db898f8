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
    assert r["data"] == {"skipped": "quick mode (pass --with_data)"}  # the data section needs --with_data


def test_recipe_ablation_rows_and_table():
    """Rows are the base recipe plus one change (the row's value wins); the table reads the eval
    job's numbers per guidance scale and names the worst class."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import recipe_ablation as ra

    assert ra.row_overrides("default") == ()
    steps = dict(o.split("=", 1) for o in ra.row_overrides("steps2x"))
    assert steps["train.num_steps"] == "2600" and steps["diffusion.tie_channels"] == "False"
    assert dict(o.split("=", 1) for o in ra.row_overrides("base")) == dict(o.split("=", 1) for o in ra.BASE)
    assert ra.row_overrides("default_lr2e-3") == ("optimizer.learning_rate=2e-3",)  # on the default, not BASE

    def numbers(cc, worst):
        return {"class_consistency_judge": cc, "fd": 1.0, "pixel_diversity": 0.5, "pixel_diversity_real": 0.6,
                "pixel_distance_to_condition": 0.5, "memorization_ratio": 1.2,
                "per_group": [{"group": "label 6", "class_consistency_judge": worst},
                              {"group": "label 1", "class_consistency_judge": 0.9}]}

    result = {"step": 10, "judge_accuracy_real": 0.9,
              "by_guidance": {"1": numbers(0.5, 0.1), "2": numbers(0.6, 0.2)}}
    row = ra.summarise(result, 60.0)
    assert row["by_guidance"]["1"]["worst_class"] == ("label 6", 0.1)
    line = ra.table({"base": {"0": row, "1": ra.summarise(result, 120.0)}}).splitlines()[-1]
    assert line.startswith("| base |") and "| 2 | 0.50 ± 0.00 | 0.60 ± 0.00 | – | Shirt 0.10 |" in line
    assert line.endswith("1.5 min |")


def test_condition_probe_scores_held_out_images():
    """The conditioning probe reads the class off separable features and reports per-class accuracy
    and the mean probability of the true class on the held-out set."""
    import numpy as np

    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import condition_probe

    rng = np.random.RandomState(0)
    centres = rng.normal(size=(3, 8)) * 4

    def draw(n):
        y = np.arange(n) % 3
        return centres[y] + rng.normal(size=(n, 8)), y

    r = condition_probe.probe(draw(300), draw(90), steps=200)
    assert r["accuracy"] > 0.95 and r["mean_p_true"] > 0.9
    assert set(r["per_class"]) == {0, 1, 2}
    noise = condition_probe.probe((rng.normal(size=(300, 8)), np.arange(300) % 3),
                                  (rng.normal(size=(90, 8)), np.arange(90) % 3), steps=200)
    assert noise["mean_p_true"] < 0.5  # no class in the features: the posterior stays near 1/3
