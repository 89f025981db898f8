r"""Sampler throughput: images/s of the trainer's sample function (DDPM / DDIM, EMA params).

  python benchmarks/sampler_bench.py --config=tiny --sampler=ddpm --num_steps=256 --batch=16
  python benchmarks/sampler_bench.py --config=S --sampler=ddim --num_steps=50 --batch=4 --measure_steps=4

Times `jax.jit(steps.make_sample_fn(config, unet, encoder))` (the function the trainer uses for
its grids: `diffusion.sample`, one UNet pass per step, unguided) on one device with cached
encoder tokens, after a compile + warm-up call. When `--measure_steps` is smaller than
`--num_steps` (the S denoiser's 256 DDPM steps take minutes on a CPU), the loop is run for
`measure_steps` and the time is scaled by num_steps / measure_steps: every step is the same
fori_loop body, so the time is linear in the step count (the noise draw before the loop is the
only fixed cost, and it is counted in full). The row says which.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_bench  # noqa: E402


def bench_sampler(config, *, sampler: str, num_steps: int, batch: int, measure_steps: int = 0,
                  repeats: int = 2, trainer=None, state=None, enc=None) -> dict:
    """Times the sample function; `trainer`, `state`, `enc` may be passed in to reuse them."""
    import jax
    import numpy as np
    from semantica_jax import steps, train

    measure = measure_steps if 0 < measure_steps < num_steps else num_steps
    config = config.copy_and_resolve_references()
    config.sample.sampler, config.sample.num_steps = sampler, measure
    config.sample.samples_per_condition, config.sample.guidance_scale = 1, 1.0
    if trainer is None:
        trainer = train.build_trainer(config)
        state = trainer.init_state(jax.random.PRNGKey(0))
        enc = trainer.load_encoder_params()
    tokens, pooled = trainer.token_shapes
    cs = config.encoder.image_size
    conds = {"cond": np.zeros((batch, cs, cs, 3), np.float32),
             "cond_tokens": np.random.default_rng(0).standard_normal((batch,) + tokens.shape[1:]).astype(np.float32),
             "cond_pooled": np.random.default_rng(1).standard_normal((batch,) + pooled.shape[1:]).astype(np.float32)}
    with trainer.context():
        fn = jax.jit(steps.make_sample_fn(config, trainer.unet, trainer.encoder))
        t0 = time.perf_counter()
        jax.block_until_ready(fn(state.ema_params, enc, conds, jax.random.PRNGKey(0)))
        first = time.perf_counter() - t0
        times = []
        for i in range(repeats):
            t0 = time.perf_counter()
            out = fn(state.ema_params, enc, conds, jax.random.PRNGKey(i + 1))
            jax.block_until_ready(out)
            times.append(time.perf_counter() - t0)
    t = statistics.median(times) * num_steps / measure
    return {
        "config": None, "sampler": sampler, "num_steps": num_steps, "measured_steps": measure,
        "batch": batch, "image_size": int(config.data.image_size),
        "compile_and_first_s": first, "seconds_per_batch": t, "images_per_s": batch / t,
        "ms_per_image_step": 1e3 * t / batch / num_steps,
        "output_shape": list(out.shape),
    }


def format_row(r: dict) -> str:
    how = "" if r["measured_steps"] == r["num_steps"] else f" (timed {r['measured_steps']} steps, scaled)"
    return (f"| {r['config']} | {r['sampler'].upper()}-{r['num_steps']}{how} | {r['batch']} | "
            f"{r['image_size']} | {r['seconds_per_batch']:.2f} | {r['images_per_s']:.3f} | "
            f"{r['ms_per_image_step']:.2f} |")


HEADER = ("| config | sampler | batch | px | s/batch | images/s | ms per image-step |\n"
          "|---|---|---|---|---|---|---|")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--sampler", default="ddpm", choices=("ddpm", "ddim"))
    p.add_argument("--num_steps", type=int, default=256)
    p.add_argument("--measure_steps", type=int, default=0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args(argv)
    train_bench._set_devices_env(1)
    config = train_bench.bench_config(args.config, args.batch, tuple(args.set))
    row = bench_sampler(config, sampler=args.sampler, num_steps=args.num_steps, batch=args.batch,
                        measure_steps=args.measure_steps, repeats=args.repeats)
    row["config"] = args.config
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main()
