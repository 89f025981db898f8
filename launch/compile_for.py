r"""Ahead-of-time compile of the train step for hardware this host does not have.

  python launch/compile_for.py --config=experiments/semantica_base.py --topology=v5e-256
  python launch/compile_for.py --config=experiments/semantica_base.py:size=L,fsdp \
      --topology=v5e-256,v5p-128 --markdown
  python launch/compile_for.py --config=experiments/semantica_base.py --topology=h100-8
  python launch/compile_for.py --config=experiments/semantica_base.py --topology=v5e-256 --plan
  python launch/compile_for.py --from_json=plans.jsonl --markdown     # re-print an earlier --json run

Builds the config's sharded ABSTRACT train state and batch on a mesh of compile-only devices
(`jax.experimental.topologies`: libtpu for TPU pods, the CUDA PJRT plugin for H100 nodes), compiles
the jitted, state-donating update step and prints, per device: peak memory against the chip's HBM
(fits / does not fit, headroom), FLOPs per step and the compile time. Runs on a CPU-only host; the
executables cannot run here. Config overrides work as for main.py (`--config.mesh.fsdp=-1`).

`--plan` picks the per-device batch for a target: it compiles the step at `--plan_probes` per-device
batches (default 1 and 4) and at the config's own batch, fits per-device peak memory (through the two
largest compiled batches) and FLOPs linearly in the batch, and prints for
every power-of-two batch up to the largest that keeps `--headroom` (20%) of the HBM free: memory,
compute time at `--mfu` (50%) of the bf16 peak, the gradient all-reduce / reduce-scatter + all-gather
time at the chip's documented ICI / DCN bandwidth, which of the two bounds the step, examples/s per
device and device-hours per 100 M training pairs (semantica_jax/hardware.py has the model and the
figures). It recommends the smallest batch that is compute-bound and computes for at least
`--plan_min_step_ms` (10 ms) per step, compiles it to check its memory, and says
whether the config's own batch is compute-bound. Every compile also prints its roofline.

Needs `pip install 'jax[tpu]==0.10.2'` (libtpu 0.0.42.1) for TPU targets and
`pip install jax-cuda12-plugin==0.10.2` for GPU targets, in the same venv.

Numbers, and what they mean:
  * peak: `compiled.memory_analysis().peak_memory_in_bytes` (params, optimizer state, batch and
    temporaries of one device). TPU compilation itself fails with RESOURCE_EXHAUSTED when the step
    does not fit; that is reported as "does not fit". On GPU nothing fails at compile time, and
    JAX may use only XLA_PYTHON_CLIENT_MEM_FRACTION of the HBM (default 0.75; 0.90 in
    launch/gpu_slurm.sbatch; --gpu_mem_fraction here). GPU targets compile with cuBLAS GEMMs
    (xla_gpu_enable_triton_gemm=False): without a GPU to autotune on, XLA's default Triton
    tilings fail on some f32 dots.
  * FLOPs: `compiled.cost_analysis()['flops']` per device (TPU; XLA's GPU compiler gives none).
    XLA counts a loop body once, so a scanned model would be undercounted; the UNet and ViT here
    unroll their blocks, and the tool reports any while loop left in the compiled program. The
    cross-check is the FLOPs of the
    UNPARTITIONED step (lowered for one CPU device, before optimisation) divided by the device
    count: what each device would do with perfect sharding and no redundant work.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any, Sequence

# The host stays on its CPU; targets are compile-only devices (see topology_devices for the
# libtpu environment).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from semantica_jax import hardware  # noqa: E402  (pure arithmetic; no JAX import)

GIB = hardware.GIB


# ============================================================================ targets
@dataclasses.dataclass(frozen=True)
class Target:
    """A named pod slice or GPU node: how to get its compile-only devices and its chip specs."""

    name: str
    chip: str  # key of semantica_jax.hardware.CHIPS
    platform: str  # 'tpu' | 'cuda'
    topology: str  # libtpu 'v5e:16x16' / CUDA '<partitions>x<hosts>x<gpus per host>'
    num_devices: int
    hbm_bytes: int  # per device
    peak_bf16_flops: float  # per device, dense
    chip_config_name: str | None = None  # TPU: 'megacore' (v4, v5p) | 'default'
    chips_per_host_bounds: tuple[int, int, int] | None = None
    wrap: tuple[bool, bool, bool] | None = None


# Chip families as libtpu names them; HBM, peak and bandwidths per chip are semantica_jax.hardware.CHIPS.
_CHIPS = {
    "v4": dict(libtpu="v4", cores_per_chip=2, dims=3),
    "v5p": dict(libtpu="v5", cores_per_chip=2, dims=3),
    "v5e": dict(libtpu="v5e", cores_per_chip=1, dims=2),
    "v6e": dict(libtpu="v6e", cores_per_chip=1, dims=2),
}
_ALIASES = {"v5litepod": "v5e"}
# Chips -> slice shape. 2-D (v5e, v6e): as sold; 3-D (v4, v5p): the power-of-two cuboids.
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
              256: (16, 16)}
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
              128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
              2048: (8, 16, 16), 4096: (16, 16, 16)}
GPUS_PER_HOST = 8


def target_for(name: str) -> Target:
    """Maps a pod or node name to its topology.

    TPU: `v5e-N` / `v5litepod-N` and `v6e-N` (N = chips), `v4-N` and `v5p-N` (N = TensorCores =
    2 x chips, one megacore device per chip). GPU: `h100-N` (N = GPUs, 8 per host; `8xh100` =
    `h100-8`).
    """
    key = name.strip().lower()
    m = re.fullmatch(r"(\d+)xh100", key)
    if m:
        key = f"h100-{m.group(1)}"
    m = re.fullmatch(r"h100-(\d+)", key)
    if m:
        n, per_host = int(m.group(1)), GPUS_PER_HOST
        if n < 1 or n % per_host:
            raise ValueError(f"--topology={name}: H100 targets are whole {per_host}-GPU hosts (h100-8, h100-16, ...)")
        h100 = hardware.CHIPS["h100"]
        return Target(name=f"h100-{n}", chip="h100", platform="cuda",
                      topology=f"1x{n // per_host}x{per_host}", num_devices=n,
                      hbm_bytes=h100.hbm_bytes, peak_bf16_flops=h100.peak_bf16_flops)
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", key)
    family = _ALIASES.get(m.group(1), m.group(1)) if m else None
    if family not in _CHIPS:
        raise ValueError(
            f"--topology={name}: unknown target; expected v5e-N, v5litepod-N, v6e-N, v4-N, v5p-N "
            "or h100-N (e.g. v5e-256, v4-64, v5p-128, v6e-64, h100-8)"
        )
    chip = _CHIPS[family]
    chips, rem = divmod(int(m.group(2)), chip["cores_per_chip"])
    shapes = _SHAPES_2D if chip["dims"] == 2 else _SHAPES_3D
    if rem or chips not in shapes:
        unit = "chips" if chip["cores_per_chip"] == 1 else "TensorCores (2 per chip)"
        sizes = sorted(c * chip["cores_per_chip"] for c in shapes)
        raise ValueError(f"--topology={name}: {family} slices have {sizes} {unit}")
    shape = shapes[chips]
    if len(shape) == 2:
        # One host drives 4 chips (2x2), except the 8-chip single-host slices (2x4); 16-chip
        # rings close into a torus.
        per_host = (2, 4, 1) if chips == 8 else (min(shape[0], 2), min(shape[1], 2), 1)
        wrap = (shape[0] == 16, shape[1] == 16, False)
        chip_config = "default"
    else:
        per_host = (2, 2, 1)
        wrap = (all(s % 4 == 0 for s in shape),) * 3  # full 4x4x4 cubes and up are tori
        chip_config = "megacore"
    return Target(
        name=f"{family}-{int(m.group(2))}", chip=family, platform="tpu",
        topology=f"{chip['libtpu']}:{'x'.join(map(str, shape))}", num_devices=chips,
        hbm_bytes=hardware.CHIPS[family].hbm_bytes,
        peak_bf16_flops=hardware.CHIPS[family].peak_bf16_flops, chip_config_name=chip_config,
        chips_per_host_bounds=per_host, wrap=wrap,
    )


# A GpuTargetConfigProto for one H100 SXM 80GB (hardware facts; the CUDA plugin compiles for it
# without a GPU).
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84942979072
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 patch: 0 }
runtime_version { major: 12 minor: 8 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


def topology_devices(target: Target, num_slices: int = 1) -> list[Any]:
    """Compile-only devices of `target` (x `num_slices` TPU slices)."""
    from jax.experimental import topologies

    if target.platform == "tpu":
        # libtpu looks for TPU metadata unless told the host's (irrelevant) accelerator type and
        # workers; these do not constrain the target topology.
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-16")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        # Compile-only use needs no exclusive TPU access; without this, any other process that
        # loaded libtpu (a JAX program run without JAX_PLATFORMS=cpu) holds /tmp/libtpu_lockfile
        # and libtpu refuses to load ("Internal error when accessing libtpu multi-process lockfile").
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        try:
            return list(topologies.get_topology_desc(
                target.topology, platform="tpu", chip_config_name=target.chip_config_name,
                chips_per_host_bounds=target.chips_per_host_bounds, num_slices=num_slices,
                wrap=target.wrap,
            ).devices)
        except (ImportError, RuntimeError) as e:
            raise RuntimeError(
                f"cannot load libtpu for {target.name}: pip install 'jax[tpu]==0.10.2' ({e})"
            ) from e
    if num_slices != 1:
        raise ValueError("--num_slices applies to TPU targets; name more GPUs instead (h100-16)")
    try:
        return list(topologies.get_topology_desc(
            "h100", "cuda", topology=target.topology, target_config=H100_TARGET_CONFIG
        ).devices)
    except (ImportError, RuntimeError) as e:
        raise RuntimeError(
            f"cannot load the CUDA plugin for {target.name}: pip install jax-cuda12-plugin==0.10.2 ({e})"
        ) from e


# ============================================================================ compile + report
@dataclasses.dataclass
class Report:
    """What compiling the train step for one target gave (per-device numbers)."""

    target: str
    platform: str  # 'tpu' | 'cuda'
    topology: str
    num_slices: int
    devices: int
    processes: int
    mesh: dict[str, int]
    params: int
    global_batch: int
    batch_per_process: int
    hbm_bytes: int
    usable_bytes: int  # what JAX may allocate of the HBM
    peak_bytes: int | None  # None when compilation ran out of memory
    argument_bytes: int | None
    temp_bytes: int | None
    fits: bool
    headroom: float | None  # 1 - peak / usable
    flops_compiled: float | None  # per device, XLA cost analysis of the compiled step
    flops_program: float | None  # unpartitioned step / devices
    while_loops: int | None  # loops in the compiled program (their bodies count once in FLOPs)
    peak_bf16_flops: float
    lower_s: float
    compile_s: float
    error: str | None = None
    # kind -> [ops, result bytes per device] of the compiled program's collectives
    collectives: dict[str, list[float]] | None = None
    ici: dict[str, int] | None = None  # mesh factors inside a granule (None: the whole mesh)
    dcn: dict[str, int] | None = None  # ... and across granules (None: one granule)
    remat: bool = False
    # Bytes per parameter of the gradient collectives: XLA reduces the gradient at the compute
    # dtype (bfloat16 steps all-reduce 2 bytes per parameter; measured, see collectives).
    grad_bytes: int = 4

    def estimate(self, mfu: float = hardware.DEFAULT_MFU) -> hardware.StepEstimate | None:
        """The roofline of this compiled step (semantica_jax.hardware), None without a FLOP count."""
        flops = self.flops_compiled or self.flops_program
        if not flops or self.peak_bytes is None:
            return None
        collectives = hardware.gradient_collectives(
            self.params, ici=self.ici or self.mesh, dcn=self.dcn, remat=self.remat,
            param_bytes=self.grad_bytes)
        return hardware.estimate_step(
            hardware.CHIPS[target_for(self.target).chip], flops_per_device=flops,
            batch_per_device=self.global_batch / self.devices, collectives=collectives, mfu=mfu,
            compiled_collectives=self.collectives, devices=self.devices)

    def text(self) -> str:
        """The human-readable block compile_for prints."""
        gib = lambda b: f"{b / GIB:.2f} GiB"
        mesh = ", ".join(f"{k}={v}" for k, v in self.mesh.items())
        lines = [
            f"target     {self.target} ({self.topology}{f' x {self.num_slices} slices' if self.num_slices > 1 else ''}): "
            f"{self.devices} devices, {self.processes} hosts, mesh ({mesh})",
            f"model      {self.params / 1e6:.1f} M params; global batch {self.global_batch} "
            f"({self.batch_per_process} per host, {self.global_batch / self.devices:g} per device)",
        ]
        if self.peak_bytes is None:
            lines.append(f"memory     DOES NOT FIT: {self.error}")
        else:
            verdict = "fits" if self.fits else "DOES NOT FIT"
            lines.append(
                f"memory     peak {gib(self.peak_bytes)} of {gib(self.usable_bytes)} usable per device "
                f"({gib(self.hbm_bytes)} HBM): {verdict}, headroom {100 * self.headroom:.1f}% "
                f"(arguments {gib(self.argument_bytes)}, temporaries {gib(self.temp_bytes)})"
            )
        if self.flops_compiled:
            flops = [f"compiled {self.flops_compiled:.3e}"]
        elif self.error:
            flops = ["compiled n/a (compilation failed)"]
        else:
            flops = ["compiled n/a (XLA:GPU has no cost analysis)"]
        if self.flops_program:
            flops.append(f"unpartitioned step / devices {self.flops_program:.3e}")
        if self.while_loops:
            flops.append(f"{self.while_loops} while loop(s) in the program: their bodies count once")
        lines.append(f"flops/step {'; '.join(flops)} per device")
        best = self.flops_compiled or self.flops_program
        if best:
            lines.append(f"           = {1e3 * best / self.peak_bf16_flops:.3g} ms per step at 100% of the "
                         f"{self.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16 peak")
        est = self.estimate()
        if est is not None:
            lines.append(
                f"roofline   compute {1e3 * est.compute_s:.2f} ms at {100 * est.mfu:.0f}% of peak, "
                f"communication {1e3 * (est.ici_s + est.dcn_s):.2f} ms (model) / "
                f"{1e3 * est.compiled_comm_s:.2f} ms (compiled collectives): {est.bound}-bound; "
                f"{est.examples_per_s:.1f} "
                f"examples/s/device, {est.chip_hours_per_budget:.0f} device-hours per 100 M pairs")
        lines.append(f"time       lower {self.lower_s:.1f} s, compile {self.compile_s:.1f} s (this host)")
        return "\n".join(lines)

    def markdown_row(self) -> str:
        mesh = "×".join(str(v) for v in self.mesh.values())
        if self.peak_bytes is None:
            memory = "—"
            fits = "no (compile OOM)"
        else:
            memory = f"{self.peak_bytes / GIB:.2f} / {self.usable_bytes / GIB:.2f}"
            fits = f"{'yes' if self.fits else 'no'} ({100 * self.headroom:.0f}%)"
        fc = f"{self.flops_compiled / 1e12:.3f}" if self.flops_compiled else "n/a"
        fp = f"{self.flops_program / 1e12:.3f}" if self.flops_program else "n/a"
        return (f"| {self.target} | {self.devices} / {self.processes} | {mesh} | "
                f"{self.global_batch / self.devices:g} | {memory} | {fits} | {fc} | {fp} | "
                f"{self.compile_s:.0f} |")


MARKDOWN_HEADER = (
    "| target | devices / hosts | mesh data×fsdp×model | batch/device | peak / usable GiB per device "
    "| fits (headroom) | TFLOP/step/device compiled | unpartitioned ÷ devices | compile s |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def _cost(stage: Any) -> dict | None:
    cost = stage.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return cost or None


def program_flops(config: Any) -> float:
    """FLOPs of the whole (unpartitioned) train step: lowered for one CPU device, unoptimised."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    from semantica_jax import sharding, train

    cpu = jax.devices("cpu")[:1]
    mesh = Mesh(np.asarray(cpu).reshape(1, 1, 1), sharding.MESH_AXES,
                axis_types=(jax.sharding.AxisType.Auto,) * 3)
    cost = _cost(train.build_trainer(config, mesh=mesh).lower_train_step())
    return float(cost["flops"]) if cost and "flops" in cost else float("nan")


