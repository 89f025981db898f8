"""Orbax checkpoints of the train state, with auto-resume from the workdir's latest step.

Layout: `<workdir>/checkpoints/<step>/{state, config}`: `state` is the sharded TrainState (UNet
params, EMA params, optimizer state, step, rng) written by `StandardSave` (async by default),
`config` the full experiment config as JSON. The frozen encoder's weights are NOT in the
checkpoint: the config names them (`encoder.weights`, or the seeded random init), so every save
stays the size of the trainable state.

Restores go through an abstract target (ShapeDtypeStruct with the *current* shardings), so a
checkpoint restores onto whatever mesh the restoring job has. A failed restore raises naming the
path and the reason; nothing ever falls back to a fresh start.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging


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
            item_names=("state", "config"),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, config: ml_collections.ConfigDict, *, force: bool = False) -> bool:
        """Starts an (async) save of `state` at `step`; returns whether a save was started."""
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                config=ocp.args.JsonSave(config_to_json_dict(config)),
            ),
            force=force,
        )

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
