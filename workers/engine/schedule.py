"""Step-size schedules: the factor by which the time step dt of the particle ODE is multiplied at step t.

SGD at a constant dt relaxes to a noise floor whose height grows with dt; the theory's t -> infinity limit is
the noiseless flow, which a decaying dt approaches. The schedule scales dt itself (so the raw learning rate,
the Langevin noise sqrt(2 dt(t) T) and the per-time birth-death probabilities all follow it), and it depends
on t only, so a run continued from a checkpoint, or extended to more steps, takes exactly the same steps
(except ``cosine``, whose shape depends on the total number of steps).
"""

from __future__ import annotations

import math

from .specs import DynamicsSpec, LrSchedule


def lr_factor(dyn: DynamicsSpec, step: int) -> float:
    """dt(step) / dt, for the step that starts after ``step`` completed steps."""
    kind = dyn.lr_schedule
    if kind is LrSchedule.CONSTANT:
        return 1.0
    if kind is LrSchedule.INVERSE_TIME:
        return max(dyn.lr_floor, 1.0 / (1.0 + step / dyn.lr_decay_steps))
    frac = min(1.0, step / dyn.steps)
    return dyn.lr_floor + (1.0 - dyn.lr_floor) * 0.5 * (1.0 + math.cos(math.pi * frac))


__all__ = ["lr_factor"]