def compile_report(
    config: Any, target: Target, *, num_slices: int = 1, gpu_mem_fraction: float = 0.90,
    flops_program_total: float | None = None,
) -> Report:
    """Compiles the train step of `config` for `target`; never touches device memory."""
    import jax
    import jax.numpy as jnp

    from semantica_jax import sharding, train

    devices = topology_devices(target, num_slices)
    mesh = sharding.create_mesh(config.mesh, devices)
    per_process = sharding.per_process_batch_size(config.batch_size, mesh)
    t0 = time.perf_counter()
    trainer = train.build_trainer(config, mesh=mesh)
    lowered = trainer.lower_train_step()
    lower_s = time.perf_counter() - t0
    usable = int(target.hbm_bytes * (gpu_mem_fraction if target.platform == "cuda" else 1.0))
    _, granules = sharding.device_granules(devices)
    shape = sharding.resolve_mesh_shape(config.mesh, len(devices), len(granules))
    common = dict(
        ici=dict(zip(sharding.MESH_AXES, shape.ici)), dcn=dict(zip(sharding.MESH_AXES, shape.dcn)),
        remat=bool(config.model.remat), grad_bytes=int(jnp.dtype(config.model.dtype).itemsize),
        target=target.name, platform=target.platform, topology=target.topology,
        num_slices=num_slices, devices=mesh.size,
        processes=len({d.process_index for d in devices}), mesh=dict(mesh.shape),
        params=trainer.num_params, global_batch=int(config.batch_size),
        batch_per_process=per_process, hbm_bytes=target.hbm_bytes, usable_bytes=usable,
        flops_program=None if flops_program_total is None else flops_program_total / mesh.size,
        peak_bf16_flops=target.peak_bf16_flops, lower_s=lower_s,
    )
    # Without a GPU, XLA cannot autotune Triton GEMM tilings, and its defaults fail on some f32
    # dots ("Couldn't find output tile sizes"); cuBLAS GEMMs compile.
    options = {"xla_gpu_enable_triton_gemm": False} if target.platform == "cuda" else None
    t0 = time.perf_counter()
    try:
        compiled = lowered.compile(compiler_options=options)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return Report(**common, peak_bytes=None, argument_bytes=None, temp_bytes=None, fits=False,
                      headroom=None, flops_compiled=None, while_loops=None, collectives=None,
                      compile_s=time.perf_counter() - t0,
                      error=str(e).strip().splitlines()[0])
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    peak = int(getattr(mem, "peak_memory_in_bytes", 0)) or (
        mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    )
    cost = _cost(compiled)
    text = compiled.as_text()
    return Report(
        **common, peak_bytes=peak, argument_bytes=int(mem.argument_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes), fits=peak <= usable, headroom=1.0 - peak / usable,
        flops_compiled=float(cost["flops"]) if cost and "flops" in cost else None,
        while_loops=len(re.findall(r"\swhile\(", text)), collectives=collective_bytes(text),
        compile_s=compile_s,
    )


