"""The Semantica trainer: `train_and_evaluate(config, workdir)`.

Read top to bottom; each banner is one stage:
  mesh -> input -> frozen encoder -> denoiser + optimizer -> sharded init -> restore ->
  compiled update step -> loop (metrics, checkpoints, sample grids, eval) -> summary.

Data flow: page shards -> (condition, target) pairs -> frozen ViT tokens (stop_gradient, not
optimised, not checkpointed) -> UNet denoiser cross-attending to them -> v/eps/x loss.
"""
import dataclasses
import functools
import json
import os
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, metrics, periodic_actions

from semantica_jax import checkpointing, diffusion, input_pipeline, sharding
from semantica_jax import encoder as encoder_lib
from semantica_jax import images as images_lib
from semantica_jax.models import unet as unet_lib


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
    skipped_steps: metrics.Average.from_output("nonfinite")  # fraction of non-finite steps


@dataclasses.dataclass
class TrainOutcome:
    """What a run leaves behind (returned for tests and scripts; the workdir holds the same)."""

    state: TrainState
    start_step: int
    summary: dict


class NonFiniteLossError(FloatingPointError):
    pass


# ============================================================================ optimizer
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


# ============================================================================ the update step
def make_train_step(config, unet: nn.Module, encoder: encoder_lib.FrozenEncoder, tx, lr_schedule):
    dc = config.diffusion
    schedule_fn = diffusion.schedule_from_config(dc, config.data.image_size)

    def train_step(state: TrainState, enc_params, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        k_t, k_eps, k_drop, k_dropout = jax.random.split(rng, 4)
        x = batch["target"]
        b = x.shape[0]
        tokens, pooled = encoder.encode(enc_params, batch["cond"])  # stop_gradient inside
        t = jax.random.uniform(k_t, (b,))
        logsnr = schedule_fn(t)
        eps = jax.random.normal(k_eps, x.shape, x.dtype)
        z = diffusion.diffuse(x, eps, logsnr)
        cond_mask = jax.random.uniform(k_drop, (b,)) >= dc.cond_drop_prob

        def loss_fn(params):
            out = unet.apply(
                {"params": params}, z, logsnr, tokens, pooled, cond_mask,
                train=True, rngs={"dropout": k_dropout},
            )
            per_ex = diffusion.loss_per_example(
                out.astype(jnp.float32), x, eps, z, logsnr,
                prediction=dc.prediction, weighting=dc.loss_weighting, sigmoid_bias=dc.sigmoid_bias,
            )
            return jnp.mean(per_ex)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        grad_norm = optax.tree.norm(grads)
        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        d = ema_decay_at(state.step, config.optimizer.ema_decay)
        new_ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state.ema_params, new_params)

        # A non-finite step never touches the state: the host raises (or counts a skip).
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = state.replace(
            step=state.step + 1,
            params=keep(new_params, state.params),
            ema_params=keep(new_ema, state.ema_params),
            opt_state=keep(new_opt_state, state.opt_state),
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
        tokens, pooled = encoder.encode(enc_params, batch["cond"])
        t = (jnp.arange(b, dtype=jnp.float32) + 0.5) / b
        logsnr = schedule_fn(t)
        eps = jax.random.normal(rng, x.shape, x.dtype)
        z = diffusion.diffuse(x, eps, logsnr)
        out = unet.apply({"params": ema_params}, z, logsnr, tokens, pooled, jnp.ones((b,), bool), train=False)
        per_ex = diffusion.loss_per_example(
            out.astype(jnp.float32), x, eps, z, logsnr,
            prediction=dc.prediction, weighting=dc.loss_weighting, sigmoid_bias=dc.sigmoid_bias,
        )
        return jnp.sum(per_ex), b

    return eval_step


def make_sample_fn(config, unet, encoder):
    """(ema_params, enc_params, cond_images [N,...], rng) -> samples [N * samples_per_condition, H, W, 3]."""
    sc, dc = config.sample, config.diffusion
    size = config.data.image_size
    schedule_fn = diffusion.schedule_from_config(dc, size)
    per = int(sc.samples_per_condition)

    def sample_fn(ema_params, enc_params, cond_images, rng):
        tokens, pooled = encoder.encode(enc_params, cond_images)
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
            guidance_interval=tuple(sc.guidance_interval),
        )

    return sample_fn


