"""One schema for a network's settings: every engine spec field declares its config path
(workers/engine/specs.py), orchestrator/schema.py builds the specs from them. These tests prove every path
exists, that each config key reaches exactly its field, and that per-network fields ride along in packs."""

from __future__ import annotations

import dataclasses
import enum
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from orchestrator import config as cfgmod
from orchestrator.config import SPEC_SECTIONS, ComponentConfig, InitConfig, ScalingConfig
from orchestrator.plan import IDENTITY, PER_NETWORK, network_settings, network_spec, pack_key
from orchestrator.schema import SchemaError, at, build, check, driver_fields, paths
from workers.engine import (
    DataSpec,
    DynamicsSpec,
    InitSpec,
    ModelSpec,
    NetworkSpec,
    TaskKind,
    TaskSpec,
    from_dict,
    to_dict,
)
from workers.engine.specs import from_config, set_by_driver

ROOT = Path(__file__).resolve().parents[2]

# Where each spec built from the config lands in :func:`specs_of` (DataSpec: inside the task's spec).
OUTPUT: dict[type, tuple[str, ...]] = {TaskSpec: ("task",), DataSpec: ("task", "data"), ModelSpec: ("model",),
                                       DynamicsSpec: ("dynamics",), NetworkSpec: ("network",)}


def specs_of(cfg: ScalingConfig) -> dict[str, Any]:
    """Every spec a network of ``cfg`` trains with, as plain values."""
    return {"task": to_dict(cfg.task.spec()), "model": to_dict(cfg.model.spec()),
            "dynamics": to_dict(cfg.dynamics.spec()), "network": to_dict(network_spec(cfg, 5, 8, 9))}


def flat(value: Any, prefix: tuple[Any, ...] = ()) -> dict[tuple[Any, ...], Any]:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in flat(sub, (*prefix, key)).items()}
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return {k: v for i, sub in enumerate(value) for k, v in flat(sub, (*prefix, i)).items()}
    return {prefix: value}


@dataclasses.dataclass(frozen=True)
class Leaf:
    """A spec field that holds a value (not a nested spec): where it lands and where the config holds it."""

    spec: type
    name: str
    out: tuple[Any, ...]
    """Its place in :func:`specs_of`."""
    path: tuple[Any, ...]
    """Its config path from the top of ScalingConfig (list items by index)."""

    def __str__(self) -> str:
        return f"{self.spec.__name__}.{self.name}<-{'.'.join(map(str, self.path))}"


