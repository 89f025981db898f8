r"""Frozen-encoder throughput: images/s per ViT size and input resolution on this machine.

  python benchmarks/encoder_bench.py                                  # S,B,L,g at 224, 28, 56 px
  python benchmarks/encoder_bench.py --sizes=S --resolutions=28,56,112 --batch=64
  python benchmarks/encoder_bench.py --family=clip --sizes=B,L --patch=16 --resolutions=224

Random-init weights (throughput does not depend on the values) with the released checkpoints'
stored position grid (`--pretrain=518`, DINOv2; resized in-graph to the input grid, as in
training). Each row: one jitted float32 forward of `--batch` images (compile time excluded),
the median of `--iters` timed calls after one warm-up. Also prints the encoder's share of a
training step at the tiny experiment's batch (`--step_batch`) for each size at the smallest
resolution: the time `config.encoder.cached_tokens=True` saves per step (the cached pipeline
instead reads float16 token blobs). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from semantica_jax import config_lib  # noqa: E402
from semantica_jax.models import vit  # noqa: E402


def build(family: str, size: str, patch: int, pretrain: int, resolution: int) -> tuple:
    """A jitted forward of a random-init encoder and its params."""
    e = config_lib.default_config().encoder
    vit.set_family(e, family)
    e.size, e.patch_size, e.image_size, e.pretrain_image_size = size, patch, resolution, pretrain
    model = vit.vit_from_config(e)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, resolution, resolution, 3)))
    forward = jax.jit(lambda p, x: model.apply(p, x)["tokens"])
    return model, params, forward


def time_forward(forward, params, batch: int, resolution: int, iters: int) -> tuple[float, float]:
    """(compile + first call seconds, median seconds per call)."""
    x = jax.random.uniform(jax.random.PRNGKey(1), (batch, resolution, resolution, 3))
    t0 = time.perf_counter()
    forward(params, x).block_until_ready()
    first = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        forward(params, x).block_until_ready()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="dinov2", choices=sorted(vit.FAMILIES))
    parser.add_argument("--sizes", default="S,B,L,g")
    parser.add_argument("--resolutions", default="224,28,56")
    parser.add_argument("--patch", type=int, default=14)
    parser.add_argument("--pretrain", type=int, default=518, help="stored position grid (px)")
    parser.add_argument("--batch", type=int, default=0,
                        help="images per call; 0 = 32 below 100 px, else 8 (S, B) / 2 (L, g)")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--step_batch", type=int, default=32, help="training batch for the "
                        "per-step encoder cost (0 = skip)")
    parser.add_argument("--json", default="", help="also write the rows here (benchmarks/run_all.py)")
    args = parser.parse_args(argv)
    sizes = args.sizes.split(",")
    resolutions = [int(r) for r in args.resolutions.split(",")]
    print(f"JAX {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} CPU cores, "
          f"family {args.family}, patch {args.patch}, stored grid {args.pretrain} px")
    print("| size | params (M) | px | tokens | batch | compile+1st (s) | ms/image | images/s |")
    print("|---|---|---|---|---|---|---|---|")
    step_rows, rows = [], []
    for size in sizes:
        for res in resolutions:
            batch = args.batch or (32 if res < 100 else (8 if size in ("tiny", "S", "B") else 2))
            model, params, forward = build(args.family, size, args.patch, args.pretrain, res)
            n_params = sum(x.size for x in jax.tree.leaves(params)) / 1e6
            first, per_call = time_forward(forward, params, batch, res, args.iters)
            tokens = model.num_prefix_tokens + (res // args.patch) ** 2
            print(f"| {size} | {n_params:.1f} | {res} | {tokens} | {batch} | {first:.1f} | "
                  f"{1e3 * per_call / batch:.2f} | {batch / per_call:.1f} |", flush=True)
            rows.append({"size": size, "params_M": n_params, "image_size": res, "tokens": tokens,
                         "batch": batch, "compile_and_first_s": first,
                         "images_per_s": batch / per_call})
            if args.step_batch and res == min(resolutions):
                step = per_call if batch == args.step_batch else time_forward(
                    forward, params, args.step_batch, res, args.iters)[1]
                step_rows.append((size, res, step))
            del params, forward
    if step_rows:
        print(f"\nIn-graph encoder cost per training step (batch {args.step_batch}); cached "
              "tokens remove it:")
        for size, res, step in step_rows:
            print(f"  {size} at {res} px: {1e3 * step:.1f} ms/step")
    result = {"family": args.family, "rows": rows,
              "step_cost": [{"size": s, "image_size": r, "batch": args.step_batch, "seconds": t}
                            for s, r, t in step_rows]}
    if args.json:
        import json
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
