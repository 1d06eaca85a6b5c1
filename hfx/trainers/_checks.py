"""Type checks of the hfx fields of a trainer config, made in ``__post_init__`` before the range checks.

Python does not enforce dataclass annotations, so ``gvm_num_pilot=2.5`` or ``lagrange_lr="3"`` used to pass the
config and fail later as a bare ``TypeError`` (``'<' not supported``, ``'float' object cannot be interpreted as an
integer``) far from the argument; ``gvm="no"`` was read as true. :func:`check_fields` names the field and the type
it needs. Numeric strings are read as numbers (a YAML file or a command line may pass them), and one value where a
list is expected becomes a one-element list when ``scalar_ok``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_DESCRIPTIONS = {"int": "an int", "number": "a number", "bool": "True or False", "str": "a string"}
_LIST_DESCRIPTIONS = {
    "int": "a list of ints",
    "number": "a list of numbers",
    "bool": "a list of True/False values",
    "str": "a list of strings",
}
_PARSERS = {"int": int, "number": float}


def _convert(kind: str, value: Any) -> tuple[bool, Any]:
    """``(ok, value)``: whether ``value`` is of ``kind`` (numeric strings convert), and the converted value."""
    if kind == "bool":
        return isinstance(value, bool), value
    if kind == "str":
        return isinstance(value, str), value
    if isinstance(value, str):
        try:
            return True, _PARSERS[kind](value.strip())
        except ValueError:
            return False, value
    numeric = isinstance(value, int) if kind == "int" else isinstance(value, (int, float))
    return numeric and not isinstance(value, bool), value


def check_fields(config: Any, spec: Mapping[str, str], *, scalar_ok: tuple[str, ...] = ()) -> None:
    """Check (and convert in place) each named field of ``config`` against its kind in ``spec``.

    Kinds: ``"int"``, ``"number"``, ``"bool"``, ``"str"``, or ``"list[<kind>]"``; a trailing ``"?"`` allows None.
    Raises a ``ValueError`` naming the config class, the field, the kind and the value given.
    """
    owner = type(config).__name__
    for name, kind in spec.items():
        value = getattr(config, name)
        optional = kind.endswith("?")
        kind = kind.rstrip("?")
        if value is None and optional:
            continue
        if kind.startswith("list["):
            item = kind[5:-1]
            if name in scalar_ok and not isinstance(value, (list, tuple)):
                value = [value]
            ok = isinstance(value, (list, tuple))
            converted = []
            if ok:
                for entry in value:
                    good, entry = _convert(item, entry)
                    ok = ok and good
                    converted.append(entry)
            if not ok:
                raise ValueError(
                    f"{owner}.{name} must be {_LIST_DESCRIPTIONS[item]}{' or None' if optional else ''}, got {value!r}"
                    + (" (one value per entry, e.g. [True, False])" if item == "bool" else "")
                )
            setattr(config, name, converted)
            continue
        ok, converted = _convert(kind, value)
        if not ok:
            raise ValueError(
                f"{owner}.{name} must be {_DESCRIPTIONS[kind]}{' or None' if optional else ''}, got {value!r} "
                f"({type(value).__name__})"
            )
        setattr(config, name, converted)
