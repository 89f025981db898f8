"""DINOv2-style Vision Transformer: the FROZEN image encoder whose tokens condition the denoiser.

One module family covers DINOv2 ViT-S/B/L/g (with or without registers); sizes come from
`config_lib.VIT_SIZES` via `vit_from_config`. The forward pass follows HF `Dinov2Model` /
`Dinov2WithRegistersModel` so that converted checkpoints reproduce HF outputs:

  images [B, H, W, 3] in [0, 1]  ->  (x - mean) / std          (preprocessing lives here)
  -> `patch_embed` (conv, kernel = stride = patch, with bias)  -> [B, N, D]
  -> prepend `cls_token`; add `pos_embed` ([1, 1 + grid*grid, D], CLS position included,
     patch part resized bicubically when the input grid differs from the stored one)
  -> insert `register_tokens` (if any) between CLS and patches, AFTER the position embedding
  -> `block_{i}`: x += ls1 * attn(norm1(x)); x += ls2 * ffn(norm2(x))   (pre-norm)
  -> final `norm`
  -> {'tokens': [B, 1 + R + N, D] (CLS, registers, patches), 'pooled': tokens[:, 0]}

The encoder is frozen: nothing here stops gradients. The trainer keeps the encoder params out of
the optimizer and wraps the outputs in `jax.lax.stop_gradient` (or uses precomputed tokens).

Parameter tree (HF name in brackets, for converters):
  patch_embed/{kernel [p, p, 3, D], bias}         [embeddings.patch_embeddings.projection]
  cls_token [1, 1, D]                             [embeddings.cls_token]
  pos_embed [1, 1 + grid**2, D]                   [embeddings.position_embeddings]
  register_tokens [1, R, D] (only if R > 0)       [embeddings.register_tokens]
  block_{i}/norm1, norm2/{scale, bias}            [encoder.layer.{i}.norm1 / norm2]
  block_{i}/attn/{query,key,value}/{kernel [D, heads, D/heads], bias [heads, D/heads]}
                                                  [encoder.layer.{i}.attention.attention.*]
  block_{i}/attn/out/{kernel [heads, D/heads, D], bias}
                                                  [encoder.layer.{i}.attention.output.dense]
  block_{i}/ls1, ls2/scale [D] (unless layerscale_init is None)
                                                  [encoder.layer.{i}.layer_scale1/2.lambda1]
  block_{i}/mlp/{fc1, fc2}  or  block_{i}/mlp/{weights_in, weights_out}
                                                  [encoder.layer.{i}.mlp.*]
  norm/{scale, bias}                              [layernorm]
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from semantica_jax import config_lib
from semantica_jax.models import layers

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FFN_TYPES = ("mlp", "swiglu")


def swiglu_hidden_dim(width: int, mlp_ratio: float = 4.0) -> int:
    """HF `Dinov2SwiGLUFFN` hidden width: int(int(width * mlp_ratio) * 2 / 3) rounded up to 8.

    E.g. DINOv2-g: width 1536, mlp_ratio 4 -> 4096, which is `VIT_SIZES['g']['mlp_dim']`. The ViT's
    `mlp_dim` for ffn='swiglu' is this already-rounded width (the size of the stored weights).
    """
    hidden = int(width * mlp_ratio)
    return (int(hidden * 2 / 3) + 7) // 8 * 8


def resize_pos_grid(patch_pos: jax.Array, new_grid: tuple[int, int]) -> jax.Array:
    """Resizes a [1, gh, gw, D] grid of position embeddings to `new_grid` (float32 math).

    Bicubic with antialiasing (`jax.image.resize(method='bicubic', antialias=True)`), i.e. timm
    semantics. Antialiasing only matters when shrinking the grid. Note: jax's bicubic uses the
    Keys kernel with a = -0.5, PyTorch's a = -0.75, and the original DINOv2 code adds a 0.1
    offset to the scale factor; so resized embeddings differ slightly (not bit-exactly) from
    HF/torch. Converters should resize once, at conversion time, with this same function.
    """
    _, _, _, dim = patch_pos.shape
    out = jax.image.resize(
        patch_pos.astype(jnp.float32),
        (1, new_grid[0], new_grid[1], dim),
        method="bicubic",
        antialias=True,
    )
    return out.astype(patch_pos.dtype)


def interpolate_pos_embed(pos_embed: jax.Array, new_grid: tuple[int, int]) -> jax.Array:
    """Adapts a stored [1, 1 + g*g, D] position embedding (CLS first) to a (gh, gw) patch grid.

    Returns `pos_embed` unchanged when (gh, gw) == (g, g); otherwise the CLS position is kept and
    the patch part is resized with `resize_pos_grid`. Returns [1, 1 + gh*gw, D].
    """
    num_patches = pos_embed.shape[1] - 1
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise ValueError(
            f"pos_embed holds {num_patches} patch positions, not a square grid "
            f"(shape {pos_embed.shape})"
        )
    gh, gw = new_grid
    if (gh, gw) == (grid, grid):
        return pos_embed
    cls_pos = pos_embed[:, :1]
    patch_pos = pos_embed[:, 1:].reshape(1, grid, grid, -1)
    patch_pos = resize_pos_grid(patch_pos, (gh, gw)).reshape(1, gh * gw, -1)
    return jnp.concatenate([cls_pos, patch_pos], axis=1)


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


class ViTBlock(nn.Module):
    """Pre-norm transformer block (HF `Dinov2Layer`)."""

    num_heads: int
    mlp_dim: int
    ffn: str = "mlp"
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
            h = layers.Mlp(self.mlp_dim, dtype=self.dtype, name="mlp")(h)
        else:
            h = layers.SwiGLU(self.mlp_dim, dtype=self.dtype, name="mlp")(h)
        x = x + scaled("ls2", h)
        return layers.constrain_tokens(x)


class ViT(nn.Module):
    """DINOv2-style ViT encoder (frozen; see module docstring for the exact forward pass).

    Attributes:
      width: token width D.
      depth: number of transformer blocks.
      num_heads: attention heads (must divide `width`).
      mlp_dim: FFN hidden width. ffn='mlp': fc1 output (HF width * mlp_ratio). ffn='swiglu':
        width of silu(gate) * up, i.e. HF's rounded hidden (see `swiglu_hidden_dim`); weights_in
        then has 2 * mlp_dim outputs.
      patch_size: patch side in pixels (conv kernel = stride).
      image_size: resolution at which `pos_embed` is stored: grid = image_size // patch_size.
        Other input sizes (multiples of patch_size) get a resized position embedding.
      num_registers: register tokens (DINOv2 "with registers"); 0 = none.
      layerscale_init: initial layer-scale value; None = no layer-scale parameters.
      ffn: 'mlp' (fc1 -> exact GELU -> fc2) or 'swiglu' (DINOv2-g).
      ln_eps: LayerNorm epsilon.
      mean, std: per-channel RGB normalisation applied to the [0, 1] input.
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
    dtype: layers.Dtype = jnp.float32
    remat: bool = False

    @property
    def grid_size(self) -> int:
        """Side of the stored position-embedding grid."""
        return self.image_size // self.patch_size

    def _check_config(self) -> None:
        if self.ffn not in FFN_TYPES:
            raise ValueError(f"ViT: ffn must be one of {FFN_TYPES}, got {self.ffn!r}")
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

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        """Encodes images.

        Args:
          images: [B, H, W, 3] RGB in [0, 1]; H and W multiples of `patch_size`.

        Returns:
          {'tokens': [B, 1 + num_registers + (H/p)*(W/p), width] (CLS, registers, patches;
           after the final LayerNorm), 'pooled': [B, width] (= tokens[:, 0])}.
        """
        self._check_config()
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

        x = layers.conv(
            self.width,
            self.patch_size,
            strides=self.patch_size,
            padding="VALID",
            in_name="channels",
            out_name="embed",
            dtype=dtype,
            name="patch_embed",
        )(x)
        batch, gh, gw, dim = x.shape
        x = x.reshape(batch, gh * gw, dim)

        init = nn.initializers.truncated_normal(0.02)
        cls_token = self.param(
            "cls_token", layers.partitioned(init, (None, None, "embed")), (1, 1, dim),
            layers.PARAM_DTYPE,
        )
        grid = self.grid_size
        pos_embed = self.param(
            "pos_embed", layers.partitioned(init, (None, "length", "embed")),
            (1, 1 + grid * grid, dim), layers.PARAM_DTYPE,
        )
        pos = interpolate_pos_embed(pos_embed, (gh, gw)).astype(dtype)
        cls = jnp.broadcast_to(cls_token.astype(dtype), (batch, 1, dim))
        x = jnp.concatenate([cls, x], axis=1) + pos

        if self.num_registers:
            registers = self.param(
                "register_tokens", layers.partitioned(init, (None, "length", "embed")),
                (1, self.num_registers, dim), layers.PARAM_DTYPE,
            )
            registers = jnp.broadcast_to(registers.astype(dtype), (batch, self.num_registers, dim))
            x = jnp.concatenate([x[:, :1], registers, x[:, 1:]], axis=1)
        x = layers.constrain_tokens(x)

        block_cls = nn.remat(ViTBlock) if self.remat else ViTBlock
        for i in range(self.depth):
            x = block_cls(
                num_heads=self.num_heads,
                mlp_dim=self.mlp_dim,
                ffn=self.ffn,
                layerscale_init=self.layerscale_init,
                ln_eps=self.ln_eps,
                dtype=dtype,
                name=f"block_{i}",
            )(x)
        x = layers.layer_norm(eps=self.ln_eps, dtype=dtype, name="norm")(x)
        x = layers.constrain_tokens(x)
        return {"tokens": x, "pooled": x[:, 0]}


