"""Search configuration: the base sections of a scaling sweep plus a ``search`` section (space, objective,
sampler, pruner, width fidelity) -> a frozen, validated :class:`SearchConfig`.

Every problem of a search space is found here, before a storage, a pool or a trial exists: empty choices,
``low > high``, log scale with a non-positive bound, unknown samplers and pruners, unknown parameter keys,
conditions on undefined parameters, and values the base config rejects (each choice and each bound is
applied to the base config and validated). Errors are one-line :class:`ConfigError` messages.

This module does not import optuna: the CLI can validate a search without it.
"""

from __future__ import annotations

import copy
import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from .config import (
    KNOWN_KEYS,
    ConfigError,
    DynamicsConfig,
    ExecutionConfig,
    ModelConfig,
    ScalingConfig,
    Strict,
    SweepConfig,
    TaskConfig,
    _set_dotted,
    _validate,
    load_raw,
    parse_set,
)

__all__ = [
    "WIDTH",
    "Condition",
    "FidelityConfig",
    "ObjectiveConfig",
    "ParamConfig",
    "PrunerConfig",
    "SamplerConfig",
    "SearchConfig",
    "SearchSection",
    "load_search",
    "searchable_keys",
]

#: The pseudo-key of the network width (a per-network setting, not a key of the scaling config).
WIDTH = "width"
#: Keys the budget sets: searching them would change what the objective compares.
_RESERVED = {"dynamics.steps": "set by search.objective (budget)"}
_OPS = ("eq", "ne", "gt", "ge", "lt", "le", "in", "not_in")

Scalar = str | int | float | bool | None


def searchable_keys() -> list[str]:
    """Leaf keys of the model and dynamics sections (plus ``width``): what a search space may name."""
    leaves = [k for k in KNOWN_KEYS if not any(o.startswith(k + ".") for o in KNOWN_KEYS)]
    return [WIDTH] + [k for k in leaves if k.split(".")[0] in ("model", "dynamics") and k not in _RESERVED]


@dataclass(frozen=True)
class Condition:
    """``param op value``: a parameter is suggested only when all its conditions hold."""

    param: str
    op: str
    value: Any

    def holds(self, params: Mapping[str, Any]) -> bool:
        if self.param not in params:  # the parameter it depends on was itself inactive
            return False
        got = params[self.param]
        if self.op == "eq":
            return bool(got == self.value)
        if self.op == "ne":
            return bool(got != self.value)
        if self.op == "in":
            return got in self.value
        if self.op == "not_in":
            return got not in self.value
        if not isinstance(got, int | float) or isinstance(got, bool):
            return False
        return {"gt": got > self.value, "ge": got >= self.value, "lt": got < self.value,
                "le": got <= self.value}[self.op]

    def __str__(self) -> str:
        return f"{self.param} {self.op} {self.value!r}"


