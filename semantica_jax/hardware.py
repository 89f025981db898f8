"""Accelerator facts and the roofline of a data-parallel / FSDP train step on them.

What a team budgets a pod run with: for a chip generation, its memory, bf16 peak and interconnect
bandwidths (`CHIPS`, each figure from the vendor page in `Chip.source`), and for a step with a known
FLOP count per chip and a known sharding, the time its compute and its gradient communication take
(`estimate_step`), which of the two bounds the step, and the chip-hours per 100 M training pairs;
and the per-topology plan built from compiles at several batches (`build_plan`: memory and FLOPs
fitted in the batch, one roofline row per power-of-two batch, a recommended batch).
`launch/compile_for.py --plan` runs the compiles and feeds them in; docs/SCALE.md explains the
model and its tables. Pure arithmetic: nothing here imports JAX.

The model, per device and step:
  * compute = FLOPs / (bf16 peak x `mfu`), `mfu` the assumed fraction of the peak the step reaches;
  * communication = the collectives that data parallelism and FSDP need, each at the bandwidth
    term of the ring (bucket) algorithm: an all-reduce of S bytes over n devices moves
    2 (n - 1) / n x S bytes through every device's links, a reduce-scatter or all-gather
    (n - 1) / n x S. Over an axis that spans granules (TPU slices, GPU hosts) the collective is
    hierarchical: the in-granule part on ICI / NVLink with S, the cross-granule part on DCN /
    the NICs with S / (devices of the axis in one granule).
  * Data parallelism all-reduces the gradient (`param_bytes` per parameter, divided by the FSDP
    and model shards: XLA reduces it at the compute dtype, 2 bytes for a bfloat16 step, as the
    compiled programs' all-reduces show); FSDP reduce-scatters it and all-gathers the parameters
    before the forward pass (and again for the backward pass when blocks are rematerialised).
  * The step takes max(compute, communication) when the gradient collectives overlap the
    backward pass (what XLA's asynchronous collectives aim for), compute + communication when
    they cannot; the plan reports both and calls a step communication-bound when communication exceeds
    `COMM_MARGIN` x compute, so that it stays hidden at half the documented bandwidth.
  * The recommended batch (`recommend`) is the smallest that fits, is compute-bound and computes
    for at least `MIN_STEP_S` per step.
Not modelled: the latency term of each collective (microseconds; it matters for very small
models), activation traffic of a `model` (tensor-parallel) axis, input-pipeline and host overheads.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

GIB = 1024**3
GB = 1e9

# A step is called communication-bound when its communication exceeds this fraction of its compute:
# at half the documented bandwidth it would then no longer hide under the backward pass.
COMM_MARGIN = 0.5
# The fraction of the bf16 peak the compute is assumed to run at (overridable per estimate).
DEFAULT_MFU = 0.5
PAIRS_BUDGET = 100e6  # chip-hours are quoted per this many training pairs
# The recommended batch computes for at least this long per step: the fixed costs of a step that
# the roofline leaves out (dispatch, kernel launches, collective latency, of the order of a
# millisecond) then stay at the 10 % level.
MIN_STEP_S = 0.010


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator generation, per chip (= one JAX device; v4 / v5p in megacore mode).

    ici_bytes_per_s: what one chip can put on its interconnect links in one direction, i.e. the
      bandwidth an all-reduce over the slice / node uses per chip (for TPUs the pages' "all-reduce
      bandwidth per Pod" / chips, or half the bidirectional ICI bandwidth per chip; for H100 half of
      NVLink's 900 GB/s bidirectional).
    dcn_bytes_per_s: the same between granules (TPU slices over the data-centre network, GPU hosts
      over their NICs); None where the vendor page gives no figure.
    """

    name: str
    hbm_bytes: int
    peak_bf16_flops: float
    ici_bytes_per_s: float
    dcn_bytes_per_s: float | None
    granule: str  # what a DCN hop connects: 'slice' (TPU) | 'host' (GPU)
    source: str


