"""Batched, sharded, seeded generation of variations (the eval job and `semantica-vary`).

`Sampler` wraps the diffusion samplers (`diffusion.sample`: DDPM ancestral or DDIM over the
continuous-time schedule, classifier-free guidance with a guidance interval) around a denoiser
and its frozen encoder:

  * one jitted program per (sampler settings, chunk size): inputs of any length are cut into
    chunks of `batch_size` (a multiple of the mesh's batch-axis size; the last chunk is padded),
    each sharded over the mesh's batch axes ('data', 'fsdp');
  * every sample has its own PRNG key (`sample_keys(seed, ids)`): its noise is drawn from that
    key only, so a sample is a function of (params, condition, seed, id) alone -- the same on 1
    or 8 devices, in a chunk of 4 or of 64, whatever else is in the batch;
  * conditions are encoded in-graph from pixels by the frozen encoder. When the model was
    trained on cached tokens (`config.encoder.cached_tokens`, stored as float16), the in-graph
    tokens are rounded through float16 the same way.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from semantica_jax import diffusion, distributed, sharding

SAMPLERS = ("ddpm", "ddim")


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    sampler: str = "ddim"
    num_steps: int = 50
    guidance_scale: float = 1.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler={self.sampler!r}; expected one of {SAMPLERS}")
        if int(self.num_steps) < 1:
            raise ValueError(f"num_steps={self.num_steps} must be >= 1")
        lo, hi = self.guidance_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"guidance_interval={self.guidance_interval} must satisfy 0 <= lo <= hi <= 1")

    def describe(self) -> str:
        g = f", guidance {self.guidance_scale:g}"
        if self.guidance_scale != 1.0 and tuple(self.guidance_interval) != (0.0, 1.0):
            g += f" on t in [{self.guidance_interval[0]:g}, {self.guidance_interval[1]:g}]"
        return f"{self.sampler.upper()}-{self.num_steps}{g}"


def sample_keys(seed: int, ids: np.ndarray) -> jax.Array:
    """Per-sample PRNG keys: key(seed) folded with each sample's integer id."""
    base = jax.random.PRNGKey(int(seed))
    ids = jnp.asarray(np.asarray(ids, np.uint32))
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(ids)