class ParamConfig(Strict):
    """One dimension of the search space."""

    type: Literal["categorical", "int", "float"]
    """categorical (choices) | int | float (low, high, optional log or step)."""
    choices: list[Scalar] | None = None
    """Values of a categorical parameter."""
    low: float | None = None
    high: float | None = None
    log: bool = False
    """Sample on a log scale (int/float; needs low > 0; excludes step)."""
    step: float | None = None
    """Grid spacing of an int/float parameter."""
    when: dict[str, Any] | None = None
    """Only suggest this parameter when conditions on earlier parameters hold, e.g.
    {dynamics.birth_death.rate: {gt: 0}}; a scalar means eq, a list means in.
    Ops: eq ne gt ge lt le in not_in."""

    @model_validator(mode="after")
    def _shape(self) -> ParamConfig:
        if self.type == "categorical":
            if self.choices is None or len(self.choices) == 0:
                raise ValueError("categorical parameter needs a non-empty 'choices' list")
            if any(v is not None for v in (self.low, self.high, self.step)) or self.log:
                raise ValueError("categorical parameter takes 'choices' only (no low/high/step/log)")
            if len({repr(c) for c in self.choices}) != len(self.choices):
                raise ValueError(f"choices has duplicates: {self.choices}")
            return self
        if self.choices is not None:
            raise ValueError(f"{self.type} parameter takes low/high, not 'choices' (use type: categorical)")
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} parameter needs both 'low' and 'high'")
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError("low and high must be finite")
        if self.low > self.high:
            raise ValueError(f"low ({self.low:g}) must be <= high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0, got low={self.low:g}; raise low or set log: false")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined; drop one")
        if self.step is not None and self.step <= 0:
            raise ValueError(f"step must be > 0, got {self.step:g}")
        if self.type == "int":
            for name, v in (("low", self.low), ("high", self.high), ("step", self.step)):
                if v is not None and v != int(v):
                    raise ValueError(f"int parameter needs an integer {name}, got {v:g}")
        return self

    def conditions(self) -> list[Condition]:
        out = []
        for param, spec in (self.when or {}).items():
            if isinstance(spec, Mapping):
                if not spec:
                    raise ValueError(f"when.{param} is empty; give e.g. {{gt: 0}}")
                for op, value in spec.items():
                    if op not in _OPS:
                        raise ValueError(f"when.{param}: unknown operator '{op}'; use one of "
                                         f"{', '.join(_OPS)}")
                    if op in ("in", "not_in") and not isinstance(value, list):
                        raise ValueError(f"when.{param}.{op} needs a list, got {value!r}")
                    if op in ("gt", "ge", "lt", "le") and (
                            not isinstance(value, int | float) or isinstance(value, bool)):
                        raise ValueError(f"when.{param}.{op} needs a number, got {value!r}")
                    out.append(Condition(param, op, value))
            elif isinstance(spec, list):
                out.append(Condition(param, "in", spec))
            else:
                out.append(Condition(param, "eq", spec))
        return out

    def endpoints(self) -> list[Any]:
        """Values to check against the base config: every choice, or both bounds."""
        if self.type == "categorical":
            return list(self.choices or [])
        assert self.low is not None and self.high is not None
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]


class ObjectiveConfig(Strict):
    mode: Literal["single", "pareto"] = "single"
    """single: minimize the final test loss | pareto: minimize (final test loss, particle-steps), report the
    Pareto front."""
    budget: Literal["steps", "particle_steps"] = "steps"
    """steps: every trial trains dynamics.steps steps | particle_steps: a trial of width n trains
    particle_steps // n steps (equal compute per trial)."""
    particle_steps: int | None = Field(None, ge=1)
    """The particle-step budget (width x steps) when budget = particle_steps."""

    @model_validator(mode="after")
    def _budget(self) -> ObjectiveConfig:
        if self.budget == "particle_steps" and self.particle_steps is None:
            raise ValueError("budget: particle_steps needs 'particle_steps', e.g. particle_steps: 64000")
        if self.budget == "steps" and self.particle_steps is not None:
            raise ValueError("particle_steps is only used with budget: particle_steps")
        return self


class SamplerConfig(Strict):
    name: Literal["tpe", "cmaes", "gp", "random", "nsga2"] = "tpe"
    """tpe | cmaes | gp | random | nsga2 (multi-objective genetic algorithm)."""
    seed: int = 0
    """Seeds the sampler; a resumed search reseeds from (seed, trials so far) so it never replays draws."""
    n_startup_trials: int | None = Field(None, ge=0)
    """Random trials before the model kicks in (tpe, cmaes, gp); None = Optuna's default."""
    population_size: int | None = Field(None, ge=2)
    """nsga2 population (None = max(8, search.parallel))."""
    constant_liar: bool = True
    """tpe: treat trials in flight as bad results, so parallel asks spread out (Optuna's advice for parallel
    searches); False lets them crowd into the best region found so far."""


class PrunerConfig(Strict):
    name: Literal["auto", "successive_halving", "hyperband", "median", "none"] = "auto"
    """auto (successive_halving, or none for pareto) | successive_halving | hyperband | median | none."""
    min_resource: int | None = Field(None, ge=1)
    """successive_halving/hyperband: resource before the first rung, in steps (particle-steps under a
    particle-step budget); None = the budget / reduction_factor^2 (at least eval_every steps)."""
    reduction_factor: int = Field(3, ge=2)
    """successive_halving/hyperband: keep the best 1/reduction_factor at each rung."""
    n_startup_trials: int = Field(4, ge=0)
    """median: trials that are never pruned, to build the median."""
    n_warmup_steps: int | None = Field(None, ge=0)
    """median: resource (as min_resource) before a trial can be pruned (None = the budget / 5)."""


