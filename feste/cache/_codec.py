"""Cached values as JSON text, with an exact round trip.

Design
------
Results are stored as JSON so that any process (or another language, or a person with
``sqlite3``) can read them, and so that reading a shared cache never runs code (no
pickle). JSON alone would blur some Python values: a tuple would come back as a list
and a dict with non-string keys would not encode. Those are written as small tagged
objects, ``{"$feste": "tuple", "items": [...]}`` and ``{"$feste": "dict", "items":
[[key, value], ...]}`` (a dict that itself has a ``"$feste"`` key is written the second
way too), so a value comes back equal to what was stored and of the same types.

Anything else (an object, bytes, a set) cannot be stored: :func:`encode` raises
:class:`TypeError` naming where in the value it sits; the caller turns that into an
error that names the task.

Strings and lists of numbers (texts, embeddings: nearly every LLM result) take a fast
path that never walks the value in Python.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["decode", "encode"]

_TAG = "$feste"
_NUMBERS = frozenset({float, int})


def _plain(value: Any, where: str) -> Any:
    """``value`` as something ``json.dumps`` writes faithfully."""
    kind = type(value)
    if kind is str or kind is float or kind is int or kind is bool or value is None:
        return value
    if kind is list:
        if set(map(type, value)) <= _NUMBERS:
            return value
        return [_plain(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if kind is dict:
        if _TAG not in value and all(type(name) is str for name in value):
            return {name: _plain(item, f"{where}[{name!r}]") for name, item in value.items()}
        return {
            _TAG: "dict",
            "items": [
                [_plain(name, f"{where} key {name!r}"), _plain(item, f"{where}[{name!r}]")]
                for name, item in value.items()
            ],
        }
    if kind is tuple:
        return {
            _TAG: "tuple",
            "items": [_plain(item, f"{where}[{index}]") for index, item in enumerate(value)],
        }
    raise TypeError(
        f"{type(value).__qualname__} at {where} cannot be stored as JSON (a cached result "
        "may hold strings, numbers, booleans, None, lists, tuples and dicts)"
    )


def encode(value: Any) -> str:
    """JSON text for ``value``; :class:`TypeError` names a part that cannot be stored."""
    if type(value) is str:
        return json.dumps(value, ensure_ascii=False)
    return json.dumps(_plain(value, "the result"), ensure_ascii=False, separators=(",", ":"))


def _tagged(obj: dict[str, Any]) -> Any:
    kind = obj.get(_TAG)
    if kind is None:
        return obj
    if kind == "tuple":
        return tuple(obj["items"])
    if kind == "dict":
        # Keys come back decoded: a tuple key is itself a tagged tuple.
        return {name: item for name, item in obj["items"]}
    raise ValueError(f"unknown tagged value {kind!r} in the cache")


def decode(text: str) -> Any:
    """The value :func:`encode` wrote."""
    if text[:1] == '"':
        return json.loads(text)
    return json.loads(text, object_hook=_tagged)
