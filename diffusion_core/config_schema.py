"""How a config key is declared, parsed and checked against its declaration.

:func:`param` declares a key of a config dataclass (default, meaning, allowed values);
:func:`build_dataclass` builds the nested dataclasses from a parsed YAML mapping, checking types;
:func:`check_declared` checks every value against its declaration. The product's own schema, the
rules that tie keys together, and loading live in :mod:`diffusion_core.config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import field
from typing import Any

import yaml

from diffusion_core.errors import ConfigError

# Every integer key fits in 32 bits (torch and numpy take counts, sizes and seeds as such).
INT_MAX = 2**31 - 1


def param(default: Any, help: str, *, choices: tuple | None = None, rule: str | None = None,
          min_items: int = 0, unique: bool = False) -> Any:
    """A config field: its default, what it means (``help``), and its allowed values: ``choices``,
    or a numeric ``rule`` (``"> 0"``, ``">= 0"``, or an interval such as ``"[0, 1)"``), which applies
    to each item of a list; a list needs ``min_items`` items and, with ``unique``, no repeats.
    Every key also obeys the rules of its type (:func:`_check_declared`): strings are not empty,
    floats are finite, integers are at most :data:`INT_MAX`. Rules that tie several keys together
    live in :func:`validate`."""
    meta = {"help": help, "choices": choices, "rule": rule, "min_items": min_items, "unique": unique}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)



def declared_fields(cls: type, prefix: str = "") -> list[tuple[str, Any, dataclasses.Field]]:
    """Every key of the schema as (dotted key, annotation, dataclass field), in params.yaml's order."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            out += declared_fields(hints[f.name], f"{key}.")
        else:
            out.append((key, hints[f.name], f))
    return out


def type_name(tp: Any) -> str:
    """An annotation as docs/configuration.md spells it: int, list[float], bool | str ..."""
    if typing.get_origin(tp) is list:
        return f"list[{type_name(typing.get_args(tp)[0])}]"
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widened to floats)."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list of {type_name(item_tp)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):  # e.g. bool | str: the first arm that takes it
        for arm in typing.get_args(tp):
            try:
                return _coerce(key, value, arm)
            except ConfigError:
                pass
        raise ConfigError(f"{key} must be {type_name(tp).replace(' | ', ' or ')}, got {value!r}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads "1e-3" (no dot) as a string; accept numeric strings like it
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")  # programming error


def build_dataclass(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'params'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else str(key)
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{full}'{hint}")
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        tp = hints[name]
        full = f"{prefix}.{name}" if prefix else name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_dataclass(tp, raw[name], full)
        else:
            kwargs[name] = _coerce(full, raw[name], tp)
    return cls(**kwargs)


def yaml_value(value: Any) -> str:
    """A value as params.yaml spells it: true, [1, 1], dpm++2m ..."""
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def value_rule(f: dataclasses.Field) -> str:
    """A field's choices or numeric rule in words: ``one of a, b``, ``> 0``, ``in [0, 1)``, or empty."""
    if f.metadata.get("choices"):
        return "one of " + ", ".join(yaml_value(c) for c in f.metadata["choices"])
    rule = f.metadata.get("rule")
    if not rule:
        return ""
    return rule if rule[0] in "<>" else f"in {rule}"


def allowed(f: dataclasses.Field, tp: Any = None) -> str:
    """What a field allows besides its type's own rules, in words, as docs/configuration.md states it."""
    parts = [value_rule(f)] if value_rule(f) else []
    if typing.get_origin(tp) is list and parts:
        parts = [f"each {parts[0]}"]
    if f.metadata.get("min_items"):
        parts.append("not empty")
    if f.metadata.get("unique"):
        parts.append("no repeats")
    return "; ".join(dict.fromkeys(parts))


def rule_holds(rule: str, v: float) -> bool:
    """Whether ``v`` obeys ``rule``: ``"> 0"``, ``">= 2"``, or an interval ``"[0, 1)"``."""
    if rule.startswith(">="):
        return v >= float(rule[2:])
    if rule.startswith(">"):
        return v > float(rule[1:])
    lo, hi = (float(x) for x in rule[1:-1].split(","))
    return (v >= lo if rule[0] == "[" else v > lo) and (v <= hi if rule[-1] == "]" else v < hi)


def check_declared(cls: type, flat: dict[str, Any]) -> None:
    """Every key of ``flat`` (a ``cls`` config's dotted keys) against its declaration: its choices or
    numeric rule (each item of a list), the list's length and repeats, and its type's own rules
    (strings not empty, integers <= INT_MAX)."""
    for key, _, f in declared_fields(cls):
        value, choices, rule = flat[key], f.metadata.get("choices"), f.metadata.get("rule")
        if choices and not any(value == c and type(value) is type(c) for c in choices):
            raise ConfigError(f"{key} must be {value_rule(f)}, got {value!r}" if isinstance(value, str) else f"{key} must be {value_rule(f)}, got {yaml_value(value)}")
        items = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
        for i, v in items:
            name = key if i is None else f"{key}[{i}]"
            if isinstance(v, str) and not choices and not v.strip():
                raise ConfigError(f"{name} must not be empty, got {v!r}")
            if isinstance(v, int) and not isinstance(v, bool) and v > INT_MAX:
                raise ConfigError(f"{name} must be at most {INT_MAX}, got {v}")
            if rule and not rule_holds(rule, v):
                raise ConfigError(f"{name} must be {value_rule(f)}, got {v}")
        if isinstance(value, list) and len(value) < f.metadata.get("min_items", 0):
            raise ConfigError(f"{key} must not be empty")
        if f.metadata.get("unique") and len(set(map(repr, value))) < len(value):
            raise ConfigError(f"{key} must not repeat an item, got {yaml_value(value)}")
