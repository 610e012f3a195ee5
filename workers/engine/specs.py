"""Frozen, validated specifications of what the engine trains.

These records cross process boundaries (driver -> Ray actor -> checkpoint file), so they are plain frozen
dataclasses of builtins and enums, serialisable with :func:`to_dict` / :func:`from_dict`.

Each field also says where the driver reads it in the sweep config (plain dataclass metadata: this package
must not import pydantic): by default the key of the same name in the config section the spec is built from
(``task``, ``model``, ``dynamics``; ``model.init`` for an :class:`InitSpec`), else the key
:func:`from_config` names, or :func:`set_by_driver` for a value the driver computes. orchestrator/schema.py
builds every spec from its config with these declarations, and checks each path exists.

A per-network hyperparameter (one that may differ between networks of a pack) is a field of
:class:`NetworkSpec` with its full config path, e.g. ``field(default=0.0, metadata=from_config("dynamics.x"))``,
used by the engine's per-network vectors (pack.py); the planner, search and MLflow params pick it up from
there (orchestrator/plan.py). A new key also needs its entry in orchestrator/config.py (the user-facing
schema: its type, bounds and doc).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from typing import Any, TypeVar


class Unit(str, enum.Enum):
    """Unit type phi(x; z). Ridge units use z = (w, b); ``gaussian`` uses a centre y and a fixed width s."""

    RELU = "relu"
    TANH = "tanh"
    SIGMOID = "sigmoid"
    GAUSSIAN = "gaussian"

    @property
    def is_ridge(self) -> bool:
        return self is not Unit.GAUSSIAN


class Parametrization(str, enum.Enum):
    """Output scaling. ``mean_field``: f = (1/n) sum c phi, raw lr n*dt. ``ntk``: f = n^-1/2 sum c phi, raw lr dt."""

    MEAN_FIELD = "mean_field"
    NTK = "ntk"


class Algorithm(str, enum.Enum):
    """``gd``: exact population energy where closed form, else a fixed training set. ``sgd``: mini-batches."""

    GD = "gd"
    SGD = "sgd"


class Scheme(str, enum.Enum):
    """Birth-death rebalancing: ``clone`` copies uniform survivors; ``prior`` re-injects fresh prior draws (c = 0)."""

    CLONE = "clone"
    PRIOR = "prior"


class RateConvention(str, enum.Enum):
    """How alpha becomes a probability.

    ``per_time`` (default, ICML 2019 paper): p = 1 - exp(-alpha |beta| dt k) where k is the birth-death
    period in steps, so alpha is a rate in the particle ODE's time units and does not depend on dt or k.
    ``per_step`` (the authors' notebooks): p = min(1, alpha |beta|) each time birth-death is applied.
    """

    PER_TIME = "per_time"
    PER_STEP = "per_step"


class StopRule(str, enum.Enum):
    """When a network stops. ``fixed``: at ``steps``. ``plateau``: as soon as its test loss is stationary over
    the final window (see :mod:`.stopping`), ``steps`` being the cap."""

    FIXED = "fixed"
    PLATEAU = "plateau"


class LrSchedule(str, enum.Enum):
    """Factor on dt at step t: ``constant`` 1; ``inverse_time`` max(floor, 1 / (1 + t / decay_steps));
    ``cosine`` floor + (1 - floor) (1 + cos(pi t / steps)) / 2."""

    CONSTANT = "constant"
    INVERSE_TIME = "inverse_time"
    COSINE = "cosine"


class InputDist(str, enum.Enum):
    """Input law: N(0, I_d), uniform on the unit sphere S^(d-1), or uniform on the box [-1, 1]^d."""

    GAUSSIAN = "gaussian"
    SPHERE = "sphere"
    UNIFORM_BOX = "uniform_box"


class Measure(str, enum.Enum):
    """Input measure of the Gaussian-mixture task: Lebesgue on R^d (exact energy only) or N(0, std^2 I)."""

    LEBESGUE = "lebesgue"
    GAUSSIAN = "gaussian"


class TaskKind(str, enum.Enum):
    TEACHER = "teacher"
    GAUSSIAN_MIXTURE = "gaussian_mixture"
    SPHERICAL_3SPIN = "spherical_3spin"
    DIGITS = "digits"
    DATASET = "dataset"
    """The user's data from a file (arrays shipped to the workers beside the spec)."""
    FUNCTION = "function"
    """The user's Python callable f(x) on a (P, d) tensor."""


class NetStatus(str, enum.Enum):
    """Life cycle of one network inside a pack."""

    RUNNING = "running"
    FINISHED = "finished"
    DIVERGED = "diverged"
    PRUNED = "pruned"
    FAILED = "failed"


#: Field metadata keys (read by orchestrator/schema.py).
CONFIG = "mfsweep.config"
"""Where the field is read in the config: a dotted path relative to the spec's config section."""
CONFIG_NONE = "mfsweep.config_none"
"""The field's value where the config holds None (a config key that is optional while the field is not)."""
BY_DRIVER = "mfsweep.by_driver"
"""The field is not read from the config: the driver sets it (the value says how)."""


def from_config(path: str | None = None, *, none: Any = dataclasses.MISSING) -> dict[str, Any]:
    """Metadata of a field read from the config at ``path`` (relative to the spec's section; None = the
    field's own name); ``none``: the field's value where the config holds None."""
    meta: dict[str, Any] = {}
    if path is not None:
        meta[CONFIG] = path
    if none is not dataclasses.MISSING:
        meta[CONFIG_NONE] = none
    return meta


def set_by_driver(how: str) -> dict[str, Any]:
    """Metadata of a field the driver computes rather than reads from the config (``how`` says from what)."""
    return {BY_DRIVER: how}


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    # Resolving string annotations is slow; specs are built for every variant of every validated config.
    import typing

    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _coerce_enums(obj: Any) -> None:
    """Turn plain strings given for enum fields into members (a bad value is a clear ValueError)."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        tp = hints.get(f.name)
        value = getattr(obj, f.name)
        if isinstance(tp, type) and issubclass(tp, enum.Enum) and not isinstance(value, tp):
            try:
                object.__setattr__(obj, f.name, tp(value))
            except ValueError:
                allowed = ", ".join(m.value for m in tp)
                raise ValueError(f"{f.name} must be one of {allowed}; got {value!r}") from None


@dataclass(frozen=True)
class Component:
    """One term a * N(x; mean, var I) of a Gaussian-mixture target."""

    weight: float
    mean: tuple[float, ...]
    var: float

    def __post_init__(self) -> None:
        _require(self.var > 0, f"mixture component variance must be > 0, got {self.var}; set a positive 'var'")


@dataclass(frozen=True)
class DataSpec:
    """Where a dataset task's arrays come from and how they were prepared. The engine never reads the file:
    the driver reads it once and ships the prepared arrays; these fields name the data (plan, checkpoints)."""

    path: str
    """Absolute path of the data file (.npz, .npy, .csv, .parquet)."""
    test_path: str | None = None
    """A given test-split file (same format and keys); None = split ``path`` by ``test_fraction``."""
    x_key: str = "x"
    y_key: str = "y"
    features: tuple[str | int, ...] = ()
    """Input columns (names for CSV/Parquet, indices for .npy); empty = every column but the targets."""
    targets: tuple[str | int, ...] = ()
    test_fraction: float = 0.25
    standardize_inputs: bool = True
    standardize_targets: bool = False
    classification: bool = False
    """Integer (or string) labels become one-hot targets for the squared loss."""


@dataclass(frozen=True)
class TaskSpec:
    """A target function with its input measure; everything random derives from ``seed``."""

    kind: TaskKind = TaskKind.TEACHER
    dim: int = 16
    """Input dimension d."""
    seed: int = 0
    """Seeds the task itself (teacher weights, 3-spin couplings, test set, data split)."""
    out_dim: int = 1
    """Output dimension k of the teacher (digits: fixed to 10, others 1)."""
    teacher_units: int = 10
    """Number of ReLU units of the teacher (kind=teacher)."""
    inputs: InputDist = InputDist.SPHERE
    """Input distribution of teacher and 3-spin tasks (3-spin is always on the sphere)."""
    n_train: int = 4096
    """Size of the fixed training set (gd without closed form, and sgd with finite_set=True)."""
    n_test: int = 4096
    """Held-out samples for the test loss (ignored where the population loss is exact)."""
    components: tuple[Component, ...] = ()
    """Gaussian-mixture target; empty means the 1-D example target of docs/science.md."""
    measure: Measure = Measure.LEBESGUE
    measure_std: float = 2.0
    """Std of the Gaussian input measure (measure=gaussian)."""
    data: DataSpec | None = field(default=None, metadata=set_by_driver(
        "DataSpec from the task section's file keys, for kind=dataset only (TaskConfig.spec)"))
    """kind=dataset: the file and its preparation (dim, out_dim, n_train, n_test are the prepared sizes)."""
    target: str = field(default="", metadata=from_config(none=""))
    """kind=function: 'package.module:function', a callable on a (P, d) tensor returning (P,) or (P, k)."""
    content_hash: str = field(default="", metadata=from_config(none=""))
    """Hash of the data (dataset) or of the target's module source (function): two sweeps on different data
    never share a pack key, a plan or MLflow params, and a resume on changed data is refused. The driver fills
    the config's task.content_hash in from the data (orchestrator/userdata.py: so are dim, out_dim, n_train
    and n_test of a dataset task), and the spec reads it there."""

    def __post_init__(self) -> None:
        _coerce_enums(self)
        _require(self.kind is not TaskKind.DATASET or self.data is not None, "task.kind=dataset needs task.path")
        _require(self.kind is not TaskKind.FUNCTION or bool(self.target), "task.kind=function needs task.target")
        _require(self.dim >= 1, f"task.dim must be >= 1, got {self.dim}")
        _require(self.out_dim >= 1, f"task.out_dim must be >= 1, got {self.out_dim}")
        _require(self.teacher_units >= 1, f"task.teacher_units must be >= 1, got {self.teacher_units}")
        _require(self.n_train >= 1, f"task.n_train must be >= 1, got {self.n_train}")
        _require(self.n_test >= 1, f"task.n_test must be >= 1, got {self.n_test}")
        _require(self.measure_std > 0, f"task.measure_std must be > 0, got {self.measure_std}")
        for comp in self.components:
            _require(
                len(comp.mean) == self.dim,
                f"mixture component mean has {len(comp.mean)} entries but task.dim is {self.dim}",
            )


@dataclass(frozen=True)
class InitSpec:
    """Initial particle law mu_0 (also the prior mu_b of the ``prior`` birth-death scheme)."""

    z: str = "normal"
    """``normal``: w (or centre) ~ N(loc, scale^2 I); ``uniform``: ~ U[low, high]^d."""
    loc: float = 0.0
    scale: float | None = None
    """None = automatic: 1/sqrt(E|x|^2) for ridge units, the task's input std for Gaussian units."""
    low: float = -2.0
    high: float = 2.0
    c_law: str = "normal"
    """Law of the output weights c: ``normal``: N(c_mean, c_std^2); ``uniform``: U[c_low, c_high]."""
    c_mean: float = 0.0
    c_std: float = 1.0
    c_low: float = -1.0
    c_high: float = 1.0
    bias_std: float = 0.0

    def __post_init__(self) -> None:
        _require(self.z in ("normal", "uniform"), f"model.init.z must be 'normal' or 'uniform', got {self.z!r}")
        _require(self.c_law in ("normal", "uniform"),
                 f"model.init.c_law must be 'normal' or 'uniform', got {self.c_law!r}")
        _require(self.c_low < self.c_high, f"model.init.c_low ({self.c_low}) must be < c_high ({self.c_high})")
        _require(self.scale is None or self.scale >= 0, f"model.init.scale must be >= 0, got {self.scale}")
        _require(self.low < self.high, f"model.init.low ({self.low}) must be < high ({self.high})")
        _require(self.c_std >= 0 and self.bias_std >= 0, "model.init.c_std and bias_std must be >= 0")