CHIPS = {
    "v4": Chip("v4", 32 * GIB, 275e12, ici_bytes_per_s=1.1e15 / 4096, dcn_bytes_per_s=None,
               granule="slice",
               source="https://cloud.google.com/tpu/docs/v4 (32 GiB HBM2, 275 TFLOP/s bf16, "
                      "all-reduce bandwidth 1.1 PB/s per 4,096-chip pod; no DCN figure)"),
    "v5e": Chip("v5e", 16 * GIB, 197e12, ici_bytes_per_s=400 * GB / 2, dcn_bytes_per_s=6.4e12 / 8 / 256,
                granule="slice",
                source="https://cloud.google.com/tpu/docs/v5e (16 GiB, 197 TFLOP/s bf16, ICI 400 GB/s "
                       "bidirectional per chip = all-reduce 51.2 TB/s per 256-chip pod, DCN 6.4 Tbps per pod)"),
    "v5p": Chip("v5p", 95 * GIB, 459e12, ici_bytes_per_s=1200 * GB / 2, dcn_bytes_per_s=50e9 / 8,
                granule="slice",
                source="https://cloud.google.com/tpu/docs/v5p (95 GiB, 459 TFLOP/s bf16, ICI 1,200 GB/s "
                       "bidirectional per chip, DCN 50 Gbps per chip)"),
    "v6e": Chip("v6e", 32 * GIB, 918e12, ici_bytes_per_s=800 * GB / 2, dcn_bytes_per_s=None,
                granule="slice",
                source="https://cloud.google.com/tpu/docs/v6e (32 GB, 918 TFLOP/s bf16, ICI 800 GB/s "
                       "bidirectional per chip = all-reduce 102.4 TB/s per 256-chip pod)"),
    # The "80 GB" H100 reports 84,942,979,072 bytes to CUDA.
    "h100": Chip("h100", 84_942_979_072, 989e12, ici_bytes_per_s=900 * GB / 2,
                 dcn_bytes_per_s=400e9 / 8, granule="host",
                 source="NVIDIA H100 SXM data sheet (80 GB HBM3, 989 TFLOP/s dense bf16, NVLink 900 GB/s "
                        "bidirectional); DGX H100 user guide (8 x 400 Gb/s ConnectX-7, one per GPU)"),
}


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective a step runs: `bytes` is S, the whole (unsharded over the group) buffer."""

    what: str  # e.g. 'gradient all-reduce (data)'
    kind: str  # 'all-reduce' | 'reduce-scatter' | 'all-gather'
    bytes: float
    ici_group: int  # devices of the axis inside one granule
    dcn_group: int  # granules the axis spans

    def seconds(self, chip: Chip) -> tuple[float, float]:
        """(ICI seconds, DCN seconds) of the ring algorithm's bandwidth term."""
        factor = {"all-reduce": 2.0, "reduce-scatter": 1.0, "all-gather": 1.0}[self.kind]
        ring = lambda n: factor * (n - 1) / n
        ici = ring(self.ici_group) * self.bytes / chip.ici_bytes_per_s
        if self.dcn_group <= 1:
            return ici, 0.0
        if chip.dcn_bytes_per_s is None:
            raise ValueError(f"{chip.name}: no documented DCN bandwidth, so a mesh across "
                             f"{self.dcn_group} {chip.granule}s cannot be estimated")
        return ici, ring(self.dcn_group) * (self.bytes / self.ici_group) / chip.dcn_bytes_per_s


def gradient_collectives(
    num_params: int, *, ici: dict[str, int], dcn: dict[str, int] | None = None,
    remat: bool = False, param_bytes: int = 4,
) -> list[Collective]:
    """The per-step collectives of data parallelism over `data` and FSDP over `fsdp`.

    `ici` / `dcn`: the resolved mesh factors inside a granule and across granules (keys 'data',
    'fsdp', 'model'); axis size = ici x dcn. Gradients and the all-gathered parameters are
    `param_bytes` wide: the compute dtype's width (2 for bfloat16, 4 for float32), since XLA
    reduces and gathers at the precision the step computes in.
    """
    dcn = dcn or {}
    size = lambda axis: ici.get(axis, 1) * dcn.get(axis, 1)
    total = param_bytes * num_params / size("model")
    out = []
    if size("fsdp") > 1:
        group = dict(ici_group=ici.get("fsdp", 1), dcn_group=dcn.get("fsdp", 1))
        out.append(Collective("gradient reduce-scatter (fsdp)", "reduce-scatter", total, **group))
        out.append(Collective("parameter all-gather, forward (fsdp)", "all-gather", total, **group))
        if remat:
            out.append(Collective("parameter all-gather, rematerialised backward (fsdp)",
                                  "all-gather", total, **group))
    if size("data") > 1:
        out.append(Collective("gradient all-reduce (data)", "all-reduce", total / size("fsdp"),
                              ici_group=ici.get("data", 1), dcn_group=dcn.get("data", 1)))
    return out


