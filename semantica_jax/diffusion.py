"""Continuous-time Gaussian diffusion: schedules, parameterisations, loss, samplers, guidance.

Conventions (VDM / simple diffusion):
  z_t = alpha_t * x + sigma_t * eps,   alpha_t^2 = sigmoid(logsnr_t),  sigma_t^2 = sigmoid(-logsnr_t)
  v   = alpha_t * eps - sigma_t * x    (so x = alpha*z - sigma*v, eps = sigma*z + alpha*v)
Time runs from t=0 (clean, high log-SNR) to t=1 (pure noise, low log-SNR).

Schedules (config.diffusion.schedule):
  'cosine':          logsnr(t) = -2 log tan(t_min + t (t_max - t_min)), with t_min/t_max chosen so
                     logsnr(0) = logsnr_max and logsnr(1) = logsnr_min (the clipped cosine schedule).
  'cosine_shifted':  cosine + 2 log(base_resolution / image_size) (simple diffusion, Hoogeboom et al.
                     2023). The shift is added after clipping, so the endpoints move with it:
                     logsnr(0) = logsnr_max + shift, logsnr(1) = logsnr_min + shift. At 64 px with
                     base 64 it equals 'cosine'; at 32 px it adds 2 log 2 (less noise), at 128 px it
                     subtracts 2 log 2 (more noise).

Samplers take a `model_fn(z, logsnr, cond_mask) -> raw model output` closure (already bound to
params and conditioning) so the same code serves training-time grids, the eval job and `vary`.
Classifier-free guidance combines the conditional and the null-condition outputs:
  out = uncond + scale * (cond - uncond); scale 1.0 = no guidance (one pass).
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

PREDICTIONS = ("v", "eps", "x")
LOSS_WEIGHTINGS = ("v", "eps", "x", "sigmoid")
SCHEDULES = ("cosine", "cosine_shifted")


# --------------------------------------------------------------------------- schedules
def logsnr_schedule(
    t: jax.Array,
    *,
    kind: str = "cosine_shifted",
    image_size: int = 64,
    base_resolution: int = 64,
    logsnr_min: float = -15.0,
    logsnr_max: float = 15.0,
) -> jax.Array:
    """log-SNR at time t in [0, 1]; monotonically decreasing in t."""
    if kind not in SCHEDULES:
        raise ValueError(f"diffusion.schedule={kind!r}; expected one of {SCHEDULES}")
    if not logsnr_min < logsnr_max:
        raise ValueError(f"diffusion.logsnr_min={logsnr_min} must be < logsnr_max={logsnr_max}")
    t_min = math.atan(math.exp(-0.5 * logsnr_max))
    t_max = math.atan(math.exp(-0.5 * logsnr_min))
    t = jnp.asarray(t, jnp.float32)
    logsnr = -2.0 * jnp.log(jnp.tan(t_min + t * (t_max - t_min)))
    if kind == "cosine_shifted":
        logsnr = logsnr + 2.0 * math.log(base_resolution / image_size)
    return logsnr


def schedule_from_config(diffusion_config, image_size: int) -> Callable[[jax.Array], jax.Array]:
    """Binds the config's schedule fields; returns t -> logsnr."""
    dc = diffusion_config

    def fn(t):
        return logsnr_schedule(
            t,
            kind=dc.schedule,
            image_size=image_size,
            base_resolution=dc.base_resolution,
            logsnr_min=dc.logsnr_min,
            logsnr_max=dc.logsnr_max,
        )

    return fn


def alpha_sigma(logsnr: jax.Array) -> tuple[jax.Array, jax.Array]:
    """alpha = sqrt(sigmoid(logsnr)), sigma = sqrt(sigmoid(-logsnr)); alpha^2 + sigma^2 = 1."""
    return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


def _bcast(a: jax.Array, x: jax.Array) -> jax.Array:
    """Reshapes a per-example [B] array to broadcast against x [B, ...]."""
    return jnp.reshape(a, a.shape + (1,) * (x.ndim - a.ndim))


def diffuse(x: jax.Array, eps: jax.Array, logsnr: jax.Array) -> jax.Array:
    a, s = alpha_sigma(logsnr)
    return _bcast(a, x) * x + _bcast(s, x) * eps


