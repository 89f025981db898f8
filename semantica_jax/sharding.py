"""Device mesh (ICI x DCN), logical-axis rules and global batches.

The mesh always has three named axes ('data', 'fsdp', 'model'). Their sizes come from
`config.mesh` in two factors:

  * ICI sizes `mesh.data`, `mesh.fsdp`, `mesh.model`: inside one *granule* (a TPU slice, or one
    host of a multi-node GPU job), at most one -1 (= all remaining devices of a granule);
  * DCN sizes `mesh.dcn_data`, `mesh.dcn_fsdp`, `mesh.dcn_model`: across granules (TPU
    multislice over the data-centre network, or GPU hosts), at most one -1 (= all remaining
    granules). On a single slice / host they all resolve to 1.

Each mesh axis has size ici * dcn. A multi-granule mesh is a hybrid mesh
(`mesh_utils.create_hybrid_device_mesh`): granules are the outer (slow) factor of every axis, so
collectives of an axis with dcn size 1 never leave a slice.

Model code names every parameter and block-boundary activation with logical axes (models/);
`config.axis_rules` maps those names to mesh axes, so the same model runs data-parallel, FSDP or
tensor-parallel by changing the config only. The batch dimension is sharded over
('data', 'fsdp'); each process feeds the rows of the batch shards its devices hold.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")
DCN_FIELDS = tuple(f"dcn_{a}" for a in MESH_AXES)

# ============================================================================ mesh shapes
@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Resolved ('data', 'fsdp', 'model') sizes inside a granule (ici) and across granules (dcn)."""

    ici: tuple[int, int, int]
    dcn: tuple[int, int, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        """The mesh's axis sizes: ici * dcn per axis."""
        return tuple(i * d for i, d in zip(self.ici, self.dcn))  # type: ignore[return-value]


def _resolve_sizes(sizes: Sequence[int], fields: Sequence[str], total: int, unit: str) -> tuple[int, ...]:
    """Resolves at most one -1 in `sizes` so that they multiply to `total`; errors name `fields`."""
    sizes = list(sizes)
    for field, s in zip(fields, sizes):
        if s == 0 or s < -1:
            raise ValueError(f"config.mesh.{field}={s} must be a positive size or -1")
    unknown = [f for f, s in zip(fields, sizes) if s == -1]
    if len(unknown) > 1:
        raise ValueError(f"config.mesh: at most one of {list(fields)} may be -1, got {unknown}")
    known = math.prod(s for s in sizes if s != -1)
    given = dict(zip(fields, sizes))
    if unknown:
        if total % known:
            raise ValueError(
                f"config.mesh: {total} {unit} cannot be split into {given} "
                f"(the fixed sizes multiply to {known})"
            )
        sizes[fields.index(unknown[0])] = total // known
    elif known != total:
        raise ValueError(
            f"config.mesh {given} multiplies to {known}, but there are {total} {unit}; "
            f"set one of {list(fields)} to -1 or change the sizes"
        )
    return tuple(sizes)


def resolve_mesh_shape(mesh_config: Any, num_devices: int, num_granules: int = 1) -> MeshShape:
    """ICI and DCN sizes of ('data', 'fsdp', 'model') for `num_devices` in `num_granules`.

    `mesh_config` is `config.mesh`; a config without DCN fields (written before they existed)
    counts as DCN sizes 1.
    """
    if num_granules < 1 or num_devices % num_granules:
        raise ValueError(f"{num_devices} devices cannot be split into {num_granules} equal slices/hosts")
    dcn = _resolve_sizes(
        [int(mesh_config.get(f, 1)) for f in DCN_FIELDS], DCN_FIELDS, num_granules,
        "slices/hosts (DCN granules)",
    )
    ici = _resolve_sizes(
        [int(mesh_config[a]) for a in MESH_AXES], MESH_AXES, num_devices // num_granules,
        "devices per slice/host" if num_granules > 1 else "devices",
    )
    return MeshShape(ici=ici, dcn=dcn)  # type: ignore[arg-type]


# ============================================================================ device arrays
def device_granules(devices: Sequence[Any]) -> tuple[str, list[list[Any]]]:
    """Groups devices into DCN granules: (attribute name, groups in sorted key order).

    TPU multislice: devices carry distinct `slice_index` values, one granule per slice. GPU with
    several processes (one per host, as launch/gpu_slurm.sbatch starts them): one granule per
    process. Everything else (a single TPU slice, even over many hosts; CPU): one granule.
    """
    devices = list(devices)
    slices = {getattr(d, "slice_index", None) for d in devices}
    if None not in slices and len(slices) > 1:
        key = "slice_index"
    elif devices[0].platform in ("gpu", "cuda", "rocm") and len({d.process_index for d in devices}) > 1:
        key = "process_index"
    else:
        return "", [devices]
    groups: dict[int, list[Any]] = collections.defaultdict(list)
    for d in devices:
        groups[getattr(d, key)].append(d)
    return key, [groups[k] for k in sorted(groups)]


def _granule_device_array(shape: Sequence[int], devices: Sequence[Any]) -> np.ndarray:
    """Devices of one granule laid out for `shape`: topology-aware where mesh_utils knows the
    hardware, otherwise (fake CPU devices, compile-only topologies it cannot map) row-major."""
    for split in (False, True):
        try:
            return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=split)
        except (AssertionError, NotImplementedError, ValueError) as e:
            error = e
    if devices[0].platform == "tpu":
        logging.warning("mesh_utils cannot map mesh %s onto the TPU topology (%s); using device "
                        "order, which may put collectives on slow links", tuple(shape), error)
    return np.asarray(devices).reshape(shape)


