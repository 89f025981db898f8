"""Shared test helpers: the tiny test config and synthetic page data (imported by several tests,
and by config files that subprocess tests hand to `python -m semantica_jax.main`)."""
import os

from semantica_jax import config_lib


def tiny_config(data_dir: str, num_steps: int, *, eval_split: bool = True, channels=(16, 32)):
    """A seconds-per-compile config on 16 px synthetic pages, sharded over the 8 fake devices."""
    c = config_lib.default_config()
    c.seed = 0
    c.batch_size = 16
    c.data.train_files = os.path.join(data_dir, "train-*.tfrecord")
    c.data.eval_files = os.path.join(data_dir, "eval-*.tfrecord") if eval_split else ""
    c.data.image_size = 16
    c.data.shuffle_buffer = 64
    c.encoder.size = "tiny"
    c.encoder.image_size = 14
    c.encoder.allow_random_init = True
    c.model.size = "tiny"
    c.model.channels = tuple(channels)
    c.model.attn_resolution = 8
    c.optimizer.warmup_steps = 5
    c.optimizer.ema_decay = 0.9
    c.mesh.data = 4
    c.mesh.fsdp = 2
    c.mesh.model = 1
    c.train.num_steps = num_steps
    c.train.log_every = 5
    c.train.checkpoint_every = 20
    c.train.eval_every = 20
    c.train.eval_batches = 1
    c.train.sample_every = 0
    c.sample.num_steps = 4
    c.sample.num_conditions = 2
    c.sample.samples_per_condition = 2
    return c


def write_pages(data_dir: str, *, eval_split: bool = True) -> str:
    from data_pipeline import synthetic

    synthetic.write_synthetic_shards(data_dir, num_pages=16, num_shards=4, images_per_page=(2, 4),
                                     image_size=16, seed=0, prefix="train")
    if eval_split:
        synthetic.write_synthetic_shards(data_dir, num_pages=16, num_shards=2, images_per_page=3,
                                         image_size=16, seed=1, prefix="eval")
    return data_dir
