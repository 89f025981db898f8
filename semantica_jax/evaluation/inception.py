"""Inception-v3 in the pytorch-fid FID layout, in JAX, from a user-supplied weights file.

The network is pytorch-fid 0.3.0's `InceptionV3(output_blocks=[3])` with `use_fid_inception=True`:
torchvision's Inception3 stem and blocks with the FID patches (FIDInceptionA / FIDInceptionC /
FIDInceptionE_1 average-pool without counting the padding, FIDInceptionE_2 max-pools), ending at the
global average pool: 2048-d "pool3" features, the standard FID space. The weights are
`pt_inception-2015-12-05-6726825d.pth` (pytorch-fid's port of TF's 2015-12-05 Inception); they are
not installable offline, so the user supplies the file (`get_extractor('inception_v3',
weights_path=...)`). It is read torch-free (`efficientnet.read_torch_checkpoint`: legacy and zip
`torch.save` formats, restricted unpickler), checked key by key and shape by shape against the
architecture below, and BatchNorm (eps 1e-3) is folded into the convolutions.

Preprocessing as pytorch-fid: resize to 299 x 299 with bilinear interpolation, align_corners=False
and NO antialiasing (`F.interpolate(mode='bilinear')`, reproduced exactly by
`jax.image.resize(method='bilinear', antialias=False)`; for upsampling, e.g. 32/64/256 px images,
antialiasing makes no difference anyway), network input in [-1, 1] (pytorch-fid maps its [0, 1]
input with 2x - 1; our images are already in [-1, 1]).

tests/test_features.py builds pytorch-fid's own `InceptionV3` (the library's code, over a
torchvision stand-in written from torchvision's source) with a random state dict of exactly these
keys and compares its features with this port.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from semantica_jax.evaluation import efficientnet

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FEATURE_DIM = 2048
NUM_CLASSES = 1008
RESOLUTION = 299
BN_EPS = 1e-3


# ============================================================================ architecture
def _conv_specs() -> dict[str, tuple[int, int, tuple[int, int], int, tuple[int, int]]]:
    """{BasicConv2d name: (in, out, (kh, kw), stride, (pad_h, pad_w))} in torchvision order."""
    specs: dict[str, Any] = {}

    def add(name, cin, cout, k, stride=1, pad=0):
        k = (k, k) if isinstance(k, int) else k
        pad = (pad, pad) if isinstance(pad, int) else pad
        specs[name] = (cin, cout, k, stride, pad)

    add("Conv2d_1a_3x3", 3, 32, 3, stride=2)
    add("Conv2d_2a_3x3", 32, 32, 3)
    add("Conv2d_2b_3x3", 32, 64, 3, pad=1)
    add("Conv2d_3b_1x1", 64, 80, 1)
    add("Conv2d_4a_3x3", 80, 192, 3)
    for name, cin, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
        add(f"{name}.branch1x1", cin, 64, 1)
        add(f"{name}.branch5x5_1", cin, 48, 1)
        add(f"{name}.branch5x5_2", 48, 64, 5, pad=2)
        add(f"{name}.branch3x3dbl_1", cin, 64, 1)
        add(f"{name}.branch3x3dbl_2", 64, 96, 3, pad=1)
        add(f"{name}.branch3x3dbl_3", 96, 96, 3, pad=1)
        add(f"{name}.branch_pool", cin, pool, 1)
    add("Mixed_6a.branch3x3", 288, 384, 3, stride=2)
    add("Mixed_6a.branch3x3dbl_1", 288, 64, 1)
    add("Mixed_6a.branch3x3dbl_2", 64, 96, 3, pad=1)
    add("Mixed_6a.branch3x3dbl_3", 96, 96, 3, stride=2)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        add(f"{name}.branch1x1", 768, 192, 1)
        add(f"{name}.branch7x7_1", 768, c7, 1)
        add(f"{name}.branch7x7_2", c7, c7, (1, 7), pad=(0, 3))
        add(f"{name}.branch7x7_3", c7, 192, (7, 1), pad=(3, 0))
        add(f"{name}.branch7x7dbl_1", 768, c7, 1)
        add(f"{name}.branch7x7dbl_2", c7, c7, (7, 1), pad=(3, 0))
        add(f"{name}.branch7x7dbl_3", c7, c7, (1, 7), pad=(0, 3))
        add(f"{name}.branch7x7dbl_4", c7, c7, (7, 1), pad=(3, 0))
        add(f"{name}.branch7x7dbl_5", c7, 192, (1, 7), pad=(0, 3))
        add(f"{name}.branch_pool", 768, 192, 1)
    add("Mixed_7a.branch3x3_1", 768, 192, 1)
    add("Mixed_7a.branch3x3_2", 192, 320, 3, stride=2)
    add("Mixed_7a.branch7x7x3_1", 768, 192, 1)
    add("Mixed_7a.branch7x7x3_2", 192, 192, (1, 7), pad=(0, 3))
    add("Mixed_7a.branch7x7x3_3", 192, 192, (7, 1), pad=(3, 0))
    add("Mixed_7a.branch7x7x3_4", 192, 192, 3, stride=2)
    for name, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
        add(f"{name}.branch1x1", cin, 320, 1)
        add(f"{name}.branch3x3_1", cin, 384, 1)
        add(f"{name}.branch3x3_2a", 384, 384, (1, 3), pad=(0, 1))
        add(f"{name}.branch3x3_2b", 384, 384, (3, 1), pad=(1, 0))
        add(f"{name}.branch3x3dbl_1", cin, 448, 1)
        add(f"{name}.branch3x3dbl_2", 448, 384, 3, pad=1)
        add(f"{name}.branch3x3dbl_3a", 384, 384, (1, 3), pad=(0, 1))
        add(f"{name}.branch3x3dbl_3b", 384, 384, (3, 1), pad=(1, 0))
        add(f"{name}.branch_pool", cin, 192, 1)
    return specs


CONV_SPECS = _conv_specs()


def state_dict_shapes(with_num_batches_tracked: bool = True) -> dict[str, tuple[int, ...]]:
    """The exact keys and shapes of pytorch-fid's FID Inception state dict (`fc` included)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, (cin, cout, (kh, kw), _, _) in CONV_SPECS.items():
        shapes[f"{name}.conv.weight"] = (cout, cin, kh, kw)
        for p in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.bn.{p}"] = (cout,)
        if with_num_batches_tracked:
            shapes[f"{name}.bn.num_batches_tracked"] = ()
    shapes["fc.weight"] = (NUM_CLASSES, FEATURE_DIM)
    shapes["fc.bias"] = (NUM_CLASSES,)
    return shapes