# ============================================================================ helpers
def _validate(config) -> None:
    if config.data.pairing not in input_pipeline.PAIRINGS:
        raise ValueError(f"config.data.pairing={config.data.pairing!r}; expected one of {input_pipeline.PAIRINGS}")
    if config.train.nonfinite not in ("raise", "skip"):
        raise ValueError(f"config.train.nonfinite={config.train.nonfinite!r}; expected 'raise' or 'skip'")
    if not 0.0 <= config.diffusion.cond_drop_prob < 1.0:
        raise ValueError(f"config.diffusion.cond_drop_prob={config.diffusion.cond_drop_prob} must be in [0, 1)")
    for name in ("prediction",):
        v = config.diffusion[name]
        if v not in diffusion.PREDICTIONS:
            raise ValueError(f"config.diffusion.{name}={v!r}; expected one of {diffusion.PREDICTIONS}")
    if config.diffusion.loss_weighting not in diffusion.LOSS_WEIGHTINGS:
        raise ValueError(
            f"config.diffusion.loss_weighting={config.diffusion.loss_weighting!r}; "
            f"expected one of {diffusion.LOSS_WEIGHTINGS}"
        )


def _is_step(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def _device_batch(batch: dict) -> dict:
    return {"cond": batch["cond"], "target": batch["target"]}


# ============================================================================ main entry
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainOutcome:
    """Trains (resuming from `workdir` if it holds checkpoints), writes metrics, grids and checkpoints."""
    _validate(config)
    tc = config.train
    num_steps = int(tc.num_steps)
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)

    # ------------------------------------------------------------------ mesh
    mesh = sharding.create_mesh(config.mesh)
    rules = sharding.axis_rules(config)
    local_batch_size = sharding.per_process_batch_size(config.batch_size, mesh)
    logging.info("Mesh %s over %d devices (%d processes); global batch %d, per process %d",
                 dict(mesh.shape), mesh.size, jax.process_count(), config.batch_size, local_batch_size)
    batch_sh = sharding.batch_sharding(mesh)

    writer = metric_writers.create_default_writer(
        workdir, just_logging=not is_main, asynchronous=True
    )
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json(indent=2))
        writer.write_hparams(_flat_hparams(config))

    # ------------------------------------------------------------------ models
    encoder = encoder_lib.FrozenEncoder.from_config(config.encoder)
    unet = unet_lib.unet_from_config(config.model)
    tx, lr_schedule = make_optimizer(config.optimizer, num_steps)
    size = config.data.image_size
    cond_size = config.encoder.image_size

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        enc_params = encoder.load_params(mesh, rules)
        token_shape = jax.eval_shape(
            lambda p, c: encoder.encode(p, c), enc_params,
            jax.ShapeDtypeStruct((1, cond_size, cond_size, 3), jnp.float32),
        )

        def init_state(rng):
            init_rng, state_rng = jax.random.split(rng)
            tokens, pooled = token_shape
            variables = unet.init(
                {"params": init_rng, "dropout": init_rng},
                jnp.zeros((1, size, size, 3)), jnp.zeros((1,)),
                jnp.zeros((1,) + tokens.shape[1:]), jnp.zeros((1,) + pooled.shape[1:]),
                jnp.ones((1,), bool), train=False,
            )
            params = variables["params"]
            return TrainState(
                step=jnp.zeros((), jnp.int32), params=params,
                ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params), rng=state_rng,
            )

        # ------------------------------------------------------------------ sharded init
        rng = jax.random.PRNGKey(config.seed)
        abstract_boxed = jax.eval_shape(init_state, rng)
        state_sh = sharding.logical_to_shardings(abstract_boxed, mesh, rules)
        abstract_state = checkpointing.abstract_like(sharding.strip_boxes(abstract_boxed), state_sh)
        num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_state.params))
        logging.info("Denoiser: %.2f M params; encoder tokens %s", num_params / 1e6, token_shape[0].shape)

        # ------------------------------------------------------------------ restore or init
        ckpt = checkpointing.Checkpointer(
            os.path.join(workdir, "checkpoints"), max_to_keep=tc.max_to_keep,
            async_save=tc.async_checkpointing,
        )
        latest = ckpt.latest_step()
        if latest is not None:
            state = ckpt.restore(latest, abstract_state)
            checkpointing.log_restore(latest, ckpt.directory)
        else:
            state = jax.jit(lambda r: nn.meta.unbox(init_state(r)), out_shardings=state_sh)(rng)
        start_step = int(jax.device_get(state.step))

        # ------------------------------------------------------------------ compile the step
        enc_sh = jax.tree.map(lambda x: x.sharding, enc_params)
        abstract_batch = {
            "cond": jax.ShapeDtypeStruct((config.batch_size, cond_size, cond_size, 3), jnp.float32, sharding=batch_sh),
            "target": jax.ShapeDtypeStruct((config.batch_size, size, size, 3), jnp.float32, sharding=batch_sh),
        }
        t0 = time.time()
        train_step = jax.jit(
            make_train_step(config, unet, encoder, tx, lr_schedule),
            in_shardings=(state_sh, enc_sh, batch_sh),
            out_shardings=(state_sh, None, None),
            donate_argnums=(0,),
        ).lower(abstract_state, enc_params, abstract_batch).compile()
        compile_s = time.time() - t0
        logging.info("Compiled the train step in %.1f s", compile_s)
        eval_step = jax.jit(make_eval_step(config, unet, encoder))
        sample_fn = jax.jit(make_sample_fn(config, unet, encoder))

    # ------------------------------------------------------------------ input
    # TODO(issue 8): the data order is re-seeded on resume (no replay from the start), not restored exactly.
    data_seed = config.seed if start_step == 0 else int(np.random.SeedSequence([config.seed, start_step]).generate_state(1)[0])
    train_ds = input_pipeline.create_train_dataset(
        config, process_index=jax.process_index(), process_count=jax.process_count(),
        batch_size=local_batch_size, seed=data_seed,
    )
    train_iter = iter(train_ds.as_numpy_iterator())
    eval_ds = None
    if config.data.eval_files:
        eval_ds = input_pipeline.create_eval_dataset(
            config, process_index=jax.process_index(), process_count=jax.process_count(),
            batch_size=local_batch_size,
        )
    grid_conds = _grid_conditions(config, eval_ds, train_ds)

    # ------------------------------------------------------------------ loop
    hooks = []
    report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer, every_steps=tc.log_every)
    if is_main:
        hooks.append(report)
        if tc.profile_steps > 0:
            hooks.append(periodic_actions.Profile(
                num_profile_steps=tc.profile_steps, first_profile=start_step + 10,
                logdir=workdir, profile_duration_ms=None,
            ))
    writer.write_scalars(start_step, {"compile_seconds": compile_s})
    train_metrics = None
    pending_finite: list[tuple[int, jax.Array]] = []
    last_checkpoint = latest
    t_log, steps_since_log = time.time(), 0
    eval_result: dict = {}
    last_loss = float("nan")

    def check_finite():
        for s, ok in pending_finite:
            if not bool(jax.device_get(ok)) and tc.nonfinite == "raise":
                raise NonFiniteLossError(
                    f"non-finite loss or gradient at step {s}; the state was not updated by it; "
                    f"last good checkpoint: {last_checkpoint if last_checkpoint is not None else 'none'} "
                    f"in {ckpt.directory} (set config.train.nonfinite='skip' to skip such steps)"
                )
        pending_finite.clear()

    if start_step >= num_steps:
        logging.info("Nothing to train: checkpoint step %d >= num_steps %d", start_step, num_steps)
    for step in range(start_step + 1, num_steps + 1):
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            batch = sharding.make_global_batch(_device_batch(next(train_iter)), mesh)
            state, step_metrics, finite = train_step(state, enc_params, batch)
        pending_finite.append((step, finite))
        train_metrics = step_metrics if train_metrics is None else train_metrics.merge(step_metrics)
        steps_since_log += 1
        for h in hooks:
            h(step)

        if _is_step(step, tc.log_every, num_steps):
            check_finite()
            scalars = {f"train/{k}": float(v) for k, v in train_metrics.compute().items()}
            now = time.time()
            scalars["train/examples_per_sec"] = config.batch_size * steps_since_log / max(now - t_log, 1e-9)
            t_log, steps_since_log = now, 0
            last_loss = scalars["train/loss"]
            writer.write_scalars(step, scalars)
            train_metrics = None

        if _is_step(step, tc.checkpoint_every, num_steps):
            check_finite()
            with report.timed("checkpoint"):
                ckpt.save(step, state, config)
            last_checkpoint = step

        if eval_ds is not None and _is_step(step, tc.eval_every, num_steps):
            with report.timed("eval"):
                eval_result = _evaluate(eval_step, state, enc_params, eval_ds, tc.eval_batches, mesh)
            writer.write_scalars(step, {f"eval/{k}": v for k, v in eval_result.items()})

        if _is_step(step, tc.sample_every, num_steps):
            with report.timed("sample"):
                _write_grid(sample_fn, state, enc_params, grid_conds, config, workdir, writer, step, is_main)

    ckpt.close()
    writer.flush()

    final_step = int(jax.device_get(state.step))
    summary = {
        "step": final_step,
        "start_step": start_step,
        "train_loss": last_loss,
        "compile_seconds": compile_s,
        "denoiser_params": num_params,
        **{f"eval_{k}": v for k, v in eval_result.items()},
    }
    if is_main:
        with open(os.path.join(workdir, "metrics.json"), "w") as f:
            json.dump(summary, f, indent=2)
    writer.close()
    return TrainOutcome(state=state, start_step=start_step, summary=summary)


