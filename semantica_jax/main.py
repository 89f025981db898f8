r"""Command-line entry point: `python -m semantica_jax.main --config=experiments/X.py --workdir=DIR`.

Config overrides: `--config.optimizer.learning_rate=3e-4`; an unknown key fails naming it
(the config is locked). Variants: `--config=experiments/semantica_base.py:size=B,res=128`.
Run it again with the same workdir to resume from the latest checkpoint (and the exact position of
the pair stream). SIGTERM checkpoints the current step and exits 0. Bad configs, sizes and missing
files end with one line `semantica: error: ...` and exit code 2, before anything is compiled.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (experiments/*.py[:variant]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
_MODE = flags.DEFINE_enum("mode", "train", ["train"], "What to run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from semantica_jax import distributed

    distributed.maybe_initialize()  # multi-host only; must precede every other JAX call
    import jax
    import tensorflow as tf

    # tf.data only: keep TensorFlow off any accelerator so it never grabs TPU/GPU memory.
    tf.config.set_visible_devices([], "GPU")
    logging.info("JAX %s: process %d/%d, %d local / %d global devices (%s)", jax.__version__,
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count(), jax.devices()[0].platform)
    from semantica_jax import config_lib, train

    try:
        outcome = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except config_lib.ConfigError as e:
        # Bad config / sizes / paths, found before anything was compiled: one line, exit 2.
        logging.error("%s", e)
        print(f"semantica: error: {e}", file=sys.stderr)
        sys.exit(2)
    logging.info("Done: %s", outcome.summary)


def run():
    """Console-script entry (`semantica-train`)."""
    app.run(main)


if __name__ == "__main__":
    run()
