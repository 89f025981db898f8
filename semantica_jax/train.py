"""The Semantica trainer: `train_and_evaluate(config, workdir)`.

Read top to bottom; each banner is one stage:
  mesh -> input -> frozen encoder -> denoiser + optimizer -> sharded init -> restore ->
  compiled update step -> loop (metrics, checkpoints, sample grids, eval) -> summary.

Data flow: page shards -> (condition, target) pairs -> frozen ViT tokens (stop_gradient, not
optimised, not checkpointed) -> UNet denoiser cross-attending to them -> v/eps/x loss.
The compiled functions (update step, eval loss, grid sampler) and the TrainState live in
`semantica_jax.steps`; this module builds the models and state on a mesh and runs the loop.
"""
import dataclasses
import itertools
import json
import math
import os
import shlex
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions
from flax.traverse_util import flatten_dict
from jax.experimental import multihost_utils

from semantica_jax import checkpointing, config_lib, diffusion, distributed, fileio, input_pipeline, optim, sharding, steps
from semantica_jax import encoder as encoder_lib
from semantica_jax import images as images_lib
from semantica_jax.models import unet as unet_lib


# ============================================================================ outcomes
@dataclasses.dataclass
class TrainOutcome:
    """What a run leaves behind (returned for tests and scripts; the workdir holds the same)."""

    state: steps.TrainState
    start_step: int
    summary: dict


class NonFiniteLossError(FloatingPointError):
    pass


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
    """Every `every` steps and at the last step; never when every <= 0."""
    return every > 0 and (step == last or step % every == 0)


_DEVICE_KEYS = ("cond", "target", "cond_tokens", "cond_pooled")


def _device_batch(batch: dict) -> dict:
    """The part of a host batch the step consumes (ids and labels stay on the host)."""
    return {k: batch[k] for k in _DEVICE_KEYS if k in batch}


# ============================================================================ the trainer's pieces
@dataclasses.dataclass
class Trainer:
    """A config's models, optimizer and sharded abstract state on a mesh; holds no data.

    Built without touching device memory, so the same object serves training, restoring onto a
    new topology, and ahead-of-time compilation for hardware this host does not have.
    """

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    rules: tuple
    encoder: encoder_lib.FrozenEncoder
    unet: nn.Module
    tx: optax.GradientTransformation
    lr_schedule: Any
    abstract_state: steps.TrainState  # ShapeDtypeStructs with shardings
    state_sharding: steps.TrainState
    abstract_enc_params: Any  # ShapeDtypeStructs with shardings
    batch_sharding: jax.sharding.NamedSharding
    token_shapes: tuple  # (tokens, pooled) ShapeDtypeStructs for a batch of 1
    _init_state: Any

    def context(self):
        """Mesh + logical axis rules, needed while tracing model code."""
        return sharding.mesh_and_rules(self.mesh, self.rules)

    @property
    def num_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.abstract_state.params))

    def abstract_batch(self) -> dict:
        c, sh = self.config, self.batch_sharding
        size, cond, b = c.data.image_size, c.encoder.image_size, c.batch_size
        batch = {
            "cond": jax.ShapeDtypeStruct((b, cond, cond, 3), jnp.float32, sharding=sh),
            "target": jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32, sharding=sh),
        }
        if c.encoder.cached_tokens:
            tokens, pooled = self.token_shapes
            batch["cond_tokens"] = jax.ShapeDtypeStruct((b,) + tokens.shape[1:], jnp.float32, sharding=sh)
            batch["cond_pooled"] = jax.ShapeDtypeStruct((b,) + pooled.shape[1:], jnp.float32, sharding=sh)
        return batch

    def init_state(self, rng: jax.Array) -> steps.TrainState:
        """A fresh state, born sharded (jit with out_shardings)."""
        with self.context():
            return jax.jit(lambda r: nn.meta.unbox(self._init_state(r)),
                           out_shardings=self.state_sharding)(rng)

    def load_encoder_params(self):
        with self.context():
            return self.encoder.load_params(self.mesh, self.rules)

    def lower_train_step(self) -> jax.stages.Lowered:
        """The jitted, sharded, state-donating update step, lowered on abstract arguments."""
        enc_sh = jax.tree.map(lambda x: x.sharding, self.abstract_enc_params)
        with self.context():
            return jax.jit(
                steps.make_train_step(self.config, self.unet, self.encoder, self.tx, self.lr_schedule),
                in_shardings=(self.state_sharding, enc_sh, self.batch_sharding),
                out_shardings=(self.state_sharding, None, None),
                donate_argnums=(0,),
            ).lower(self.abstract_state, self.abstract_enc_params, self.abstract_batch())


@dataclasses.dataclass
class Models:
    """A config's frozen encoder and denoiser on a mesh, with the denoiser's sharded abstract
    params: all that sampling, export and evaluation need (no optimizer, no device memory)."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    rules: tuple
    encoder: encoder_lib.FrozenEncoder
    unet: nn.Module
    abstract_params: Any  # ShapeDtypeStructs with shardings
    abstract_enc_params: Any  # ShapeDtypeStructs with shardings
    token_shapes: tuple  # (tokens, pooled) ShapeDtypeStructs for a batch of 1
    init_params: Any  # rng -> boxed (nn.Partitioned) UNet params; traced inside the mesh context


def build_models(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None) -> Models:
    """The encoder, the denoiser and its abstract params for `config` on `mesh` (default:
    `sharding.create_mesh(config.mesh)` over this host's devices)."""
    _validate(config)
    mesh = sharding.create_mesh(config.mesh) if mesh is None else mesh
    rules = sharding.axis_rules(config)
    encoder = encoder_lib.FrozenEncoder.from_config(config.encoder)
    unet = unet_lib.unet_from_config(config.model, platform=mesh.devices.flat[0].platform)
    size, cond_size = config.data.image_size, config.encoder.image_size

    # No eager op may run inside the mesh context: the mesh may hold compile-only devices.
    abstract_enc = encoder.abstract_params(mesh, rules)
    with sharding.mesh_and_rules(mesh, rules):
        tokens, pooled = jax.eval_shape(
            encoder.encode, abstract_enc, jax.ShapeDtypeStruct((1, cond_size, cond_size, 3), jnp.float32)
        )

        def init_params(rng):
            return unet.init(
                {"params": rng, "dropout": rng},
                jnp.zeros((1, size, size, 3)), jnp.zeros((1,)),
                jnp.zeros((1,) + tokens.shape[1:]), jnp.zeros((1,) + pooled.shape[1:]),
                jnp.ones((1,), bool), train=False,
            )["params"]

        boxed = jax.eval_shape(init_params, jax.ShapeDtypeStruct((2,), jnp.uint32))
        params_sh = sharding.logical_to_shardings(boxed, mesh, rules)
    return Models(config=config, mesh=mesh, rules=rules, encoder=encoder, unet=unet,
                  abstract_params=checkpointing.abstract_like(sharding.strip_boxes(boxed), params_sh),
                  abstract_enc_params=abstract_enc, token_shapes=(tokens, pooled),
                  init_params=init_params)


def build_trainer(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None) -> Trainer:
    """`build_models` plus the optimizer and the sharded abstract TrainState.

    `mesh` defaults to `sharding.create_mesh(config.mesh)` over this host's devices; pass a mesh
    of compile-only devices (jax.experimental.topologies) to compile for other hardware.
    """
    models = build_models(config, mesh)
    mesh, rules = models.mesh, models.rules
    tx, lr_schedule = optim.make_optimizer(config.optimizer, int(config.train.num_steps))
    with sharding.mesh_and_rules(mesh, rules):

        def init_state(rng):
            init_rng, state_rng = jax.random.split(rng)
            params = models.init_params(init_rng)
            return steps.TrainState(
                step=jnp.zeros((), jnp.int32), params=params,
                ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params), rng=state_rng,
            )

        abstract_boxed = jax.eval_shape(init_state, jax.ShapeDtypeStruct((2,), jnp.uint32))
        state_sh = sharding.logical_to_shardings(abstract_boxed, mesh, rules)
    abstract_state = checkpointing.abstract_like(sharding.strip_boxes(abstract_boxed), state_sh)
    return Trainer(
        config=config, mesh=mesh, rules=rules, encoder=models.encoder, unet=models.unet, tx=tx,
        lr_schedule=lr_schedule, abstract_state=abstract_state, state_sharding=state_sh,
        abstract_enc_params=models.abstract_enc_params, batch_sharding=sharding.batch_sharding(mesh),
        token_shapes=models.token_shapes, _init_state=init_state,
    )


