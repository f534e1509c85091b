"""Argument normalisation shared by the ops, modules, models and converter: the one int-or-pair helper.

``pair(value)`` is timm's ``to_2tuple`` (an iterable becomes a tuple, anything else is repeated),
for values timm itself accepts loosely. ``pair(value, name, owner)`` is the checked form every
public boundary uses: an int or an (h, w) pair of ints (each ``>= minimum`` when given), else a
ValueError that names the owner, the argument, what was expected and what was received.
"""
from __future__ import annotations

import collections.abc
import numbers
from typing import Optional, Sequence, Tuple, Union

IntOrPair = Union[int, Sequence[int]]

__all__ = ["IntOrPair", "pair"]


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def pair(value, name: Optional[str] = None, owner: Optional[str] = None, *,
         minimum: Optional[int] = None) -> tuple:
    """``value`` as a 2-tuple; checked (ints, ``>= minimum``) when ``name`` is given."""
    if name is None:
        if isinstance(value, collections.abc.Iterable) and not isinstance(value, str):
            return tuple(value)
        return (value, value)
    if _is_int(value):
        result: Tuple = (value, value)
    elif isinstance(value, collections.abc.Iterable) and not isinstance(value, str):
        result = tuple(value)
    else:
        result = ()
    if len(result) != 2 or not all(_is_int(v) and (minimum is None or v >= minimum) for v in result):
        what = "ints" if minimum is None else "positive ints" if minimum == 1 else f"ints >= {minimum}"
        prefix = f"{owner}: " if owner else ""
        raise ValueError(f"{prefix}{name} must be an int or an (h, w) pair of {what}, got {value!r}")
    return int(result[0]), int(result[1])
