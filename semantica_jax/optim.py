"""The optimizer and the EMA of the trainable params (`config.optimizer`).

`make_optimizer`: AdamW (weight decay on matrices and kernels only) behind global-norm
clipping, with a linear warm-up and then a constant or cosine learning rate; `ema_decay_at`: the
EMA decay with warm-up that `steps.make_train_step` applies after every update.
"""
import jax
import jax.numpy as jnp
import ml_collections
import optax


def make_optimizer(oc: ml_collections.ConfigDict, num_steps: int):
    """AdamW with linear warm-up, then constant or cosine decay; global-norm clipping."""
    warmup = max(int(oc.warmup_steps), 0)
    if oc.decay == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, oc.learning_rate, max(warmup, 1), max(num_steps, warmup + 1), end_value=0.0
        )
    elif oc.decay == "constant":
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, oc.learning_rate, max(warmup, 1)),
             optax.constant_schedule(oc.learning_rate)],
            [warmup],
        )
    else:
        raise ValueError(f"config.optimizer.decay={oc.decay!r}; expected 'constant' or 'cosine'")
    # Decay only matrices/kernels, not biases, norm scales or null tokens.
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    chain = []
    if oc.grad_clip_norm and oc.grad_clip_norm > 0:
        chain.append(optax.clip_by_global_norm(oc.grad_clip_norm))
    chain.append(
        optax.adamw(schedule, b1=oc.b1, b2=oc.b2, weight_decay=oc.weight_decay, mask=decay_mask)
    )
    return optax.chain(*chain), schedule


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
    """EMA decay with the usual warm-up min(decay, (1 + step) / (10 + step))."""
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))
