"""Building blocks shared by the frozen ViT encoder (`vit.py`) and the UNet denoiser (`unet.py`).

Conventions (see DESIGN.md):
  * Parameters are stored in float32 (`param_dtype`); the `dtype` field of a module is the
    compute dtype (e.g. bfloat16 on TPU).
  * Every parameter carries logical axis names (`nn.with_logical_partitioning`) drawn from
    `config_lib.DEFAULT_AXIS_RULES`; activations at block boundaries are annotated with
    `nn.with_logical_constraint` (a no-op without a mesh / axis rules in context).
  * Attention uses `jax.nn.dot_product_attention` with the [batch, length, heads, head_dim]
    layout.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any  # str ('bfloat16') or a jnp dtype
Initializer = Callable[..., jax.Array]
AxisNames = tuple[str | None, ...]

PARAM_DTYPE = jnp.float32

# config.model.remat_policy -> what a rematerialised block may keep for the backward pass
# (None = nothing: everything inside the block is recomputed).
REMAT_POLICIES = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy(name: str) -> Any:
    """`jax.checkpoint` policy for `config.model.remat_policy` (see REMAT_POLICIES)."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"config.model.remat_policy={name!r}; expected one of {sorted(REMAT_POLICIES)}")
    return REMAT_POLICIES[name]

# Logical names of activations at block boundaries.
IMAGE_AXES: AxisNames = ("batch", "height", "width", "channels")
TOKEN_AXES: AxisNames = ("batch", "length", "embed")

default_kernel_init = nn.initializers.lecun_normal()


def canonical_dtype(dtype: Dtype) -> jnp.dtype:
    """Turns a dtype given as a string ('bfloat16') or a jnp type into a `jnp.dtype`."""
    try:
        return jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"unknown compute dtype {dtype!r}") from e


def partitioned(init_fn: Initializer, names: AxisNames) -> Initializer:
    """Shorthand for `nn.with_logical_partitioning(init_fn, names)`."""
    return nn.with_logical_partitioning(init_fn, names)


def constrain_image(x: jax.Array) -> jax.Array:
    """Annotates an [B, H, W, C] feature map with logical axes (no-op without a mesh)."""
    return nn.with_logical_constraint(x, IMAGE_AXES)


def constrain_tokens(x: jax.Array) -> jax.Array:
    """Annotates a [B, T, D] token sequence with logical axes (no-op without a mesh)."""
    return nn.with_logical_constraint(x, TOKEN_AXES)


