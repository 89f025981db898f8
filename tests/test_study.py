"""The claims-study runner (semantica_study) end to end on tiny synthetic pages.

Two arms x one seed (8 train steps each, a 2-step eval at 32 px features) run through the real
subprocess path (main.py train, the export + eval worker), then the report; a second run must
skip both arms. Plus the verdict rules on hand-made numbers (no training).
"""
import json
import os

import pytest

import helpers
from semantica_study import cli, runner, spec, stats

TESTS = os.path.dirname(os.path.abspath(__file__))

CONFIG = '''
import sys
sys.path.insert(0, {tests!r})
import helpers
from semantica_jax import config_lib


def get_config(arg=None):
    v = config_lib.parse_variant(arg)
    c = helpers.tiny_config({data!r}, 8)
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.data.pairing = v.get("pairing", "pairs")
    c.train.log_every = 4
    c.train.checkpoint_every = 8
    c.train.eval_every = 0
    c.train.async_checkpointing = False
    c.eval.group_by = "label"
    c.eval.shots = 1
    c.eval.samples_per_condition = 2
    c.eval.num_steps = 2
    c.eval.batch_size = 16
    c.eval.extractor = "encoder"  # 32-d features of the tiny encoder: FD and probe in no time
    c.eval.memorization_images = 16
    c.eval.grid_groups = 4
    c.eval.cache_dir = {cache!r}
    return c
'''

STUDY = '''
def get_study(arg=None):
    cfg = {config!r}
    return dict(
        name="t", title="Test study", num_classes=10, budget_minutes=30,
        overrides={{"eval.guidance_scales": (1.0,)}},
        table_guidance=(1.0,),
        arms=[
            dict(name="pairs", config=cfg, seeds=(0,), claims=("c1", "g"),
                 overrides={{"eval.guidance_scales": (1.0, 2.0)}}),
            dict(name="reconstruction", config=cfg + ":pairing=reconstruction", seeds=(0,), claims=("c1",)),
        ],
        claims=[
            dict(id="c1", title="1. Pairs vs reconstruction", arms=("pairs", "reconstruction"),
                 checks=[dict(kind="greater", metric="pixel_distance_to_condition", a="pairs",
                              b="reconstruction", statement="pairs further from the condition")]),
            dict(id="h", kind="heldout", title="2. Held out", arm="pairs", reference="reconstruction",
                 labels=(1, 2)),
            dict(id="g", kind="guidance", title="5. Guidance", arm="pairs",
                 checks=[dict(kind="trend", arm="pairs", metric="consistency", direction="up",
                              **{{"from": 1.0, "to": 2.0}})]),
        ],
    )
'''


