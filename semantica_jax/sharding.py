"""Device mesh, logical-axis rules and global batches.

The mesh always has three named axes ('data', 'fsdp', 'model'); config.mesh gives their sizes with
at most one -1 (= all remaining devices). Model code names every parameter and block-boundary
activation with logical axes (models/); `config.axis_rules` maps those names to mesh axes, so the
same model runs data-parallel, FSDP or tensor-parallel by changing the config only.
The batch dimension is sharded over ('data', 'fsdp').
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")


def resolve_mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
    """Sizes of ('data', 'fsdp', 'model'), resolving a single -1; errors name the config fields."""
    sizes = [int(mesh_config[a]) for a in MESH_AXES]
    unknown = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
    if len(unknown) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {unknown}")
    for a, s in zip(MESH_AXES, sizes):
        if s == 0 or s < -1:
            raise ValueError(f"config.mesh.{a}={s} must be a positive size or -1")
    known = math.prod(s for s in sizes if s != -1)
    if unknown:
        if num_devices % known:
            raise ValueError(
                f"config.mesh: {num_devices} devices cannot be split into "
                f"{dict(zip(MESH_AXES, sizes))} (fixed axes multiply to {known})"
            )
        sizes[MESH_AXES.index(unknown[0])] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"config.mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices, "
            f"but {num_devices} are available"
        )
    return tuple(sizes)  # type: ignore[return-value]


def create_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'model') mesh with Auto axis types (needed by flax.linen partitioning)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh_config, len(devices))
    try:
        device_array = mesh_utils.create_device_mesh(shape, devices)
    except (AssertionError, NotImplementedError, ValueError):
        # Fake CPU devices and unusual topologies: plain row-major order.
        device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def axis_rules(config) -> tuple[tuple[str, Any], ...]:
    """config.axis_rules as a tuple of (logical name, mesh axes) pairs."""
    return tuple((name, tuple(v) if isinstance(v, list) else v) for name, v in config.axis_rules)


def logical_to_shardings(abstract_tree: Any, mesh: Mesh, rules) -> Any:
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


def per_process_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """Global batch / process count, with errors naming the numbers when sizes do not divide."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch_size % shards:
        raise ValueError(
            f"config.batch_size={global_batch_size} is not divisible by the batch-sharding mesh axes "
            f"data*fsdp={mesh.shape['data']}*{mesh.shape['fsdp']}={shards}"
        )
    nproc = jax.process_count()
    if global_batch_size % nproc:
        raise ValueError(
            f"config.batch_size={global_batch_size} is not divisible by the process count {nproc}"
        )
    return global_batch_size // nproc


def make_global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Process-local numpy arrays -> global jax.Arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }
