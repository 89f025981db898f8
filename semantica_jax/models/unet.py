"""U-ViT-style pixel-space UNet denoiser, conditioned on frozen-encoder tokens by cross-attention.

Layout (level i works at resolution H / (patch_size * 2**i) with `channels[i]` feature maps):

  (patch_size > 1: space-to-depth, every p x p pixel block -> p*p*C channels)
  conv_in 3x3
  down_{i}: num_res_blocks x [down_{i}_res_{j} (ResBlock), down_{i}_attn_{j} (TransformerBlock,
            only if the level's resolution <= attn_resolution)], skips kept;
            down_{i}_downsample (strided 3x3 conv) between levels
  mid_res_0, mid_attn, mid_res_1 at the lowest resolution
  up_{i}: (num_res_blocks + 1) x [concat skip, up_{i}_res_{j}, up_{i}_attn_{j} (if attention)];
          up_{i}_upsample (nearest x2 + 3x3 conv) between levels
  out_norm (GroupNorm) -> swish -> conv_out 3x3, ZERO-initialised (untrained output == 0)
  (patch_size > 1: conv_out gives p*p*out_channels maps, depth-to-space back to H x W)

Conditioning:
  * time: sinusoidal features of logsnr -> time_dense1 -> swish -> time_dense2 (width
    4 * channels[0]); every ResBlock gets it through a scale-shift of its second GroupNorm.
  * pooled (if `pooled_cond`): pooled_norm (LayerNorm) -> pooled_proj (Dense) of the encoder's
    pooled vector, added to the time embedding; examples with cond_mask False get the learned
    `null_pooled` vector instead.
  * tokens: cond_norm (LayerNorm) -> cond_proj (Dense, 'cond_embed' -> 'embed') to `cond_dim`;
    examples with cond_mask False get the learned `null_cond_tokens` [T, cond_dim] sequence
    instead (classifier-free guidance). Every TransformerBlock cross-attends to them.

GroupNorm group counts: see `layers.group_norm_groups` (min(32, C // 4), lowered until it
divides C). Dropout applies inside ResBlocks only (when `train` and dropout > 0; needs a
'dropout' rng).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from semantica_jax.models import layers

# Denoiser ladder: channels per resolution level (level 0 = the image resolution, each next level
# halves it), ResBlocks per level, attention heads. Levels at or below `model.attn_resolution`
# also get transformer blocks (self-attn + cross-attn + MLP). Heads must divide the channels of
# every attention level. Sizes at 64 px: tiny 0.98 M params (at 32 px), S 85 M, L 639 M.
SIZES = {
    # name: (channels per level, blocks per level, transformer width, heads)
    "tiny": dict(channels=(16, 32, 64), num_res_blocks=1, num_heads=2),
    "S": dict(channels=(128, 256, 512), num_res_blocks=2, num_heads=8),
    "B": dict(channels=(128, 256, 512, 768), num_res_blocks=2, num_heads=8),
    "L": dict(channels=(256, 512, 768, 1024), num_res_blocks=3, num_heads=16),
}

# Angular frequencies of the logsnr features, log-spaced in [MIN, MAX]. With logsnr in
# [-15, 15] the lowest frequency stays below a quarter turn (monotone, unambiguous features) and
# the highest resolves logsnr differences of ~0.1.
LOGSNR_MIN_FREQ = 1.0 / 16.0
LOGSNR_MAX_FREQ = 64.0


def logsnr_embedding(logsnr: jax.Array, dim: int) -> jax.Array:
    """Sinusoidal features [B, dim] of logsnr [B]: sin/cos at log-spaced frequencies (float32)."""
    if dim < 2:
        raise ValueError(f"logsnr_embedding: dim must be >= 2, got {dim}")
    half = dim // 2
    freqs = jnp.exp(
        jnp.linspace(math.log(LOGSNR_MIN_FREQ), math.log(LOGSNR_MAX_FREQ), half, dtype=jnp.float32)
    )
    args = logsnr.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class ResBlock(nn.Module):
    """GN -> swish -> conv3x3 -> GN * (1 + scale) + shift (from temb) -> swish -> dropout ->
    conv3x3, plus the input (through a 1x1 conv `skip` when the channel count changes)."""

    out_channels: int
    dropout: float = 0.0
    dtype: layers.Dtype = jnp.float32
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
        c = self.out_channels
        h = layers.group_norm(x.shape[-1], dtype=self.dtype, name="norm1")(x)
        h = layers.conv(c, 3, dtype=self.dtype, impl=self.conv_impl, name="conv1")(nn.swish(h))
        scale_shift = layers.dense(
            2 * c, ("embed", "conv_out"), ("conv_out",), dtype=self.dtype, name="temb_proj"
        )(nn.swish(temb))
        scale, shift = jnp.split(scale_shift[:, None, None, :], 2, axis=-1)
        h = layers.group_norm(c, dtype=self.dtype, name="norm2")(h) * (1 + scale) + shift
        h = nn.Dropout(self.dropout)(nn.swish(h), deterministic=not train)
        h = layers.conv(c, 3, dtype=self.dtype, impl=self.conv_impl, name="conv2")(h)
        if x.shape[-1] != c:
            x = layers.conv(c, 1, dtype=self.dtype, impl=self.conv_impl, name="skip")(x)
        return layers.constrain_image(x + h)


class TransformerBlock(nn.Module):
    """On the flattened map [B, H*W, C]: self-attention, cross-attention to `cond`, GELU MLP;
    each pre-LayerNorm with a residual connection."""

    num_heads: int
    mlp_ratio: int = 4
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
        batch, height, width, c = x.shape
        h = layers.constrain_tokens(x.reshape(batch, height * width, c))
        y = layers.layer_norm(dtype=self.dtype, name="norm1")(h)
        h = h + layers.Attention(self.num_heads, dtype=self.dtype, name="self_attn")(y)
        y = layers.layer_norm(dtype=self.dtype, name="norm2")(h)
        h = h + layers.Attention(self.num_heads, dtype=self.dtype, name="cross_attn")(y, cond)
        y = layers.layer_norm(dtype=self.dtype, name="norm3")(h)
        h = h + layers.Mlp(self.mlp_ratio * c, dtype=self.dtype, name="mlp")(y)
        h = layers.constrain_tokens(h)
        return layers.constrain_image(h.reshape(batch, height, width, c))


class UNet(nn.Module):
    """U-ViT-style UNet denoiser (see module docstring).

    Attributes:
      channels: feature maps per resolution level; level 0 = input resolution, each next level
        halves it.
      num_res_blocks: ResBlocks per level on the down path (num_res_blocks + 1 on the up path).
      num_heads: attention heads of every TransformerBlock (must divide the channels of every
        level with attention).
      attn_resolution: TransformerBlocks follow the ResBlocks at this resolution and below.
      mlp_ratio: TransformerBlock MLP hidden = mlp_ratio * channels.
      cond_dim: width of the projected conditioning tokens; -1 = channels[-1].
      pooled_cond: add the projected pooled encoder vector to the time embedding.
      token_cond: cross-attend to the projected encoder tokens (False: to the learned null
        sequence only, the "pooled only" ablation; needs pooled_cond for any conditioning).
      dropout: dropout rate inside ResBlocks (train only).
      dtype: compute dtype; params stay float32; the prediction is returned in float32.
      out_channels: channels of the prediction.
      remat: rematerialise TransformerBlocks in the backward pass.
      remat_policy: what a rematerialised block keeps (`layers.REMAT_POLICIES`: 'full' keeps
        nothing, 'dots_saveable' / 'dots_with_no_batch_dims_saveable' keep matmul outputs).
      conv_impl: how convolutions are computed (`layers.CONV_IMPLS`: 'xla' convolutions or
        'matmul' im2col GEMMs); the parameters are the same either way.
      patch_size: p > 1 folds every p x p pixel block into channels before conv_in and unfolds
        conv_out's p*p*out_channels maps back (a patchified stem): level 0 runs at H / p, so
        the full-resolution feature maps, their norms and activations are never formed.
    """

    channels: tuple[int, ...]
    num_res_blocks: int
    num_heads: int
    attn_resolution: int = 16
    mlp_ratio: int = 4
    cond_dim: int = -1
    pooled_cond: bool = True
    token_cond: bool = True
    dropout: float = 0.0
    dtype: layers.Dtype = jnp.float32
    out_channels: int = 3
    remat: bool = False
    remat_policy: str = "full"
    conv_impl: str = "xla"
    patch_size: int = 1

    @property
    def resolved_cond_dim(self) -> int:
        return self.channels[-1] if self.cond_dim == -1 else self.cond_dim

    def level_resolutions(self, resolution: int) -> tuple[int, ...]:
        """Resolution of every level for a square input; raises ValueError if unsupported."""
        num_levels = len(self.channels)
        if num_levels == 0:
            raise ValueError("UNet: model.channels is empty")
        p = self.patch_size
        if p < 1 or resolution % p:
            raise ValueError(f"UNet: input resolution {resolution} is not divisible by model.patch_size={p}")
        resolution //= p
        factor = 2 ** (num_levels - 1)
        if resolution % factor:
            raise ValueError(
                f"UNet: input resolution {resolution * p}"
                + (f" / model.patch_size={p} = {resolution}" if p > 1 else "")
                + f" is not divisible by {factor} = 2**(len(model.channels) - 1) for "
                f"model.channels={tuple(self.channels)}"
            )
        levels = tuple(resolution // 2**i for i in range(num_levels))
        if levels[-1] > self.attn_resolution:
            raise ValueError(
                f"UNet: no level at or below model.attn_resolution={self.attn_resolution} for "
                f"input resolution {resolution}: levels are {levels} (model.channels="
                f"{tuple(self.channels)}); raise attn_resolution or add levels"
            )
        for res, c in zip(levels, self.channels):
            if res <= self.attn_resolution and c % self.num_heads:
                raise ValueError(
                    f"UNet: model.num_heads={self.num_heads} does not divide {c} channels of "
                    f"the attention level at resolution {res} (model.channels="
                    f"{tuple(self.channels)})"
                )
        return levels

    def _check_inputs(
        self,
        x: jax.Array,
        logsnr: jax.Array,
        cond_tokens: jax.Array,
        cond_pooled: jax.Array | None,
        cond_mask: jax.Array | None,
    ) -> None:
        if self.num_res_blocks < 1:
            raise ValueError(f"UNet: model.num_res_blocks must be >= 1, got {self.num_res_blocks}")
        if x.ndim != 4:
            raise ValueError(f"UNet: x must be [B, H, W, C], got shape {x.shape}")
        batch, height, width, _ = x.shape
        if height != width:
            raise ValueError(f"UNet: input must be square, got {height}x{width}")
        if logsnr.shape != (batch,):
            raise ValueError(f"UNet: logsnr must have shape ({batch},), got {logsnr.shape}")
        if cond_tokens.ndim != 3 or cond_tokens.shape[0] != batch:
            raise ValueError(
                f"UNet: cond_tokens must be [{batch}, T, D], got shape {cond_tokens.shape}"
            )
        if self.pooled_cond:
            if cond_pooled is None:
                raise ValueError("UNet: model.pooled_cond=True needs cond_pooled, got None")
            if cond_pooled.ndim != 2 or cond_pooled.shape[0] != batch:
                raise ValueError(
                    f"UNet: cond_pooled must be [{batch}, D], got shape {cond_pooled.shape}"
                )
        if cond_mask is not None and cond_mask.shape != (batch,):
            raise ValueError(f"UNet: cond_mask must have shape ({batch},), got {cond_mask.shape}")

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        logsnr: jax.Array,
        cond_tokens: jax.Array,
        cond_pooled: jax.Array | None,
        cond_mask: jax.Array | None,
        *,
        train: bool,
    ) -> jax.Array:
        """Predicts (eps / v / x, per the diffusion parameterisation) for noisy images.

        Args:
          x: [B, H, W, C] noisy images (H == W, divisible by 2**(len(channels) - 1)).
          logsnr: [B] log signal-to-noise ratios (about [-15, 15]).
          cond_tokens: [B, T, Dc] encoder tokens. T must equal the T seen at init.
          cond_pooled: [B, Dc] pooled encoder vector (may be None if not pooled_cond).
          cond_mask: [B] bool, True = use the condition, False = learned null condition
            (classifier-free guidance); None = all True.
          train: enables dropout (needs a 'dropout' rng when dropout > 0).

        Returns:
          [B, H, W, out_channels] float32 prediction.
        """
        self._check_inputs(x, logsnr, cond_tokens, cond_pooled, cond_mask)
        levels = self.level_resolutions(x.shape[1])
        dtype = layers.canonical_dtype(self.dtype)
        batch = x.shape[0]
        if cond_mask is None:
            cond_mask = jnp.ones((batch,), dtype=bool)
        cond_mask = cond_mask.astype(bool)

        # ------------------------------------------------------------ time (+ pooled) embedding
        temb_dim = 4 * self.channels[0]
        temb = logsnr_embedding(logsnr, self.channels[0]).astype(dtype)
        temb = layers.dense(
            temb_dim, ("embed", "mlp"), ("mlp",), dtype=dtype, name="time_dense1"
        )(temb)
        temb = layers.dense(
            temb_dim, ("mlp", "embed"), ("embed",), dtype=dtype, name="time_dense2"
        )(nn.swish(temb))
        if self.pooled_cond:
            pooled = layers.layer_norm(dtype=dtype, name="pooled_norm")(cond_pooled.astype(dtype))
            pooled = layers.dense(
                temb_dim, ("cond_embed", "embed"), ("embed",), dtype=dtype, name="pooled_proj"
            )(pooled)
            null_pooled = self.param(
                "null_pooled",
                layers.partitioned(nn.initializers.zeros_init(), ("embed",)),
                (temb_dim,),
                layers.PARAM_DTYPE,
            )
            temb = temb + jnp.where(cond_mask[:, None], pooled, null_pooled.astype(dtype))

        # ------------------------------------------------------------ conditioning tokens
        cond_dim = self.resolved_cond_dim
        num_tokens = cond_tokens.shape[1]
        cond = layers.layer_norm(dtype=dtype, name="cond_norm")(cond_tokens.astype(dtype))
        cond = layers.dense(
            cond_dim, ("cond_embed", "embed"), ("embed",), dtype=dtype, name="cond_proj"
        )(cond)
        if self.has_variable("params", "null_cond_tokens"):
            stored = jnp.shape(nn.meta.unbox(self.get_variable("params", "null_cond_tokens")))
            if stored != (num_tokens, cond_dim):
                raise ValueError(
                    f"UNet: cond_tokens has {num_tokens} tokens (projected to cond_dim={cond_dim}) "
                    f"but the learned null sequence null_cond_tokens has shape {stored}, fixed at "
                    "init; the encoder token count must match the one seen at init"
                )
        null_tokens = self.param(
            "null_cond_tokens",
            layers.partitioned(nn.initializers.normal(1.0), ("length", "embed")),
            (num_tokens, cond_dim),
            layers.PARAM_DTYPE,
        )
        # token_cond=False (ablation): cross-attention always sees the learned null sequence, so
        # the image reaches the denoiser through the pooled vector only.
        token_mask = cond_mask if self.token_cond else jnp.zeros_like(cond_mask)
        cond = jnp.where(token_mask[:, None, None], cond, null_tokens.astype(dtype)[None])
        cond = layers.constrain_tokens(cond)

        # ------------------------------------------------------------ UNet
        attn_cls = TransformerBlock
        if self.remat:
            attn_cls = nn.remat(TransformerBlock, policy=layers.remat_policy(self.remat_policy))

        def res_block(c: int, name: str) -> ResBlock:
            return ResBlock(c, dropout=self.dropout, dtype=dtype, conv_impl=self.conv_impl, name=name)

        def attn_block(name: str) -> TransformerBlock:
            return attn_cls(self.num_heads, mlp_ratio=self.mlp_ratio, dtype=dtype, name=name)

        p = self.patch_size
        if p > 1:
            x = layers.space_to_depth(x, p)
        h = layers.conv(
            self.channels[0], 3, in_name="channels", dtype=dtype, impl=self.conv_impl, name="conv_in"
        )(x.astype(dtype))
        h = layers.constrain_image(h)
        skips = [h]
        last = len(self.channels) - 1
        for i, (res, c) in enumerate(zip(levels, self.channels)):
            for j in range(self.num_res_blocks):
                h = res_block(c, f"down_{i}_res_{j}")(h, temb, train)
                if res <= self.attn_resolution:
                    h = attn_block(f"down_{i}_attn_{j}")(h, cond)
                skips.append(h)
            if i != last:
                h = layers.conv(c, 3, strides=2, dtype=dtype, impl=self.conv_impl,
                                name=f"down_{i}_downsample")(h)
                h = layers.constrain_image(h)
                skips.append(h)

        h = res_block(self.channels[-1], "mid_res_0")(h, temb, train)
        h = attn_block("mid_attn")(h, cond)
        h = res_block(self.channels[-1], "mid_res_1")(h, temb, train)

        for i in reversed(range(len(self.channels))):
            res, c = levels[i], self.channels[i]
            for j in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = res_block(c, f"up_{i}_res_{j}")(h, temb, train)
                if res <= self.attn_resolution:
                    h = attn_block(f"up_{i}_attn_{j}")(h, cond)
            if i != 0:
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest x2
                h = layers.conv(c, 3, dtype=dtype, impl=self.conv_impl, name=f"up_{i}_upsample")(h)
                h = layers.constrain_image(h)
        assert not skips, "internal error: unused skip connections"

        h = nn.swish(layers.group_norm(h.shape[-1], dtype=dtype, name="out_norm")(h))
        out = layers.conv(
            self.out_channels * p * p,
            3,
            out_name="channels",
            dtype=dtype,
            kernel_init=nn.initializers.zeros_init(),
            impl=self.conv_impl,
            name="conv_out",
        )(h)
        if p > 1:
            out = layers.depth_to_space(out, p)
        return out.astype(jnp.float32)


def resolve_conv_impl(conv_impl: str, platform: str | None = None) -> str:
    """`model.conv_impl` with 'auto' resolved for `platform` (default: JAX's default backend):
    'matmul' on CPU, 'xla' elsewhere."""
    if conv_impl == "auto":
        platform = platform or jax.default_backend()
        return "matmul" if platform == "cpu" else "xla"
    if conv_impl not in layers.CONV_IMPLS:
        raise ValueError(
            f"model.conv_impl={conv_impl!r}; expected 'auto' or one of {layers.CONV_IMPLS}"
        )
    return conv_impl


def unet_from_config(model_config: Any, platform: str | None = None) -> UNet:
    """Builds the UNet from `config.model`.

    `model.size` picks a `SIZES` entry; `model.channels` (non-empty),
    `model.num_res_blocks` (!= -1) and `model.num_heads` (!= -1) override it.
    `model.remat_policy` is checked even when `model.remat` is off. `platform` (the mesh's
    device platform, e.g. 'cpu' / 'tpu') resolves `model.conv_impl='auto'`; None = JAX's
    default backend.
    """
    size = model_config.size
    if size not in SIZES:
        raise ValueError(
            f"model.size={size!r} is not a UNet size; choose one of {sorted(SIZES)}"
        )
    ladder = SIZES[size]
    channels = tuple(int(c) for c in model_config.channels) or tuple(ladder["channels"])
    num_res_blocks = int(model_config.num_res_blocks)
    num_heads = int(model_config.num_heads)
    if any(c <= 0 for c in channels):
        raise ValueError(f"model.channels must be positive, got {channels}")
    layers.remat_policy(model_config.remat_policy)
    return UNet(
        channels=channels,
        num_res_blocks=ladder["num_res_blocks"] if num_res_blocks == -1 else num_res_blocks,
        num_heads=ladder["num_heads"] if num_heads == -1 else num_heads,
        attn_resolution=int(model_config.attn_resolution),
        mlp_ratio=int(model_config.mlp_ratio),
        cond_dim=int(model_config.cond_dim),
        pooled_cond=bool(model_config.pooled_cond),
        token_cond=bool(model_config.get("token_cond", True)),
        dropout=float(model_config.dropout),
        dtype=model_config.dtype,
        remat=bool(model_config.remat),
        remat_policy=str(model_config.remat_policy),
        conv_impl=resolve_conv_impl(str(model_config.get("conv_impl", "xla")), platform),
        patch_size=int(model_config.get("patch_size", 1)),
    )
