"""The frozen image encoder as the trainer sees it: load weights once, encode under stop_gradient.

The encoder's parameters live outside the TrainState: they are never given to the optimizer,
never donated and never written into checkpoints (the config names where they come from).

Weights (`config.encoder.weights`):
  - "" : a seeded random init (`config.encoder.init_seed`). Only for tests and the CPU slice, and
         only when `config.encoder.allow_random_init=True`, so a production run can never start
         silently with a random encoder.
  - a `.npz` file of the encoder's param tree, keys joined by "/" (e.g.
    `block_0/attn/query/kernel`), as written by `save_params_npz`. Every key and shape is checked
    against the module; mismatches are reported by name.
"""
from __future__ import annotations

import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from semantica_jax import sharding
from semantica_jax.models import vit as vit_lib


def save_params_npz(params: Any, path: str) -> None:
    flat = flax.traverse_util.flatten_dict(sharding.strip_boxes(params), sep="/")
    np.savez(path, **{k: np.asarray(v) for k, v in flat.items()})


def load_params_npz(path: str, expected: Any) -> dict:
    """Reads an npz param tree and checks it key-by-key and shape-by-shape against `expected`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"config.encoder.weights={path!r} does not exist")
    with np.load(path) as f:
        flat = {k: f[k] for k in f.files}
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


class FrozenEncoder:
    """Wraps a ViT module with frozen, sharded parameters."""

    def __init__(self, module: nn.Module, encoder_config):
        self.module = module
        self.config = encoder_config

    @classmethod
    def from_config(cls, encoder_config) -> "FrozenEncoder":
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
        return cls(vit_lib.vit_from_config(ec), ec)

    def _dummy(self):
        s = self.config.image_size
        return jnp.zeros((1, s, s, 3), jnp.float32)

    def load_params(self, mesh, rules) -> Any:
        """Sharded, unboxed encoder params (call under `jax.set_mesh` + `nn.logical_axis_rules`)."""
        init = lambda rng: self.module.init(rng, self._dummy())["params"]
        abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
        shardings = sharding.logical_to_shardings(abstract, mesh, rules)
        if self.config.weights:
            host = load_params_npz(self.config.weights, abstract)
            logging.info("Loaded encoder weights from %s", self.config.weights)
            return jax.device_put(host, shardings)
        logging.warning("Encoder: seeded RANDOM init (seed %d); not a pretrained encoder",
                        self.config.init_seed)
        return jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(
            jax.random.PRNGKey(self.config.init_seed)
        )

    def encode(self, params, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images [B, H, W, 3] in [0, 1] at the encoder resolution -> (tokens [B,T,D], pooled [B,D])."""
        out = self.module.apply({"params": params}, images)
        return jax.lax.stop_gradient(out["tokens"]), jax.lax.stop_gradient(out["pooled"])