class Sampler:
    """Generates samples for per-sample conditions with a denoiser + frozen encoder on a mesh."""

    def __init__(self, config, unet, encoder, mesh, rules, *, batch_size: int = 64):
        self.config, self.unet, self.encoder = config, unet, encoder
        self.mesh, self.rules = mesh, rules
        n_batch = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
        self.batch_size = max(n_batch, int(math.ceil(batch_size / n_batch)) * n_batch)
        self._fns: dict[SamplerSettings, Callable] = {}
        self._compiled: dict[SamplerSettings, Callable] = {}  # multi-host: compiled ahead
        self._batch_sharding = sharding.batch_sharding(mesh)
        self.images_per_second = float("nan")  # of the last `generate` call, after compilation

    def _fn(self, settings: SamplerSettings) -> Callable:
        if settings in self._fns:
            return self._fns[settings]
        c = self.config
        dc = c.diffusion
        size = int(c.data.image_size)
        schedule_fn = diffusion.schedule_from_config(dc, size)
        quantize = bool(c.encoder.cached_tokens)
        unet, encoder = self.unet, self.encoder

        def fn(ema_params, enc_params, cond, keys):
            tokens, pooled = encoder.encode(enc_params, cond)
            if quantize:  # what training saw: tokens cached as float16
                tokens = tokens.astype(jnp.float16).astype(jnp.float32)
                pooled = pooled.astype(jnp.float16).astype(jnp.float32)

            def model_fn(z, logsnr, cond_mask):
                reps = z.shape[0] // tokens.shape[0]  # 2 when guidance batches cond + uncond
                return unet.apply({"params": ema_params}, z, logsnr, jnp.tile(tokens, (reps, 1, 1)),
                                  jnp.tile(pooled, (reps, 1)), cond_mask, train=False)

            return diffusion.sample(
                model_fn, None, (cond.shape[0], size, size, 3), schedule_fn=schedule_fn,
                prediction=dc.prediction, num_steps=int(settings.num_steps), sampler=settings.sampler,
                guidance_scale=float(settings.guidance_scale),
                guidance_interval=tuple(float(v) for v in settings.guidance_interval),
                example_keys=keys, tie_channels=bool(dc.get("tie_channels", False)),
            )

        batch_sh = self._batch_sharding
        with self._context():
            jitted = jax.jit(fn, in_shardings=(None, None, batch_sh, batch_sh), out_shardings=batch_sh)
        self._fns[settings] = jitted
        return jitted

    def _context(self):
        """Mesh + logical axis rules, needed while tracing and calling model code."""
        return sharding.mesh_and_rules(self.mesh, self.rules)

    def generate(self, ema_params, enc_params, cond: np.ndarray, keys: jax.Array,
                 settings: SamplerSettings, *, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """cond: [N, h, w, 3] condition images in [0, 1] (any size; the encoder resizes), one
        per sample; keys: [N] PRNG keys -> samples [N, S, S, 3] in [-1, 1] (numpy)."""
        cond = np.asarray(cond, np.float32)
        n = cond.shape[0]
        if keys.shape[0] != n:
            raise ValueError(f"{keys.shape[0]} keys for {n} conditions")
        fn = self._fn(settings)
        b = self.batch_size
        keys = np.asarray(jax.random.key_data(keys) if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)
                          else keys)
        out, t_first, t0 = [], None, time.perf_counter()
        for start in range(0, n, b):
            stop = min(start + b, n)
            c_chunk, k_chunk = cond[start:stop], keys[start:stop]
            if stop - start < b:  # pad the last chunk (one program for every chunk)
                pad = b - (stop - start)
                c_chunk = np.concatenate([c_chunk, np.repeat(c_chunk[-1:], pad, 0)])
                k_chunk = np.concatenate([k_chunk, np.repeat(k_chunk[-1:], pad, 0)])
            with self._context():  # every process holds the whole chunk (a multi-host mesh too)
                args = (ema_params, enc_params, sharding.global_array(c_chunk, self._batch_sharding),
                        sharding.global_array(k_chunk, self._batch_sharding))
                if jax.process_count() > 1 and settings not in self._compiled:
                    # Compiled ahead, then every process waits for the others before the first run.
                    self._compiled[settings] = fn.lower(*args).compile()
                    distributed.barrier("sampler compiled")
                samples = self._compiled.get(settings, fn)(*args)
            out.append(sharding.to_host(samples)[: stop - start])
            if t_first is None:
                t_first = time.perf_counter()  # the first chunk includes compilation
            if progress is not None:
                progress(stop, n)
        if len(out) > 1:
            self.images_per_second = (n - len(out[0])) / max(time.perf_counter() - t_first, 1e-9)
        else:
            self.images_per_second = n / max(time.perf_counter() - t0, 1e-9)
        return np.concatenate(out) if out else np.zeros((0,) + (self.config.data.image_size,) * 2 + (3,), np.float32)


def settings_from_config(sample_config: Any) -> SamplerSettings:
    """SamplerSettings from `config.sample` (the training-time grids)."""
    return SamplerSettings(
        sampler=sample_config.sampler, num_steps=int(sample_config.num_steps),
        guidance_scale=float(sample_config.guidance_scale),
        guidance_interval=tuple(float(v) for v in sample_config.guidance_interval),
    )


def log_progress(label: str, every_seconds: float = 10.0) -> Callable[[int, int], None]:
    """A progress callback that logs `label: done/total, images/s, ETA` at most every few seconds."""
    t0 = time.perf_counter()
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.perf_counter() - t0
        if done < total and now - last[0] < every_seconds:
            return
        last[0] = now
        rate = done / max(now, 1e-9)
        eta = (total - done) / rate if rate > 0 else float("inf")
        logging.info("%s: %d/%d images, %.1f images/s, ETA %.0f s", label, done, total, rate, eta)

    return report