_COLLECTIVE_OP = re.compile(
    r"\s(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(-start)?\(")
_ARRAY_TYPE = re.compile(r"\b(pred|[su](?:8|16|32|64)|f8e\w+|bf16|f16|f32|f64|c64|c128)\[([0-9,]*)\]")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


def collective_bytes(hlo_text: str) -> dict[str, list[float]]:
    """Collectives of a compiled program: kind -> [number of ops, result bytes per device].

    The result of an all-reduce is the reduced buffer, of an all-gather the gathered one, of a
    reduce-scatter the device's shard (the `-start` halves of async pairs are counted; an
    all-gather-start's result tuple holds its operands first, which are left out). Ops inside a
    while loop count once. A cross-check of the analytic traffic in semantica_jax.hardware."""
    out: dict[str, list[float]] = {}
    for line in hlo_text.splitlines():
        m = _COLLECTIVE_OP.search(line)
        if not m or " = " not in line[: m.start()]:
            continue
        arrays = _ARRAY_TYPE.findall(line[line.index(" = ") + 3: m.start()])
        if m.group(2) and m.group(1) in ("all-gather", "collective-permute"):
            arrays = arrays[len(arrays) // 2:] if m.group(1) == "all-gather" else arrays[:1]
        size = sum(_DTYPE_BYTES.get(t, 1) * math.prod(int(d) for d in dims.split(",") if d)
                   for t, dims in arrays)
        entry = out.setdefault(m.group(1), [0, 0.0])
        entry[0] += 1
        entry[1] += size
    return out


def prepare_config(config: Any) -> Any:
    """The config as compiled: shapes only, so a random-init encoder stands in for missing weights."""
    if not config.encoder.weights:
        with config.unlocked():
            config.encoder.allow_random_init = True
    return config


# ============================================================================ per-topology plan
def _with_batch(config: Any, global_batch: int) -> Any:
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.batch_size = int(global_batch)
    return config


def plan_target(
    config: Any, target: Target, *, num_slices: int = 1, gpu_mem_fraction: float = 0.90,
    mfu: float = hardware.DEFAULT_MFU, headroom: float = 0.2, probes: Sequence[int] = (1, 4),
    max_batch: int = 1024, min_step_s: float = hardware.MIN_STEP_S, check_config: bool = True,
    log=print,
) -> hardware.Plan:
    """Per-device batches for `config` on `target`: memory from compiles, the step's roofline.

    Compiles the step at the `probes` per-device batches and (unless `check_config` is False) at
    the config's own batch, then `hardware.build_plan`; the batch it recommends is compiled too, to check
    its memory. GPU targets take FLOPs from the unpartitioned program (XLA:GPU gives no cost
    analysis).
    """
    from semantica_jax import sharding

    devices = topology_devices(target, num_slices)
    _, granules = sharding.device_granules(devices)
    shape = sharding.resolve_mesh_shape(config.mesh, len(devices), len(granules))
    batch_shards = shape.shape[0] * shape.shape[1]  # data x fsdp
    reports: dict[int, Report] = {}

    def compile_at(b: int) -> Report:
        log(f"           compiling {target.name} at {b} per batch shard (global batch {b * batch_shards})",
            flush=True)
        cfg = _with_batch(config, b * batch_shards)
        total = program_flops(cfg) if target.platform == "cuda" else None
        report = compile_report(cfg, target, num_slices=num_slices, gpu_mem_fraction=gpu_mem_fraction,
                                flops_program_total=total)
        reports[b] = report
        log("\n".join("           " + l for l in report.text().splitlines()), flush=True)
        return report

    own = config.batch_size / batch_shards
    # The config's own batch is compiled too, so that whether it fits is measured, not fitted.
    extra = {int(own)} if check_config and own == int(own) and 1 <= own <= max_batch else set()
    for b in sorted(set(probes) | extra):
        compile_at(b)
    return hardware.build_plan(target.name, hardware.CHIPS[target.chip], reports,
                               config_batch=int(config.batch_size), mfu=mfu,
                               headroom=headroom, max_batch=max_batch, min_step_s=min_step_s,
                               compile_at=compile_at)


# ============================================================================ command line
def _report_from_record(r: dict) -> Report:
    names = {f.name for f in dataclasses.fields(Report)}
    report = Report(**{k: v for k, v in r.items() if k in names})
    if "grad_bytes" not in r and r.get("collectives", {}).get("all-reduce"):
        # Records written before grad_bytes existed: read it off the compiled all-reduces.
        report.grad_bytes = 2 if r["collectives"]["all-reduce"][1] / r["params"] < 3 else 4
    return report


def read_json(path: str) -> list[Report | tuple[dict, dict[int, Report]]]:
    """An earlier `--json` file: compile reports, and for plan records (record, compiles by batch
    per batch shard)."""
    out: list = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON line ({e})") from e
            if "plan" not in record:
                out.append(_report_from_record(record))
                continue
            plan, reports = record["plan"], {}
            for r in plan["compiles"]:
                report = _report_from_record(r)
                reports[report.global_batch // (report.mesh["data"] * report.mesh["fsdp"])] = report
            out.append((plan, reports))
    return out


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _FROM_JSON.value:
        reports, plans = [], []
        for item in read_json(_FROM_JSON.value):
            if isinstance(item, Report):
                reports.append(item)
                print(item.text())
                continue
            record, compiled = item
            target = target_for(record["target"])
            plans.append(hardware.build_plan(
                target.name, hardware.CHIPS[target.chip], compiled, config_batch=record["config_batch"],
                                    mfu=_MFU.value, headroom=_HEADROOM.value, max_batch=_PLAN_MAX_BATCH.value,
                                    min_step_s=_PLAN_MIN_STEP_MS.value / 1e3))
            print(plans[-1].text())
        if _MARKDOWN.value and reports:
            print("\n" + MARKDOWN_HEADER + "\n" + "\n".join(r.markdown_row() for r in reports))
        if _MARKDOWN.value and plans:
            print("\n" + hardware.PLAN_MARKDOWN_HEADER + "\n" + "\n".join(p.markdown_row() for p in plans))
        return
    config = prepare_config(_CONFIG.value)
    targets = [target_for(t) for t in _TOPOLOGY.value.split(",") if t.strip()]
    if not targets:
        raise app.UsageError("--topology is empty")
    print(f"config     {_CONFIG_PATH()}", flush=True)
    if _PLAN.value:
        plans = []
        for target in targets:
            plan = plan_target(
                config, target, num_slices=_NUM_SLICES.value, gpu_mem_fraction=_GPU_MEM_FRACTION.value,
                mfu=_MFU.value, headroom=_HEADROOM.value,
                probes=[int(b) for b in _PLAN_PROBES.value], max_batch=_PLAN_MAX_BATCH.value,
                min_step_s=_PLAN_MIN_STEP_MS.value / 1e3, check_config=_PLAN_CHECK_CONFIG.value)
            plans.append(plan)
            print(plan.text(), flush=True)
            if _JSON.value:
                with open(_JSON.value, "a") as f:
                    f.write(json.dumps({"config": _CONFIG_PATH(), "plan": plan.record()}) + "\n")
        if _MARKDOWN.value:
            print("\n" + hardware.PLAN_MARKDOWN_HEADER)
            for p in plans:
                print(p.markdown_row())
        if any(p.recommended is None for p in plans):
            sys.exit(1)
        return
    t0 = time.perf_counter()
    total = program_flops(config)
    print(f"           unpartitioned step: {total:.4e} FLOPs ({time.perf_counter() - t0:.1f} s)", flush=True)
    reports = []
    for target in targets:
        report = compile_report(config, target, num_slices=_NUM_SLICES.value,
                                gpu_mem_fraction=_GPU_MEM_FRACTION.value,
                                flops_program_total=None if math.isnan(total) else total)
        reports.append(report)
        print(report.text(), flush=True)
        if _JSON.value:
            with open(_JSON.value, "a") as f:
                f.write(json.dumps({"config": _CONFIG_PATH(), **dataclasses.asdict(report)}) + "\n")
    if _MARKDOWN.value:
        print("\n" + MARKDOWN_HEADER)
        for r in reports:
            print(r.markdown_row())
    if not all(r.fits for r in reports):
        sys.exit(1)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "Experiment config (experiments/*.py[:variant]).", lock_config=True)
    _TOPOLOGY = flags.DEFINE_string(
        "topology", None, "Comma-separated targets: v5e-N, v6e-N, v4-N, v5p-N, h100-N.")
    _NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "TPU multislice: number of slices.")
    _GPU_MEM_FRACTION = flags.DEFINE_float(
        "gpu_mem_fraction", 0.90, "Share of GPU HBM JAX may use (XLA_PYTHON_CLIENT_MEM_FRACTION).")
    _JSON = flags.DEFINE_string("json", None, "Append one JSON line per target to this file.")
    _MARKDOWN = flags.DEFINE_bool("markdown", False, "Also print a markdown table (docs/SCALE.md).")
    _PLAN = flags.DEFINE_bool(
        "plan", False, "Plan the per-device batch: compile at --plan_probes, fit memory and FLOPs, "
        "print each power-of-two batch's memory, roofline (compute vs communication) and "
        "device-hours per 100 M pairs, and recommend one (semantica_jax/hardware.py).")
    _MFU = flags.DEFINE_float("mfu", hardware.DEFAULT_MFU, "Plan: fraction of the bf16 peak the compute runs at.")
    _HEADROOM = flags.DEFINE_float("headroom", 0.2, "Plan: share of the usable HBM to keep free.")
    _PLAN_PROBES = flags.DEFINE_list("plan_probes", ["1", "4"], "Plan: per-device batches to compile.")
    _PLAN_MAX_BATCH = flags.DEFINE_integer("plan_max_batch", 1024, "Plan: largest per-device batch listed.")
    _PLAN_MIN_STEP_MS = flags.DEFINE_float(
        "plan_min_step_ms", 1e3 * hardware.MIN_STEP_S,
        "Plan: the recommended batch computes at least this long per step (fixed per-step costs "
        "are not modelled).")
    _PLAN_CHECK_CONFIG = flags.DEFINE_bool(
        "plan_check_config", True, "Plan: also compile the config's own batch (else its memory is fitted).")
    _FROM_JSON = flags.DEFINE_string(
        "from_json", None, "Print the reports (with their roofline) of an earlier --json file; "
        "compiles nothing, needs no --config / --topology.")
    flags.register_multi_flags_validator(
        ["config", "topology", "from_json"],
        lambda f: f["from_json"] is not None or (f["config"] is not None and f["topology"] is not None),
        message="--config and --topology are required (unless --from_json)")
    _CONFIG_PATH = lambda: config_flags.get_config_filename(flags.FLAGS["config"])
    app.run(main)
