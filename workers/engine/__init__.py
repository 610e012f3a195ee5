"""The particle engine: mean-field two-layer networks as packed interacting particles (torch only).

Importing this package must not import ray, optuna or mlflow.
"""

from __future__ import annotations

from .birth_death import Resampling, probabilities, resample
from .pack import (
    DataStream,
    NetMetrics,
    Pack,
    Report,
    Retired,
    check_compatible,
    estimate_pack_bytes,
    init_particles,
    uses_exact_energy,
)
from .rng import derive_seed, generator
from .specs import (
    Algorithm,
    Component,
    DataSpec,
    DynamicsSpec,
    InitSpec,
    InputDist,
    Measure,
    ModelSpec,
    NetStatus,
    NetworkSpec,
    Parametrization,
    RateConvention,
    Scheme,
    TaskKind,
    TaskSpec,
    Unit,
    from_dict,
    to_dict,
)
from .tasks import EXAMPLE_A, SPLIT_KEYS, SplitArrays, Task, gaussian_overlap, import_target, make_task

__all__ = [
    "EXAMPLE_A",
    "SPLIT_KEYS",
    "Algorithm",
    "Component",
    "DataSpec",
    "DataStream",
    "DynamicsSpec",
    "InitSpec",
    "InputDist",
    "Measure",
    "ModelSpec",
    "NetMetrics",
    "NetStatus",
    "NetworkSpec",
    "Pack",
    "Parametrization",
    "RateConvention",
    "Report",
    "Resampling",
    "Retired",
    "Scheme",
    "SplitArrays",
    "Task",
    "TaskKind",
    "TaskSpec",
    "Unit",
    "check_compatible",
    "derive_seed",
    "estimate_pack_bytes",
    "from_dict",
    "gaussian_overlap",
    "generator",
    "import_target",
    "init_particles",
    "make_task",
    "probabilities",
    "resample",
    "to_dict",
    "uses_exact_energy",
]
