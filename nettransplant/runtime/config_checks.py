"""Checks of config fields, each failure one ValueError line naming ``config.<field>``.

Used by the commands' ``validate_config`` functions, which run before any data
is loaded or any model trained: a number out of range (NaN, infinite, negative,
zero where it must be positive), a name outside its choices or an empty list
is refused at once, e.g. ``config.distillation.temperature must be > 0, got 0``.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Any

# Bounds far above any sensible run: a value beyond them is a typo.
MAX_STEPS, MAX_BATCH, MAX_SAMPLES, MAX_SEED = 10**7, 2**16, 10**6, 2**31 - 1


def lookup(config, field: str) -> Any:
    """``config``'s value at the dotted ``field``; ValueError naming it if it is missing."""
    node = config
    for part in field.split("."):
        try:
            node = node[part]
        except (KeyError, AttributeError, TypeError):
            raise ValueError(f"config.{field} is missing") from None
    return node


def _fmt(x: float) -> str:
    """``10000000`` rather than ``1e+07``, ``0`` rather than ``0.0``; ``0.001``, ``nan``."""
    if math.isfinite(x) and float(x).is_integer() and abs(x) < 1e16:
        return str(int(x))
    return f"{x:g}"


def _is_number(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if kind is int else isinstance(value, int | float)


def number(where: str, value: Any, kind: type = float, *, low: float = -math.inf,
           high: float = math.inf, above: float | None = None) -> None:
    """Refuse ``value`` unless it is a finite ``kind`` (``int``: an integer; ``float``: any
    real number) in ``[low, high]`` and, with ``above``, strictly greater than it.

    ``where`` names the value in the message (``config.transfer.temperature``).
    """
    if not _is_number(value, kind):
        raise ValueError(f"{where} must be {'an integer' if kind is int else 'a number'}, "
                         f"got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{where} must be finite, got {_fmt(value)}")
    if above is not None and not value > above:
        raise ValueError(f"{where} must be > {_fmt(above)}, got {_fmt(value)}")
    if not low <= value <= high:
        if math.isfinite(low) and math.isfinite(high):
            bound = f"in [{_fmt(low)}, {_fmt(high)}]"
        elif math.isfinite(low):
            bound = f">= {_fmt(low)}"
        else:
            bound = f"<= {_fmt(high)}"
        raise ValueError(f"{where} must be {bound}, got {_fmt(value)}")


def field(config, name: str, kind: type = float, **bounds) -> Any:
    """:func:`number` on ``config.<name>``; returns the value."""
    value = lookup(config, name)
    number(f"config.{name}", value, kind, **bounds)
    return value


def positive(config, name: str, high: float = math.inf) -> float:
    """A finite number > 0 (a learning rate, a temperature)."""
    return field(config, name, float, above=0, high=high)


def count(config, name: str, low: int = 1, high: int = MAX_STEPS) -> int:
    """An integer in ``[low, high]`` (steps, samples, a batch size)."""
    return field(config, name, int, low=low, high=high)


def choice(config, name: str, choices: Collection[str]) -> str:
    """One of ``choices``."""
    value = lookup(config, name)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"config.{name} must be one of {', '.join(map(str, choices))}, got "
                         f"{value!r}")
    return value


def sequence(config, name: str, *, min_len: int = 1, unique: bool = False) -> Sequence:
    """A list or tuple of at least ``min_len`` items (distinct with ``unique``)."""
    value = lookup(config, name)
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ValueError(f"config.{name} must be a list, got {value!r}")
    if len(value) < min_len:
        raise ValueError(f"config.{name} must hold at least {min_len} item"
                         f"{'s' if min_len > 1 else ''}, got {list(value)}")
    if unique and len(set(map(repr, value))) != len(value):
        raise ValueError(f"config.{name} must not repeat an item, got {list(value)}")
    return value


def choices(config, name: str, allowed: Collection[str], *, min_len: int = 1,
            unique: bool = True) -> Sequence[str]:
    """A list of names, each one of ``allowed``."""
    value = sequence(config, name, min_len=min_len, unique=unique)
    bad = [v for v in value if not isinstance(v, str) or v not in allowed]
    if bad:
        raise ValueError(f"config.{name}: unknown {bad}; choose from {list(allowed)}")
    return value


def numbers(config, name: str, kind: type = float, *, min_len: int = 1, **bounds
            ) -> Sequence:
    """A list of numbers, each passing :func:`number` with ``bounds``."""
    value = sequence(config, name, min_len=min_len)
    for i, item in enumerate(value):
        number(f"config.{name}[{i}]", item, kind, **bounds)
    return value