class FidelityConfig(Strict):
    widths: list[int]
    """Trials run at widths[0]; the top_k complete trials are retrained at every larger width."""
    top_k: int = Field(6, ge=1)
    """How many of the best small-width trials are promoted (Spearman needs >= 3)."""

    @model_validator(mode="after")
    def _widths(self) -> FidelityConfig:
        if len(self.widths) < 2:
            raise ValueError("fidelity.widths needs at least two widths, e.g. [16, 64, 256]")
        if any(w < 1 for w in self.widths):
            raise ValueError(f"fidelity.widths must be positive, got {self.widths}")
        if sorted(set(self.widths)) != self.widths:
            raise ValueError(f"fidelity.widths must be increasing without duplicates, got {self.widths}")
        return self


class ReevalConfig(Strict):
    top_k: int = Field(5, ge=1)
    """How many of the best complete trials are retrained."""
    seeds: int = Field(4, ge=2)
    """Fresh (initialisation and data) seeds each of them is retrained on; the pick is the lowest mean."""


class SearchSection(Strict):
    trials: int = Field(32, ge=1)
    """Trials to finish (complete, pruned or failed); trials a dead driver left running are retried, not
    counted."""
    parallel: int = Field(8, ge=1)
    """Trials in flight at once, one pack per worker (packed where compatible); each pack that ends is
    replaced at once by a pack of new trials, asked with every result told so far."""
    width: int = Field(64, ge=1)
    """Network width when 'width' is not in the space (and no fidelity)."""
    seed: int = 0
    """Data and initialisation seed shared by every trial (common random numbers: trials differ only in
    their parameters)."""
    space: dict[str, ParamConfig] = Field(default_factory=dict)
    """Parameter name (dotted config key, or 'width') -> its distribution; suggested in this order."""
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    pruner: PrunerConfig = Field(default_factory=PrunerConfig)
    fidelity: FidelityConfig | None = None
    """Width as fidelity (docs/science.md, section 5): search at a small width, promote the best to larger ones."""
    reeval: ReevalConfig | None = None
    """Retrain the best trials on fresh seeds and pick the lowest mean: one run's final loss is a noisy draw,
    so the lowest of many draws flatters its configuration (docs/search.md)."""

    @property
    def pruner_name(self) -> str:
        if self.pruner.name != "auto":
            return self.pruner.name
        return "none" if self.objective.mode == "pareto" else "successive_halving"

    @property
    def trial_width(self) -> int:
        """Width of a trial whose space has no 'width' parameter."""
        return self.fidelity.widths[0] if self.fidelity is not None else self.width