def noise(key: jax.Array, shape: tuple[int, ...], tie_channels: bool = False,
          dtype=jnp.float32) -> jax.Array:
    """Standard normal noise of `shape` [..., C]; with `tie_channels` one draw shared by all C
    channels (config.diffusion.tie_channels: grey images stored as RGB diffuse as the 1-channel
    images they are; independent noise would hand the model C noisy copies of each pixel, i.e.
    a +log C shift of the schedule that it must first learn to exploit by averaging)."""
    if not tie_channels:
        return jax.random.normal(key, shape, dtype)
    return jnp.broadcast_to(jax.random.normal(key, tuple(shape[:-1]) + (1,), dtype), shape)


# --------------------------------------------------------------------------- parameterisations
def v_from_x_eps(x, eps, logsnr):
    a, s = alpha_sigma(logsnr)
    return _bcast(a, x) * eps - _bcast(s, x) * x


def x_from_z_v(z, v, logsnr):
    a, s = alpha_sigma(logsnr)
    return _bcast(a, z) * z - _bcast(s, z) * v


def eps_from_z_v(z, v, logsnr):
    a, s = alpha_sigma(logsnr)
    return _bcast(s, z) * z + _bcast(a, z) * v


def x_from_z_eps(z, eps, logsnr):
    a, s = alpha_sigma(logsnr)
    return (z - _bcast(s, z) * eps) / _bcast(a, z)


def eps_from_z_x(z, x, logsnr):
    a, s = alpha_sigma(logsnr)
    return (z - _bcast(a, z) * x) / _bcast(s, z)


def to_x_eps(output, z, logsnr, prediction: str) -> tuple[jax.Array, jax.Array]:
    """Converts a raw model output in the given parameterisation to (x_hat, eps_hat)."""
    if prediction == "v":
        return x_from_z_v(z, output, logsnr), eps_from_z_v(z, output, logsnr)
    if prediction == "eps":
        return x_from_z_eps(z, output, logsnr), output
    if prediction == "x":
        return output, eps_from_z_x(z, output, logsnr)
    raise ValueError(f"diffusion.prediction={prediction!r}; expected one of {PREDICTIONS}")


# --------------------------------------------------------------------------- loss
def loss_per_example(
    output: jax.Array,
    x: jax.Array,
    eps: jax.Array,
    z: jax.Array,
    logsnr: jax.Array,
    *,
    prediction: str,
    weighting: str,
    sigmoid_bias: float = -3.0,
) -> jax.Array:
    """Mean-over-pixels weighted denoising loss, one value per example ([B]).

    weighting:
      'v'       mean (v_hat - v)^2        = (1 + SNR)     * mean (x_hat - x)^2
      'eps'     mean (eps_hat - eps)^2    = SNR           * mean (x_hat - x)^2
      'x'       mean (x_hat - x)^2        (the paper's E||x - f(z_t, t, y)||^2)
      'sigmoid' sigmoid(bias - logsnr) * mean (eps_hat - eps)^2  (Kingma & Gao 2023)
    """
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"diffusion.loss_weighting={weighting!r}; expected one of {LOSS_WEIGHTINGS}")
    x_hat, eps_hat = to_x_eps(output, z, logsnr, prediction)
    axes = tuple(range(1, x.ndim))
    if weighting == "x":
        return jnp.mean(jnp.square(x_hat - x), axis=axes)
    if weighting == "v":
        v_hat = v_from_x_eps(x_hat, eps_hat, logsnr)
        return jnp.mean(jnp.square(v_hat - v_from_x_eps(x, eps, logsnr)), axis=axes)
    eps_loss = jnp.mean(jnp.square(eps_hat - eps), axis=axes)
    if weighting == "eps":
        return eps_loss
    return jax.nn.sigmoid(sigmoid_bias - logsnr) * eps_loss


# --------------------------------------------------------------------------- guidance
def guided_output(
    model_fn: Callable[..., jax.Array],
    z: jax.Array,
    logsnr: jax.Array,
    t: jax.Array,
    *,
    guidance_scale: float,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
) -> jax.Array:
    """Classifier-free guidance: uncond + scale * (cond - uncond), applied only for t in the interval.

    `model_fn(z, logsnr, cond_mask)`; cond_mask [B] bool, False selects the learned null condition.
    With guidance_scale == 1.0 only the conditional pass runs.
    """
    batch = z.shape[0]
    on = jnp.ones((batch,), bool)
    if guidance_scale == 1.0:
        return model_fn(z, logsnr, on)
    # One batched call of size 2B: [conditional; unconditional].
    both = model_fn(
        jnp.concatenate([z, z]), jnp.concatenate([logsnr, logsnr]), jnp.concatenate([on, ~on])
    )
    cond, uncond = both[:batch], both[batch:]
    lo, hi = guidance_interval
    scale = jnp.where((t >= lo) & (t <= hi), guidance_scale, 1.0)
    return uncond + _bcast(jnp.broadcast_to(scale, (batch,)), z) * (cond - uncond)