def test_study_runs_reports_and_resumes(tmp_path, monkeypatch):
    data = helpers.write_pages(str(tmp_path / "pages"))
    config = tmp_path / "tiny_study_config.py"
    config.write_text(CONFIG.format(tests=TESTS, data=data, cache=str(tmp_path / "cache")))
    study_file = tmp_path / "study_test.py"
    study_file.write_text(STUDY.format(config=str(config)))
    out = str(tmp_path / "out")

    assert cli.main([f"--study={study_file}", f"--out={out}", "--cpu_devices=1"]) == 0

    report = json.load(open(os.path.join(out, spec.REPORT_JSON)))
    for arm in ("pairs", "reconstruction"):
        seed = report["arms"][arm]["seeds"]["0"]
        assert seed["state"] == "done" and seed["train_step"] == 8
        assert seed["train_seconds"] > 0 and seed["eval_seconds"] > 0
        agg = report["arms"][arm]["aggregate"]
        assert set(agg) == ({"1", "2"} if arm == "pairs" else {"1"})
        assert agg["1"]["pixel_probe_accuracy_real"]["mean"] is not None
        for m in ("class_consistency", "class_consistency_pixels", "consistency", "diversity",
                  "pixel_distance_to_condition", "fd"):
            assert agg["1"][m]["n"] == 1 and agg["1"][m]["mean"] is not None
        assert os.path.exists(os.path.join(out, arm, "seed0", "train.log"))
        assert os.path.exists(os.path.join(out, arm, "seed0", "export", "export.json"))
    # Reconstruction: the config of what actually ran is read back from the export.
    assert report["arms"]["reconstruction"]["seeds"]["0"]["config"]["pairing"] == "reconstruction"
    assert [c["id"] for c in report["claims"]] == ["c1", "h", "g"]
    verdicts = [v["verdict"] for c in report["claims"] for v in c["verdicts"]]
    assert len(verdicts) == 1 + 1 + 1  # c1 check, held-out at guidance 1, guidance trend
    assert set(verdicts) <= {"yes", "no", "no clear difference"}
    held = report["claims"][1]
    assert {r["groups"] for r in held["table"]} == {"held-out classes", "other classes"}
    # The confusion table: 1 condition x 2 variations per held-out class, as the judge saw them.
    assert [(c["label"], sum(c["judged_as"].values())) for c in held["confusion"]] == [(1, 2), (2, 2)]
    assert report["chance"] == pytest.approx(0.1)
    grid = os.path.join(out, report["grids"]["side_by_side_g1"])
    assert os.path.exists(grid) and os.path.exists(os.path.join(out, report["grids"]["guidance_pairs"]))
    from PIL import Image

    single = Image.open(os.path.join(out, "pairs", "seed0", "eval", "grids", "export_step_8_g1.png"))
    assert Image.open(grid).width > 2 * single.width  # two arms side by side, each at its own (upscaled) size

    md = open(os.path.join(out, spec.REPORT_MD)).read()
    for text in ("## Arms", "## 1. Pairs vs reconstruction", "## 2. Held out", "## 5. Guidance",
                 "## Samples side by side", "## Wall time", "## Limits", "| arm | seeds | guidance |",
                 "**pairs further from the condition:", "chance = 1/10"):
        assert text in md, text
    assert "(single seed: no spread measured, tentative)" in md

    # A second run skips both arms: no subprocess, logs untouched, same results.
    log = os.path.join(out, "pairs", "seed0", "train.log")
    size = os.path.getsize(log)
    def no_subprocess(cmd, *args, **kwargs):
        raise AssertionError(f"a finished arm ran again: {cmd[:4]}")

    monkeypatch.setattr(runner, "_run_logged", no_subprocess)
    assert cli.main([f"--study={study_file}", f"--out={out}", "--cpu_devices=1"]) == 0
    assert os.path.getsize(log) == size
    status = json.load(open(os.path.join(out, "pairs", "seed0", spec.STATUS_FILE)))
    assert status["train"]["skipped"] and status["eval"]["skipped"]
    assert status["state"] == "done"

    # --report_only rewrites the report from the files alone.
    os.remove(os.path.join(out, spec.REPORT_MD))
    assert cli.main([f"--study={study_file}", f"--out={out}", "--report_only"]) == 0
    assert os.path.exists(os.path.join(out, spec.REPORT_MD))


def _arm(values_by_scale: dict, per_group=None) -> dict:
    """A fake `collect` entry: seed i has value i of every list."""
    n = len(next(iter(next(iter(values_by_scale.values())).values())))
    seeds = {}
    for i in range(n):
        by = {sc: {m: vals[i] for m, vals in metrics.items()} for sc, metrics in values_by_scale.items()}
        for sc in by:
            by[sc]["per_group"] = (per_group or {}).get(sc, [[]] * n)[i]
        seeds[i] = {"result": {"by_guidance": by, "probe_accuracy_real": 0.8}}
    return {"seeds": seeds, "aggregate": stats.aggregate(seeds)}