def device_array(mesh_config: Any, devices: Sequence[Any]) -> np.ndarray:
    """The devices as a [data, fsdp, model] array for `config.mesh` (hybrid across granules)."""
    devices = list(devices)
    key, granules = device_granules(devices)
    shape = resolve_mesh_shape(mesh_config, len(devices), len(granules))
    if len(granules) == 1:
        return _granule_device_array(shape.shape, devices)
    sizes = {len(g) for g in granules}
    if len(sizes) != 1:
        raise ValueError(f"granules ({key}) hold different numbers of devices: {sorted(sizes)}")
    try:
        return mesh_utils.create_hybrid_device_mesh(
            shape.ici, shape.dcn, devices, process_is_granule=key == "process_index",
            allow_split_physical_axes=True,
        )
    except (AssertionError, NotImplementedError, ValueError):
        # Same layout (granules outer, as np.block builds it) with a per-granule fallback.
        blocks = np.stack([_granule_device_array(shape.ici, g) for g in granules])
        blocks = blocks.reshape(shape.dcn + shape.ici).transpose(0, 3, 1, 4, 2, 5)
        return blocks.reshape(shape.shape)


def create_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'model') mesh with Auto axis types (needed by flax.linen partitioning).

    `devices` defaults to `jax.devices()`; pass compile-only devices
    (`jax.experimental.topologies`) to build the mesh of a pod this host does not have.
    """
    devices = jax.devices() if devices is None else devices
    return Mesh(device_array(mesh_config, devices), MESH_AXES,
                axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def describe_mesh(mesh: Mesh) -> str:
    """One line: axis sizes, device count, processes and DCN granules (for logs and tools)."""
    devices = list(mesh.devices.flat)
    key, granules = device_granules(devices)
    procs = len({d.process_index for d in devices})
    sizes = ", ".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names)
    where = f", {len(granules)} granules by {key}" if key else ""
    return f"mesh ({sizes}) over {len(devices)} {devices[0].device_kind} devices, {procs} processes{where}"


# ============================================================================ logical rules
def axis_rules(config: Any) -> tuple[tuple[str, Any], ...]:
    """config.axis_rules as a tuple of (logical name, mesh axes) pairs."""
    return tuple((name, tuple(v) if isinstance(v, list) else v) for name, v in config.axis_rules)


def logical_to_shardings(abstract_tree: Any, mesh: Mesh, rules: Any) -> Any:
    """NamedShardings for a (boxed, abstract) tree; unannotated leaves are replicated."""
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def strip_boxes(tree: Any) -> Any:
    """Removes flax partitioning boxes without adding sharding constraints (safe outside jit)."""
    is_box = lambda x: isinstance(x, nn.Partitioned)
    return jax.tree.map(lambda x: x.value if is_box(x) else x, tree, is_leaf=is_box)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# ============================================================================ global batches
def batch_shards_by_process(mesh: Mesh) -> dict[int, set[int]]:
    """For every process, the batch shards (flat ('data', 'fsdp') index) its devices hold."""
    names = list(mesh.axis_names)
    devices = np.moveaxis(mesh.devices, [names.index(a) for a in BATCH_AXES], [0, 1])
    shards = devices.reshape(devices.shape[0] * devices.shape[1], -1)
    owned: dict[int, set[int]] = collections.defaultdict(set)
    for index, row in enumerate(shards):
        for d in row:
            owned[d.process_index].add(index)
    return dict(owned)


def per_process_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """Rows of the global batch that each process loads, with errors naming the numbers.

    Each process reads the rows of the batch shards its devices hold (normally
    global batch / process count). Raises ValueError when `config.batch_size` does not divide by
    the batch-sharding axes data * fsdp or by the process count, or when a batch shard spans
    processes (a 'model' axis across hosts), which a per-process input pipeline cannot feed.
    """
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch_size % shards:
        raise ValueError(
            f"config.batch_size={global_batch_size} is not divisible by the batch-sharding mesh axes "
            f"data*fsdp={mesh.shape['data']}*{mesh.shape['fsdp']}={shards}"
        )
    owned = batch_shards_by_process(mesh)
    nproc = len(owned)
    if global_batch_size % nproc:
        raise ValueError(
            f"config.batch_size={global_batch_size} is not divisible by the process count {nproc}"
        )
    counts = sorted({len(s) for s in owned.values()})
    if len(counts) != 1 or counts[0] * nproc != shards:
        raise ValueError(
            f"mesh {dict(mesh.shape)}: the {shards} batch shards (data*fsdp) do not split evenly "
            f"and disjointly over {nproc} processes (shards per process: {counts}); keep "
            "config.mesh.model groups inside one host"
        )
    return global_batch_size // shards * counts[0]


def make_global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Process-local numpy arrays -> global jax.Arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }


def global_array(value: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global jax.Array of `value`, which every process holds whole (e.g. fixed sample
    conditions): each process places the slices its own devices own."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of `x` as numpy on every process: all-gathered from the other processes
    when some of its shards live only there (a batch-sharded output on a multi-host mesh)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@contextlib.contextmanager
def mesh_and_rules(mesh: Mesh, rules: Sequence[tuple]):
    """The mesh and the logical-axis rules in context: what tracing and calling model code needs."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield
