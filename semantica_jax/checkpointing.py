"""Orbax checkpoints of the train state, with auto-resume from the workdir's latest step.

Layout: `<workdir>/checkpoints/<step>/{state, config, data}`: `state` is the sharded TrainState
(UNet params, EMA params, optimizer state, step, rng) written by `StandardSave` (async by
default), `config` the full experiment config as JSON, `data` the input pipeline's position per
process (JSON) so a resumed run continues the exact pair stream. Orbax writes each step into a
temporary directory and renames it when complete, so a process killed mid-save leaves no
checkpoint that `latest_step()` would pick up. The frozen encoder's weights are NOT in the
checkpoint: the config names them (`encoder.weights`, or the seeded random init), so every save
stays the size of the trainable state.

Resuming a run also needs the input pipeline's position (`resume_data_position`), a clean stop
on SIGTERM at a step every process agrees on (`PreemptionWatch`), and, when
`train.record_data_ids` is set, a log of the pairs consumed that matches the restored step
(`DataIdsLog`).

Restores go through an abstract target (ShapeDtypeStruct with the *current* shardings), so a
checkpoint restores onto whatever mesh the restoring job has. A failed restore raises naming the
path and the reason; nothing ever falls back to a fresh start.
"""
from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from flax.traverse_util import flatten_dict

from semantica_jax import config_lib


class RestoreError(RuntimeError):
    """A checkpoint exists but could not be restored."""


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` with the project's item names and error policy."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory) if "://" not in directory else directory
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                enable_async_checkpointing=async_save,
                create=True,
            ),
            item_names=("state", "config", "data"),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, config: ml_collections.ConfigDict, *,
             data: dict | None = None, force: bool = False) -> bool:
        """Starts an (async) save of `state` at `step`; returns whether a save was started."""
        items = dict(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(config_to_json_dict(config)),
        )
        if data is not None:
            items["data"] = ocp.args.JsonSave(data)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: Any) -> Any:
        """Restores the state at `step` onto the shardings carried by `abstract_state`."""
        path = os.path.join(self.directory, str(step))
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            )
        except Exception as e:  # re-raised with the path: a failed restore must never pass silently
            raise RestoreError(f"could not restore checkpoint {path}: {type(e).__name__}: {e}") from e
        return restored.state

    def restore_subtrees(self, step: int, abstract: dict[str, Any]) -> dict[str, Any]:
        """Only some fields of the saved state (e.g. `{"ema_params": abstract_params}`), onto the
        shardings the abstract trees carry: Orbax's partial restore, which reads nothing else
        (no optimizer state), so no optimizer need be built to restore a model."""
        path = os.path.join(self.directory, str(step))
        item = dict(abstract)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=True)))
        except Exception as e:  # re-raised with the path, as `restore`
            raise RestoreError(f"could not restore {sorted(item)} of checkpoint {path}: "
                               f"{type(e).__name__}: {e}") from e
        return dict(restored.state)

    def restore_data(self, step: int) -> dict | None:
        """The input position saved with `step`, or None when that checkpoint has none."""
        if not os.path.isdir(os.path.join(self.directory, str(step), "data")):
            return None
        path = os.path.join(self.directory, str(step))
        try:
            return self._manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data
        except Exception as e:
            raise RestoreError(f"could not read the data position of checkpoint {path}: {e}") from e

    def restore_config(self, step: int) -> dict:
        path = os.path.join(self.directory, str(step))
        try:
            return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
        except Exception as e:
            raise RestoreError(f"could not read the config of checkpoint {path}: {e}") from e

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def config_to_json_dict(config: ml_collections.ConfigDict) -> dict:
    """The config as plain JSON types (tuples become lists)."""
    return json.loads(config.to_json())


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the given shardings: the restore target for a new topology."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def log_restore(step: int, directory: str) -> None:
    logging.info("Resumed from checkpoint %s at step %d", directory, step)


# Fields that may differ freely between the run that wrote a checkpoint and the run resuming it.
_FREE_FIELDS = (
    "train.num_steps", "train.log_every", "train.checkpoint_every", "train.eval_every",
    "train.sample_every", "train.eval_batches", "train.max_to_keep", "train.async_checkpointing",
    "train.profile_steps", "model.conv_impl", "train.allow_config_change", "train.record_data_ids", "sample.", "eval.", "mesh.",
    "data.eval_files", "data.num_parallel_calls", "data.prefetch",
)
# Fields that change parameter shapes or tree structure: a checkpoint cannot be restored across them.
_SHAPE_FIELDS = ("model.", "encoder.size", "encoder.patch_size", "encoder.image_size",
                 "encoder.num_registers", "encoder.family", "data.image_size")


def check_config_compatible(saved: dict, config: ml_collections.ConfigDict, *, where: str,
                            allow_change: bool) -> list[str]:
    """Compares a checkpoint's saved config with the resuming run's config.

    Raises ValueError naming the differing keys when a shape-changing field differs (never
    restorable), or when any other result-affecting field differs and `allow_change` is False.
    Returns the list of differing keys that were allowed.
    """
    old, new = flatten_dict(saved, sep="."), flatten_dict(config_to_json_dict(config), sep=".")
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    keys = [k for k in keys if not any(k == f or (f.endswith(".") and k.startswith(f)) for f in _FREE_FIELDS)]
    # Fields added to the code after the checkpoint was written: unchanged when at their default.
    defaults = flatten_dict(config_to_json_dict(config_lib.default_config()), sep=".")
    keys = [k for k in keys if not (k not in old and k in defaults and new.get(k) == defaults[k])]
    shape = [k for k in keys if any(k == f or (f.endswith(".") and k.startswith(f)) for f in _SHAPE_FIELDS)]
    describe = lambda ks: ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in ks)
    if shape:
        raise ValueError(
            f"the checkpoint in {where} was written with a different model: {describe(shape)}; "
            "these fields change parameter shapes, so use a new workdir"
        )
    if keys and not allow_change:
        raise ValueError(
            f"the config differs from the one saved in {where}: {describe(keys)}; "
            "pass --config.train.allow_config_change=True if this change is intended"
        )
    return keys


# ============================================================================ resuming a run
def resume_data_position(data: dict | None, config, step: int, nproc: int, pid: int) -> tuple[int, int]:
    """(seed, start_element) for this process's input pipeline when resuming at `step`, from the
    checkpoint's `data` item: the exact position when the process count and seed are unchanged,
    otherwise a fresh shuffle seeded by (seed, step), logged with the reason."""
    if data is not None and data["process_count"] == nproc and data["seed"] == int(config.seed):
        return int(config.seed), int(data["positions"][pid])
    reason = ("the checkpoint has no data position" if data is None else
              f"the process count changed ({data['process_count']} -> {nproc}), so files map to processes differently"
              if data["process_count"] != nproc else "config.seed changed")
    seed = int(np.random.SeedSequence([int(config.seed), step]).generate_state(1)[0])
    logging.warning("Cannot continue the exact pair stream at step %d: %s; continuing with a fresh "
                    "shuffle seeded by (seed, step) = %d", step, reason, seed)
    return seed, 0


class PreemptionWatch:
    """SIGTERM -> checkpoint-and-exit at the next step boundary.

    Single host: a SIGTERM handler sets a flag. Multi-host: JAX's preemption sync point, so every
    host stops at the same step (a flag per host could disagree by a step).
    """

    def __init__(self):
        self._flag = threading.Event()
        self._previous = None

    def __enter__(self):
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._flag.set())
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._flag.is_set()


class DataIdsLog:
    """Appends the ids of every pair consumed to <workdir>/data_ids/process_<i>.jsonl.

    On resume, lines past the restored step (written before a crash) are dropped first, so the
    file always describes the pairs that produced the current state.
    """

    def __init__(self, workdir: str, pid: int, start_step: int):
        directory = os.path.join(workdir, "data_ids")
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, f"process_{pid}.jsonl")
        if os.path.exists(self.path):
            with open(self.path) as f:
                lines = f.readlines()
            if lines and not lines[-1].endswith("\n"):
                lines.pop()  # a line cut by a kill mid-write: its step is past any checkpoint
            kept = [ln for ln in lines if json.loads(ln)["step"] <= start_step]
            if len(kept) < len(lines):  # rewritten atomically: a kill now loses no kept line
                tmp = f"{self.path}.tmp{os.getpid()}"
                with open(tmp, "w") as f:
                    f.writelines(kept)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
        self._f = open(self.path, "a")

    def write(self, step: int, batch: dict) -> None:
        row = {"step": step, **{k: batch[k].tolist() for k in ("page_hash", "cond_index", "target_index")}}
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()  # a kill -9 must not lose lines of steps that a checkpoint covers

    def close(self) -> None:
        self._f.close()
