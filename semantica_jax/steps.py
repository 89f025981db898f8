"""The compiled functions of training: the update step, the eval-loss step and the grid sampler.

Each `make_*` returns a pure function of (params, frozen-encoder params, batch, ...) that the
trainer jits with its shardings (`train.Trainer.lower_train_step`); the same functions serve
the benchmarks and ahead-of-time compiles. The train and eval steps share one loss
(`per_example_loss`); the condition is read from cached tokens or encoded in-graph
(`condition`), always under stop_gradient.
"""
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from clu import metrics

from semantica_jax import diffusion, optim
from semantica_jax import encoder as encoder_lib


# ============================================================================ state & metrics
@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # trainable UNet params
    ema_params: Any  # EMA of params, used for sampling and evaluation
    opt_state: Any
    rng: jax.Array  # base key; step keys are fold_in(rng, step), so resume is deterministic


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    grad_norm: metrics.Average.from_output("grad_norm")
    learning_rate: metrics.LastValue.from_output("learning_rate")
    nonfinite_fraction: metrics.Average.from_output("nonfinite")  # steps skipped as non-finite


# ============================================================================ the update step
def condition(encoder: encoder_lib.FrozenEncoder, enc_params, batch: dict) -> tuple[jax.Array, jax.Array]:
    """The frozen encoder's (tokens, pooled) for the batch's condition images: read from the
    batch when it carries cached tokens (config.encoder.cached_tokens), else encoded in-graph."""
    if "cond_tokens" in batch:
        return (jax.lax.stop_gradient(batch["cond_tokens"].astype(jnp.float32)),
                jax.lax.stop_gradient(batch["cond_pooled"].astype(jnp.float32)))
    return encoder.encode(enc_params, batch["cond"])


def per_example_loss(unet: nn.Module, params, dc, x, eps, z, logsnr, tokens, pooled, cond_mask,
                     **apply_kwargs) -> jax.Array:
    """[B] diffusion loss of the denoiser's output on z (`config.diffusion` = dc: prediction,
    weighting), shared by the train and eval steps; `apply_kwargs` go to `unet.apply`."""
    out = unet.apply({"params": params}, z, logsnr, tokens, pooled, cond_mask, **apply_kwargs)
    return diffusion.loss_per_example(
        out.astype(jnp.float32), x, eps, z, logsnr,
        prediction=dc.prediction, weighting=dc.loss_weighting, sigmoid_bias=dc.sigmoid_bias,
    )


def make_train_step(config, unet: nn.Module, encoder: encoder_lib.FrozenEncoder, tx, lr_schedule):
    dc = config.diffusion
    schedule_fn = diffusion.schedule_from_config(dc, config.data.image_size)

    def train_step(state: TrainState, enc_params, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        k_t, k_eps, k_drop, k_dropout = jax.random.split(rng, 4)
        x = batch["target"]
        b = x.shape[0]
        tokens, pooled = condition(encoder, enc_params, batch)  # frozen: stop_gradient
        t = jax.random.uniform(k_t, (b,))
        logsnr = schedule_fn(t)
        eps = diffusion.noise(k_eps, x.shape, bool(dc.tie_channels), x.dtype)
        z = diffusion.diffuse(x, eps, logsnr)
        cond_mask = jax.random.uniform(k_drop, (b,)) >= dc.cond_drop_prob

        def loss_fn(params):
            return jnp.mean(per_example_loss(unet, params, dc, x, eps, z, logsnr, tokens, pooled, cond_mask,
                                             train=True, rngs={"dropout": k_dropout}))

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        grad_norm = optax.tree.norm(grads)
        d = optim.ema_decay_at(state.step, config.optimizer.ema_decay)

        def update(params, ema_params, opt_state):
            updates, new_opt_state = tx.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            new_ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema_params, new_params)
            return new_params, new_ema, new_opt_state

        # A non-finite step never touches the state: the host raises (or counts a skip). A
        # conditional rather than a select per leaf: the select was a full extra pass over
        # params, EMA and both Adam moments every step (~8 % of an S step on CPU).
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_params, new_ema, new_opt_state = jax.lax.cond(
            finite, update, lambda *old: old, state.params, state.ema_params, state.opt_state)
        new_state = state.replace(
            step=state.step + 1, params=new_params, ema_params=new_ema, opt_state=new_opt_state,
        )
        step_metrics = TrainMetrics.single_from_model_output(
            loss=jnp.where(finite, loss, 0.0),
            grad_norm=jnp.where(finite, grad_norm, 0.0),
            learning_rate=lr_schedule(state.step),
            nonfinite=(~finite).astype(jnp.float32),
        )
        return new_state, step_metrics, finite

    return train_step


# ============================================================================ eval & sampling
def make_eval_step(config, unet, encoder):
    """Loss of the EMA model on held-out pairs at stratified t with fixed noise (comparable over time)."""
    dc = config.diffusion
    schedule_fn = diffusion.schedule_from_config(dc, config.data.image_size)

    def eval_step(ema_params, enc_params, batch, rng):
        x = batch["target"]
        b = x.shape[0]
        tokens, pooled = condition(encoder, enc_params, batch)
        t = (jnp.arange(b, dtype=jnp.float32) + 0.5) / b
        logsnr = schedule_fn(t)
        eps = diffusion.noise(rng, x.shape, bool(dc.tie_channels), x.dtype)
        z = diffusion.diffuse(x, eps, logsnr)
        per_ex = per_example_loss(unet, ema_params, dc, x, eps, z, logsnr, tokens, pooled,
                                  jnp.ones((b,), bool), train=False)
        return jnp.sum(per_ex), b

    return eval_step


def make_sample_fn(config, unet, encoder):
    """(ema_params, enc_params, conds, rng) -> samples [N * samples_per_condition, H, W, 3].

    `conds` holds `cond` images [N, S, S, 3] (and `cond_tokens`/`cond_pooled` when cached)."""
    sc, dc = config.sample, config.diffusion
    size = config.data.image_size
    schedule_fn = diffusion.schedule_from_config(dc, size)
    per = int(sc.samples_per_condition)

    def sample_fn(ema_params, enc_params, conds, rng):
        tokens, pooled = condition(encoder, enc_params, conds)
        tokens, pooled = jnp.repeat(tokens, per, axis=0), jnp.repeat(pooled, per, axis=0)

        def model_fn(z, logsnr, cond_mask):
            reps = z.shape[0] // tokens.shape[0]  # 2 when guidance batches cond + uncond
            return unet.apply(
                {"params": ema_params}, z, logsnr,
                jnp.tile(tokens, (reps, 1, 1)), jnp.tile(pooled, (reps, 1)), cond_mask, train=False,
            )

        return diffusion.sample(
            model_fn, rng, (tokens.shape[0], size, size, 3),
            schedule_fn=schedule_fn, prediction=dc.prediction, num_steps=sc.num_steps,
            sampler=sc.sampler, guidance_scale=sc.guidance_scale,
            guidance_interval=tuple(sc.guidance_interval), tie_channels=bool(dc.tie_channels),
        )

    return sample_fn