@dataclass(frozen=True)
class ModelSpec:
    """Pack-wide architecture: every network of a pack shares the unit type (one kernel per group)."""

    unit: Unit = Unit.RELU
    bias: bool = True
    """Ridge units only: phi = act(w.x + b) with or without b."""
    gaussian_var: float = 0.5
    """Variance s^2 of Gaussian units N(x; y, s^2 I)."""
    init: InitSpec = field(default_factory=InitSpec)
    prior: InitSpec | None = None
    """Law mu_b of fresh particles for the ``prior`` birth-death scheme (None = the initial law). A broad
    prior is what lets the cloud escape a bad initialization."""

    def __post_init__(self) -> None:
        _coerce_enums(self)
        _require(self.gaussian_var > 0, f"model.gaussian_var must be > 0, got {self.gaussian_var}")


@dataclass(frozen=True)
class DynamicsSpec:
    """Pack-wide dynamics: step count, batch and the birth-death schedule are shared by the pack."""

    algorithm: Algorithm = Algorithm.SGD
    steps: int = 1000
    batch_size: int = 256
    """SGD mini-batch P (shared by every network of the pack)."""
    finite_set: bool = False
    """SGD only: draw batches from the fixed training set instead of fresh samples (online SGD)."""
    eval_every: int = 50
    """Report train/test losses every this many steps (and at step 0 and the last step)."""
    bd_every: int = field(default=1, metadata=from_config("birth_death.every"))
    """Apply birth-death every this many steps."""
    bd_quench: int = field(default=0, metadata=from_config("birth_death.quench"))
    """Last steps run as plain GD/SGD (no birth-death)."""
    bd_convention: RateConvention = field(default=RateConvention.PER_TIME,
                                          metadata=from_config("birth_death.convention"))
    diverge_threshold: float = 1e8
    """A network whose loss is non-finite or above this is retired as diverged."""
    stop_rule: StopRule = field(default=StopRule.FIXED, metadata=from_config("stop.rule"))
    stop_window: int = field(default=1000, metadata=from_config("stop.window"))
    """The final window (the estimate and the plateau test): the last quarter of the run, at least this many
    steps, at most the last half."""
    stop_rel_tol: float = field(default=0.1, metadata=from_config("stop.rel_tol"))
    """Plateau: the upper confidence bound of the relative decrease the window's trend predicts over a
    doubling of the training time must be below this (workers/engine/stopping.py)."""
    stop_z: float = field(default=2.0, metadata=from_config("stop.confidence"))
    """Plateau: that bound is this many standard errors above the measured decrease (one-sided)."""
    stop_min_steps: int = field(default=0, metadata=from_config("stop.min_steps"))
    """Plateau: no network stops before this step."""
    lr_schedule: LrSchedule = field(default=LrSchedule.CONSTANT, metadata=from_config("lr_schedule.kind"))
    lr_decay_steps: float = field(default=1000.0, metadata=from_config("lr_schedule.decay_steps"))
    """inverse_time: dt halves after this many steps."""
    lr_floor: float = field(default=0.0, metadata=from_config("lr_schedule.floor"))
    """Smallest factor on dt (inverse_time, cosine)."""

    def __post_init__(self) -> None:
        _coerce_enums(self)
        _require(self.steps >= 1, f"dynamics.steps must be >= 1, got {self.steps}")
        _require(self.stop_window >= 1, f"dynamics.stop.window must be >= 1, got {self.stop_window}")
        _require(self.stop_rel_tol > 0, f"dynamics.stop.rel_tol must be > 0, got {self.stop_rel_tol}")
        _require(self.stop_z >= 0, f"dynamics.stop.confidence must be >= 0, got {self.stop_z}")
        _require(self.lr_decay_steps > 0, f"dynamics.lr_schedule.decay_steps must be > 0, got {self.lr_decay_steps}")
        _require(0 <= self.lr_floor <= 1, f"dynamics.lr_schedule.floor must be in [0, 1], got {self.lr_floor}")
        _require(self.batch_size >= 1, f"dynamics.batch_size must be >= 1, got {self.batch_size}")
        _require(self.eval_every >= 1, f"dynamics.eval_every must be >= 1, got {self.eval_every}")
        _require(self.bd_every >= 1, f"dynamics.birth_death.every must be >= 1, got {self.bd_every}")
        _require(self.bd_quench >= 0, f"dynamics.birth_death.quench must be >= 0, got {self.bd_quench}")
        _require(self.diverge_threshold > 0, "dynamics.diverge_threshold must be > 0")


