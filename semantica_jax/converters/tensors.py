"""Key bookkeeping and tensor mapping shared by the checkpoint layouts (`layouts.py`).

`_Tensors` hands out each mapped key of one checkpoint once, shape-checked, and `finish` reports
every key that was neither taken nor deliberately ignored. The helpers turn torch / HF arrays
into the `models/vit.py` param subtrees (Linear [out, in] -> kernels, conv [D, 3, p, p] ->
[p, p, 3, D], fused qkv -> per-head projections).
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from semantica_jax.converters.readers import ConversionError


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


# ============================================================================ array mappings
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