@dataclasses.dataclass(frozen=True)
class StepEstimate:
    """The roofline of one train step, per device."""

    batch_per_device: float
    flops: float  # per device
    compute_s: float
    ici_s: float  # the model's collectives (gradient_collectives) on ICI ...
    dcn_s: float  # ... and across granules
    mfu: float
    compiled_comm_s: float = 0.0  # the compiled program's own collectives (compiled_collective_seconds)

    @property
    def comm_s(self) -> float:
        """The larger of the model's and the compiled program's communication time."""
        return max(self.ici_s + self.dcn_s, self.compiled_comm_s)

    @property
    def step_s(self) -> float:
        """With the gradient collectives overlapped with the backward pass."""
        return max(self.compute_s, self.comm_s)

    @property
    def step_serial_s(self) -> float:
        """Without overlap: the communication after the compute (the pessimistic end)."""
        return self.compute_s + self.comm_s

    @property
    def bound(self) -> str:
        return "communication" if self.comm_s > COMM_MARGIN * self.compute_s else "compute"

    @property
    def examples_per_s(self) -> float:
        return self.batch_per_device / self.step_s

    @property
    def chip_hours_per_budget(self) -> float:
        """Chip-hours (device-hours) to train on PAIRS_BUDGET pairs, communication overlapped."""
        return PAIRS_BUDGET / self.examples_per_s / 3600.0

    @property
    def chip_hours_serial(self) -> float:
        """The same without overlap."""
        return PAIRS_BUDGET * self.step_serial_s / self.batch_per_device / 3600.0


def compiled_collective_seconds(collectives: dict[str, Sequence[float]] | None, chip: Chip,
                                devices: int) -> float:
    """ICI time of a compiled program's collectives, from their result bytes per device
    (launch/compile_for.py's `collective_bytes`), with the ring factors of large groups: an
    all-reduce moves 2x its result, an all-gather, all-to-all or collective-permute 1x, a
    reduce-scatter (whose result is one device's shard) its result x (group - 1), the group
    taken as all `devices` (an upper bound). Everything counts as ICI traffic."""
    factor = {"all-reduce": 2.0, "reduce-scatter": max(devices - 1, 1)}
    return sum(factor.get(kind, 1.0) * nbytes for kind, (_, nbytes) in (collectives or {}).items()
               ) / chip.ici_bytes_per_s


def estimate_step(
    chip: Chip, *, flops_per_device: float, batch_per_device: float,
    collectives: Sequence[Collective], mfu: float = DEFAULT_MFU,
    compiled_collectives: dict[str, Sequence[float]] | None = None, devices: int = 1,
) -> StepEstimate:
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu={mfu}: expected a fraction of the peak in (0, 1]")
    ici = dcn = 0.0
    for c in collectives:
        i, d = c.seconds(chip)
        ici, dcn = ici + i, dcn + d
    return StepEstimate(batch_per_device=batch_per_device, flops=flops_per_device,
                        compute_s=flops_per_device / (chip.peak_bf16_flops * mfu),
                        ici_s=ici, dcn_s=dcn, mfu=mfu,
                        compiled_comm_s=compiled_collective_seconds(compiled_collectives, chip,
                                                                    max(1, round(devices))))


@dataclasses.dataclass(frozen=True)
class Linear:
    """y = intercept + slope x, fitted through measured points (per-device memory or FLOPs vs batch)."""

    intercept: float
    slope: float

    @classmethod
    def fit(cls, points: Sequence[tuple[float, float]]) -> "Linear":
        if len({x for x, _ in points}) < 2:
            raise ValueError(f"need measurements at two batch sizes, got {sorted(points)}")
        n = len(points)
        mx = sum(x for x, _ in points) / n
        my = sum(y for _, y in points) / n
        slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
        return cls(my - slope * mx, slope)

    def __call__(self, x: float) -> float:
        return self.intercept + self.slope * x

    def largest_x(self, y_max: float) -> float:
        """The largest x with y <= y_max (inf when y does not grow with x)."""
        if self.slope <= 0:
            return math.inf if self.intercept <= y_max else -math.inf
        return (y_max - self.intercept) / self.slope


def powers_of_two(upto: float, start: int = 1) -> list[int]:
    out, b = [], start
    while b <= upto:
        out.append(b)
        b *= 2
    return out


