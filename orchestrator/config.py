"""Sweep configuration: YAML + ``--set`` overrides -> a frozen, validated :class:`ScalingConfig`.

Every error is one line that names the key and the fix (:class:`ConfigError`); unknown keys are errors with
a suggestion of the closest known key.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Specs and compatibility rules only: workers.engine loads torch lazily, and validation must not wait for it.
from workers.engine import (
    Algorithm,
    DataSpec,
    DynamicsSpec,
    InitSpec,
    InputDist,
    LrSchedule,
    Measure,
    ModelSpec,
    NetworkSpec,
    Parametrization,
    RateConvention,
    Scheme,
    StopRule,
    TaskKind,
    TaskSpec,
    Unit,
    check_compatible,
    traits,
)

from .schema import build, check

#: Fewest reports in a window for the plateau test (workers.engine.stopping.MIN_POINTS).
MIN_POINTS = 10

#: The embedded quick-start sweep that ``mfsweep scaling`` runs without a config.
QUICKSTART = Path(__file__).with_name("quickstart.yaml")


class ConfigError(ValueError):
    """A bad configuration; ``str(err)`` is one line naming the key and the fix."""


class Strict(BaseModel):
    # The attribute docstrings document each key here, in the source; pydantic's use_attribute_docstrings
    # would re-parse this file at every start (a tenth of `mfsweep validate`) for descriptions nothing reads.
    model_config = ConfigDict(extra="forbid", frozen=True)


class ComponentConfig(Strict):
    weight: float
    """Mixture weight a_m (may be negative)."""
    mean: list[float]
    """Centre mu_m (length task.dim)."""
    var: float = Field(gt=0)
    """Variance v_m of N(x; mu_m, v_m I)."""


class TaskConfig(Strict):
    kind: TaskKind = TaskKind.TEACHER
    """teacher | gaussian_mixture | spherical_3spin | digits | dataset (your file) | function (your callable)."""
    dim: int = Field(16, ge=1)
    """Input dimension d (digits: always 64; dataset: filled in from the data)."""
    seed: int = 0
    """Seeds the target (teacher weights, couplings) and the test set."""
    out_dim: int = Field(1, ge=1)
    """Teacher output dimension (dataset and function: filled in from the data / the target's output)."""
    teacher_units: int = Field(10, ge=1)
    """ReLU units of the teacher network."""
    inputs: InputDist = InputDist.SPHERE
    """Input law of the teacher and function tasks: sphere | gaussian | uniform_box ([-1, 1]^d)."""
    n_train: int = Field(4096, ge=1)
    """Fixed training set size (gd without closed form; sgd with finite_set; dataset: filled in)."""
    n_test: int = Field(4096, ge=1)
    """Held-out test samples (unused where the population loss is exact; dataset: filled in)."""
    components: list[ComponentConfig] = Field(default_factory=list)
    """Gaussian-mixture target; empty = the 1-D example target of docs/science.md."""
    measure: Measure = Measure.LEBESGUE
    """Gaussian-mixture input measure: lebesgue (exact energy) | gaussian (samplable)."""
    measure_std: float = Field(2.0, gt=0)
    """Std of the Gaussian input measure."""
    path: str | None = None
    """dataset: the data file, .npz (arrays x_key/y_key), .npy (one 2-D array), .csv or .parquet."""
    test_path: str | None = None
    """dataset: a given test split (same layout); None = split task.path by test_fraction with task.seed."""
    x_key: str = "x"
    """dataset, .npz: the inputs array."""
    y_key: str = "y"
    """dataset, .npz: the targets (or labels) array."""
    features: list[str | int] = Field(default_factory=list)
    """dataset, .csv/.parquet/.npy: input columns (names, or indices for .npy); empty = all but the targets."""
    targets: list[str | int] = Field(default_factory=list)
    """dataset, .csv/.parquet: target columns (required); .npy: indices (default the last column)."""
    test_fraction: float = Field(0.25, gt=0, lt=1)
    """dataset: share of the rows held out for the test loss."""
    standardize_inputs: bool = True
    """dataset: centre and scale each input by the training part's mean and std."""
    standardize_targets: bool = False
    """dataset, regression: the same for the targets (the loss is then in units of the target's std)."""
    classification: bool = False
    """dataset: the one target column holds labels (integers or strings) -> one-hot targets, squared loss."""
    target: str | None = None
    """function: 'package.module:function', mapping a (P, d) tensor to (P,) or (P, k)."""
    module_dir: str | None = None
    """function: folder the target's module is imported from (default: the working directory); on Ray its
    top-level package or module is shipped to the workers (runtime_env py_modules)."""
    content_hash: str | None = None
    """dataset/function: filled in from the data / the target's module source; a set value must match (a
    resume on changed data is refused)."""

    @model_validator(mode="wrap")
    @classmethod
    def _user_problem(cls, data: Any, handler: Any) -> TaskConfig:
        # The user's file or callable is read and checked here, before anything starts (orchestrator/userdata).
        cfg: TaskConfig = handler(data)
        from .userdata import DataError, resolve

        try:
            found = resolve(cfg)
        except DataError as err:  # pydantic puts this under 'task:' already
            raise ValueError(str(err).removeprefix("task.")) from None
        return cfg.model_copy(update=found) if found else cfg

    def spec(self) -> TaskSpec:
        # A dataset task's file keys, read from this same section, make its DataSpec.
        data = build(DataSpec, self) if self.kind is TaskKind.DATASET and self.path else None
        return build(TaskSpec, self, data=data)


class InitConfig(Strict):
    z: Literal["normal", "uniform"] = "normal"
    """Law of w (ridge units) or of the centres (gaussian units)."""
    loc: float = 0.0
    scale: float | None = Field(None, ge=0)
    """None = automatic (1/sqrt(E|x|^2) for ridge units, the input spread for gaussian units)."""
    low: float = -2.0
    high: float = 2.0
    c_law: Literal["normal", "uniform"] = "normal"
    """Law of the output weights c: normal N(c_mean, c_std^2) | uniform U[c_low, c_high]."""
    c_mean: float = 0.0
    c_std: float = Field(1.0, ge=0)
    c_low: float = -1.0
    c_high: float = 1.0
    bias_std: float = Field(0.0, ge=0)

    def spec(self) -> InitSpec:
        return build(InitSpec, self)

    @model_validator(mode="after")
    def _bounds(self) -> InitConfig:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        if self.c_low >= self.c_high:
            raise ValueError(f"c_low ({self.c_low}) must be < c_high ({self.c_high})")
        return self


class ModelConfig(Strict):
    unit: Unit = Unit.RELU
    """relu | tanh | sigmoid | gaussian."""
    bias: bool = True
    """Ridge units: use a bias b in phi(w.x + b)."""
    parametrization: Parametrization = Parametrization.MEAN_FIELD
    """mean_field (1/n output, raw lr n*dt) | ntk (1/sqrt(n) output, raw lr dt)."""
    gaussian_var: float = Field(0.5, gt=0)
    """Variance s^2 of gaussian units N(x; y, s^2 I)."""
    init: InitConfig = Field(default_factory=InitConfig)
    """Initial particle law mu_0."""
    prior: InitConfig | None = None
    """Law of fresh particles for birth-death scheme 'prior' (None = the initial law)."""

    def spec(self) -> ModelSpec:
        return build(ModelSpec, self)


class BirthDeathConfig(Strict):
    rate: float = Field(0.0, ge=0)
    """alpha; 0 turns birth-death off."""
    scheme: Scheme = Scheme.CLONE
    """clone (copy uniform survivors) | prior (re-inject fresh prior draws with c = 0)."""
    every: int = Field(1, ge=1)
    """Apply every this many steps."""
    quench: int = Field(0, ge=0)
    """Last steps run without birth-death."""
    convention: RateConvention = RateConvention.PER_TIME
    """per_time: p = 1-exp(-alpha|beta| dt every) (paper) | per_step: p = min(1, alpha|beta|) (notebooks)."""


class StopConfig(Strict):
    rule: StopRule = StopRule.FIXED
    """fixed: every network trains dynamics.steps | plateau: a network stops as soon as its test loss is
    stationary over the final window (dynamics.steps is then the cap). Either way each result is the mean
    over the final window and says whether it converged (docs/convergence.md)."""
    window: int = Field(1000, ge=1)
    """The final window (the estimate and the plateau test) is the last quarter of the run but at least this
    many steps (and at most the last half of the run)."""
    rel_tol: float = Field(0.1, gt=0)
    """Converged when the relative decrease of the test loss that the window's trend predicts over a doubling
    of the training time is surely (see confidence) below this (docs/convergence.md)."""
    confidence: float = Field(2.0, ge=0)
    """Standard errors added to the measured decrease before comparing it with rel_tol (one-sided)."""
    min_steps: int = Field(0, ge=0)
    """plateau: no network stops before this step (guards early plateaus, e.g. near a saddle)."""


class LrScheduleConfig(Strict):
    kind: LrSchedule = LrSchedule.CONSTANT
    """constant | inverse_time: dt / (1 + t / decay_steps) | cosine: from dt to floor*dt over dynamics.steps."""
    decay_steps: float = Field(1000.0, gt=0)
    """inverse_time: steps after which dt has halved."""
    floor: float = Field(0.0, ge=0, le=1)
    """Smallest dt(t) / dt."""


class DynamicsConfig(Strict):
    algorithm: Algorithm = Algorithm.SGD
    """gd (exact energy where closed form, else the fixed training set) | sgd (mini-batches)."""
    lr: float = Field(0.05, gt=0, allow_inf_nan=False)
    """Time step dt of the particle ODE (raw learning rate n*dt under mean_field, dt under ntk)."""
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(256, ge=1)
    """SGD mini-batch size P (shared by a pack)."""
    finite_set: bool = False
    """SGD: sample batches from the fixed training set instead of fresh samples."""
    temperature: float = Field(0.0, ge=0)
    """Langevin temperature 1/beta (noise sqrt(2 dt/beta))."""
    eval_every: int = Field(50, ge=1)
    """Report (and log) losses every this many steps."""
    diverge_threshold: float = Field(1e8, gt=0)
    """A loss above this (or non-finite) retires the network as diverged."""
    birth_death: BirthDeathConfig = Field(default_factory=BirthDeathConfig)
    stop: StopConfig = Field(default_factory=StopConfig)
    """When a network stops, and how its result is estimated."""
    lr_schedule: LrScheduleConfig = Field(default_factory=LrScheduleConfig)
    """Step-size schedule dt(t) (SGD's noise floor shrinks with dt)."""

    @model_validator(mode="after")
    def _quench(self) -> DynamicsConfig:
        if self.birth_death.quench > self.steps:
            raise ValueError(f"birth_death.quench ({self.birth_death.quench}) exceeds steps ({self.steps})")
        if self.stop.rule is StopRule.PLATEAU and self.stop.window < MIN_POINTS * self.eval_every:
            raise ValueError(
                f"stop.window ({self.stop.window}) holds fewer than {MIN_POINTS} reports at eval_every "
                f"{self.eval_every}, too few for the plateau test; raise stop.window to >= "
                f"{MIN_POINTS * self.eval_every} or lower eval_every")
        return self

    def spec(self) -> DynamicsSpec:
        return build(DynamicsSpec, self)


class VariantConfig(Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """Label of the variant (fitted separately); it names MLflow metrics, which refuse '+' and the like."""
    set: dict[str, Any] = Field(default_factory=dict)
    """Overrides of the base config, as dotted keys: {dynamics.birth_death.rate: 1.0}."""


class SweepConfig(Strict):
    widths: list[int] = Field(default_factory=lambda: [16, 32, 64, 128, 256, 512])
    """Network widths n."""
    seeds: int = Field(4, ge=1)
    """Replicates per width (the bootstrap resamples them)."""
    seed: int = 0
    """Sweep seed: each replicate's stream derives from (seed, replicate), shared across variants."""
    variants: list[VariantConfig] = Field(default_factory=list)
    """Settings fitted separately; empty = one variant named 'base'."""

    @field_validator("widths")
    @classmethod
    def _widths(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("widths is empty; give at least two widths, e.g. [16, 64, 256]")
        bad = [w for w in v if w < 1]
        if bad:
            raise ValueError(f"widths must be positive integers, got {bad}")
        if len(set(v)) != len(v):
            raise ValueError(f"widths has duplicates: {v}")
        return sorted(v)

    @field_validator("variants")
    @classmethod
    def _unique(cls, v: list[VariantConfig]) -> list[VariantConfig]:
        names = [x.name for x in v]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique, got {names}")
        return v


class ExecutionConfig(Strict):
    backend: Literal["ray", "local"] = "ray"
    """ray (actor pool, local or --address cluster) | local (one worker process on this machine, no Ray: the
    fastest start, a few seconds to the first step)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda where the workers see a GPU, else cpu."""
    dtype: Literal["float32", "float64"] = "float32"
    kernel: Literal["auto", "torch", "triton"] = "auto"
    """Sampled-loss steps: auto (fused Triton kernels on CUDA when triton imports, else torch) | torch |
    triton (CUDA only)."""
    precision: Literal["ieee", "tf32"] = "ieee"
    """Triton float32 dots: ieee (exact FP32) | tf32 (tensor cores: faster, inputs rounded to 10-bit mantissas)."""
    workers: int | None = Field(None, ge=1)
    """Most actors at once; None = one per GPU, or one per 'cpus_per_worker' CPUs, of every node, including
    nodes that join while the sweep runs."""
    max_workers: int | None = Field(None, ge=1)
    """Most workers to ask the Ray autoscaler for (request_resources: one bundle per queued or running pack);
    None = ask for nothing, use the nodes that are there or join."""
    wait_for_workers_s: float = Field(3600.0, gt=0)
    """How long a run waits while no worker is alive (all nodes preempted) before it exits with code 3 and
    the resume command; nothing is recorded as failed."""
    cpus_per_worker: int = Field(1, ge=1)
    checkpoint_every: int = Field(200, ge=1)
    """Checkpoint each pack every this many steps (rounded up to a report step)."""
    max_retries: int = Field(3, ge=0)
    """Retries of a pack whose own training raised, before its networks are marked failed. A pack whose
    worker or node is lost always runs again from its checkpoint (no limit)."""
    memory_fraction: float = Field(0.5, gt=0, le=1)
    """Share of a worker's device memory one pack may use."""
    max_networks_per_pack: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _kernel_device(self) -> ExecutionConfig:
        if self.kernel == "triton" and self.device == "cpu":
            raise ValueError("kernel=triton runs on CUDA only; set execution.kernel=auto or torch, or device=cuda")
        return self


class TrackingConfig(Strict):
    runs: Literal["network", "group"] = "network"
    """MLflow child runs: network (one per network: its own curves, params and status) | group (one per
    variant x width, each seed's curves as metric keys ``seed<r>/<key>``: a 100k-network sweep stays a few
    thousand runs in the MLflow UI). See README, "Very large sweeps"."""


class ScalingConfig(Strict):
    name: str = Field("sweep", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """Sweep name: the MLflow experiment and the output folder prefix."""
    task: TaskConfig = Field(default_factory=TaskConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    dynamics: DynamicsConfig = Field(default_factory=DynamicsConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def variant_configs(self) -> list[tuple[str, ScalingConfig]]:
        """(name, resolved config) per variant; a variant's config has no variants of its own."""
        base = self.model_dump(mode="json")
        base["sweep"]["variants"] = []
        if not self.sweep.variants:
            return [("base", self)]
        out = []
        for i, var in enumerate(self.sweep.variants):
            raw = copy.deepcopy(base)
            for key, value in var.set.items():
                _check_per_variant(key, value, where=f"sweep.variants[{i}] ({var.name}).set")
                _set_dotted(raw, key, value, where=f"sweep.variants[{i}].set")
            out.append((var.name, _validate(raw, where=f"sweep.variants[{i}] ({var.name})")))
        return out


#: The engine specs the config is converted to, each with the section its config paths are relative to
#: (orchestrator/schema.py; nested specs, e.g. ModelSpec.init, follow from their fields).
SPEC_SECTIONS: tuple[tuple[type, str], ...] = (
    (TaskSpec, "task"), (DataSpec, "task"), (ModelSpec, "model"), (DynamicsSpec, "dynamics"), (NetworkSpec, ""))


def _check_specs() -> None:
    """SchemaError, at import, for a spec field that names a key the config lacks (about a millisecond)."""
    for spec, section in SPEC_SECTIONS:
        check(spec, ScalingConfig, section)


_check_specs()


# --------------------------------------------------------------------------- loading


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        full = f"{prefix}{name}"
        keys.append(full)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_known_keys(ann, full + "."))
    return keys


KNOWN_KEYS = _known_keys(ScalingConfig)


def _hint(loc: str) -> str:
    if loc == "search":
        return "; this is a search config: run it with mfsweep search CONFIG"
    close = difflib.get_close_matches(loc, KNOWN_KEYS, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else "; see the keys in configs/scaling/*.yaml"


def _format(err: ValidationError, where: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"{where}: unknown key '{loc}'{_hint(loc)}"
    got = first.get("input")
    got_s = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    return f"{where}: {loc}: {msg}{got_s}{more}"


def _validate(raw: Mapping[str, Any], where: str) -> ScalingConfig:
    try:
        cfg = ScalingConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format(err, where)) from None
    try:
        check_compatible(traits(cfg.task.spec()), cfg.model.spec(), cfg.dynamics.spec())
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
    return cfg


# What a variant may change: the network's task, model and dynamics, and the pack-level numerics (packs are
# grouped by these: plan.pack_key). The rest (sweep.*, execution's pool and budget settings, name) belongs to
# the whole sweep.
PER_VARIANT_SECTIONS = ("task", "model", "dynamics")
PER_VARIANT_KEYS = ("execution.dtype", "execution.kernel", "execution.precision")


def _leaves(key: str, value: Any) -> list[str]:
    if isinstance(value, dict) and value:
        return [leaf for k, v in value.items() for leaf in _leaves(f"{key}.{k}", v)]
    return [key]


def _check_per_variant(key: str, value: Any, where: str) -> None:
    """ConfigError (one line) for a known key that a variant cannot change (it would be silently ignored)."""
    for leaf in _leaves(key, value):
        if leaf.split(".")[0] in PER_VARIANT_SECTIONS or leaf in PER_VARIANT_KEYS or leaf not in KNOWN_KEYS:
            continue  # unknown keys are reported by validation, with a suggestion
        allowed = ", ".join([f"{s}.*" for s in PER_VARIANT_SECTIONS] + list(PER_VARIANT_KEYS))
        raise ConfigError(f"{where}: '{leaf}' applies to the whole sweep, not to one variant; set it at the top "
                          f"level (a variant may set {allowed})")


def _set_dotted(raw: dict[str, Any], key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{where}: '{'.'.join(parts[: i + 1])}' is not a section, cannot set '{key}'")
        node = nxt
    node[parts[-1]] = value


def parse_set(items: Sequence[str]) -> list[tuple[str, Any]]:
    """``key=value`` strings -> (key, YAML-parsed value)."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set sweep.seeds=3")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({err.__class__.__name__})") from None
        out.append((key.strip(), value))
    return out


def load_raw(path: str | Path | None) -> dict[str, Any]:
    """The YAML mapping of a config file ({} for None = embedded defaults)."""
    if path is None:
        return {}
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config {p} is a folder; pass a YAML file such as configs/scaling/teacher_relu.yaml "
                          "(or mfsweep resume FOLDER to continue a run)")
    if not p.is_file():
        raise ConfigError(f"config file {p} not found; pass a path such as configs/scaling/teacher_relu.yaml")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, OSError) as err:
        why = "is not UTF-8 text" if isinstance(err, UnicodeDecodeError) else f"cannot be read ({err.strerror})"
        raise ConfigError(f"{p} {why}; pass a YAML config file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or err.__class__.__name__
        raise ConfigError(f"{p}: malformed YAML{at}: {problem}; fix the syntax") from None
    if data is None:  # an empty file (or only comments) must not silently run the embedded defaults
        raise ConfigError(f"{p} is empty; give at least one section (task, model, dynamics, sweep, execution), "
                          "e.g. start from configs/scaling/teacher_relu.yaml, or omit CONFIG for the quick start")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections (task, model, dynamics, ...)")
    return data


def load(path: str | Path | None, overrides: Sequence[str] = (), **direct: Any) -> ScalingConfig:
    """Load, apply ``--set`` overrides and direct dotted overrides, validate (variants included)."""
    raw = load_raw(path)
    where = str(path) if path is not None else "config"
    for key, value in [*parse_set(overrides), *direct.items()]:
        _set_dotted(raw, key, value, where=f"--set {key}")
    cfg = _validate(raw, where)
    cfg.variant_configs()  # validate every variant now, before anything starts
    return cfg


#: What ``mfsweep resume DIR --set`` may change: the step cap, so a finished sweep continues from its checkpoints.
EXTENDABLE = ("dynamics.steps",)


def extend(cfg: ScalingConfig, overrides: Sequence[str]) -> ScalingConfig:
    """``cfg`` with its step cap raised by ``--set dynamics.steps=N`` (anything else is an error). A birth-death
    quench grows by the same number of steps: birth-death stopped where it stopped, and the extended run is
    exactly the run that had the larger cap and quench from the start."""
    if not overrides:
        return cfg
    pairs = parse_set(overrides)
    for key, _ in pairs:
        if key not in EXTENDABLE:
            raise ConfigError(f"resume --set {key}: only {', '.join(EXTENDABLE)} can change when a sweep "
                              "continues; start a new sweep (mfsweep scaling ... --out NEW) to change anything else")
    steps = dict(pairs)["dynamics.steps"]
    old = cfg.dynamics.steps
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < old:
        raise ConfigError(f"resume --set dynamics.steps={steps}: give a whole number of steps >= {old}, the "
                          "sweep's current cap")
    extra = steps - old
    for name, v in cfg.variant_configs():
        if v.dynamics.steps != old:
            raise ConfigError(f"variant {name} sets its own dynamics.steps ({v.dynamics.steps}); edit it in the "
                              "sweep's config.yaml instead of resume --set")
        if extra and v.dynamics.lr_schedule.kind is LrSchedule.COSINE:
            raise ConfigError(f"variant {name} uses lr_schedule cosine, whose shape depends on the total steps; "
                              "start a new sweep with more dynamics.steps")
    raw = cfg.model_dump(mode="json")
    raw["dynamics"]["steps"] = steps
    raw["dynamics"]["birth_death"]["quench"] += extra if raw["dynamics"]["birth_death"]["quench"] else 0
    for var in raw["sweep"]["variants"]:
        q = var["set"].get("dynamics.birth_death.quench")
        if isinstance(q, int) and q > 0:
            var["set"]["dynamics.birth_death.quench"] = q + extra
    new = _validate(raw, "resume --set")
    new.variant_configs()
    return new


def dump(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
