"""Deterministic structured answers: JSON-schema instances, tool calls, log probabilities.

Design: like ``_responses``, everything here is a pure function of the request, so a
test can compute the answer it expects. A structured answer is built from a *source
text*: the first user message of the conversation with every ``[[...]]`` marker
removed (:func:`source_text`). Taking the first message, not the last, means a
conversation that re-asks (the question, a bad answer, a correction) gets the value
the question would have got, which is what a repair loop needs to be testable.

``schema_instance(schema, source)`` walks a JSON schema and builds a value that
conforms to it:

- ``string``: the source text (an ``enum`` gives its first value, ``const`` its
  value; ``minLength`` pads with ``"x"``, ``maxLength`` cuts);
- ``integer``: ``count_tokens(source)``; ``number``: that plus 0.5; both clamped to
  ``minimum``/``maximum`` (exclusive bounds move one step inside);
- ``boolean``: whether the source has an even number of characters; ``null``: None;
- ``array``: two items (at least ``minItems``, at most ``maxItems``);
- ``object``: every declared property, in declaration order;
- ``anyOf``/``oneOf``: the first variant that is not ``null``; ``allOf``: the
  variants merged; ``$ref``: resolved against the root's ``$defs``/``definitions``;
  a list of types: the first that is not ``"null"``; no type: the source text.

Answer markers change a JSON-mode answer (they are ignored otherwise), when they
sit in the *last* user message: ``[[invalid_json]]`` makes the text invalid JSON
(:func:`invalid_json_text`); ``[[wrong_schema]]`` answers ``{"unexpected": source}``
instead of an instance of the requested schema.

Tool calls: :func:`tool_call` names the tool and gives ``schema_instance`` of its
``parameters`` as the JSON arguments; its id is derived from the name and source.
Log probabilities: the answer split in tokens of 4 characters (the ``count_tokens``
rule), each with :func:`token_logprob`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any, Final

from ._responses import CHARS_PER_TOKEN, count_tokens

__all__ = [
    "ANSWER_MARKERS",
    "answer_marker",
    "invalid_json_text",
    "json_answer_text",
    "schema_instance",
    "source_text",
    "token_chunks",
    "token_logprob",
    "tool_call",
    "wrong_schema_value",
]

#: Markers that change a JSON-mode answer (not transport faults).
ANSWER_MARKERS: Final = ("invalid_json", "wrong_schema")

_ANY_MARKER: Final = re.compile(r"\[\[[^\[\]]*\]\]")
_ANSWER_MARKER: Final = re.compile(r"\[\[(invalid_json|wrong_schema)\]\]")
_DEFAULT_ITEMS: Final = 2
_MAX_DEPTH: Final = 32


def source_text(text: str) -> str:
    """``text`` without any ``[[...]]`` marker and without surrounding whitespace."""
    return _ANY_MARKER.sub("", text).strip()


def answer_marker(text: str) -> str | None:
    """The first answer marker in ``text`` (``"invalid_json"``, ``"wrong_schema"``) or None."""
    if "[[" not in text:
        return None
    match = _ANSWER_MARKER.search(text)
    return match.group(1) if match else None


def _resolve(ref: str, root: Mapping[str, Any]) -> Mapping[str, Any]:
    if not ref.startswith("#/"):
        raise ValueError(f"only local $ref values are supported, got {ref!r}")
    target: Any = root
    for part in ref[2:].split("/"):
        if not isinstance(target, Mapping) or part not in target:
            raise ValueError(f"$ref {ref!r} points nowhere")
        target = target[part]
    if not isinstance(target, Mapping):
        raise ValueError(f"$ref {ref!r} is not a schema")
    return target


def _merged(variants: list[Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    properties: dict[str, Any] = {}
    for variant in variants:
        if isinstance(variant, Mapping):
            merged.update(variant)
            properties.update(variant.get("properties") or {})
    if properties:
        merged["properties"] = properties
    merged.pop("allOf", None)
    return merged


def _clamped(value: float, schema: Mapping[str, Any], step: float) -> float:
    low = schema.get("minimum")
    if isinstance(schema.get("exclusiveMinimum"), (int, float)):
        low = schema["exclusiveMinimum"] + step
    high = schema.get("maximum")
    if isinstance(schema.get("exclusiveMaximum"), (int, float)):
        high = schema["exclusiveMaximum"] - step
    if isinstance(low, (int, float)) and value < low:
        value = low
    if isinstance(high, (int, float)) and value > high:
        value = high
    return value


def _string(schema: Mapping[str, Any], source: str) -> str:
    text = source
    minimum = schema.get("minLength")
    maximum = schema.get("maxLength")
    if isinstance(minimum, int) and len(text) < minimum:
        text += "x" * (minimum - len(text))
    if isinstance(maximum, int) and len(text) > maximum:
        text = text[:maximum]
    return text


def _instance(schema: Any, source: str, root: Mapping[str, Any], depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise ValueError("the schema nests deeper than 32 levels (a recursive $ref?)")
    if schema is True or not isinstance(schema, Mapping):
        return source
    if "$ref" in schema:
        resolved = dict(_resolve(schema["$ref"], root))
        resolved.update({k: v for k, v in schema.items() if k != "$ref"})
        return _instance(resolved, source, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    for combinator in ("anyOf", "oneOf"):
        variants = schema.get(combinator)
        if isinstance(variants, list) and variants:
            chosen = next(
                (v for v in variants if not (isinstance(v, Mapping) and v.get("type") == "null")),
                variants[0],
            )
            return _instance(chosen, source, root, depth + 1)
    if isinstance(schema.get("allOf"), list):
        return _instance(_merged(schema["allOf"]), source, root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None and "properties" in schema:
        kind = "object"
    if kind == "object":
        properties = schema.get("properties") or {}
        return {name: _instance(sub, source, root, depth + 1) for name, sub in properties.items()}
    if kind == "array":
        minimum = schema.get("minItems")
        maximum = schema.get("maxItems")
        count = _DEFAULT_ITEMS
        if isinstance(maximum, int):
            count = min(count, maximum)
        if isinstance(minimum, int):
            count = max(count, minimum)
        prefix = schema.get("prefixItems")
        if isinstance(prefix, list) and prefix:
            return [_instance(sub, source, root, depth + 1) for sub in prefix]
        items = schema.get("items", {})
        return [_instance(items, source, root, depth + 1) for _ in range(count)]
    if kind == "integer":
        return int(_clamped(count_tokens(source), schema, 1))
    if kind == "number":
        return float(_clamped(count_tokens(source) + 0.5, schema, 0.5))
    if kind == "boolean":
        return len(source) % 2 == 0
    if kind == "null":
        return None
    return _string(schema, source)


def schema_instance(schema: Mapping[str, Any], source: str) -> Any:
    """A value conforming to ``schema``, built from ``source`` (rules in the module doc).

    Raises ``ValueError`` for a ``$ref`` that cannot be resolved.
    """
    return _instance(schema, source, schema, 0)


def json_answer_text(value: Any) -> str:
    """How the server writes a JSON answer: ``json.dumps`` with its default separators."""
    return json.dumps(value, ensure_ascii=False)


def invalid_json_text(text: str) -> str:
    """What an ``[[invalid_json]]`` answer says: chatter, then the first half of ``text``."""
    return "Sure! Here is the JSON: " + text[: len(text) // 2]


def wrong_schema_value(source: str) -> dict[str, Any]:
    """What a ``[[wrong_schema]]`` answer holds instead of an instance of the schema."""
    return {"unexpected": source}


def tool_call(name: str, parameters: Any, source: str, index: int = 0) -> dict[str, str]:
    """``{"id", "name", "arguments"}`` of the call the server makes to tool ``name``."""
    schema = parameters if isinstance(parameters, Mapping) else {"type": "object"}
    arguments = json_answer_text(schema_instance(schema, source))
    digest = hashlib.sha256(f"{name}\0{source}\0{index}".encode()).hexdigest()
    return {"id": f"call_{digest[:16]}", "name": name, "arguments": arguments}


def token_chunks(text: str) -> list[str]:
    """``text`` cut into tokens of 4 characters (so ``len(...) == count_tokens(text)``)."""
    return [text[start : start + CHARS_PER_TOKEN] for start in range(0, len(text), CHARS_PER_TOKEN)]


def token_logprob(token: str, position: int) -> float:
    """A log probability in (-2, 0] for ``token`` at ``position``, 4 decimals."""
    digest = hashlib.sha256(f"{position}\0{token}".encode()).digest()
    return -round(int.from_bytes(digest[:4], "little") / 0xFFFFFFFF * 2, 4)
