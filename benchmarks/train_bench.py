r"""Train-step throughput as a fraction of this machine's matmul peak (MFU on CPU).

  python benchmarks/train_bench.py --config=S --devices=2 --batch=8      # one row (one process)
  python benchmarks/train_bench.py --config=tiny --devices=1,2,4,8       # one process per count
  python benchmarks/train_bench.py --config=S --devices=2 --json=out.json

One process per fake-device count (XLA_FLAGS=--xla_force_host_platform_device_count=N must be set
before jax is imported, so the parent starts a child per count). In each child:

  * the trainer's real update step (`Trainer.lower_train_step().compile()`: sharded, donated,
    AdamW + EMA + finite checks) on random data, with cached encoder tokens, so the step is the
    denoiser's (the in-graph encoder's cost is benchmarks/encoder_bench.py's business);
  * FLOPs per step: `cost_analysis()['flops']` of the same step compiled for ONE device at the
    same global batch (the model's FLOPs, independent of how it is partitioned);
  * the peak: a jitted float32 [n, n] @ [n, n] matmul on one device (which uses every core; best
    of 3), measured in the same process before and after every timed step, so a neighbour's
    load hits both;
  * per step: MFU = FLOPs / step time / mean(peak before, peak after). Reported: the median
    and best of those ratios, and the median step time and peak (absolute numbers drift with
    the machine's load; the ratios much less).

Configs: 'tiny' = experiments/semantica_tiny.py's denoiser (16/32/64 channels, 32 px, batch 32,
17 DINOv2-S tokens: 4x4 patches + CLS); 'S' = experiments/semantica_base.py's S denoiser at 64 px (128/256/512,
85 M params, 257 DINOv2-B tokens of 768) in float32 (bfloat16 is emulated and slow on CPU).
Everything else is the experiment's config; `--set=model.remat=True` style overrides apply.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _set_devices_env(n: int) -> None:
    """N fake CPU devices (set before jax is imported); n == 0: the host's real devices
    (GPU/TPU), platform left to JAX."""
    if n == 0:
        return
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


# ============================================================================ configs
def bench_config(name: str, batch: int = 0, overrides: tuple[str, ...] = ()):
    """The benchmark's config: the experiment's denoiser with cached (random) encoder tokens."""
    if REPO not in sys.path:
        sys.path.append(REPO)  # appended: a PYTHONPATH copy of semantica_jax (A/B runs) wins
    from experiments import semantica_base, semantica_tiny

    if name == "tiny":
        c = semantica_tiny.get_config("encoder=random")
        # the main job's token shapes: DINOv2-S/14 at 56 px = CLS + 4x4 patches, width 384
        c.encoder.size, c.encoder.image_size = "S", 56
    elif name in ("S", "B", "L"):
        c = semantica_base.get_config(f"size={name}")
        c.model.dtype = "float32"
        c.encoder.dtype = "float32"
    else:
        raise ValueError(f"unknown benchmark config {name!r}; expected tiny, S, B or L")
    c.encoder.cached_tokens = True
    c.encoder.allow_random_init = True
    c.encoder.weights = ""
    c.data.train_files = c.data.eval_files = ""
    c.mesh.data, c.mesh.fsdp, c.mesh.model = -1, 1, 1
    c.mesh.dcn_data, c.mesh.dcn_fsdp, c.mesh.dcn_model = -1, 1, 1
    if batch:
        c.batch_size = batch
    for item in overrides:
        key, _, value = item.partition("=")
        node = c
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        import ast
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
        node[leaf] = value
    return c


# ============================================================================ in-process pieces
PEAK_DTYPE = "float32"  # --peak_dtype: bfloat16 for a GPU/TPU run of a bfloat16 config


def matmul_peak(n: int = 2048, reps: int = 5):
    """Best FLOP/s of a jitted [n, n] @ [n, n] (PEAK_DTYPE) on the first device (all cores)."""
    import jax
    import jax.numpy as jnp

    dev = jax.devices()[0]
    dt = jnp.dtype(PEAK_DTYPE)
    a = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (n, n), dt), dev)
    b = jax.device_put(jax.random.normal(jax.random.PRNGKey(1), (n, n), dt), dev)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def step_flops(config) -> float:
    """FLOPs of one update step at the global batch, from XLA's cost analysis on one device
    (with XLA convolutions, see below)."""
    import jax
    from semantica_jax import train

    from semantica_jax import sharding

    one = config.copy_and_resolve_references()
    one.mesh.data, one.mesh.fsdp, one.mesh.model = -1, 1, 1
    # The model's FLOPs, whatever computes the convolutions: XLA counts a convolution's valid
    # taps only, while im2col GEMMs also count the zero padding (+4 % for S at 64 px).
    one.model.conv_impl = "xla"
    mesh = sharding.create_mesh(one.mesh, jax.devices()[:1])
    config = one
    trainer = train.build_trainer(config, mesh)
    cost = trainer.lower_train_step().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def random_batch(trainer, seed: int = 0):
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    out = {}
    for k, s in trainer.abstract_batch().items():
        x = rng.standard_normal(s.shape).astype(np.float32)
        if k == "target":
            x = np.clip(x, -1, 1)
        out[k] = jax.device_put(jnp.asarray(x, s.dtype), s.sharding)
    return out


def bench_step(config, *, rounds: int = 3, steps_per_round: int = 3, peak_n: int = 2048,
               profile_dir: str = "", keep: dict | None = None) -> dict:
    """Times the trainer's compiled step; returns a dict of numbers (see module docstring).

    `keep`, when given, receives the trainer, final state and encoder params (for reuse)."""
    import jax
    from semantica_jax import train

    flops = step_flops(config)
    trainer = train.build_trainer(config)
    t0 = time.perf_counter()
    compiled = trainer.lower_train_step().compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    state = trainer.init_state(jax.random.PRNGKey(0))
    enc_params = trainer.load_encoder_params()
    batch = random_batch(trainer)
    state, _, ok = compiled(state, enc_params, batch)  # warm-up
    jax.block_until_ready(state)
    # Each timed step sits between two peak samples; its MFU uses their mean, so a neighbour's
    # load that slows the step also lowers the peak it is compared with.
    peaks, times = [matmul_peak(peak_n, 3)], []
    for _ in range(rounds * steps_per_round):
        t0 = time.perf_counter()
        state, m, ok = compiled(state, enc_params, batch)
        jax.block_until_ready((state, ok))
        times.append(time.perf_counter() - t0)
        peaks.append(matmul_peak(peak_n, 3))
    if profile_dir:
        jax.profiler.start_trace(profile_dir)
        for _ in range(2):
            state, m, ok = compiled(state, enc_params, batch)
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
    if keep is not None:
        keep.update(trainer=trainer, state=state, enc=enc_params)
    ratios = [flops / t / (0.5 * (peaks[i] + peaks[i + 1])) for i, t in enumerate(times)]
    med, best = statistics.median(times), min(times)
    pk = statistics.median(peaks)
    return {
        "config": None,
        "devices": jax.device_count(),
        "batch": int(config.batch_size),
        "image_size": int(config.data.image_size),
        "params_M": trainer.num_params / 1e6,
        "flops_per_step": flops,
        "compile_s": compile_s,
        "step_s_median": med,
        "step_s_min": best,
        "examples_per_s": config.batch_size / med,
        "achieved_gflops": flops / med / 1e9,
        "peak_gflops": pk / 1e9,
        "peak_gflops_samples": [p / 1e9 for p in peaks],
        "mfu_median": statistics.median(ratios),
        "mfu_best": max(ratios),
        "mfu_samples": ratios,
        "compiled_bytes_per_device": {
            "peak": getattr(mem, "peak_memory_in_bytes", None),
            "temp": mem.temp_size_in_bytes,
            "arguments": mem.argument_size_in_bytes,
            "outputs": mem.output_size_in_bytes,
        } if mem is not None else None,
    }


# ============================================================================ driver
def run_child(config_name: str, devices: int, batch: int, args_extra: list[str],
              timeout: float = 1800) -> dict:
    """Runs one (config, device count) measurement in a fresh process; returns its JSON row."""
    cmd = [sys.executable, os.path.abspath(__file__), f"--config={config_name}",
           f"--devices={devices}", f"--batch={batch}", "--child", *args_extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"train_bench child failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")


def format_row(r: dict) -> str:
    return (f"| {r['config']} | {r['devices']} | {r['batch']} | {r['image_size']} | "
            f"{r['params_M']:.1f} | {r['flops_per_step'] / 1e9:.1f} | {r['step_s_median']:.3f} | "
            f"{r['examples_per_s']:.1f} | {r['achieved_gflops']:.1f} | {r['peak_gflops']:.1f} | "
            f"{100 * r['mfu_median']:.1f} % | {100 * r['mfu_best']:.1f} % |")


HEADER = ("| config | devices | batch | px | params (M) | GFLOP/step | s/step (median) | examples/s | "
          "GFLOP/s | matmul peak GFLOP/s | MFU (median) | MFU (best) |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")

DEFAULT_BATCH = {"tiny": 32, "S": 8, "B": 8, "L": 8}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny,S")
    p.add_argument("--devices", default="1,2",
                   help="fake CPU device counts, one process each; 0 = the host's real devices (GPU)")
    p.add_argument("--batch", type=int, default=0, help="global batch; 0 = per-config default")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--peak_n", type=int, default=2048)
    p.add_argument("--peak_dtype", default="float32", help="dtype of the peak matmul")
    p.add_argument("--set", action="append", default=[], help="config override key=value")
    p.add_argument("--profile_dir", default="")
    p.add_argument("--json", default="")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    global PEAK_DTYPE
    PEAK_DTYPE = args.peak_dtype
    if args.child:
        _set_devices_env(int(args.devices))
        config = bench_config(args.config, args.batch, tuple(args.set))
        row = bench_step(config, rounds=args.rounds, steps_per_round=args.steps,
                         peak_n=args.peak_n, profile_dir=args.profile_dir)
        row["config"] = args.config + ("" if not args.set else " " + " ".join(args.set))
        print(json.dumps(row), flush=True)
        return [row]

    extra = [f"--rounds={args.rounds}", f"--steps={args.steps}", f"--peak_n={args.peak_n}",
             f"--peak_dtype={args.peak_dtype}",
             *[f"--set={s}" for s in args.set]]
    rows = []
    print(HEADER, flush=True)
    for name in args.config.split(","):
        for n in [int(d) for d in args.devices.split(",")]:
            batch = args.batch or DEFAULT_BATCH[name]
            row = run_child(name, n, batch, extra)
            rows.append(row)
            print(format_row(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
