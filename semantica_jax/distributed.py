"""Multi-host start-up: call `jax.distributed.initialize()` only where the environment is multi-host.

`multihost_reason(env)` is a pure function of the environment variables, so the decision is
testable without a cluster. It returns why the process is one of several (and JAX's distributed
runtime must be initialised before any other JAX call), or None on a single host, where
initialising would only wait for peers that never come.

Signals, in order:
  * `SEMANTICA_DISTRIBUTED=1|0`: explicit (launch/tpu_pod.sh sets it from the pod's worker count,
    because a Cloud TPU VM's ssh environment names no peers; JAX then reads them from the TPU
    metadata server);
  * `JAX_COORDINATOR_ADDRESS` (with `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID` unless a cluster
    environment below supplies them): an explicitly wired job;
  * `TPU_WORKER_HOSTNAMES` / `TPU_PROCESS_ADDRESSES` listing more than one host (GKE TPU pods),
    `MEGASCALE_NUM_SLICES` > 1 or `MEGASCALE_COORDINATOR_ADDRESS` (TPU multislice);
  * `SLURM_STEP_NUM_TASKS` (else `SLURM_NTASKS`) > 1 inside an srun job step
    (`SLURM_STEP_NODELIST` set; a python started directly by the batch script is one process);
  * `OMPI_COMM_WORLD_SIZE` > 1 (mpirun).
"""
from __future__ import annotations

import os
from typing import Mapping

from absl import logging

_TRUE = ("1", "true", "yes")
_FALSE = ("0", "false", "no")


def _int(env: Mapping[str, str], name: str) -> int:
    if name not in env:
        raise ValueError(f"environment variable {name} is not set")
    value = env[name]
    try:
        return int(value)
    except ValueError as e:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from e


def _hosts(value: str) -> list[str]:
    return [h for h in value.split(",") if h.strip()]


def multihost_reason(env: Mapping[str, str]) -> str | None:
    """Why `env` describes one process of a multi-host job, or None for a single host."""
    forced = env.get("SEMANTICA_DISTRIBUTED", "").strip().lower()
    if forced in _TRUE:
        return "SEMANTICA_DISTRIBUTED=1"
    if forced in _FALSE:
        return None
    if forced:
        raise ValueError(f"SEMANTICA_DISTRIBUTED={forced!r}; expected 1 or 0 (or unset)")
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return f"JAX_COORDINATOR_ADDRESS={env['JAX_COORDINATOR_ADDRESS']}"
    for name in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        hosts = _hosts(env.get(name, ""))
        if len(hosts) > 1:
            return f"{name} lists {len(hosts)} hosts"
    if "MEGASCALE_NUM_SLICES" in env and _int(env, "MEGASCALE_NUM_SLICES") > 1:
        return f"MEGASCALE_NUM_SLICES={env['MEGASCALE_NUM_SLICES']}"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "MEGASCALE_COORDINATOR_ADDRESS is set (TPU multislice)"
    if "SLURM_STEP_NODELIST" in env:
        for name in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"):
            if name in env:
                if _int(env, name) > 1:
                    return f"{name}={env[name]} (srun step)"
                break
    if "OMPI_COMM_WORLD_SIZE" in env and _int(env, "OMPI_COMM_WORLD_SIZE") > 1:
        return f"OMPI_COMM_WORLD_SIZE={env['OMPI_COMM_WORLD_SIZE']}"
    return None


def maybe_initialize(env: Mapping[str, str] | None = None) -> bool:
    """Initialises JAX's distributed runtime if `env` (default: os.environ) is multi-host.

    Must run before any other JAX call. Returns whether it initialised. Coordinator, process
    count and id come from the cluster environment (JAX's auto-detection: Cloud TPU metadata,
    GKE, SLURM, Open MPI) or from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
    """
    env = os.environ if env is None else env
    reason = multihost_reason(env)
    if reason is None:
        logging.info("Single host: not initialising jax.distributed")
        return False
    import jax

    kwargs = {}
    if env.get("JAX_COORDINATOR_ADDRESS") and "JAX_NUM_PROCESSES" in env:
        kwargs = dict(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=_int(env, "JAX_NUM_PROCESSES"),
            process_id=_int(env, "JAX_PROCESS_ID"),
        )
    if env.get("SEMANTICA_HEARTBEAT_TIMEOUT_SECONDS"):
        # How soon the survivors learn that a process died (JAX's default: 100 s).
        kwargs["heartbeat_timeout_seconds"] = _int(env, "SEMANTICA_HEARTBEAT_TIMEOUT_SECONDS")
    if env.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
        # Several CPU processes (launch/local_multihost.sh): collectives across processes need gloo.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    logging.info("Multi-host (%s): jax.distributed.initialize(%s)", reason, kwargs or "")
    jax.distributed.initialize(**kwargs)
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True


def barrier(name: str, timeout_s: int = 1800) -> None:
    """Waits until every process reaches `name`, through the coordination
    service rather than a device collective. Needed before a program's first collective when the
    processes may arrive far apart (one compiled slower): a CPU collective's first use gives up
    after 30 s. No-op on one process."""
    import jax

    global _barriers
    if jax.process_count() > 1:
        from orbax.checkpoint import multihost

        _barriers += 1  # every process passes the same barriers in the same order
        multihost.sync_global_processes(f"{name} #{_barriers}", timeout=timeout_s)


_barriers = 0

