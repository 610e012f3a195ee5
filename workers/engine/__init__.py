"""The particle engine: mean-field two-layer networks as packed interacting particles (torch only).

Importing this package must not import ray, optuna or mlflow. It does not import torch either: the specs
(:mod:`.specs`), the compatibility rules (:mod:`.compat`), the reports (:mod:`.reports`), seeds and memory
planning are plain Python, loaded at once, so validating a config takes milliseconds and the driver runs
without torch; every torch-backed name (``Pack``, ``make_task``, ...) is loaded from its
module on first use (PEP 562 module ``__getattr__``), so ``from workers.engine import Pack`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .compat import SpecTraits, check_compatible, traits
from .memory import estimate_pack_bytes
from .reports import NetMetrics, Report, Retired
from .rng import derive_seed
from .specs import (
    Algorithm,
    Component,
    DataSpec,
    DynamicsSpec,
    InitSpec,
    InputDist,
    LrSchedule,
    Measure,
    ModelSpec,
    NetStatus,
    NetworkSpec,
    Parametrization,
    RateConvention,
    Scheme,
    StopRule,
    TaskKind,
    TaskSpec,
    Unit,
    from_dict,
    to_dict,
)
from .stopping import Estimate  # torch-free

if TYPE_CHECKING:  # the lazily loaded names, for type checkers and IDEs
    from .birth_death import Resampling, probabilities, resample
    from .pack import (
        DataStream,
        Pack,
        init_particles,
        uses_exact_energy,
    )
    from .rng import generator
    from .tasks import EXAMPLE_A, SPLIT_KEYS, SplitArrays, Task, gaussian_overlap, import_target, make_task

#: Torch-backed names -> the submodule that defines them.
_LAZY = {
    **dict.fromkeys(("Resampling", "probabilities", "resample"), "birth_death"),
    **dict.fromkeys(("DataStream", "Pack", "init_particles", "uses_exact_energy"), "pack"),
    "generator": "rng",
    **dict.fromkeys(("EXAMPLE_A", "SPLIT_KEYS", "SplitArrays", "Task", "gaussian_overlap", "import_target",
                     "make_task"), "tasks"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "EXAMPLE_A",
    "SPLIT_KEYS",
    "Algorithm",
    "Component",
    "DataSpec",
    "DataStream",
    "DynamicsSpec",
    "Estimate",
    "InitSpec",
    "InputDist",
    "LrSchedule",
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
    "SpecTraits",
    "SplitArrays",
    "StopRule",
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
    "traits",
    "uses_exact_energy",
]