class SearchConfig(Strict):
    name: str = Field("search", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """Search name: the MLflow experiment, the default study name and output folder prefix."""
    task: TaskConfig = Field(default_factory=TaskConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    dynamics: DynamicsConfig = Field(default_factory=DynamicsConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    """Only used by the exported best config (best_config.yaml for `mfsweep scaling`)."""
    search: SearchSection = Field(default_factory=SearchSection)

    def base_raw(self) -> dict[str, Any]:
        """The scaling-config mapping of the fixed settings (no search section)."""
        raw = self.model_dump(mode="json")
        raw.pop("search")
        return raw

    def steps_for(self, width: int) -> int:
        """Training steps of a trial of this width under the objective's budget."""
        obj = self.search.objective
        if obj.budget == "particle_steps":
            assert obj.particle_steps is not None
            return max(1, obj.particle_steps // width)
        return self.dynamics.steps

    def resolve(self, params: Mapping[str, Any], width: int | None = None,
                where: str = "trial") -> tuple[ScalingConfig, int]:
        """(scaling config with ``params`` applied and the budget's steps, width) of one trial; raises
        ConfigError when the combination is invalid."""
        w = int(params.get(WIDTH, width if width is not None else self.search.trial_width))
        raw = self.base_raw()
        for key, value in params.items():
            if key != WIDTH:
                _set_dotted(raw, key, value, where=f"search.space.{key}")
        raw["dynamics"]["steps"] = self.steps_for(w)
        raw["dynamics"]["eval_every"] = min(raw["dynamics"].get("eval_every", 50), raw["dynamics"]["steps"])
        return _validate(raw, where), w


# --------------------------------------------------------------------------- loading


def _search_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(f"{prefix}{name}")
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_search_keys(ann, f"{prefix}{name}."))
    return keys


_SEARCH_KEYS = _search_keys(SearchConfig) + [f"search.fidelity.{k}" for k in FidelityConfig.model_fields] + \
    [f"search.reeval.{k}" for k in ReevalConfig.model_fields]


def _format(err: ValidationError, where: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        close = difflib.get_close_matches(loc, _SEARCH_KEYS, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else "; see the keys in configs/search/*.yaml"
        return f"{where}: unknown key '{loc}'{hint}"
    got = first.get("input")
    got_s = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    return f"{where}: {loc}: {msg}{got_s}{more}"


def _check_space(cfg: SearchConfig, where: str) -> None:
    """Semantic checks that need the whole config (keys, conditions, values against the base config)."""
    s = cfg.search
    allowed = searchable_keys()
    seen: list[str] = []
    for key, param in s.space.items():
        at = f"{where}: search.space.{key}"
        if key in _RESERVED:
            raise ConfigError(f"{at}: cannot be searched ({_RESERVED[key]})")
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else "searchable: width, model.*, dynamics.*"
            raise ConfigError(f"{at}: unknown parameter key; {hint}")
        try:
            conds = param.conditions()
        except ValueError as err:
            raise ConfigError(f"{at}: {err}") from None
        for c in conds:
            if c.param not in seen:
                raise ConfigError(f"{at}: when refers to '{c.param}', which is not a parameter defined "
                                  f"before it in search.space")
        seen.append(key)
        if key == WIDTH:
            if s.fidelity is not None:
                raise ConfigError(f"{at}: width cannot be searched with search.fidelity (the fidelity sets "
                                  "it)")
            bad = [v for v in param.endpoints() if not isinstance(v, int | float) or isinstance(v, bool)
                   or v < 1 or v != int(v)]
            if bad:
                raise ConfigError(f"{at}: widths must be positive integers, got {bad}")
            continue
        for value in param.endpoints():
            raw = cfg.base_raw()
            _set_dotted(raw, key, value, where=at)
            _validate(raw, f"{at}={value!r}")
    if not s.space:
        raise ConfigError(f"{where}: search.space is empty; add parameters, e.g. dynamics.lr: "
                          "{type: float, low: 0.01, high: 1.0, log: true}")
    pareto = s.objective.mode == "pareto"
    if pareto and s.pruner_name != "none":
        raise ConfigError(f"{where}: search.pruner.name: Optuna cannot prune multi-objective studies; "
                          "set search.pruner.name: none (or auto)")
    if pareto and s.sampler.name == "cmaes":
        raise ConfigError(f"{where}: search.sampler.name: cmaes is single-objective; use nsga2, tpe, gp or "
                          "random with objective.mode: pareto")
    if pareto and s.fidelity is not None:
        raise ConfigError(f"{where}: search.fidelity needs objective.mode: single (it ranks by test loss)")
    if s.fidelity is not None and s.fidelity.top_k > s.trials:
        raise ConfigError(f"{where}: search.fidelity.top_k ({s.fidelity.top_k}) exceeds search.trials "
                          f"({s.trials})")
    if pareto and s.reeval is not None:
        raise ConfigError(f"{where}: search.reeval needs objective.mode: single (it ranks by test loss)")
    if s.reeval is not None and s.reeval.top_k > s.trials:
        raise ConfigError(f"{where}: search.reeval.top_k ({s.reeval.top_k}) exceeds search.trials ({s.trials})")
    # The fixed settings must form a valid config with the budget applied.
    cfg.resolve({}, where=f"{where} (fixed settings with the budget applied)")


def validate_search(raw: Mapping[str, Any], where: str) -> SearchConfig:
    try:
        cfg = SearchConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format(err, where)) from None
    _check_space(cfg, where)
    return cfg


def load_search(path: str | Path | None, overrides: Sequence[str] = (), **direct: Any) -> SearchConfig:
    """Load a search YAML, apply ``--set`` overrides and direct dotted overrides, validate everything."""
    if path is None:
        raise ConfigError("mfsweep search needs a CONFIG, e.g. configs/search/bd_teacher.yaml")
    raw = copy.deepcopy(load_raw(path))
    for key, value in [*parse_set(overrides), *direct.items()]:
        _set_dotted(raw, key, value, where=f"--set {key}")
    return validate_search(raw, str(path))
