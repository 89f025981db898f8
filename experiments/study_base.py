r"""The claims study at base scale on real page data (a sketch: NOT run in this repo).

The same runner as the tiny study, pointed at `experiments/semantica_base.py` (64 px, S denoiser,
frozen DINOv2-B/14) and your own page shards. Nothing here has been run: budgets and thresholds
are placeholders to adjust after a first short run.

  python -m semantica_study \
      --study='experiments/study_base.py:pages=/data/web_pages,weights=/weights/dinov2_b14.npz,eval_pages=/data/imagenet_val_pages,num_classes=1000' \
      --out=/runs/study_base
  # print the per-arm commands (e.g. to launch each arm on a pod with launch/tpu_pod.sh), then
  # collect the results afterwards:
  python -m semantica_study --study='...' --out=/runs/study_base --dry_run
  python -m semantica_study --study='...' --out=/runs/study_base --report_only

The runner starts every phase as a local subprocess (one host: a GPU node or a single TPU VM).
On a multi-host pod run each printed train command on every worker (launch/tpu_pod.sh) into the
printed workdir, then rerun the study command on one host: finished trainings are skipped and
only export + eval + report run there.

Variant args (`experiments/study_base.py:key=value,...`):
  pages=DIR        page shards: DIR/train-*.tfrecord (+ DIR/eval-*.tfrecord); required
  weights=PATH     converted DINOv2-B/14 weights (.npz + JSON sidecar, semantica-convert-encoder); required
  eval_pages=DIR   a LABELLED page dataset never trained on (e.g. ImageNet val grouped by class, see
                   data_pipeline) for the few-shot eval; default DIR/eval-*.tfrecord of `pages`
  num_classes=N    classes of eval_pages (chance = 1/N); 0 = no class-consistency verdicts
  clip_weights=PATH  adds an encoder arm with CLIP ViT-B/16 (encoder_ablation.py:clip_b16)
  inception=PATH   pytorch-fid Inception-v3 weights: the eval uses Inception-v3 FID instead of
                   EfficientNet-Lite0 features
  steps=N          train steps per arm (default 100000)
Budget: 100,000 steps at the base config's global batch 1024 are 102 M pairs per arm-seed. By the
pod plan's roofline (docs/SCALE.md: 50% MFU, communication hidden) that is at least 96 v5e /
68 v4 / 41 v5p chip-hours or 16.5 H100-hours of training per arm-seed (0.37 h on a v5e-256), so
the 8 arm-seeds above cost >= 765 v5e chip-hours before the eval jobs; a real run's MFU, and so
its bill, will be lower than the plan's. Pairs vs reconstruction needs both arms at both seeds;
the filter claim needs the filter arms and the similarity mirror; the encoder claim an encoder arm.
The similarity-filter arms train on the mirror DIR_sim written by
  python -m semantica_jax.similarity --config=experiments/semantica_base.py \
      --shards='DIR/train-*.tfrecord' --out_dir=DIR_sim --sweep
Claim 2 (adaptation without finetuning) is the paper's own setting here: every arm is trained on
web pages and evaluated on eval_pages, whose classes it never saw as labels.
"""
import os

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_study(arg=None):
    from semantica_jax import config_lib

    v = config_lib.parse_variant(arg)
    config_lib.check_variant_keys(
        v, {"pages", "weights", "eval_pages", "num_classes", "clip_weights", "inception", "steps"}, "study_base")
    pages = str(v.get("pages", "/path/to/pages"))
    weights = str(v.get("weights", "/path/to/dinov2_b14.npz"))
    eval_pages = str(v.get("eval_pages", pages))
    num_classes = int(v.get("num_classes", 0))
    base = os.path.join(_REPO, "experiments", "semantica_base.py")
    ablation = os.path.join(_REPO, "experiments", "encoder_ablation.py")
    data = {"data.train_files": os.path.join(pages, "train-*.tfrecord"),
            "data.eval_files": os.path.join(pages, "eval-*.tfrecord"), "encoder.weights": weights}
    sim = {**data, "data.train_files": os.path.join(pages + "_sim", "train-*.tfrecord"),
           "data.pair_filter": "similarity"}
    overrides = {
        "train.num_steps": int(v.get("steps", 100_000)),
        "eval.files": os.path.join(eval_pages, "eval-*.tfrecord"),
        "eval.group_by": "label" if num_classes else "page",
        "eval.max_groups": 100,  # a fixed subset of classes keeps the eval affordable
        "eval.guidance_scales": (1.0, 2.0),
        "eval.num_steps": 100,
    }
    if v.get("inception"):
        overrides.update({"eval.extractor": "inception_v3", "eval.extractor_weights": str(v["inception"])})
    arms = [
        dict(name="pairs", config=base, seeds=(0, 1), overrides={**data, "eval.guidance_scales": (1.0, 1.5, 2.0, 3.0)},
             claims=("pairs_vs_reconstruction", "adaptation", "filter", "encoder", "guidance"),
             description="two different images of a page"),
        dict(name="reconstruction", config=base, seeds=(0, 1), overrides={**data, "data.pairing": "reconstruction"},
             claims=("pairs_vs_reconstruction",), description="condition = target"),
        dict(name="filter", config=base, seeds=(0, 1), overrides={**sim, "data.sim_low": 0.5, "data.sim_high": 0.95},
             claims=("filter",), description="similarity filter [0.5, 0.95]"),
        dict(name="filter_tight", config=base, seeds=(0, 1), overrides={**sim, "data.sim_low": 0.5, "data.sim_high": 0.9},
             claims=("filter",), description="similarity filter [0.5, 0.90]"),
    ]
    encoder_arms = ["pairs"]
    if v.get("clip_weights"):
        arms.append(dict(name="encoder_clip_b16", config=f"{ablation}:encoder=clip_b16,weights={v['clip_weights']}",
                         seeds=(0,), overrides={k: x for k, x in data.items() if k != "encoder.weights"},
                         claims=("encoder",), description="CLIP ViT-B/16 instead of DINOv2-B/14"))
        encoder_arms.append("encoder_clip_b16")
    chance = 1.0 / num_classes if num_classes else 0.0
    claims = [
        dict(id="pairs_vs_reconstruction", title="1. Pairs vs reconstruction", arms=("pairs", "reconstruction"),
             checks=[dict(kind="greater", metric=m, a="pairs", b="reconstruction")
                     for m in ("pixel_distance_to_condition", "pixel_diversity", "diversity", "fewshot_recall")]),
        dict(id="adaptation", title="2. Adaptation without finetuning (eval on an unseen labelled dataset)",
             arms=("pairs",),
             checks=[dict(kind="above", arm="pairs", metric="class_consistency", value=chance + 0.1,
                          statement="samples conditioned on unseen-dataset images keep the class")]
             if num_classes else []),
        dict(id="filter", title="3. Similarity filter", similarity=True, arms=("pairs", "filter", "filter_tight"),
             checks=[dict(kind="less", metric="fd", a="filter", b="pairs"),
                     dict(kind="greater", metric="diversity", a="filter_tight", b="filter")]),
        dict(id="guidance", kind="guidance", title="5. Guidance scale", arm="pairs",
             checks=[dict(kind="trend", arm="pairs", metric="consistency", direction="up", **{"from": 1.0, "to": 3.0}),
                     dict(kind="trend", arm="pairs", metric="diversity", direction="down", **{"from": 1.0, "to": 3.0})]),
    ]
    if len(encoder_arms) > 1:
        claims.insert(3, dict(id="encoder", title="4. Frozen encoder: DINOv2 vs CLIP", arms=tuple(encoder_arms),
                              checks=[dict(kind="less", metric="fd", a="pairs", b="encoder_clip_b16")]))
    return dict(
        name="base", title="Semantica's claims at base scale (64 px, S denoiser, DINOv2-B/14)",
        description=f"Page data {pages}; eval on {eval_pages}. A sketch, not run in this repo.",
        num_classes=num_classes, budget_minutes=0, overrides=overrides, table_guidance=(1.0, 2.0),
        arms=arms, claims=claims,
        limits=["64 px; page data and training length as configured by the variant args; "
                "the thresholds and budgets of this sketch were never tuned."],
    )