def recommend(estimates: Sequence[StepEstimate], fits: Sequence[bool], *,
              min_compute_s: float = MIN_STEP_S) -> StepEstimate | None:
    """The smallest batch that fits, is compute-bound and computes for at least `min_compute_s`
    (the most sample-efficient of the efficient ones); failing that, the largest that fits."""
    ok = sorted((e for e, f in zip(estimates, fits) if f), key=lambda e: e.batch_per_device)
    for e in ok:
        if e.bound == "compute" and e.compute_s >= min_compute_s:
            return e
    return ok[-1] if ok else None


# ============================================================================ per-topology plan
@dataclasses.dataclass
class PlanRow:
    """One candidate batch of a plan: memory (compiled or fitted) and the step's roofline."""

    batch_per_device: int
    global_batch: int
    peak_bytes: float | None
    compiled: bool  # peak_bytes from a compile at this batch (else the linear fit of the probes)
    fits: bool  # with the plan's headroom
    estimate: StepEstimate


@dataclasses.dataclass
class Plan:
    """What `--plan` found for one config on one target."""

    target: str  # e.g. 'v5e-256'
    chip: Chip
    mesh: dict[str, int]
    ici: dict[str, int]
    dcn: dict[str, int]
    params: int
    remat: bool
    mfu: float
    headroom: float
    usable_bytes: int
    collectives: list[Collective]
    rows: list[PlanRow]
    recommended: PlanRow | None
    min_step_s: float
    config_batch: int  # the config's global batch
    reports: list  # every compile the plan ran (launch/compile_for.py Reports)

    def config_row(self) -> PlanRow | None:
        return next((r for r in self.rows if r.global_batch == self.config_batch), None)

    def strategy(self) -> str:
        parts = []
        for axis, name in (("data", "data-parallel"), ("fsdp", "FSDP"), ("model", "model-parallel")):
            n = self.mesh[axis]
            if n > 1:
                dcn = self.dcn.get(axis, 1)
                across = f" = {self.ici[axis]} x {dcn} {self.chip.granule}s" if dcn > 1 else ""
                parts.append(f"{name} over {n}{across}")
        return ", ".join(parts) or "one device"

    def text(self) -> str:
        chip, gib = self.chip, lambda b: f"{b / GIB:.2f}"
        dcn = f"{chip.dcn_bytes_per_s / 1e9:.2f} GB/s" if chip.dcn_bytes_per_s else "not documented"
        lines = [
            f"plan       {self.target}: {self.strategy()}; {self.params / 1e6:.1f} M trained params"
            f"{' (blocks rematerialised)' if self.remat else ''}",
            f"           roofline: compute at {100 * self.mfu:.0f}% of {chip.peak_bf16_flops / 1e12:.0f} TFLOP/s "
            f"bf16; ICI {chip.ici_bytes_per_s / 1e9:.0f} GB/s, DCN {dcn} per device and direction",
            "           collectives per step: " + "; ".join(
                f"{c.what} {c.bytes / 1e6:.0f} MB" for c in self.collectives) if self.collectives
            else "           collectives per step: none (one device)",
            "           compiled program: " + ("; ".join(
                f"{kind} {nbytes / 1e6:.0f} MB in {int(ops)} ops"
                for kind, (ops, nbytes) in sorted((self.reports[0].collectives or {}).items()))
                or "no collectives counted"),
            f"{'batch/dev':>10} {'global':>7} {'peak GiB':>12} {'TFLOP/dev':>10} {'compute ms':>11} "
            f"{'ICI ms':>7} {'DCN ms':>7} {'compiled':>8} {'bound':>13} {'ex/s/dev':>9} {'dev-h/100M pairs':>17} "
            f"{'(no overlap)':>12}",
        ]
        for r in self.rows:
            e = r.estimate
            mem = "-" if r.peak_bytes is None else ("" if r.compiled else "~") + gib(r.peak_bytes)
            mem += "" if r.fits else "!"
            lines.append(
                f"{r.batch_per_device:>10} {r.global_batch:>7} {mem:>12} {e.flops / 1e12:>10.3f} "
                f"{1e3 * e.compute_s:>11.2f} {1e3 * e.ici_s:>7.2f} {1e3 * e.dcn_s:>7.2f} "
                f"{1e3 * e.compiled_comm_s:>8.2f} {e.bound:>13} "
                f"{e.examples_per_s:>9.1f} {e.chip_hours_per_budget:>17.1f} {e.chip_hours_serial:>12.1f}")
        lines.append("           ICI / DCN ms: the model's collectives; compiled ms: the compiled program's "
                     "(nearest compiled batch); the larger counts")
        lines.append(f"           peak: compiled, ~ fitted through the compiled probes, ! less than "
                     f"{100 * self.headroom:.0f}% headroom of {gib(self.usable_bytes)} GiB usable")
        own = self.config_row()
        if own is None:
            lines.append(f"config     global batch {self.config_batch} is not a whole number of examples per "
                         "batch shard here")
        else:
            e = own.estimate
            lines.append(
                f"config     global batch {own.global_batch} ({own.batch_per_device} per device): "
                f"{e.bound}-bound (communication {e.comm_s / e.compute_s:.2f} x compute), "
                f"{'fits with' if own.fits else 'DOES NOT FIT with'} >= {100 * self.headroom:.0f}% of the HBM "
                f"free ({'compiled' if own.compiled else 'fitted'} peak "
                f"{'n/a: out of memory' if own.peak_bytes is None else f'{own.peak_bytes / GIB:.2f} GiB'})")
        r = self.recommended
        if r is None:
            lines.append("recommend  nothing fits with the headroom: shard more (FSDP), rematerialise, or "
                         "use a bigger chip")
        else:
            e = r.estimate
            lines.append(
                f"recommend  the smallest batch that fits, is compute-bound and computes >= "
                f"{1e3 * self.min_step_s:.0f} ms per step:")
            lines.append(
                f"           {r.batch_per_device} per device (global batch {r.global_batch}): "
                f"{e.bound}-bound (communication {e.comm_s / e.compute_s:.2f} x compute), "
                f"peak {gib(r.peak_bytes)} GiB ({100 * (1 - r.peak_bytes / self.usable_bytes):.0f}% headroom, "
                f"{'compiled' if r.compiled else 'fitted'}), {1e3 * e.step_s:.1f} ms/step, "
                f"{e.examples_per_s:.0f} examples/s/device, {e.chip_hours_per_budget:.0f} device-hours "
                f"per 100 M pairs ({e.chip_hours_serial:.0f} if communication does not overlap)")
        return "\n".join(lines)

    def markdown_row(self) -> str:
        r = self.recommended
        if r is None:
            return f"| {self.target} | {self.strategy()} | — | — | does not fit | — | — | — | — |"
        e = r.estimate
        return (f"| {self.target} | {self.strategy()} | {r.batch_per_device} ({r.global_batch}) | "
                f"{r.peak_bytes / GIB:.2f} / {self.usable_bytes / GIB:.2f} | {e.flops / 1e12:.3f} | "
                f"{1e3 * e.compute_s:.1f} | {1e3 * e.comm_s:.2f} | {e.bound} | "
                f"{e.examples_per_s:.0f} | {e.chip_hours_per_budget:.0f} ({e.chip_hours_serial:.0f}) |")

    def record(self) -> dict:
        return dict(
            target=self.target, chip=self.chip.name, mesh=self.mesh, ici=self.ici, dcn=self.dcn,
            params=self.params, remat=self.remat, mfu=self.mfu, headroom=self.headroom,
            usable_bytes=self.usable_bytes, collectives=[dataclasses.asdict(c) for c in self.collectives],
            rows=[dict(batch_per_device=r.batch_per_device, global_batch=r.global_batch,
                       peak_bytes=r.peak_bytes, compiled=r.compiled, fits=r.fits,
                       compute_s=r.estimate.compute_s, ici_s=r.estimate.ici_s, dcn_s=r.estimate.dcn_s,
                       compiled_comm_s=r.estimate.compiled_comm_s,
                       flops=r.estimate.flops, bound=r.estimate.bound,
                       examples_per_s=r.estimate.examples_per_s,
                       chip_hours_per_100m_pairs=r.estimate.chip_hours_per_budget,
                       chip_hours_per_100m_pairs_serial=r.estimate.chip_hours_serial) for r in self.rows],
            recommended=None if self.recommended is None else self.recommended.batch_per_device,
            config_batch=self.config_batch,
            compiles=[dataclasses.asdict(r) for r in self.reports],
        )