# ============================================================================ main entry
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainOutcome:
    """Trains (resuming from `workdir` if it holds checkpoints), writes metrics, grids and checkpoints.

    Raises config_lib.ConfigError (one line naming the field or path) for bad configs, sizes and
    missing data before anything is compiled; checkpointing.RestoreError when a checkpoint exists
    but cannot be restored; NonFiniteLossError on a non-finite loss (train.nonfinite='raise').
    On SIGTERM (or a multi-host preemption sync point) it checkpoints the current step, waits for
    the save and returns with summary['preempted'] = True.
    """
    tc = config.train
    num_steps = int(tc.num_steps)
    pid, nproc = jax.process_index(), jax.process_count()
    is_main = pid == 0
    run_start = time.time()

    # ------------------------------------------------------------------ preflight: config, sizes, files
    try:
        trainer = build_trainer(config)
        local_batch_size = sharding.per_process_batch_size(config.batch_size, trainer.mesh)
        train_files = input_pipeline.files_for_process(
            input_pipeline.list_shard_files(config.data.train_files), pid, nproc)
        if config.data.eval_files:
            input_pipeline.files_for_process(
                input_pipeline.list_shard_files(config.data.eval_files), pid, nproc)
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise config_lib.ConfigError(str(e)) from e
    mesh = trainer.mesh
    logging.info("Mesh %s over %d devices (%d processes); global batch %d, per process %d; %d train files here",
                 dict(mesh.shape), mesh.size, nproc, config.batch_size, local_batch_size, len(train_files))
    num_params = trainer.num_params
    logging.info("Denoiser: %.2f M params", num_params / 1e6)
    os.makedirs(workdir, exist_ok=True)

    # ------------------------------------------------------------------ frozen encoder weights
    try:
        enc_params = trainer.load_encoder_params()
    except (ValueError, FileNotFoundError) as e:
        raise config_lib.ConfigError(str(e)) from e

    # ------------------------------------------------------------------ restore or init
    ckpt = checkpointing.Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=tc.max_to_keep,
        async_save=tc.async_checkpointing,
    )
    latest = ckpt.latest_step()
    data_seed, start_element = int(config.seed), 0
    if latest is not None:
        where = os.path.join(ckpt.directory, str(latest))
        try:
            changed = checkpointing.check_config_compatible(
                ckpt.restore_config(latest), config, where=where, allow_change=tc.allow_config_change)
        except ValueError as e:
            raise config_lib.ConfigError(str(e)) from e
        if changed:
            logging.warning("Resuming with changed config fields (allowed): %s", changed)
        state = ckpt.restore(latest, trainer.abstract_state)
        data_seed, start_element = checkpointing.resume_data_position(ckpt.restore_data(latest), config, latest, nproc, pid)
        checkpointing.log_restore(latest, ckpt.directory)
    else:
        state = trainer.init_state(jax.random.PRNGKey(config.seed))
    start_step = int(jax.device_get(state.step))

    # ------------------------------------------------------------------ input
    train_ds = input_pipeline.create_train_dataset(
        config, process_index=pid, process_count=nproc, batch_size=local_batch_size,
        seed=data_seed, start_element=start_element,
    )
    train_iter = iter(train_ds.as_numpy_iterator())
    eval_ds = None
    if config.data.eval_files:
        eval_ds = input_pipeline.create_eval_dataset(
            config, process_index=pid, process_count=nproc, batch_size=local_batch_size)
    grid_conds = _grid_conditions(config, local_batch_size)
    ids_log = checkpointing.DataIdsLog(workdir, pid, start_step) if tc.record_data_ids else None

    # ------------------------------------------------------------------ compile the step
    t0 = time.time()
    train_step = trainer.lower_train_step().compile()
    compile_s = time.time() - t0
    logging.info("Compiled the train step in %.1f s", compile_s)
    distributed.barrier(f"train step compiled (start {start_step})")
    # Traced at their first call, inside trainer.context() (see the loop).
    eval_step = jax.jit(steps.make_eval_step(config, trainer.unet, trainer.encoder))
    sample_fn = jax.jit(steps.make_sample_fn(config, trainer.unet, trainer.encoder))

    # ------------------------------------------------------------------ writers and hooks
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_main, asynchronous=True)
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json(indent=2))
        if start_step == 0:
            writer.write_hparams(_flat_hparams(config))
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

    # ------------------------------------------------------------------ loop
    train_metrics = None
    pending_finite: list[tuple[int, jax.Array]] = []
    last_checkpoint = latest
    skipped_steps = 0
    next_element = start_element
    t_log, steps_since_log = time.time(), 0
    eval_result: dict = {}
    last_loss = float("nan")
    preempted = False

    def check_finite():
        nonlocal skipped_steps
        for s, ok in pending_finite:
            if bool(jax.device_get(ok)):
                continue
            if tc.nonfinite == "raise":
                raise NonFiniteLossError(
                    f"non-finite loss or gradient at step {s} (the state was not updated by it); "
                    f"last good checkpoint: {last_checkpoint if last_checkpoint is not None else 'none'} "
                    f"in {ckpt.directory}; set config.train.nonfinite='skip' to skip such steps"
                )
            skipped_steps += 1
        pending_finite.clear()

    def save(step, force=False):
        nonlocal last_checkpoint
        check_finite()
        positions = [next_element]
        if nproc > 1:
            positions = [int(p) for p in multihost_utils.process_allgather(np.int64(next_element))]
        data = {"process_count": nproc, "positions": positions, "seed": data_seed,
                "local_batch_size": local_batch_size}
        ckpt.save(step, state, config, data=data, force=force)
        last_checkpoint = step

    if start_step >= num_steps:
        logging.info("Nothing to train: checkpoint step %d >= num_steps %d", start_step, num_steps)
    with checkpointing.PreemptionWatch() as preemption:
        for step in range(start_step + 1, num_steps + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                host_batch = next(train_iter)
                batch = sharding.make_global_batch(_device_batch(host_batch), mesh)
                state, step_metrics, finite = train_step(state, enc_params, batch)
            next_element = int(host_batch["element_index"].max()) + 1
            if ids_log is not None:
                ids_log.write(step, host_batch)
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
                scalars["train/skipped_steps_total"] = skipped_steps
                t_log, steps_since_log = now, 0
                last_loss = scalars["train/loss"]
                writer.write_scalars(step, scalars)
                train_metrics = None

            if _is_step(step, tc.checkpoint_every, num_steps):
                with report.timed("checkpoint"):
                    save(step)

            if eval_ds is not None and _is_step(step, tc.eval_every, num_steps):
                with report.timed("eval"), trainer.context():
                    eval_result = _evaluate(eval_step, state, enc_params, eval_ds, tc.eval_batches, mesh)
                writer.write_scalars(step, {f"eval/{k}": v for k, v in eval_result.items()})

            if _is_step(step, tc.sample_every, num_steps):
                with report.timed("sample"), trainer.context():
                    _write_grid(sample_fn, state, enc_params, grid_conds, config, workdir, writer, step, is_main)

            if step < num_steps and preemption.reached(step):
                if last_checkpoint != step:
                    save(step, force=True)
                ckpt.wait_until_finished()
                logging.warning("Preempted: checkpoint for step %d saved in %s; exiting cleanly",
                                step, ckpt.directory)
                preempted = True
                break

    ckpt.close()
    if ids_log is not None:
        ids_log.close()
    writer.flush()

    final_step = int(jax.device_get(state.step))
    summary = {
        "step": final_step,
        "start_step": start_step,
        "preempted": preempted,
        "train_loss": last_loss if math.isfinite(last_loss) else None,  # None: no step trained
        "skipped_steps": skipped_steps,
        "compile_seconds": compile_s,
        "denoiser_params": num_params,
        **{f"eval_{k}": v for k, v in eval_result.items()},
        # This process's wall time, and the sum over the runs that made this workdir's steps
        # (a resumed run adds its own to the total of the run it resumed).
        "run_wall_seconds": time.time() - run_start,
        "total_wall_seconds": _previous_wall_seconds(workdir, start_step) + time.time() - run_start,
        "hardware": _hardware(),
        "command": shlex.join([os.path.basename(sys.executable)] + sys.argv),
    }
    if is_main:
        fileio.write_json(os.path.join(workdir, "metrics.json"), summary)
    writer.close()
    return TrainOutcome(state=state, start_step=start_step, summary=summary)


# ============================================================================ loop helpers
def _previous_wall_seconds(workdir: str, start_step: int) -> float:
    """The total wall time of the runs before a resume at `start_step` (0 for a fresh run, or
    when the previous run's metrics.json is missing or ended elsewhere)."""
    if start_step == 0:
        return 0.0
    try:
        with open(os.path.join(workdir, "metrics.json")) as f:
            prev = json.load(f)
    except (OSError, ValueError):
        return 0.0
    if prev.get("step") != start_step:
        return 0.0
    return float(prev.get("total_wall_seconds") or 0.0)


def _hardware() -> dict:
    """What trained: platform, device kind, device and process counts."""
    d = jax.devices()[0]
    return {"platform": d.platform, "device_kind": d.device_kind, "devices": jax.device_count(),
            "processes": jax.process_count(), "host_cpus": os.cpu_count()}


def _flat_hparams(config) -> dict:
    """The config as flat 'a.b' keys with scalar values (others as text), for the hparams log."""
    flat = flatten_dict(config.to_dict(), sep=".")
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}