def check_state_dict(sd: dict[str, np.ndarray], source: str = "state dict") -> None:
    """Raises ValueError naming missing / unexpected keys and shape mismatches."""
    want = state_dict_shapes()
    optional = {k for k in want if k.endswith("num_batches_tracked")}
    missing = sorted(set(want) - set(sd) - optional)
    unexpected = sorted(set(sd) - set(want))
    bad = [f"{k}: {tuple(sd[k].shape)} vs {want[k]}" for k in want
           if k in sd and tuple(sd[k].shape) != want[k]]
    if missing or unexpected or bad:
        raise ValueError(
            f"{source} is not pytorch-fid's FID Inception ({WEIGHTS_FILE}): missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}, shape mismatches {bad[:8]}"
        )


def params_from_state_dict(sd: dict[str, np.ndarray], source: str = "state dict") -> dict[str, Any]:
    """{conv name: (HWIO kernel, bias) with BN folded}, plus 'fc': (kernel [2048, 1008], bias)."""
    check_state_dict(sd, source)
    params: dict[str, Any] = {}
    for name in CONV_SPECS:
        w = sd[f"{name}.conv.weight"].astype(np.float64)
        g, b = sd[f"{name}.bn.weight"].astype(np.float64), sd[f"{name}.bn.bias"].astype(np.float64)
        mean, var = sd[f"{name}.bn.running_mean"].astype(np.float64), sd[f"{name}.bn.running_var"].astype(np.float64)
        scale = g / np.sqrt(var + BN_EPS)
        kernel = np.transpose(w * scale[:, None, None, None], (2, 3, 1, 0))
        params[name] = (kernel.astype(np.float32), (b - mean * scale).astype(np.float32))
    params["fc"] = (sd["fc.weight"].T.astype(np.float32), sd["fc.bias"].astype(np.float32))
    return params


def load_params(path: str) -> dict[str, Any]:
    """Params from a user-supplied `pt_inception-2015-12-05-6726825d.pth` (read without torch)."""
    return params_from_state_dict(efficientnet.read_torch_checkpoint(path), source=path)


# ============================================================================ forward
def _basic(params, name, x):
    _, _, _, stride, (ph, pw) = CONV_SPECS[name]
    w, b = params[name]
    y = jax.lax.conv_general_dilated(
        x, w, (stride, stride), ((ph, ph), (pw, pw)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST)
    return jax.nn.relu(y + b)


def _max_pool(x, k=3, stride=2, pad=0):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, stride, stride, 1),
                                 ((0, 0), (pad, pad), (pad, pad), (0, 0)))


def _avg_pool_3x3_same(x):
    """3x3, stride 1, padding 1, count_include_pad=False (the FID blocks' average pool)."""
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    s = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
    ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
    n = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
    return s / n