# ============================================================================ loop helpers
def _flat_hparams(config) -> dict:
    flat = {}

    def walk(prefix, node):
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, (dict, ml_collections.ConfigDict)):
                walk(key + ".", v)
            elif isinstance(v, (int, float, str, bool)):
                flat[key] = v
            else:
                flat[key] = str(v)

    walk("", config)
    return flat


def _evaluate(eval_step, state, enc_params, eval_ds, num_batches, mesh) -> dict:
    total, count = 0.0, 0
    rng = jax.random.PRNGKey(0)
    for i, batch in enumerate(eval_ds.as_numpy_iterator()):
        if num_batches > 0 and i >= num_batches:
            break
        gb = sharding.make_global_batch(_device_batch(batch), mesh)
        s, n = eval_step(state.ema_params, enc_params, gb, jax.random.fold_in(rng, i))
        total += float(s)
        count += int(n)
    if count == 0:
        raise ValueError("the eval split produced no batch: check config.data.eval_files and the batch size")
    return {"loss": total / count, "examples": count}


def _grid_conditions(config, eval_ds, train_ds) -> np.ndarray:
    """Fixed conditioning images for the sample grids (from the eval split when there is one)."""
    n = int(config.sample.num_conditions)
    ds = eval_ds if eval_ds is not None else train_ds
    conds = []
    for batch in ds.as_numpy_iterator():
        conds.append(batch["cond"])
        if sum(len(c) for c in conds) >= n:
            break
    return np.concatenate(conds)[:n]


def _write_grid(sample_fn, state, enc_params, conds, config, workdir, writer, step, is_main):
    rng = jax.random.PRNGKey(config.sample.seed)
    samples = np.asarray(jax.device_get(sample_fn(state.ema_params, enc_params, conds, rng)))
    grid = images_lib.variation_grid(conds, samples, config.sample.samples_per_condition,
                                     config.data.image_size)
    if is_main:
        path = images_lib.save_png(grid, os.path.join(workdir, "samples", f"step_{step:07d}.png"))
        logging.info("Wrote sample grid %s", path)
    writer.write_images(step, {"samples": grid[None]})