def _evaluate(eval_step, state, enc_params, eval_ds, num_batches, mesh) -> dict:
    """Mean eval loss over the eval split; on several processes, over as many batches as the
    process with the fewest has (every eval step is a collective: they must take the same count)."""
    total, count = 0.0, 0
    rng = jax.random.PRNGKey(0)
    batches = eval_ds.as_numpy_iterator()
    for i in itertools.count():
        if num_batches > 0 and i >= num_batches:
            break
        batch = next(batches, None)
        if jax.process_count() > 1:
            have = multihost_utils.process_allgather(np.int32(batch is not None))
            if not np.all(have):
                if np.any(have):
                    logging.warning("eval: the processes' eval shards hold different numbers of batches; "
                                    "stopped after %d, the fewest", i)
                break
        elif batch is None:
            break
        gb = sharding.make_global_batch(_device_batch(batch), mesh)
        s, n = eval_step(state.ema_params, enc_params, gb, jax.random.fold_in(rng, i))
        total += float(s)
        count += int(n)
    if count == 0:
        raise ValueError("the eval split produced no batch: check config.data.eval_files and the batch size")
    return {"loss": total / count, "examples": count}


def _grid_conditions(config, batch_size: int) -> dict:
    """Fixed conditions for the sample grids: the first pairs of the eval split (else of the
    training stream at `config.seed`), read whole by every process, so that every process of a
    multi-host run and every resumed run draws the same grid."""
    n = int(config.sample.num_conditions)
    if config.data.eval_files:
        ds = input_pipeline.create_eval_dataset(config, process_index=0, process_count=1, batch_size=batch_size)
    else:
        ds = input_pipeline.create_train_dataset(config, process_index=0, process_count=1, batch_size=batch_size)
    batches = []
    for batch in ds.as_numpy_iterator():
        batches.append({k: batch[k] for k in ("cond", "cond_tokens", "cond_pooled", "label") if k in batch})
        if sum(len(b["cond"]) for b in batches) >= n:
            break
    return {k: np.concatenate([b[k] for b in batches])[:n] for k in batches[0]}


def _write_grid(sample_fn, state, enc_params, conds, config, workdir, writer, step, is_main):
    rng = jax.random.PRNGKey(config.sample.seed)
    model_conds = {k: v for k, v in conds.items() if k != "label"}
    samples = sharding.to_host(sample_fn(state.ema_params, enc_params, model_conds, rng))
    labels = conds.get("label")
    row_labels = None
    if labels is not None and np.all(labels >= 0):
        row_labels = images_lib.class_names_for([f"label {int(v)}" for v in labels], tuple(config.data.class_names))
    grid = images_lib.variation_grid(conds["cond"], samples, config.sample.samples_per_condition,
                                     config.data.image_size, row_labels=row_labels)
    if is_main:
        path = images_lib.save_png(grid, os.path.join(workdir, "samples", f"step_{step:07d}.png"))
        logging.info("Wrote sample grid %s", path)
    writer.write_images(step, {"samples": grid[None]})
