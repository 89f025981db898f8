r"""Memory: peak host RSS of a short training run (a fresh process) and the step's compiled memory.

  python benchmarks/memory_bench.py --config=tiny --steps=20 --devices=2
  python benchmarks/memory_bench.py --config=S --steps=2 --batch=8

The run is the real `train.train_and_evaluate` (input pipeline, sharded init, compiled step,
checkpoint at the end) on synthetic page shards written to a temporary directory, in a child
process; its peak resident set size is `resource.getrusage(RUSAGE_CHILDREN).ru_maxrss` read by
the parent (Linux reports KiB). The denoiser is the benchmark config's (benchmarks/train_bench.py);
the frozen encoder is the random-init tiny ViT encoded in-graph (the synthetic shards carry no
cached tokens), so the RSS covers model + optimizer state + data pipeline + XLA, not a big encoder.
The compiled per-device memory of the step (`compiled.memory_analysis()`) comes with each
train_bench row.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import train_bench  # noqa: E402


def _child(args) -> None:
    train_bench._set_devices_env(args.devices)
    sys.path.insert(0, train_bench.REPO)
    from data_pipeline import synthetic
    from semantica_jax import train

    config = train_bench.bench_config(args.config, args.batch, tuple(args.set))
    size = int(config.data.image_size)
    data = tempfile.mkdtemp(prefix="memory_bench_")
    synthetic.write_synthetic_shards(data, num_pages=max(64, 2 * config.batch_size), num_shards=2,
                                     images_per_page=(2, 4), image_size=size, seed=0, prefix="train")
    config.data.train_files = os.path.join(data, "train-*.tfrecord")
    config.data.shuffle_buffer = 64
    config.encoder.cached_tokens = False
    config.encoder.size, config.encoder.image_size = "tiny", 28
    config.train.num_steps = args.steps
    config.train.log_every = args.steps
    config.train.checkpoint_every = args.steps
    config.train.sample_every = 0
    config.train.eval_every = 0
    config.train.async_checkpointing = False
    t0 = time.perf_counter()
    out = train.train_and_evaluate(config, os.path.join(data, "workdir"))
    print(json.dumps({"steps": out.summary["step"], "seconds": time.perf_counter() - t0,
                      "compile_seconds": out.summary["compile_seconds"],
                      "self_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}),
          flush=True)


def measure(config_name: str, *, steps: int, devices: int, batch: int = 0, sets=(),
            timeout: float = 1800) -> dict:
    """Runs the training child and returns its peak RSS (MiB) and timings."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", f"--config={config_name}",
           f"--steps={steps}", f"--devices={devices}", f"--batch={batch}", *[f"--set={s}" for s in sets]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=train_bench.REPO)
    rows = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not rows:
        raise RuntimeError(f"memory_bench child failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    # Only this one child has been waited for when measure() is the caller's only subprocess;
    # the child's own ru_maxrss is the figure either way (they agree when it is the first child).
    row = rows[-1]
    return {"config": config_name, "devices": devices, "batch": batch or train_bench.DEFAULT_BATCH[config_name],
            "train_steps": row["steps"], "run_seconds": row["seconds"],
            "peak_rss_mib": row["self_maxrss_kib"] / 1024.0,
            "children_maxrss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--batch", type=int, default=0)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.batch = args.batch or train_bench.DEFAULT_BATCH[args.config]
        return _child(args)
    row = measure(args.config, steps=args.steps, devices=args.devices, batch=args.batch, sets=args.set)
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
