r"""Command-line entry point: `python -m semantica_jax.main --config=experiments/X.py --workdir=DIR`.

Modes (`--mode`):
  train   (default) train, resuming from the workdir's latest checkpoint
  eval    the eval job: evaluate every checkpoint of --workdir with the few-shot protocol
          (the config's `eval` section), waiting for new ones until the last train step;
          `--eval_once` for one pass, `--eval_export=DIR` to evaluate an export instead
  export  write the EMA params + config of a checkpoint (`--export_step`, default the latest)
          to `--export_dir` (default WORKDIR/export) for eval jobs and `semantica-vary`;
          --config is not needed (the checkpoint carries its config)

Config overrides: `--config.optimizer.learning_rate=3e-4`; an unknown key fails naming it
(the config is locked). Variants: `--config=experiments/semantica_base.py:size=B,res=128`.
Run it again with the same workdir to resume from the latest checkpoint (and the exact position of
the pair stream). SIGTERM checkpoints the current step and exits 0. Bad configs, sizes and missing
files end with one line `semantica: error: ...` and exit code 2, before anything is compiled.
Library INFO logs (Orbax, absl, TensorStore) are hidden unless `--verbosity=1`; the project's
lines and clu's progress reports (steps/s, ETA, metrics) always show.
"""
from __future__ import annotations

import logging as std_logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (experiments/*.py[:variant]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "export"], "What to run.")
_EVAL_ONCE = flags.DEFINE_bool("eval_once", False, "eval: one pass over the existing checkpoints, then exit.")
_EVAL_EXPORT = flags.DEFINE_string("eval_export", None, "eval: evaluate this export instead of checkpoints.")
_EXPORT_STEP = flags.DEFINE_integer("export_step", None, "export: checkpoint step (default: the latest).")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "export: output directory (default WORKDIR/export).")
_EXPORT_RAW = flags.DEFINE_bool("export_raw", False, "export: also write the raw (non-EMA) params.")
flags.mark_flags_as_required(["workdir"])

# Whose INFO lines the terminal shows at the default verbosity: the project's own, and clu's
# (progress, steps/s, ETA, metrics). Other libraries (Orbax's save internals, absl, TensorStore)
# log at WARNING and above unless `--verbosity=1` (or higher) asks for everything.
_INFO_SOURCES = tuple(os.sep + p + os.sep for p in ("semantica_jax", "data_pipeline", "clu"))


class _LibraryInfoFilter:
    """Drops library records below WARNING (a `logging` filter for absl's handler)."""

    def filter(self, record) -> bool:
        return record.levelno >= std_logging.WARNING or any(s in record.pathname for s in _INFO_SOURCES)


def quiet_library_logs() -> None:
    """Unless --verbosity >= 1: only the project's and clu's INFO lines reach the terminal."""
    if flags.FLAGS.verbosity < 1:
        logging.get_absl_handler().addFilter(_LibraryInfoFilter())


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    quiet_library_logs()
    from semantica_jax import distributed

    distributed.maybe_initialize()  # multi-host only; must precede every other JAX call
    import jax
    import tensorflow as tf

    # tf.data only: keep TensorFlow off any accelerator so it never grabs TPU/GPU memory.
    tf.config.set_visible_devices([], "GPU")
    logging.info("JAX %s: process %d/%d, %d local / %d global devices (%s)", jax.__version__,
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count(), jax.devices()[0].platform)
    from semantica_jax import config_lib, export, train
    from semantica_jax.evaluation import job

    try:
        if _MODE.value != "export" and _CONFIG.value is None:
            raise config_lib.ConfigError(f"--mode={_MODE.value} needs --config")
        if _MODE.value == "train":
            outcome = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
            logging.info("Done: %s", outcome.summary)
        elif _MODE.value == "eval":
            for result in job.run_eval_job(_CONFIG.value, _WORKDIR.value, export_dir=_EVAL_EXPORT.value,
                                           once=_EVAL_ONCE.value):
                print(job.summary_table(result))
        else:
            out = _EXPORT_DIR.value or os.path.join(_WORKDIR.value, "export")
            export.export_checkpoint(_WORKDIR.value, out, step=_EXPORT_STEP.value, raw=_EXPORT_RAW.value,
                                     overwrite=True)
            print(out)
    except (config_lib.ConfigError, export.ExportError) as e:
        # Bad config / sizes / paths, found before anything was compiled: one line, exit 2.
        logging.error("%s", e)
        print(f"semantica: error: {e}", file=sys.stderr)
        sys.exit(2)


def run():
    """Console-script entry (`semantica-train`)."""
    app.run(main)


if __name__ == "__main__":
    run()
