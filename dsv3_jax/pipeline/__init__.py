"""Pipeline parallelism: schedules (per-rank F/B/W op lists) and their simulators.

  schedules  Op, Schedule, make(name, ranks, microbatches), SCHEDULES, ScheduleError
  simulate   simulate (MPMD event timing), lockstep / simulate_lockstep (SPMD tick packing)
  python -m dsv3_jax.pipeline --schedule dualpipev --pp 8 --microbatches 20 --png out.png

These modules are pure Python + NumPy; the JAX executor lives in its own module.
"""
from dsv3_jax.pipeline.schedules import (SCHEDULES, Op, Schedule, ScheduleError, deps, make,
                                         validate)

__all__ = ["SCHEDULES", "Op", "Schedule", "ScheduleError", "deps", "make", "validate"]