# --------------------------------------------------------------------------- samplers
def sample(
    model_fn: Callable[..., jax.Array],
    rng: jax.Array,
    shape: tuple[int, ...],
    *,
    schedule_fn: Callable[[jax.Array], jax.Array],
    prediction: str,
    num_steps: int,
    sampler: str = "ddpm",
    guidance_scale: float = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    clip_x: bool = True,
    example_keys: jax.Array | None = None,
    tie_channels: bool = False,
) -> jax.Array:
    """Generates x from pure noise with `num_steps` uniform steps in t from 1 to 0.

    sampler 'ddpm': ancestral sampling from the posterior q(z_s | z_t, x = x_hat).
    sampler 'ddim': deterministic DDIM (eta = 0): z_s = alpha_s x_hat + sigma_s eps_hat.
    The last step returns the model's x estimate at t = 1/num_steps (clipped to [-1, 1] when
    clip_x), so an exact model returns exactly the data.

    `example_keys` ([B] PRNG keys, `rng` is then ignored) draws every example's noise from its
    own key, so a sample depends only on its key and condition, not on the batch it was
    generated in or on how that batch is sharded (the eval job and `vary` use this).
    `tie_channels` (grey data, see `noise`): one noise draw for all channels, and the x estimate
    is the channel mean, so every step and the result are exactly grey.
    """
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"sampler={sampler!r}; expected 'ddpm' or 'ddim'")
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")
    if example_keys is not None:
        if example_keys.shape[0] != shape[0]:
            raise ValueError(f"{example_keys.shape[0]} example keys for a batch of {shape[0]}")

        def draw_noise(i):
            return jax.vmap(lambda k: noise(jax.random.fold_in(k, i), shape[1:], tie_channels))(example_keys)

        z = draw_noise(num_steps)  # an index the loop never uses
    else:
        noise_rng, loop_rng = jax.random.split(rng)
        z = noise(noise_rng, shape, tie_channels)

        def draw_noise(i):
            return noise(jax.random.fold_in(loop_rng, i), shape, tie_channels)

    batch = shape[0]

    def predict(z, t):
        logsnr = jnp.full((batch,), schedule_fn(t))
        out = guided_output(
            model_fn, z, logsnr, t, guidance_scale=guidance_scale, guidance_interval=guidance_interval
        )
        x_hat, _ = to_x_eps(out.astype(jnp.float32), z, logsnr, prediction)
        if tie_channels:
            x_hat = jnp.broadcast_to(jnp.mean(x_hat, axis=-1, keepdims=True), x_hat.shape)
        if clip_x:
            x_hat = jnp.clip(x_hat, -1.0, 1.0)
        # eps consistent with the (possibly clipped) x estimate.
        eps_hat = eps_from_z_x(z, x_hat, logsnr)
        return x_hat, eps_hat

    def body(i, carry):
        z, x_last = carry
        t = 1.0 - i / num_steps
        s = 1.0 - (i + 1) / num_steps
        x_hat, eps_hat = predict(z, t)
        logsnr_t, logsnr_s = schedule_fn(t), schedule_fn(s)
        alpha_s, sigma_s = alpha_sigma(logsnr_s)
        if sampler == "ddim":
            z_next = alpha_s * x_hat + sigma_s * eps_hat
        else:
            alpha_t, _ = alpha_sigma(logsnr_t)
            r = jnp.exp(logsnr_t - logsnr_s)  # < 1
            mean = r * (alpha_s / alpha_t) * z + (1.0 - r) * alpha_s * x_hat
            std = jnp.sqrt((1.0 - r) * jnp.square(sigma_s))
            z_next = mean + std * draw_noise(i)
        return z_next, x_hat

    _, x = jax.lax.fori_loop(0, num_steps, body, (z, jnp.zeros(shape, jnp.float32)))
    return x