def _floats(values: Sequence[float], field: str) -> tuple[float, ...]:
    out = tuple(float(v) for v in values)
    if len(out) != 3:
        raise ValueError(f"encoder.{field} needs 3 values (RGB), got {values!r}")
    return out


def vit_from_config(
    encoder_config: Any, *, dtype: layers.Dtype = jnp.float32, remat: bool = False
) -> ViT:
    """Builds the ViT from `config.encoder` (size from `config_lib.VIT_SIZES[encoder.size]`).

    Reads `size, patch_size, image_size, num_registers, layerscale_init, mean, std`.
    `dtype` / `remat` are not encoder config fields (the encoder is frozen and usually run in the
    denoiser's compute dtype), hence keyword arguments.
    """
    size = encoder_config.size
    if size not in config_lib.VIT_SIZES:
        raise ValueError(
            f"encoder.size={size!r} is not a ViT size; choose one of {sorted(config_lib.VIT_SIZES)}"
        )
    ladder = config_lib.VIT_SIZES[size]
    layerscale = encoder_config.layerscale_init
    return ViT(
        width=int(ladder["width"]),
        depth=int(ladder["depth"]),
        num_heads=int(ladder["num_heads"]),
        mlp_dim=int(ladder["mlp_dim"]),
        ffn=str(ladder["ffn"]),
        patch_size=int(encoder_config.patch_size),
        image_size=int(encoder_config.image_size),
        num_registers=int(encoder_config.num_registers),
        layerscale_init=None if layerscale is None else float(layerscale),
        mean=_floats(encoder_config.mean, "mean"),
        std=_floats(encoder_config.std, "std"),
        dtype=dtype,
        remat=remat,
    )