def _nested(tp: Any) -> tuple[type | None, bool]:
    """(the spec class a field holds, whether as tuple items)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) in (
        typing.Union, __import__("types").UnionType) else [tp]
    tp = args[0] if len(args) == 1 else tp
    many = typing.get_origin(tp) is tuple
    inner = typing.get_args(tp)[0] if many else tp
    return (inner if isinstance(inner, type) and dataclasses.is_dataclass(inner) else None), many


def leaves(cls: type, out: tuple[Any, ...], path: tuple[Any, ...]) -> list[Leaf]:
    hints = typing.get_type_hints(cls)
    found: list[Leaf] = []
    for name, rel in paths(cls).items():
        sub, many = _nested(hints[name])
        full = (*path, *rel.split("."))
        if sub is None:
            found.append(Leaf(cls, name, (*out, name), full))
        else:  # a nested spec (the first item of a tuple of them)
            found += leaves(sub, (*out, name, 0) if many else (*out, name), (*full, 0) if many else full)
    return found


ALL_LEAVES = [leaf for cls, section in SPEC_SECTIONS
              for leaf in leaves(cls, OUTPUT[cls], tuple(filter(None, section.split("."))))]


def test_the_test_knows_where_every_spec_lands() -> None:
    assert set(OUTPUT) == {cls for cls, _ in SPEC_SECTIONS}


# --------------------------------------------------------------------------- (a) paths resolve


def test_every_spec_path_resolves_in_the_config_schema() -> None:
    for cls, section in SPEC_SECTIONS:
        check(cls, ScalingConfig, section)  # raises SchemaError naming the field and the key
    full = BASE_FULL
    for leaf in ALL_LEAVES:
        value: Any = full
        for part in leaf.path:
            value = value[part] if isinstance(part, int) else getattr(value, part)


def test_a_wrong_path_names_the_field_the_key_and_the_closest_key() -> None:
    @dataclasses.dataclass(frozen=True)
    class Typo:
        bd_every: int = dataclasses.field(default=1, metadata=from_config("birth_death.evry"))

    with pytest.raises(SchemaError, match=r"Typo.bd_every reads config key 'dynamics.birth_death.evry'.*"
                                          r"did you mean 'dynamics.birth_death.every'"):
        check(Typo, ScalingConfig, "dynamics")

    @dataclasses.dataclass(frozen=True)
    class Undeclared:  # no metadata: read at its own name, which the section lacks
        bd_every: int = 1

    with pytest.raises(SchemaError, match=r"Undeclared.bd_every reads config key 'dynamics.bd_every'"):
        check(Undeclared, ScalingConfig, "dynamics")

    with pytest.raises(SchemaError, match=r"Inner.spread reads config key 'model.init.spread'"):
        check(Outer, ScalingConfig, "model")
    with pytest.raises(SchemaError, match=r"NotASection.lr is a Inner but config key 'dynamics.lr' is not a "):
        check(NotASection, ScalingConfig, "dynamics")


# Module level: type hints of nested specs resolve in their module.
@dataclasses.dataclass(frozen=True)
class Inner:
    spread: float = 1.0


@dataclasses.dataclass(frozen=True)
class Outer:  # a nested spec's path is checked against the nested section
    init: Inner = dataclasses.field(default_factory=Inner)


@dataclasses.dataclass(frozen=True)
class NotASection:
    lr: Inner = dataclasses.field(default_factory=Inner)


def test_a_wrong_path_on_an_engine_spec_fails_when_the_config_module_loads() -> None:
    code = ("import dataclasses, types; import workers.engine.specs as s; "
            "f = {f.name: f for f in dataclasses.fields(s.NetworkSpec)}['lr']; "
            "f.metadata = types.MappingProxyType({s.CONFIG: 'dynamics.lrr'}); import orchestrator.config")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode != 0
    assert "NetworkSpec.lr reads config key 'dynamics.lrr'" in proc.stderr
    assert "did you mean 'dynamics.lr'" in proc.stderr


def test_driver_set_fields_are_declared_and_required() -> None:
    assert IDENTITY == driver_fields(NetworkSpec) == ("net_id", "width", "seed")
    assert driver_fields(TaskSpec) == ("data",)
    cfg = cfgmod.load(None)
    with pytest.raises(SchemaError, match="NetworkSpec: the driver sets net_id, seed, width; got none"):
        build(NetworkSpec, cfg)
    with pytest.raises(SchemaError, match="TaskSpec: the driver sets data; got none"):
        build(TaskSpec, cfg.task)
    with pytest.raises(SchemaError, match="the driver sets none; got width"):
        build(InitSpec, cfg.model.init, width=3)


def test_a_none_config_value_for_a_required_field_is_an_error_unless_declared() -> None:
    @dataclasses.dataclass(frozen=True)
    class Bare:
        target: str = ""

    @dataclasses.dataclass(frozen=True)
    class Declared:
        target: str = dataclasses.field(default="", metadata=from_config(none="-"))

    task = cfgmod.load(None).task
    assert task.target is None
    with pytest.raises(SchemaError, match=r"Bare.target: config key 'target' is None.*from_config\(none=...\)"):
        build(Bare, task)
    assert build(Declared, task).target == "-"


def test_set_by_driver_is_not_read_from_the_config() -> None:
    @dataclasses.dataclass(frozen=True)
    class Mixed:
        dim: int
        made: str = dataclasses.field(default="", metadata=set_by_driver("computed"))

    assert paths(Mixed) == {"dim": "dim"}
    assert build(Mixed, cfgmod.load(None).task, made="z") == Mixed(16, "z")


# --------------------------------------------------------------------------- (b), (c) wiring


def _base() -> tuple[ScalingConfig, ScalingConfig]:
    """(plain teacher config, one where every nested spec exists: a dataset task with a mixture component,
    a prior law), both left unvalidated past loading so each key can change alone."""
    plain = cfgmod.load(None, ["sweep.variants=[]"])
    task = plain.task.model_copy(update={
        "kind": TaskKind.DATASET, "path": "/data.csv", "targets": ["y"],
        "components": [ComponentConfig(weight=1.0, mean=[0.0] * plain.task.dim, var=1.0)]})
    full = plain.model_copy(update={"task": task, "model": plain.model.model_copy(update={"prior": InitConfig()})})
    return plain, full


BASE_PLAIN, BASE_FULL = _base()


def _base_for(leaf: Leaf) -> ScalingConfig:
    return BASE_FULL if {"data", "components", "prior"} & set(leaf.out) else BASE_PLAIN


def _annotation(path: tuple[Any, ...]) -> Any:
    node: Any = ScalingConfig
    ann: Any = None
    for part in path:
        if isinstance(part, int):
            continue
        ann = node.model_fields[part].annotation
        inner = [a for a in typing.get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
        node = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else (inner[0] if inner else None)
    return ann


def other(value: Any, annotation: Any) -> Any:
    """A valid value unlike ``value`` for a config key of ``annotation``."""
    literals = [a for a in typing.get_args(annotation) if isinstance(a, str)]
    if typing.get_origin(annotation) is typing.Literal:
        return next(a for a in literals if a != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, enum.Enum):
        return next(m for m in type(value) if m is not value)
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 0.5
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return [value[0] + 0.5, *value[1:]] if value and isinstance(value[0], float) else [*value, "x"]
    if value is None:
        args = typing.get_args(annotation)
        if float in args:
            return 0.5
        if str in args:
            return "x"
    raise AssertionError(f"no test value for {value!r} ({annotation}); teach other() this type")


def replace_at(node: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(head, int):
        items = list(node)
        items[head] = replace_at(items[head], rest, value)
        return items
    return node.model_copy(update={head: replace_at(getattr(node, head), rest, value)})


def _changed(leaf: Leaf) -> tuple[ScalingConfig, ScalingConfig, Any]:
    base = _base_for(leaf)
    old: Any = base
    for part in leaf.path:
        old = old[part] if isinstance(part, int) else getattr(old, part)
    new = other(old, _annotation(leaf.path))
    return base, replace_at(base, leaf.path, new), new


@pytest.mark.parametrize("leaf", ALL_LEAVES, ids=str)
def test_a_config_key_changes_exactly_its_spec_field(leaf: Leaf) -> None:
    """(b) Each field of each spec, nested ones included, follows its config key, and nothing else does."""
    base, changed, new = _changed(leaf)
    before, after = flat(specs_of(base)), flat(specs_of(changed))
    assert before.keys() == after.keys()
    assert [k for k in before if before[k] != after[k]] == [leaf.out]
    got = after[leaf.out]
    assert got == (to_dict(tuple(new)) if isinstance(new, list) else to_dict(new))


@pytest.mark.parametrize("leaf", ALL_LEAVES, ids=str)
def test_per_network_fields_share_packs_and_pack_level_fields_split_them(leaf: Leaf) -> None:
    """(c) A NetworkSpec setting varies per network in one pack and is an MLflow param; any other field is
    pack-level and changes the pack key."""
    base, changed, new = _changed(leaf)
    if leaf.spec is NetworkSpec:
        assert pack_key(changed) == pack_key(base)
        assert network_settings(changed)[leaf.name] == to_dict(new) != network_settings(base)[leaf.name]
    else:
        assert pack_key(changed) != pack_key(base)


@pytest.mark.parametrize("name", sorted(PER_NETWORK))
def test_a_per_network_setting_set_by_the_user_reaches_its_network(name: str) -> None:
    """(c) Through validation, as a --set or a variant gives it."""
    (leaf,) = [x for x in ALL_LEAVES if x.spec is NetworkSpec and x.name == name]
    _, _, new = _changed(leaf)
    value = to_dict(new)
    cfg = cfgmod.load(None, [f"{PER_NETWORK[name]}={value}", "sweep.variants=[]"])
    assert to_dict(getattr(network_spec(cfg, 1, 8, 2), name)) == value
    assert network_settings(cfg)[name] == value
    assert pack_key(cfg) == pack_key(BASE_PLAIN)


def test_the_per_network_table_is_the_network_spec() -> None:
    fields = [f.name for f in dataclasses.fields(NetworkSpec)]
    assert list(PER_NETWORK) == [f for f in fields if f not in IDENTITY]
    assert PER_NETWORK["bd_rate"] == "dynamics.birth_death.rate"
    assert {leaf.name for leaf in ALL_LEAVES if leaf.spec is NetworkSpec} == set(PER_NETWORK)


# --------------------------------------------------------------------------- the schemas agree


# Config keys of the network's sections that no engine spec reads, and who reads them instead.
NOT_FOR_THE_ENGINE = {"task.module_dir": "orchestrator/userdata.py imports the target function from there"}


def test_every_engine_config_key_reaches_a_spec() -> None:
    """A key added to the task, model or dynamics section but to no spec would be validated and ignored."""
    used = {".".join(str(p) for p in leaf.path if not isinstance(p, int)) for leaf in ALL_LEAVES}
    prefixes = {u.rsplit(".", i)[0] for u in used for i in range(u.count(".") + 1)}
    sections = ("task.", "model.", "dynamics.")
    unread = [k for k in cfgmod.KNOWN_KEYS if k.startswith(sections) and k not in prefixes]
    assert unread == list(NOT_FOR_THE_ENGINE)


def test_engine_defaults_agree_with_config_defaults() -> None:
    """A spec built from the default config equals the spec's own defaults (the two are declared apart)."""
    cfg = cfgmod.load(None, ["sweep.variants=[]"])
    assert cfg.task.spec() == TaskSpec()
    assert cfg.model.spec() == ModelSpec()
    assert cfg.dynamics.spec() == DynamicsSpec()
    assert network_spec(cfg, 1, 8, 2) == NetworkSpec(net_id=1, width=8, seed=2)


@pytest.mark.parametrize("cfg", [BASE_PLAIN, BASE_FULL], ids=["plain", "full"])
def test_built_specs_have_the_engine_types(cfg: ScalingConfig) -> None:
    """Tuples, not lists; enums, not strings: a spec equals its own round trip through to_dict/from_dict."""
    for spec in (cfg.task.spec(), cfg.model.spec(), cfg.dynamics.spec(), network_spec(cfg, 1, 8, 2)):
        assert spec == from_dict(type(spec), to_dict(spec))
        hash(spec)
    assert at(cfg, "dynamics.birth_death.rate") == cfg.dynamics.birth_death.rate