def test_verdict_rules():
    study = spec.normalize_study({
        "arms": [{"name": "a", "config": "x.py"}, {"name": "b", "config": "x.py"}], "num_classes": 10})
    arms = {
        "a": _arm({"1": {"m": [0.50, 0.52]}, "3": {"m": [0.60, 0.64]}}),
        "b": _arm({"1": {"m": [0.30, 0.31]}, "3": {"m": [0.30, 0.31]}}),
    }
    v = stats.evaluate_check(study, arms, {"kind": "greater", "metric": "m", "a": "a", "b": "b"})
    assert v["verdict"] == "yes" and "spread" in v["detail"]
    v = stats.evaluate_check(study, arms, {"kind": "greater", "metric": "m", "a": "b", "b": "a"})
    assert v["verdict"] == "no"
    v = stats.evaluate_check(study, arms, {"kind": "greater", "metric": "m", "a": "a", "b": "b", "min_gap": 0.5})
    assert v["verdict"] == "no clear difference"
    v = stats.evaluate_check(study, arms, {"kind": "above", "metric": "m", "arm": "a", "value": 0.7})
    assert v["verdict"] == "no"
    v = stats.evaluate_check(study, arms, {"kind": "trend", "metric": "m", "arm": "a", "direction": "up",
                                               "from": 1, "to": 3})
    assert v["verdict"] == "yes" and v["difference"] == pytest.approx(0.11)
    v = stats.evaluate_check(study, arms, {"kind": "greater", "metric": "missing", "a": "a", "b": "b"})
    assert v["verdict"] == "not measured"
    # Held-out groups: per-group means over the chosen labels, per seed.
    groups = [[{"group": "label 1", "class_consistency": 0.4}, {"group": "label 2", "class_consistency": 0.6},
               {"group": "label 3", "class_consistency": 1.0}]]
    arm = _arm({"1": {"m": [0.5]}}, per_group={"1": groups})
    st = stats.group_stats(arm["seeds"], "1", {1, 2}, "class_consistency")
    assert st["mean"] == pytest.approx(0.5) and st["n"] == 1
    st = stats.group_stats(arm["seeds"], "1", {1, 2}, "class_consistency", exclude=True)
    assert st["mean"] == pytest.approx(1.0)
    # The held-out confusion: the judge's per-group predictions summed over seeds.
    seeds = [[{"group": "label 1", "judge_predicted": {"3": 5, "1": 2}}, {"group": "label 2"}],
             [{"group": "label 1", "judge_predicted": {"3": 1, "4": 4}}]]
    arm = _arm({"1": {"m": [0.5, 0.6]}}, per_group={"1": seeds})
    assert stats.judged_as(arm["seeds"], "1", 1) == {3: 6, 1: 2, 4: 4}
    assert stats.judged_as(arm["seeds"], "1", 2) == {}  # results without predictions


def test_study_files_load_and_reject_bad_references(tmp_path):
    repo = os.path.dirname(TESTS)
    tiny = spec.load_study(os.path.join(repo, "experiments", "study_tiny.py"))
    assert {a["name"] for a in tiny["arms"]} >= {"pairs", "reconstruction", "heldout", "filter", "encoder_random"}
    assert spec.load_study(os.path.join(repo, "experiments", "study_base.py"))["arms"]
    bad = tmp_path / "bad.py"
    bad.write_text("def get_study(arg=None):\n    return dict(arms=[dict(name='a', config='x.py')],\n"
                   "        claims=[dict(id='c', arms=('a', 'zzz'))])\n")
    with pytest.raises(spec.StudyError, match="zzz"):
        spec.load_study(str(bad))
    with pytest.raises(spec.StudyError, match="key=value"):
        spec.parse_override("novalue")


def test_overrides_set_dotted_keys_and_refuse_unknown_ones():
    from semantica_jax import config_lib

    c = config_lib.default_config()
    spec.apply_overrides(c, {"model.channels": [8, 16], "optimizer.learning_rate": 3e-4})
    assert c.model.channels == (8, 16) and c.optimizer.learning_rate == 3e-4
    assert not c.is_locked  # left as it was
    with pytest.raises(spec.StudyError, match="unknown config key 'model.chanels'"):
        spec.apply_overrides(c, {"model.chanels": 3})
    assert "chanels" not in c.model
    with pytest.raises(spec.StudyError, match="optimizer.learning_rate='fast'"):
        spec.apply_overrides(c, {"optimizer.learning_rate": "fast"})


def test_runs_share_a_compilation_cache_unless_one_is_set(tmp_path, monkeypatch):
    cache = str(tmp_path / "jax_cache")
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    env = runner._subprocess_env(2, cache)
    assert env["JAX_COMPILATION_CACHE_DIR"] == cache and os.path.isdir(cache)
    assert "JAX_COMPILATION_CACHE_DIR" not in runner._subprocess_env(2, "")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
    assert runner._subprocess_env(2, cache)["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "mine")
