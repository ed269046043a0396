"""Multi-process JAX: `jax.distributed.initialize` from flags, environment or the cluster.

Precedence: explicit arguments (the trainer's --coordinator/--num_processes/--process_id flags),
then DSV3_COORDINATOR / DSV3_NUM_PROCESSES / DSV3_PROCESS_ID, then JAX's own cluster
auto-detection (SLURM, Open MPI, ...) when DSV3_DISTRIBUTED=auto or a SLURM/OMPI job is
detected. On CPU the collectives go through gloo (set before initialising).
"""
from __future__ import annotations

import os

import jax

_CLUSTER_ENV = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids=None) -> bool:
    """Initialises multi-process JAX if asked to; returns whether it did."""
    coordinator = coordinator or os.environ.get("DSV3_COORDINATOR")
    num_processes = num_processes or _int_env("DSV3_NUM_PROCESSES")
    if process_id is None:
        process_id = _int_env("DSV3_PROCESS_ID")
    auto = os.environ.get("DSV3_DISTRIBUTED") == "auto" or any(k in os.environ for k in _CLUSTER_ENV)
    if not coordinator and not auto:
        return False
    if coordinator and (num_processes is None or process_id is None):
        raise ValueError("multi-process run: --coordinator needs --num_processes and --process_id "
                         "(or DSV3_NUM_PROCESSES / DSV3_PROCESS_ID)")
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id {process_id} not in [0, {num_processes})")
    # Only the CPU client reads this (CPU multi-process collectives); harmless on GPU machines.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=local_device_ids)
    else:
        jax.distributed.initialize()      # cluster auto-detection (SLURM, Open MPI, ...)
    return True


def is_main() -> bool:
    return jax.process_index() == 0


def _int_env(name):
    v = os.environ.get(name)
    return None if v in (None, "") else int(v)
