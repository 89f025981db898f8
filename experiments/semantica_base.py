r"""Semantica base: 64 px pixel-space U-ViT denoiser conditioned on a frozen DINOv2 ViT-B/14.

Launch on a TPU pod slice (every worker; see launch/tpu_pod.sh and docs/SCALE.md):
  launch/tpu_pod.sh experiments/semantica_base.py --tpu NAME --zone ZONE --project PROJECT \
      --workdir gs://BUCKET/semantica_base -- --config.data.train_files='gs://BUCKET/pages/train-*' \
      --config.encoder.weights=PATH
  (the L denoiser: experiments/semantica_base.py:size=L,fsdp; multi-node GPU:
   sbatch launch/gpu_slurm.sbatch experiments/semantica_base.py:size=L,fsdp WORKDIR [flags])
Check memory and FLOPs for a pod before launching: python launch/compile_for.py \
    --config=experiments/semantica_base.py --topology=v5e-256
Locally (any machine): python -m semantica_jax.main --config=experiments/semantica_base.py:runlocal \
    --workdir=/tmp/semantica_base --config.data.train_files='PATH/train-*.tfrecord'
Required overrides: `--config.data.train_files` (WebLI-style page shards, see README "Shard format")
and `--config.encoder.weights` (converted encoder weights; random init is refused outside runlocal).
Variants (`experiments/semantica_base.py:key=value,...`):
  size=S|B|L      denoiser size ladder (decoder-scaling ablation); default S
  encoder=S|B|L|g DINOv2 encoder size; default B
  res=64|128|256  target resolution (the log-SNR shift follows it; extra UNet levels are
                  prepended so attention stays at <= 16 px); default 64
  fsdp            fully sharded data parallel, for size=L: parameters, EMA and Adam state
                  (float32; compute stays bfloat16) sharded over all chips of a slice
                  (mesh data=1, fsdp=-1; slices stay data-parallel, dcn_data=-1), and
                  transformer blocks rematerialised (remat_policy=dots_with_no_batch_dims_saveable);
                  on 16 GiB v5e chips the compiled step re-gathers weights (~21 bytes per
                  parameter per step at 256 px, docs/SCALE.md): plan it before launching
  batch=N         global batch N (default 1024); the recipe follows config_lib.scale_to_batch:
                  the same run in training pairs (steps, warm-up and EMA horizon), learning
                  rate x sqrt(N / 256) from 1e-4 at the reference batch 256
  topology=NAME   the batch the pod plan recommends for NAME (v5e-256, v4-64, v5p-128, h100-8),
                  rescaled the same way; size=S only (plan other sizes with --plan, pass batch=)
  runlocal        batch 8, 3 steps, random encoder at 56 px: checks the config runs on a laptop
Pod plan (`python launch/compile_for.py --config=experiments/semantica_base.py --topology=T --plan`;
compute at 50% of the bf16 peak vs the bfloat16 gradient all-reduce, 171 MB, at the chip's
documented ICI bandwidth; data-parallel; docs/SCALE.md has the full tables and the model):
  topology  recommended batch/chip (global)  compute ms  all-reduce ms  device-h/100M pairs
  v5e-256   4 (1024)                         13.4        1.71           93
  v4-64     8 (256)                          19.2        1.27           67
  v5p-128   8 (512)                          11.5        0.57           40
  h100-8    32 (256)                         18.6        0.76           16
  "Recommended" = the smallest power of two per chip that fits with >= 20% HBM headroom, is
  compute-bound (communication <= 0.5 x compute) and computes >= 10 ms per step. The default
  global batch 1024 is compute-bound on all four (communication 0.13 / 0.02 / 0.02 / 0.01 x
  compute) and fits (peak 2.55 / ~8.2 / ~6.0 / 22.3 GiB per chip); the previous default, 256,
  was communication-bound on v5e-256 (1 per chip: 3.37 ms of compute, 1.71 ms all-reduce).
What it should show: loss decreasing, and samples (grids in TensorBoard) that are diverse variations
keeping the condition's semantics; reconstruction pairing (`--config.data.pairing=reconstruction`)
should give near-copies instead.
What the tiny recipe's ablation (docs/RECIPE.md) changes here, and why not more:
  kept: v-prediction with the v-loss, AdamW with a constant learning rate after warm-up (the
        cosine decay and the x / sigmoid loss weightings did not help there), patch tokens +
        CLS cross-attended and the pooled vector in the time embedding (pooled-only was worse);
  not carried: diffusion.tie_channels (web images are RGB), data.target_fit='pad' (photos
        are larger than the target; 'pad' only leaves images no larger than it unresampled),
        the plain schedule (the +2 log 2 per doubling shift was not ablated alone, and above
        32 px it is the literature's choice), model.patch_size=2 (measured at 32 px on CPU,
        where the 16-channel full-resolution maps dominated the step; the S ladder's 128+
        channels on TPU/GPU are not limited that way: `--config.model.patch_size=2` to try).
"""
from semantica_jax import config_lib
from semantica_jax.models import unet, vit

