"""Config -> engine spec, generically. Each field of an engine spec (workers/engine/specs.py) declares where
the sweep config holds its value (:func:`workers.engine.specs.from_config`: a dotted path relative to the
config section the spec is built from, by default the field's own name) or that the driver sets it
(:func:`workers.engine.specs.set_by_driver`). :func:`build` reads those paths, so a setting is declared once,
on the engine's field, and no conversion is written by hand; :func:`check` proves every path exists in the
config's pydantic models (orchestrator/config.py runs it at import, so a wrong path fails at once).

Conversion follows the spec field's type: a dataclass field is built from the config model at its path, a
tuple from a list (element by element), None stays None where the field admits it (else the field's declared
``none`` value); everything else is taken as the config holds it (pydantic has already validated it).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel

from workers.engine.specs import BY_DRIVER, CONFIG, CONFIG_NONE

T = TypeVar("T")


class SchemaError(TypeError):
    """A spec field's declaration does not match the config's schema (a programming error, not the user's)."""


def config_path(f: dataclasses.Field[Any]) -> str | None:
    """Where field ``f`` is read in its spec's config section; None for a field the driver sets."""
    if BY_DRIVER in f.metadata:
        return None
    return str(f.metadata.get(CONFIG, f.name))


def paths(cls: type) -> dict[str, str]:
    """Field name -> config path of the fields of spec ``cls`` read from the config (declaration order)."""
    return {f.name: p for f in dataclasses.fields(cls) if (p := config_path(f)) is not None}


def driver_fields(cls: type) -> tuple[str, ...]:
    """The fields of spec ``cls`` that the driver sets itself (:func:`build` wants them as arguments)."""
    return tuple(f.name for f in dataclasses.fields(cls) if BY_DRIVER in f.metadata)


def at(source: Any, path: str) -> Any:
    """The value at dotted ``path`` of a config model."""
    return _walk(source, path.split("."))


def _walk(source: Any, parts: tuple[str, ...] | list[str]) -> Any:
    value = source
    for part in parts:
        value = getattr(value, part)
    return value


# --------------------------------------------------------------------------- building


def _non_none(tp: Any) -> tuple[Any, bool]:
    """(``tp`` without None, whether it admitted None); a union of several types stays as it is."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), len(rest) < len(args)  # noqa: UP007
    return tp, False


def _spec_class(tp: Any) -> type | None:
    """The dataclass a field of type ``tp`` holds (directly, optionally, or as tuple elements), if any."""
    tp = _non_none(tp)[0]
    if typing.get_origin(tp) is tuple:
        tp = _non_none(typing.get_args(tp)[0])[0]
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _converter(tp: Any) -> Callable[[Any], Any] | None:
    """How a config value becomes a value of spec type ``tp`` (None: as it is)."""
    tp = _non_none(tp)[0]
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        cls = tp
        return lambda v: v if isinstance(v, cls) else build(cls, v)
    if typing.get_origin(tp) is tuple:
        inner = _converter(typing.get_args(tp)[0])
        return tuple if inner is None else (lambda v: tuple(inner(x) for x in v))
    return None


@dataclass(frozen=True)
class _Field:
    name: str
    path: tuple[str, ...]
    convert: Callable[[Any], Any] | None
    nullable: bool
    none: Any


@dataclass(frozen=True)
class _Recipe:
    fields: tuple[_Field, ...]
    by_driver: frozenset[str]


_RECIPES: dict[type, _Recipe] = {}


def _recipe(cls: type) -> _Recipe:
    # Built once per spec class: specs are built for every network the planner places (pack keys).
    recipe = _RECIPES.get(cls)
    if recipe is None:
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            path = config_path(f)
            if path is not None:
                out.append(_Field(f.name, tuple(path.split(".")), _converter(hints[f.name]),
                                  _non_none(hints[f.name])[1], f.metadata.get(CONFIG_NONE, dataclasses.MISSING)))
        recipe = _RECIPES[cls] = _Recipe(tuple(out), frozenset(driver_fields(cls)))
    return recipe


def build(cls: type[T], source: Any, **by_driver: Any) -> T:
    """Spec ``cls`` from the config model ``source`` (the section its paths are relative to), each field read
    at its declared path; ``by_driver``: exactly the fields :func:`set_by_driver` marks."""
    recipe = _recipe(cls)
    if by_driver.keys() != recipe.by_driver:
        want = ", ".join(sorted(recipe.by_driver)) or "none"
        raise SchemaError(f"{cls.__name__}: the driver sets {want}; got {', '.join(sorted(by_driver)) or 'none'}")
    kwargs = dict(by_driver)
    for f in recipe.fields:
        value = _walk(source, f.path)
        if value is None:
            if not f.nullable:
                if f.none is dataclasses.MISSING:
                    raise SchemaError(f"{cls.__name__}.{f.name}: config key '{'.'.join(f.path)}' is None but the "
                                      "field is not optional; declare from_config(none=...) on the field")
                value = f.none
        elif f.convert is not None:
            value = f.convert(value)
        kwargs[f.name] = value
    return cls(**kwargs)


# --------------------------------------------------------------------------- checking


def _model_in(annotation: Any) -> Any:
    """A config annotation without None and list: the model (or type) its values are made of."""
    tp = _non_none(annotation)[0]
    if typing.get_origin(tp) is list:
        tp = _non_none(typing.get_args(tp)[0])[0]
    return tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def check(cls: type, root: type[BaseModel], section: str = "") -> None:
    """SchemaError (naming the field, the path and the closest key) unless every config path of spec ``cls``,
    built from ``section`` of config model ``root``, exists there, nested specs included."""
    model: Any = root
    for part in filter(None, section.split(".")):
        model = _model_in(model.model_fields[part].annotation)
    _check(cls, model, f"{section}." if section else "")


def _check(cls: type, model: type[BaseModel], prefix: str) -> None:
    hints = typing.get_type_hints(cls)
    for name, path in paths(cls).items():
        node: Any = model
        for i, part in enumerate(path.split(".")):
            if not _is_model(node) or part not in node.model_fields:
                where = prefix + ".".join(path.split(".")[:i])
                known = [f"{where}.{k}" for k in node.model_fields] if _is_model(node) else []
                close = difflib.get_close_matches(prefix + path, known, n=1, cutoff=0.6)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise SchemaError(f"{cls.__name__}.{name} reads config key '{prefix}{path}', which does not exist"
                                  f" ({where or 'the config'} has no '{part}'){hint}; fix from_config(...) on the "
                                  "field in workers/engine/specs.py, or add the key to orchestrator/config.py")
            node = _model_in(node.model_fields[part].annotation)
        sub = _spec_class(hints[name])
        if sub is not None:
            if not _is_model(node):
                raise SchemaError(f"{cls.__name__}.{name} is a {sub.__name__} but config key '{prefix}{path}' is "
                                  "not a section")
            _check(sub, node, f"{prefix}{path}.")
