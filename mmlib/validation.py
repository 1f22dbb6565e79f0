"""Checking and coercing values: the one place for the checks every module repeats.

Configs come from YAML (where PyYAML's YAML 1.1 reads `3e-4` as a *string*), JSON, the
command line (`--set encoder.learning_rate=3e-4`) and Python. `coerce_fields` converts every
field of a dataclass to its declared type (int, float, bool, str, Optional, unions, lists,
tuples, dicts, nested dataclasses) and names the field (a dotted path such as
`encoder.learning_rate`) when a value cannot be converted.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import re
import types
from collections.abc import Mapping
from typing import Any, Union, get_args, get_origin, get_type_hints

_TRUE = ("true", "yes", "1", "on")
_FALSE = ("false", "no", "0", "off")
_NONE = ("none", "null", "~", "")
_INT = re.compile(r"[+-]?\d+")


class ValidationError(ValueError, TypeError):
    """A bad value; `name` is its field (dotted for nested configs), `problem` the rest.

    Both a ValueError and a TypeError, so a caller that raised either keeps its contract.
    """

    def __init__(self, name: str, problem: str):
        self.name, self.problem = name, problem
        super().__init__(f"{name} {problem}")

    def within(self, parent: str) -> ValidationError:
        """The same error, named under `parent` (e.g. `encoder.` + `learning_rate`)."""
        return ValidationError(f"{parent}.{self.name}", self.problem)


def is_int(value: Any) -> bool:
    """True for ints (numpy ints too), False for bools and everything else."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def require_int(name: str, value: Any, minimum: int | None = 1, *,
                optional: bool = False) -> int | None:
    """`value` if it is an int (not a bool) >= `minimum` (default: positive), or None when
    `optional`; otherwise a ValidationError naming `name`."""
    if value is None and optional:
        return None
    if not is_int(value):
        kind = "an integer" + (" or None" if optional else "")
        raise ValidationError(name, f"must be {kind}, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        bound = "positive" if minimum == 1 else f">= {minimum}"
        raise ValidationError(name, f"must be {bound}, got {value!r}")
    return int(value)


def require_number(name: str, value: Any, *, above: float | None = None,
                   at_least: float | None = None, below: float | None = None,
                   optional: bool = False) -> float | None:
    """`value` if it is a finite real number (not a bool) within the given bounds, or None
    when `optional`; otherwise a ValidationError naming `name`."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValidationError(name, f"must be a finite number, got {value!r}")
    if above is not None and not value > above:
        raise ValidationError(name, f"must be > {above}, got {value!r}")
    if at_least is not None and not value >= at_least:
        raise ValidationError(name, f"must be >= {at_least}, got {value!r}")
    if below is not None and not value < below:
        raise ValidationError(name, f"must be < {below}, got {value!r}")
    return value


def require_str(name: str, value: Any, *, optional: bool = False) -> str | None:
    """`value` if it is a non-empty string (or None when `optional`)."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise ValidationError(name, f"must be a non-empty string, got {value!r}")
    return value


def require_choice(name: str, value: Any, choices: tuple[Any, ...]) -> Any:
    """`value` if it is one of `choices`."""
    if value not in choices:
        raise ValidationError(name, f"must be one of {choices}, got {value!r}")
    return value


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def coerce_fields(obj: Any) -> None:
    """Convert every field of the dataclass `obj`, in place, to its declared type."""
    hints = _field_types(type(obj))
    for f in dataclasses.fields(obj):
        setattr(obj, f.name, coerce(f.name, getattr(obj, f.name), hints[f.name]))


def coerce(name: str, value: Any, hint: Any) -> Any:
    """`value` converted to the type `hint` (strings from YAML or the command line included),
    or a ValidationError naming `name` and the expected type."""
    if hint is Any:
        return value
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return _coerce_union(name, value, get_args(hint))
    if hint is type(None):
        if value is None:
            return None
        raise ValidationError(name, f"must be None, got {value!r}")
    if hint is bool:
        return _coerce_bool(name, value)
    if hint is int:
        if is_int(value):
            return int(value)
        if isinstance(value, str) and _INT.fullmatch(value.strip()):
            return int(value)
        raise ValidationError(name, f"must be an integer, got {value!r} ({type(value).__name__})")
    if hint is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValidationError(name, f"must be a number, got {value!r} ({type(value).__name__})")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValidationError(name, f"must be a string, got {value!r} ({type(value).__name__}); "
                                    "quote it in YAML")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValidationError(name, f"must be a list, got {value!r} ({type(value).__name__})")
        args = get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ValidationError(name, f"must have {len(args)} items, got {value!r}")
            types_ = args
        else:
            types_ = (args[0] if args else Any,) * len(value)
        items = [coerce(f"{name}[{i}]", v, t) for i, (v, t) in enumerate(zip(value, types_, strict=True))]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise ValidationError(name, f"must be a mapping, got {value!r} ({type(value).__name__})")
        key_t, val_t = get_args(hint) or (Any, Any)
        return {coerce(f"{name} key", k, key_t): coerce(f"{name}.{k}", v, val_t)
                for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return _coerce_dataclass(name, value, hint)
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ValidationError(name, f"must be a {hint.__name__}, got {value!r}")
    return value


def _coerce_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if is_int(value) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValidationError(name, f"must be true or false, got {value!r} (strings accepted: "
                                "true/false, yes/no, 1/0)")


def _coerce_union(name: str, value: Any, members: tuple[Any, ...]) -> Any:
    optional = type(None) in members
    others = [m for m in members if m is not type(None)]
    if value is None:
        if optional:
            return None
        raise ValidationError(name, f"must not be None (expected {_describe(members)})")
    # A value already of a member's type keeps that type (a str for `str | list[str]`).
    for m in others:
        base = get_origin(m) or m
        if isinstance(base, type) and isinstance(value, base) and not (
                isinstance(value, bool) and base in (int, float)):
            return coerce(name, value, m)
    if optional and str not in others and isinstance(value, str) and value.strip().lower() in _NONE:
        return None
    for m in others:
        try:
            return coerce(name, value, m)
        except ValidationError:
            continue
    raise ValidationError(name, f"must be {_describe(members)}, got {value!r} "
                                f"({type(value).__name__})")


def _coerce_dataclass(name: str, value: Any, cls: type) -> Any:
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise ValidationError(name, f"must be a mapping of {cls.__name__} fields, got {value!r}")
    build = getattr(cls, "from_dict", None) or (lambda d: cls(**d))
    try:
        return build(dict(value))
    except ValidationError as e:
        raise e.within(name) from e
    except ValueError as e:
        raise ValidationError(name, f"is invalid: {e}") from e


def _describe(members: tuple[Any, ...]) -> str:
    return " or ".join("None" if m is type(None) else
                       getattr(m, "__name__", str(m)) if get_origin(m) is None else str(m)
                       for m in members)
