"""Checks of option values given by users, shared by every config dataclass.

One place so that every bad option reads the same way ("NAME must be ..., got VALUE") and the
awkward cases are handled once: a bool is not an int (``epochs=True`` is a slip, not 1), NaN is in
no range (every comparison with it is False, so a plain ``x < lo`` check lets it through), and a
string that is not a number names the option instead of surfacing ``float()``'s bare message.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Collection


def int_at_least(name: str, value, minimum: int = 1, *, optional: bool = False) -> int | None:
    """``value`` as an int ``>= minimum`` (``None`` passes when ``optional``), else ValueError."""
    if value is None and optional:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum:
        return int(value)
    kind = {0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")
    raise ValueError(f"{name} must be {kind}{' or None' if optional else ''}, got {value!r}")


def seed_value(value, name: str = "seed") -> int:
    """A seed every seeded step accepts (the Philox mask key, numpy): an int in ``[0, 2**32)``,
    checked before the work starts rather than where a mask is first drawn."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and 0 <= value < 2**32:
        return int(value)
    raise ValueError(f"{name} must be an int in [0, 2**32), got {value!r}")


def real_in(name: str, value, lo: float | None = None, hi: float | None = None, *,
            lo_open: bool = False, hi_open: bool = False, optional: bool = False) -> float | None:
    """``value`` as a finite float inside the interval from ``lo`` to ``hi`` (open ends where
    ``lo_open`` / ``hi_open``; ``None`` for no bound), ``None`` passing when ``optional``."""
    if value is None and optional:
        return None
    x = None
    if isinstance(value, (numbers.Real, str)) and not isinstance(value, bool):
        try:
            x = float(value)
        except ValueError:
            x = None
    ok = x is not None and math.isfinite(x)
    if ok and lo is not None:
        ok = x > lo if lo_open else x >= lo
    if ok and hi is not None:
        ok = x < hi if hi_open else x <= hi
    if ok:
        return x
    if lo is not None and hi is not None:
        kind = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo == 0 and lo_open:
        kind = "a positive finite number"
    elif lo is not None:
        kind = f"a finite number {'>' if lo_open else '>='} {lo:g}"
    elif hi is not None:
        kind = f"a finite number {'<' if hi_open else '<='} {hi:g}"
    else:
        kind = "a finite number"
    raise ValueError(f"{name} must be {kind}{' or None' if optional else ''}, got {value!r}")


def one_of(name: str, value, choices: Collection):
    """``value`` itself when it is one of ``choices``, else ValueError listing them."""
    if value in tuple(choices):
        return value
    raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