PLAN_MARKDOWN_HEADER = (
    "| target | sharding | batch per device (global) | peak / usable GiB | TFLOP/step/device | "
    "compute ms | communication ms | bound | examples/s/device | device-hours per 100 M pairs "
    "(no overlap) |\n|---|---|---|---|---|---|---|---|---|---|"
)


def build_plan(
    target: str, chip: Chip, reports: dict, *, config_batch: int, mfu: float = DEFAULT_MFU,
    headroom: float = 0.2, max_batch: int = 1024, min_step_s: float = MIN_STEP_S,
    compile_at=None,
) -> Plan:
    """The plan from compiles at several batches per batch shard (`reports`, keyed by it: objects
    with launch/compile_for.py's Report fields).

    Fits per-device peak memory through the two largest compiled batches (at small batches fixed
    buffers can hide the activations' growth: XLA:GPU reports the same peak at 1, 4 and 8
    examples per H100) and FLOPs through all, lists the powers of two up to the largest batch
    that keeps `headroom` of the usable HBM free (at most `max_batch`) plus the config's own, and
    recommends the smallest that is compute-bound and computes for at least `min_step_s`
    (recommend). With `compile_at`
    (batch -> its Report, added to `reports`) a recommended batch that was not compiled is compiled to check its memory
    (a miss shrinks the list); without it (re-printing a --json record) it stays fitted.
    """
    first = reports[min(reports)]
    mesh, ici, dcn = first.mesh, first.ici or first.mesh, first.dcn or {}
    batch_shards = mesh["data"] * mesh["fsdp"]
    fitted = sorted((b, r.peak_bytes) for b, r in reports.items() if r.peak_bytes is not None)
    if len(fitted) < 2:
        raise RuntimeError(f"{target}: the step fits at fewer than two of the compiled batches "
                           f"{sorted(reports)}; try smaller --plan_probes, FSDP or remat")
    memory = Linear.fit(fitted[-2:])
    flops = {b: r.flops_compiled or r.flops_program for b, r in reports.items()
             if r.peak_bytes is not None and (r.flops_compiled or r.flops_program)}
    flop_fit = Linear.fit(list(flops.items()))
    limit = (1.0 - headroom) * first.usable_bytes
    collectives = gradient_collectives(first.params, ici=ici, dcn=dcn, remat=first.remat,
                                       param_bytes=first.grad_bytes)
    own = config_batch / batch_shards
    own = {int(own)} if own == int(own) and own >= 1 else set()

    def row(b: int) -> PlanRow:
        r = reports.get(b)
        peak = r.peak_bytes if r is not None else memory(b)
        # The compiled collectives of this batch, else of the nearest compiled one.
        near = r if r is not None else reports[min(reports, key=lambda c: (abs(c - b), -c))]
        est = estimate_step(chip, flops_per_device=flops.get(b) or flop_fit(b),
                            batch_per_device=b * batch_shards / first.devices,
                            collectives=collectives, mfu=mfu,
                            compiled_collectives=near.collectives, devices=first.devices)
        return PlanRow(b, b * batch_shards, peak, r is not None, peak is not None and peak <= limit, est)

    largest = min(max_batch, memory.largest_x(limit))
    while True:
        batches = sorted(set(powers_of_two(largest)) | set(reports) | own)
        rows = [row(b) for b in batches]
        best = recommend([r.estimate for r in rows], [r.fits for r in rows],
                                  min_compute_s=min_step_s)
        chosen = next((r for r in rows if best is not None and r.estimate is best), None)
        if chosen is None or chosen.compiled or compile_at is None:
            break
        compile_at(chosen.batch_per_device)
        r = reports[chosen.batch_per_device]
        if r.peak_bytes is not None and (r.flops_compiled or r.flops_program):
            flops[chosen.batch_per_device] = r.flops_compiled or r.flops_program
        if not row(chosen.batch_per_device).fits:
            largest = chosen.batch_per_device / 2
    rows = [row(b) for b in batches]
    chosen = next((r for r in rows if chosen is not None and r.batch_per_device == chosen.batch_per_device), None)
    return Plan(target=target, chip=chip, mesh=mesh, ici=ici, dcn=dcn, params=first.params,
                remat=first.remat, mfu=mfu, headroom=headroom, usable_bytes=first.usable_bytes,
                collectives=collectives, rows=rows, recommended=chosen, min_step_s=min_step_s,
                config_batch=config_batch,
                reports=[reports[b] for b in sorted(reports)])