@dataclass(frozen=True, slots=True)
class NetworkSpec:
    """One network of a pack: its width, random stream and per-network hyperparameters.

    The identity fields are set by the planner; every other field is a per-network hyperparameter, read
    from the config at its full path (built from the whole sweep config, not one section). Networks that
    differ only in these share a pack (pack.py holds them as per-network vectors)."""

    net_id: int = field(metadata=set_by_driver("the planner numbers the sweep's networks"))
    """Unique within a sweep; names the network in metrics and checkpoints."""
    width: int = field(metadata=set_by_driver("the planner: one of sweep.widths (search: the trial's width)"))
    seed: int = field(metadata=set_by_driver("the planner: derived from sweep.seed and the replicate"))
    """Seeds this network's own stream (init, Langevin noise, birth-death draws)."""
    lr: float = field(default=0.05, metadata=from_config("dynamics.lr"))
    """Time step dt of the particle ODE (raw learning rate n*dt under mean-field, dt under ntk)."""
    parametrization: Parametrization = field(default=Parametrization.MEAN_FIELD,
                                             metadata=from_config("model.parametrization"))
    temperature: float = field(default=0.0, metadata=from_config("dynamics.temperature"))
    """Langevin temperature 1/beta: noise sqrt(2 dt / beta) per coordinate and step."""
    bd_rate: float = field(default=0.0, metadata=from_config("dynamics.birth_death.rate"))
    """Birth-death rate alpha (0 = off)."""
    bd_scheme: Scheme = field(default=Scheme.CLONE, metadata=from_config("dynamics.birth_death.scheme"))

    def __post_init__(self) -> None:
        _coerce_enums(self)
        _require(self.width >= 1, f"network width must be a positive integer, got {self.width}")
        _require(
            math.isfinite(self.lr) and self.lr > 0, f"learning rate (dt) must be finite and > 0, got {self.lr}"
        )
        _require(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        _require(self.bd_rate >= 0, f"birth-death rate must be >= 0, got {self.bd_rate}")


T = TypeVar("T")


def to_dict(obj: Any) -> Any:
    """Plain JSON-able form of a spec (enums become their values)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    return obj


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Inverse of :func:`to_dict` for the specs of this module (unknown keys are errors)."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - names
    _require(not unknown, f"unknown keys for {cls.__name__}: {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        kwargs[key] = _coerce(hints[key], value)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any) -> Any:
    import typing

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        return None
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value)
    if origin is tuple:
        inner = args[0] if args else Any
        return tuple(_coerce(inner, v) for v in value)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        non_none = [a for a in args if a is not type(None)]
        return _coerce(non_none[0], value) if len(non_none) == 1 else value
    return value