def _block_a(p, m, x):
    b1 = _basic(p, f"{m}.branch1x1", x)
    b5 = _basic(p, f"{m}.branch5x5_2", _basic(p, f"{m}.branch5x5_1", x))
    b3 = _basic(p, f"{m}.branch3x3dbl_1", x)
    b3 = _basic(p, f"{m}.branch3x3dbl_3", _basic(p, f"{m}.branch3x3dbl_2", b3))
    bp = _basic(p, f"{m}.branch_pool", _avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


def _block_b(p, m, x):
    b3 = _basic(p, f"{m}.branch3x3", x)
    bd = _basic(p, f"{m}.branch3x3dbl_1", x)
    bd = _basic(p, f"{m}.branch3x3dbl_3", _basic(p, f"{m}.branch3x3dbl_2", bd))
    return jnp.concatenate([b3, bd, _max_pool(x)], axis=-1)


def _block_c(p, m, x):
    b1 = _basic(p, f"{m}.branch1x1", x)
    b7 = x
    for i in (1, 2, 3):
        b7 = _basic(p, f"{m}.branch7x7_{i}", b7)
    bd = x
    for i in (1, 2, 3, 4, 5):
        bd = _basic(p, f"{m}.branch7x7dbl_{i}", bd)
    bp = _basic(p, f"{m}.branch_pool", _avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


def _block_d(p, m, x):
    b3 = _basic(p, f"{m}.branch3x3_2", _basic(p, f"{m}.branch3x3_1", x))
    b7 = x
    for i in (1, 2, 3, 4):
        b7 = _basic(p, f"{m}.branch7x7x3_{i}", b7)
    return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)


def _block_e(p, m, x, pool: str):
    b1 = _basic(p, f"{m}.branch1x1", x)
    b3 = _basic(p, f"{m}.branch3x3_1", x)
    b3 = jnp.concatenate([_basic(p, f"{m}.branch3x3_2a", b3), _basic(p, f"{m}.branch3x3_2b", b3)], -1)
    bd = _basic(p, f"{m}.branch3x3dbl_2", _basic(p, f"{m}.branch3x3dbl_1", x))
    bd = jnp.concatenate([_basic(p, f"{m}.branch3x3dbl_3a", bd), _basic(p, f"{m}.branch3x3dbl_3b", bd)], -1)
    pooled = _avg_pool_3x3_same(x) if pool == "avg" else _max_pool(x, 3, 1, 1)
    bp = _basic(p, f"{m}.branch_pool", pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize(images: jax.Array, resolution: int = RESOLUTION) -> jax.Array:
    """pytorch-fid's resize: bilinear, align_corners=False, no antialiasing."""
    b, h, w, c = images.shape
    if (h, w) == (resolution, resolution):
        return images
    return jax.image.resize(images, (b, resolution, resolution, c), method="bilinear", antialias=False)


def apply(params: dict[str, Any], images: jax.Array, with_logits: bool = False):
    """images [B, H, W, 3] in [-1, 1], already at the network resolution (>= 75 px; 299 for
    FID) -> pool3 features [B, 2048] (and the 1008 logits of the `fc` layer)."""
    x = images.astype(jnp.float32)
    for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
        x = _basic(params, name, x)
    x = _max_pool(x)
    x = _basic(params, "Conv2d_4a_3x3", _basic(params, "Conv2d_3b_1x1", x))
    x = _max_pool(x)
    for m in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        x = _block_a(params, m, x)
    x = _block_b(params, "Mixed_6a", x)
    for m in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        x = _block_c(params, m, x)
    x = _block_d(params, "Mixed_7a", x)
    x = _block_e(params, "Mixed_7b", x, "avg")  # FIDInceptionE_1
    x = _block_e(params, "Mixed_7c", x, "max")  # FIDInceptionE_2
    feats = x.mean(axis=(1, 2))
    if not with_logits:
        return feats
    w, b = params["fc"]
    return feats, jnp.dot(feats, w, precision=jax.lax.Precision.HIGHEST) + b


def random_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """A random state dict with exactly pytorch-fid's keys and shapes (for structural tests):
    He-scaled conv weights and non-trivial BN statistics, so activations stay O(1)."""
    rng = np.random.default_rng(seed)
    sd: dict[str, np.ndarray] = {}
    for key, shape in state_dict_shapes().items():
        if key.endswith("num_batches_tracked"):
            sd[key] = np.asarray(0, np.int64)
        elif key.endswith("conv.weight"):
            fan_in = int(np.prod(shape[1:]))
            sd[key] = (rng.normal(size=shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        elif key.endswith("bn.weight"):
            sd[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif key.endswith("running_var"):
            sd[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        elif key == "fc.weight":
            sd[key] = (rng.normal(size=shape) / np.sqrt(shape[1])).astype(np.float32)
        else:  # bn.bias, bn.running_mean, fc.bias
            sd[key] = (rng.normal(size=shape) * 0.1).astype(np.float32)
    return sd
