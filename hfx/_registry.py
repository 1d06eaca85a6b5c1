"""Register hfx tuners into PEFT.

PEFT's ``register_peft_method`` only accepts names that are already members of its ``PeftType`` enum, and PEFT
has no plugin hook. So hfx adds the missing members at import time (idempotently, reusing a member another
package may already have added) and then fills PEFT's four mapping dicts. Every tuner registers with one line::

    register("bone", BoneConfig, BoneModel)
"""

from __future__ import annotations

import enum
import sys
import threading
import warnings

from peft.utils import PeftType

_LOCK = threading.Lock()


def add_enum_member(enum_cls: type[enum.Enum], name: str, value: str | None = None) -> enum.Enum:
    """Add ``name`` to a ``(str, Enum)`` class in place and return the member; return the existing one if present.

    Relies on CPython's enum internals (``_member_map_``, ``_value2member_map_``, ``_member_names_``), which are
    stable across Python 3.10-3.13; tested for each of them in ``tests/test_registry.py``.
    """
    value = name if value is None else value
    with _LOCK:
        existing = enum_cls.__members__.get(name)
        if existing is not None:
            if existing.value != value:
                raise ValueError(
                    f"{enum_cls.__name__}.{name} already exists with value {existing.value!r}, not {value!r}."
                )
            return existing
        if value in enum_cls._value2member_map_:
            raise ValueError(f"Value {value!r} is already used by {enum_cls._value2member_map_[value]!r}.")
        base = enum_cls.__mro__[1]  # the mixed-in data type, e.g. str
        member = base.__new__(enum_cls, value)
        member._name_ = name
        member._value_ = value
        member.__objclass__ = enum_cls
        if hasattr(member, "__init__"):
            member.__init__(value)
        if sys.version_info >= (3, 11):
            member._sort_order_ = len(enum_cls._member_names_)
        enum_cls._member_map_[name] = member
        enum_cls._value2member_map_[value] = member
        enum_cls._member_names_.append(name)
        # EnumType.__setattr__ forbids rebinding members; bypass it to expose `PeftType.NAME`.
        type.__setattr__(enum_cls, name, member)
        return member


def _same_class(a: type, b: type) -> bool:
    """True for the same class, or the same class re-imported (module reload, a second copy of hfx)."""
    return a is b or (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def register(name: str, config_cls: type, model_cls: type, prefix: str | None = None) -> None:
    """Make ``name`` a PEFT method: add ``PeftType.<NAME>`` if missing, then register config, tuner and prefix.

    Idempotent: a second call with the same classes (or a re-import of them) does nothing. If another package
    registered the same type with different classes, hfx's classes replace them with a warning naming both.
    """
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )
    from peft.utils import register_peft_method

    prefix = prefix or f"{name}_"
    peft_type = add_enum_member(PeftType, name.upper())
    with _LOCK:
        current = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
        if current is not None:
            if not _same_class(current, config_cls):
                warnings.warn(
                    f"PEFT type {peft_type.value} was registered by {current.__module__}.{current.__qualname__}; "
                    f"hfx replaces it with {config_cls.__module__}.{config_cls.__qualname__}. Adapters of that type "
                    "now load with hfx's classes.",
                    stacklevel=2,
                )
            for mapping in (PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_MIXED_MODEL_MAPPING):
                mapping.pop(peft_type, None)
            PEFT_TYPE_TO_PREFIX_MAPPING.pop(peft_type, None)
        owner = next((t for t, p in PEFT_TYPE_TO_PREFIX_MAPPING.items() if p == prefix), None)
        if owner is not None:
            raise ValueError(f"Prefix {prefix!r} for hfx tuner {name!r} is already used by PEFT type {owner}.")
        register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)


def registered_types() -> list[str]:
    """PEFT type names that hfx registered in this process (for diagnostics and error messages)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return sorted(str(t.value) for t, c in PEFT_TYPE_TO_CONFIG_MAPPING.items() if c.__module__.startswith("hfx."))
