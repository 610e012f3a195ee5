"""Records exchanged between the driver and the workers (frozen, picklable, no magic-key dicts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .engine import DynamicsSpec, ModelSpec, NetworkSpec, Report, TaskSpec


@dataclass(frozen=True)
class PackJob:
    """One pack to train. Invariant: retrying a job resumes from ``checkpoint`` when that file exists."""

    pack_id: str
    task: TaskSpec
    model: ModelSpec
    dynamics: DynamicsSpec
    networks: tuple[NetworkSpec, ...]
    data_seed: int
    dtype: str = "float32"
    kernel: str = "auto"
    """auto | torch | triton: which implementation runs the sampled-loss steps (see workers.engine.kernels)."""
    precision: str = "ieee"
    """ieee | tf32: float32 dot precision of the Triton kernels."""
    checkpoint: str | None = None
    """Path (shared by all nodes) of this pack's checkpoint file."""
    checkpoint_every: int = 200
    resend_after: int | None = None
    """A job run again after its worker was lost: the reports its checkpoint covers past this step (the last
    one the driver received) are sent again from the report log, since the lost worker may have emitted them
    without their reaching the driver. None: a first run, or a driver that reads the logs itself (resume)."""
    data: Any = field(default=None, compare=False, repr=False)
    """A dataset task's prepared arrays (a dict, see ``SplitArrays``), or a Ray ObjectRef to them: the driver
    reads the data once and ships it through Ray's object store. Never written to plan.json."""

    @property
    def cost(self) -> float:
        """Work in particle-steps (what the progress bar counts)."""
        return float(sum(sp.width for sp in self.networks) * self.dynamics.steps)


@dataclass(frozen=True)
class PackEvent:
    """A report of a pack, tagged with where and when it ran."""

    pack_id: str
    report: Report
    worker: str
    resumed_from: int
    """Step the pack started from in this attempt (0 = fresh)."""
    wall_s: float


@dataclass(frozen=True)
class WorkerInfo:
    worker: str
    node: str
    device: str
    memory_bytes: int
    """Device memory one pack may plan against (GPU memory, or this worker's share of the node's RAM)."""