def layer_norm(
    *, eps: float = 1e-6, dtype: Dtype = jnp.float32, name: str | None = None
) -> nn.LayerNorm:
    """A LayerNorm whose scale and bias carry the logical name 'norm'."""
    return nn.LayerNorm(
        epsilon=eps,
        dtype=canonical_dtype(dtype),
        param_dtype=PARAM_DTYPE,
        scale_init=partitioned(nn.initializers.ones_init(), ("norm",)),
        bias_init=partitioned(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


def space_to_depth(x: jax.Array, p: int) -> jax.Array:
    """[B, H, W, C] -> [B, H/p, W/p, p*p*C]: every p x p pixel block becomes channels (row-major
    within the block, channels last); `depth_to_space` inverts it exactly."""
    b, h, w, c = x.shape
    if h % p or w % p:
        raise ValueError(f"space_to_depth: {h}x{w} is not divisible by the block size {p}")
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // p, w // p, p * p * c)


def depth_to_space(x: jax.Array, p: int) -> jax.Array:
    """[B, H, W, p*p*C] -> [B, H*p, W*p, C], the inverse of `space_to_depth`."""
    b, h, w, pc = x.shape
    if pc % (p * p):
        raise ValueError(f"depth_to_space: {pc} channels are not divisible by {p}*{p}")
    x = x.reshape(b, h, w, p, p, pc // (p * p)).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, pc // (p * p))


def group_norm_groups(channels: int, max_groups: int = 32, min_group_size: int = 4) -> int:
    """Number of GroupNorm groups for `channels` feature maps.

    Starts from `min(max_groups, channels // min_group_size)` (at least 1) and decreases it until
    it divides `channels`. Examples: 32 -> 8, 64 -> 16, 96 -> 24, 128 -> 32, 768 -> 32, 3 -> 1.
    So groups always divide the channels and hold at least `min_group_size` channels whenever
    `channels >= min_group_size`.
    """
    if channels <= 0:
        raise ValueError(f"group_norm_groups: channels must be positive, got {channels}")
    groups = max(1, min(max_groups, channels // min_group_size))
    while channels % groups:
        groups -= 1
    return groups


def group_norm(
    channels: int, *, dtype: Dtype = jnp.float32, name: str | None = None
) -> nn.GroupNorm:
    """A GroupNorm (groups from `group_norm_groups`) with 'norm'-named scale and bias."""
    return nn.GroupNorm(
        num_groups=group_norm_groups(channels),
        epsilon=1e-6,
        dtype=canonical_dtype(dtype),
        param_dtype=PARAM_DTYPE,
        scale_init=partitioned(nn.initializers.ones_init(), ("norm",)),
        bias_init=partitioned(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


def dense(
    features: int,
    kernel_names: AxisNames,
    bias_names: AxisNames,
    *,
    dtype: Dtype = jnp.float32,
    use_bias: bool = True,
    kernel_init: Initializer = default_kernel_init,
    name: str | None = None,
) -> nn.Dense:
    """An `nn.Dense` with logically named kernel [in, out] and bias [out]."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=canonical_dtype(dtype),
        param_dtype=PARAM_DTYPE,
        kernel_init=partitioned(kernel_init, kernel_names),
        bias_init=partitioned(nn.initializers.zeros_init(), bias_names),
        name=name,
    )


def conv(
    features: int,
    kernel_size: int,
    *,
    strides: int = 1,
    padding: str | Sequence[tuple[int, int]] = "SAME",
    in_name: str = "conv_in",
    out_name: str = "conv_out",
    dtype: Dtype = jnp.float32,
    kernel_init: Initializer = default_kernel_init,
    impl: str = "xla",
    name: str | None = None,
) -> nn.Conv:
    """An `nn.Conv` (NHWC): kernel names ('conv_h', 'conv_w', in_name, out_name), bias (out_name,).

    The first/last convolutions of a network, whose in/out side is the 3 RGB channels, pass
    `in_name='channels'` / `out_name='channels'` (replicated): a 3-wide dimension cannot be
    sharded over the 'fsdp' / 'model' mesh axes that 'conv_in' / 'conv_out' map to.

    `impl` picks how the convolution is computed (`CONV_IMPLS`); parameters (names, shapes,
    init) are the same for every impl, so checkpoints move freely between them.
    """
    return nn.Conv(
        features,
        kernel_size=(kernel_size, kernel_size),
        strides=(strides, strides),
        padding=padding,
        dtype=canonical_dtype(dtype),
        param_dtype=PARAM_DTYPE,
        kernel_init=partitioned(kernel_init, ("conv_h", "conv_w", in_name, out_name)),
        bias_init=partitioned(nn.initializers.zeros_init(), (out_name,)),
        conv_general_dilated=conv_fn(impl),
        name=name,
    )


# ---------------------------------------------------------------------------- convolution impls
# How a UNet convolution is computed (config.model.conv_impl):
#   'xla'    : lax.conv_general_dilated (XLA's convolution; what TPUs and GPUs want).
#   'matmul' : im2col: the k*k shifted views of the padded input concatenated on the channel axis,
#              then ONE [B*H*W, k*k*Cin] @ [k*k*Cin, Cout] matmul (a 1x1 conv is a plain matmul).
#              Same FLOPs; every pass (forward, input- and filter-gradient) becomes a large GEMM.
#              On XLA:CPU the filter-gradient convolution runs at 10-20 % of the matmul peak,
#              the GEMMs at 50-90 % (benchmarks/profile_step.py). Costs k*k x the input's memory
#              for the patches (kept for the backward pass). Convolutions with k*k*Cin <
#              MATMUL_CONV_MIN_DEPTH, dilated or grouped ones stay XLA convolutions.
CONV_IMPLS = ("xla", "matmul")
# 'matmul' keeps XLA convolutions whose GEMM depth k*k*Cin is below this: thin GEMMs do not pay
# for the patch copies (measured: the tiny denoiser's 16-64 channel convolutions ran 1.3-1.5x
# slower as GEMMs; the S denoiser's >= 128 channel ones 1.5x faster).
MATMUL_CONV_MIN_DEPTH = 1024


def _same_pads(size: int, k: int, stride: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


def matmul_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                                rhs_dilation=None, dimension_numbers=None,
                                feature_group_count=1, precision=None, **kw):
    """`lax.conv_general_dilated` for NHWC x HWIO 2-D convolutions as im2col + one matmul.

    Anything else (dilation, groups, other layouts) and convolutions shallower than
    MATMUL_CONV_MIN_DEPTH fall back to lax.conv_general_dilated.
    """
    dims = 2
    plain = (lhs.ndim == 4 and rhs.ndim == 4 and feature_group_count == 1 and not kw
             and all(d == 1 for d in (lhs_dilation or (1,) * dims))
             and all(d == 1 for d in (rhs_dilation or (1,) * dims))
             and (dimension_numbers is None or tuple(dimension_numbers) in (
                 ("NHWC", "HWIO", "NHWC"),
                 jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC")))))
    if not plain or rhs.shape[0] * rhs.shape[1] * rhs.shape[2] < MATMUL_CONV_MIN_DEPTH:
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, precision=precision, **kw)
    kh, kw_, cin, cout = rhs.shape
    b, h, w, _ = lhs.shape
    sh, sw = window_strides
    if isinstance(padding, str):
        if padding == "SAME":
            pads = (_same_pads(h, kh, sh), _same_pads(w, kw_, sw))
        elif padding == "VALID":
            pads = ((0, 0), (0, 0))
        else:
            raise ValueError(f"matmul conv: unsupported padding {padding!r}")
    else:
        pads = tuple(tuple(p) for p in padding)
    ho = (h + pads[0][0] + pads[0][1] - kh) // sh + 1
    wo = (w + pads[1][0] + pads[1][1] - kw_) // sw + 1
    if kh == kw_ == 1 and pads == ((0, 0), (0, 0)):
        x = lhs[:, ::sh, ::sw, :] if (sh, sw) != (1, 1) else lhs
        return jnp.einsum("bhwc,cd->bhwd", x, rhs[0, 0], precision=precision)
    xp = jnp.pad(lhs, ((0, 0), pads[0], pads[1], (0, 0)))
    cols = jnp.concatenate(
        [xp[:, i:i + (ho - 1) * sh + 1:sh, j:j + (wo - 1) * sw + 1:sw, :]
         for i in range(kh) for j in range(kw_)], axis=-1)
    return jnp.einsum("bhwk,kd->bhwd", cols, rhs.reshape(kh * kw_ * cin, cout), precision=precision)


def conv_fn(impl: str):
    """The `conv_general_dilated` callable for `impl` (see CONV_IMPLS)."""
    if impl == "xla":
        return None  # nn.Conv's default, lax.conv_general_dilated
    if impl == "matmul":
        return matmul_conv_general_dilated
    raise ValueError(f"config.model.conv_impl={impl!r}; expected one of {CONV_IMPLS}")


class LayerScale(nn.Module):
    """Per-channel learned scale (DINOv2 / CaiT layer-scale): `x * scale` (HF `lambda1`)."""

    init_value: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale",
            partitioned(nn.initializers.constant(self.init_value), ("embed",)),
            (x.shape[-1],),
            PARAM_DTYPE,
        )
        return x * scale.astype(canonical_dtype(self.dtype))


class HeadsProjection(nn.Module):
    """x [..., D] -> [..., heads, head_dim]: kernel [D, heads, head_dim] ('embed', 'heads', 'kv'),
    bias [heads, head_dim] ('heads', 'kv').

    Written with `self.param` + einsum rather than `nn.DenseGeneral`: DenseGeneral initialises a
    flattened 2-D kernel and unboxes it, which applies the rank-3 logical sharding constraint to
    a rank-2 array and fails under a mesh.
    """

    num_heads: int
    head_dim: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            partitioned(
                nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2)), ("embed", "heads", "kv")
            ),
            (x.shape[-1], self.num_heads, self.head_dim),
            PARAM_DTYPE,
        )
        dtype = canonical_dtype(self.dtype)
        y = jnp.einsum("...d,dnh->...nh", x.astype(dtype), kernel.astype(dtype))
        if self.use_bias:
            bias = self.param(
                "bias",
                partitioned(nn.initializers.zeros_init(), ("heads", "kv")),
                (self.num_heads, self.head_dim),
                PARAM_DTYPE,
            )
            y = y + bias.astype(dtype)
        return y


class HeadsOutput(nn.Module):
    """[..., heads, head_dim] -> [..., features]: kernel [heads, head_dim, features]
    ('heads', 'kv', 'embed'), bias [features] ('embed',)."""

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            partitioned(
                nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2), ("heads", "kv", "embed")
            ),
            (x.shape[-2], x.shape[-1], self.features),
            PARAM_DTYPE,
        )
        dtype = canonical_dtype(self.dtype)
        y = jnp.einsum("...nh,nhd->...d", x.astype(dtype), kernel.astype(dtype))
        if self.use_bias:
            bias = self.param(
                "bias",
                partitioned(nn.initializers.zeros_init(), ("embed",)),
                (self.features,),
                PARAM_DTYPE,
            )
            y = y + bias.astype(dtype)
        return y


class Attention(nn.Module):
    """Multi-head (self- or cross-) attention with separate query/key/value projections.

    Submodules: `query`, `key`, `value` (`HeadsProjection`: kernel [D, heads, D/heads] named
    ('embed', 'heads', 'kv'), bias ('heads', 'kv')) and `out` (`HeadsOutput`: kernel
    [heads, D/heads, D] named ('heads', 'kv', 'embed'), bias ('embed',)). This is the HF
    `Dinov2SelfAttention` + `Dinov2SelfOutput` layout: an HF [D_out, D_in] Linear weight maps to
    the query kernel as `W.T.reshape(D, heads, D // heads)` and to the out kernel as
    `W.T.reshape(heads, D // heads, D)`.

    Queries come from `x` [B, Tq, D]; keys/values from `context` [B, Tk, Dc] (defaults to `x`).
    The head dim is `D // num_heads`; the output width is D. Scores are scaled by
    1/sqrt(head_dim) (`jax.nn.dot_product_attention`'s default).
    """

    num_heads: int
    dtype: Dtype = jnp.float32
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(
                f"{self.name or 'Attention'}: num_heads={self.num_heads} does not divide "
                f"the width {width}"
            )
        head_dim = width // self.num_heads
        context = x if context is None else context

        def proj(name: str) -> HeadsProjection:
            return HeadsProjection(
                self.num_heads, head_dim, use_bias=self.use_bias, dtype=self.dtype, name=name
            )

        q = proj("query")(x)
        k = proj("key")(context)
        v = proj("value")(context)
        y = jax.nn.dot_product_attention(q, k, v)  # [B, Tq, N, H]
        return HeadsOutput(width, use_bias=self.use_bias, dtype=self.dtype, name="out")(y)


class Mlp(nn.Module):
    """Transformer MLP: `fc1` -> GELU -> `fc2` (HF `Dinov2MLP`); exact GELU by default."""

    hidden_dim: int
    dtype: Dtype = jnp.float32
    approximate_gelu: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        h = dense(self.hidden_dim, ("embed", "mlp"), ("mlp",), dtype=self.dtype, name="fc1")(x)
        h = jax.nn.gelu(h, approximate=self.approximate_gelu)
        return dense(width, ("mlp", "embed"), ("embed",), dtype=self.dtype, name="fc2")(h)


class SwiGLU(nn.Module):
    """SwiGLU FFN (HF `Dinov2SwiGLUFFN`): `weights_in` -> split [gate, up] -> silu(gate) * up ->
    `weights_out`. `hidden_dim` is the width of silu(gate) * up (HF's rounded hidden features)."""

    hidden_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        h = dense(
            2 * self.hidden_dim, ("embed", "mlp"), ("mlp",), dtype=self.dtype, name="weights_in"
        )(x)
        gate, up = jnp.split(h, 2, axis=-1)
        h = jax.nn.silu(gate) * up
        return dense(width, ("mlp", "embed"), ("embed",), dtype=self.dtype, name="weights_out")(h)