_VARIANT_KEYS = {"size", "encoder", "res", "fsdp", "runlocal", "batch", "topology"}

# The optimiser settings below are written for this global batch; other batches get the same run
# in training pairs (config_lib.scale_to_batch: steps, warm-up and EMA horizon in pairs, the
# learning rate x sqrt(batch ratio)).
REFERENCE_BATCH = 256
DEFAULT_BATCH = 1024
# `topology=NAME`: the global batch `launch/compile_for.py --plan` recommends for the S denoiser
# (the table in the docstring; docs/SCALE.md).
PLANNED_BATCH = {"v5e-256": 1024, "v4-64": 256, "v5p-128": 512, "h100-8": 256}


def get_config(arg=None):
    v = config_lib.parse_variant(arg)
    config_lib.check_variant_keys(v, _VARIANT_KEYS, "semantica_base")
    c = config_lib.default_config()
    c.batch_size = REFERENCE_BATCH
    c.data.image_size = int(v.get("res", 64))
    c.model.size = str(v.get("size", "S"))
    if c.model.size not in unet.SIZES:
        raise ValueError(f"semantica_base: size={c.model.size!r}; expected one of {sorted(unet.SIZES)}")
    c.encoder.size = str(v.get("encoder", "B"))
    if c.encoder.size not in vit.SIZES:
        raise ValueError(f"semantica_base: encoder={c.encoder.size!r}; expected one of {sorted(vit.SIZES)}")
    # Higher resolutions get extra full-resolution levels in front of the ladder, so the
    # lowest level stays at or below model.attn_resolution (where the transformer blocks are).
    channels = list(unet.SIZES[c.model.size]["channels"])
    while c.data.image_size // 2 ** (len(channels) - 1) > c.model.attn_resolution:
        channels.insert(0, channels[0])
    c.model.channels = tuple(channels)
    c.encoder.image_size = 224
    c.model.dtype = "bfloat16"
    c.encoder.dtype = "bfloat16"  # the in-graph frozen encoder (params stay float32)
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 5_000
    c.optimizer.ema_decay = 0.9999
    c.train.num_steps = 500_000  # 128 M pairs at the reference batch

    if "batch" in v and "topology" in v:
        raise ValueError("semantica_base: give batch= or topology=, not both")
    if "topology" in v:
        if c.model.size != "S":
            raise ValueError(f"semantica_base: topology= plans exist for size=S only; for size={c.model.size} "
                             "run launch/compile_for.py --plan and pass batch=")
        if v["topology"] not in PLANNED_BATCH:
            raise ValueError(f"semantica_base: topology={v['topology']!r}; planned: {sorted(PLANNED_BATCH)}")
    batch = int(PLANNED_BATCH[v["topology"]] if "topology" in v else v.get("batch", DEFAULT_BATCH))
    config_lib.scale_to_batch(c, batch)

    if v.get("fsdp"):
        c.mesh.data, c.mesh.fsdp, c.mesh.model = 1, -1, 1
        c.mesh.dcn_data, c.mesh.dcn_fsdp, c.mesh.dcn_model = -1, 1, 1
        c.model.remat = True
        c.model.remat_policy = "dots_with_no_batch_dims_saveable"

    if v.get("runlocal"):
        c.batch_size = 8
        c.model.dtype = "float32"
        c.encoder.dtype = "float32"
        c.encoder.image_size = 56
        c.encoder.allow_random_init = True
        c.data.shuffle_buffer = 100
        config_lib.apply_overrides(c, config_lib.smoke_overrides(3))
    return c
