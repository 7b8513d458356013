"""The continuous-batching scheduling policy the simulator's replay and the model
generator share (`SchedulingPolicy`: FCFS admission, prompt chunks under a token budget,
the admission headroom, newest-first preemption). Host only: no JAX; of paged_kv it
imports only `paged_kv.errors`."""

from paged_kv.sched.policy import SchedulingPolicy, StepPlan, leaves_headroom

__all__ = ["SchedulingPolicy", "StepPlan", "leaves_headroom"]
