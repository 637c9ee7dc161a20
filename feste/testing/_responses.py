"""Deterministic outputs of the simulated LLM APIs, as pure functions of the inputs.

Design: every value the test server answers with (generated text, token counts,
embedding vectors, rerank scores, fault and delay markers) is computed here from
the request alone, with no state, clock or randomness. Tests elsewhere import
these functions to compute the values they expect, and the formats are simple
enough to be written as literals too:

- ``count_tokens("hello world!")`` is ``ceil(len / 4)`` for non-empty text: 3.
- ``chat_text("gpt-x", "hi")`` is ``"echo(gpt-x): hi"``; the second choice of a
  request for several is ``chat_text("gpt-x", "hi", 1) == "echo(gpt-x)[1]: hi"``.
- ``completion_text("gpt-x", "hi")`` is ``"complete(gpt-x): hi"``.
- ``embedding(model, text, dim)`` is ``dim`` floats in [-1, 1], 6 decimals,
  derived from ``sha256(model + "\\0" + text)``; a longer vector starts with
  the shorter one (``embedding(m, t, 16)[:8] == embedding(m, t, 8)``).
- ``rerank_scores(query, documents)`` is, per document, the fraction of the
  distinct lowercased whitespace-separated query words that occur among the
  document's words; ``rerank_order`` sorts by score descending, then index.
"""

from __future__ import annotations

import base64
import hashlib
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

__all__ = [
    "CHARS_PER_TOKEN",
    "Trigger",
    "chat_text",
    "completion_text",
    "count_tokens",
    "delay_of",
    "embedding",
    "embedding_base64",
    "find_trigger",
    "quantize_embedding",
    "rerank_order",
    "rerank_scores",
    "truncate_to_tokens",
]

# One token per 4 characters is the usual rule of thumb for English text; the
# exact tokenizer does not matter for tests, only that counts are cheap, stable
# and monotonic in the text length.
CHARS_PER_TOKEN: Final = 4

# 2**32 - 1 maps a 4-byte digest chunk onto [0, 1] inclusive.
_UINT32_MAX: Final = 0xFFFFFFFF
_FLOATS_PER_DIGEST: Final = 8  # 32 bytes of sha256 = 8 chunks of 4 bytes

_TRIGGER_PATTERN: Final = re.compile(
    r"\[\[(status:(\d{3})|retry_after:(\d+(?:\.\d+)?)|hang|drop|malformed|bad_usage|deep_json)\]\]"
)


# Not a fault: the extra seconds a chat or completion takes to generate its answer.
_DELAY_PATTERN: Final = re.compile(r"\[\[delay:(\d+(?:\.\d+)?)\]\]")


def count_tokens(text: str) -> int:
    """Estimated token count: 0 for empty text, else ``ceil(len(text) / 4)``."""
    if not text:
        return 0
    return -(-len(text) // CHARS_PER_TOKEN)


def truncate_to_tokens(text: str, max_tokens: int) -> str:
    """The longest prefix of ``text`` whose ``count_tokens`` is at most ``max_tokens``."""
    return text[: max(0, max_tokens) * CHARS_PER_TOKEN]


def chat_text(model: str, content: str, choice: int = 0) -> str:
    """Assistant reply to a chat whose last user message is ``content``.

    Choice ``i`` > 0 of a request for several (``n``) is ``f"echo({model})[{i}]: {content}"``.
    """
    if choice:
        return f"echo({model})[{choice}]: {content}"
    return f"echo({model}): {content}"


def completion_text(model: str, prompt: str) -> str:
    """Completion of ``prompt`` by the legacy completions endpoint."""
    return f"complete({model}): {prompt}"


def embedding(model: str, text: str, dim: int = 8) -> list[float]:
    """Deterministic embedding: ``dim`` floats in [-1, 1] rounded to 6 decimals.

    The first 8 values come from the 32 bytes of ``sha256(model + "\\0" + text)``
    read as little-endian uint32 chunks and mapped linearly onto [-1, 1]. Values
    past 8 come from ``sha256(first_digest + block_number)`` so that a longer
    vector always starts with the shorter one.
    """
    if dim < 1:
        raise ValueError(f"dim must be at least 1, got {dim}")
    seed = hashlib.sha256(f"{model}\0{text}".encode()).digest()
    values: list[float] = []
    block = 0
    while len(values) < dim:
        digest = seed if block == 0 else hashlib.sha256(seed + block.to_bytes(4, "little")).digest()
        for (chunk,) in struct.iter_unpack("<I", digest):
            values.append(round(chunk / _UINT32_MAX * 2.0 - 1.0, 6))
        block += 1
    return values[:dim]


def embedding_base64(values: Sequence[float]) -> str:
    """Base64 of the values as little-endian float32, as the OpenAI API sends them."""
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")


def quantize_embedding(
    values: Sequence[float], embedding_type: str
) -> list[int] | list[float] | str:
    """One embedding in a Cohere ``embedding_types`` format.

    ``float`` as is; ``base64`` as for OpenAI; ``int8`` is ``round(v * 127)``;
    ``uint8`` is ``round((v + 1) * 127.5)``; ``ubinary`` packs the signs (bit 1
    when v > 0) eight dimensions per byte, first dimension in the high bit, the
    last byte padded with zero bits; ``binary`` is ``ubinary - 128``.
    """
    if embedding_type == "float":
        return list(values)
    if embedding_type == "base64":
        return embedding_base64(values)
    if embedding_type == "int8":
        return [round(v * 127) for v in values]
    if embedding_type == "uint8":
        return [round((v + 1.0) * 127.5) for v in values]
    if embedding_type in ("binary", "ubinary"):
        packed: list[int] = []
        for start in range(0, len(values), 8):
            byte = 0
            for offset in range(8):
                position = start + offset
                bit = 1 if position < len(values) and values[position] > 0 else 0
                byte = (byte << 1) | bit
            packed.append(byte if embedding_type == "ubinary" else byte - 128)
        return packed
    raise ValueError(f"unknown embedding type {embedding_type!r}")


def _words(text: str) -> set[str]:
    return set(text.lower().split())


def rerank_scores(query: str, documents: Sequence[str]) -> list[float]:
    """Relevance of each document to ``query``, in document order.

    The score is the fraction of the distinct query words (lowercased, split on
    whitespace) that are also words of the document; 0.0 for a query without
    words. Punctuation is part of a word, so ``"cat."`` does not match ``"cat"``.
    """
    query_words = _words(query)
    if not query_words:
        return [0.0 for _ in documents]
    return [len(query_words & _words(document)) / len(query_words) for document in documents]


def rerank_order(
    query: str, documents: Sequence[str], top_n: int | None = None
) -> list[tuple[int, float]]:
    """``(index, score)`` pairs by score descending; ties go to the lower index."""
    scores = rerank_scores(query, documents)
    ranked = sorted(enumerate(scores), key=lambda pair: (-pair[1], pair[0]))
    return ranked if top_n is None else ranked[:top_n]


@dataclass(frozen=True, slots=True)
class Trigger:
    """A fault requested by a marker inside an input text (see ``find_trigger``).

    ``kind`` is ``"status"``, ``"retry_after"``, ``"hang"``, ``"drop"``,
    ``"malformed"``, ``"bad_usage"`` or ``"deep_json"``; ``where`` names the
    input holding the marker, e.g. ``"input[3]"``; ``status`` is the HTTP
    status for kind ``"status"``, else None; ``seconds`` the announced wait for
    kind ``"retry_after"``, else None; ``text`` the whole input holding the marker.
    """

    kind: str
    where: str
    status: int | None = None
    seconds: float | None = None
    text: str = ""


def find_trigger(texts: Sequence[str], name: str = "input", indexed: bool = True) -> Trigger | None:
    """The first fault marker in ``texts``, or None.

    Markers: ``[[status:NNN]]`` with NNN in 400..599 (other codes are ignored),
    ``[[retry_after:SECONDS]]`` (digits, optionally a decimal fraction),
    ``[[hang]]``, ``[[drop]]``, ``[[malformed]]``, ``[[bad_usage]]`` and
    ``[[deep_json]]``. Within one text the
    leftmost marker wins; across texts the first text holding one wins. The
    trigger's ``where`` is ``f"{name}[{i}]"``, or just ``name`` when not
    ``indexed`` (for single-text fields such as a rerank query).
    """
    for index, text in enumerate(texts):
        if "[[" not in text:  # cheap pre-check: almost no input holds a marker
            continue
        for match in _TRIGGER_PATTERN.finditer(text):
            where = f"{name}[{index}]" if indexed else name
            code, seconds = match.group(2), match.group(3)
            if seconds is not None:
                return Trigger("retry_after", where, seconds=float(seconds), text=text)
            if code is None:
                return Trigger(match.group(1), where, text=text)
            status = int(code)
            if 400 <= status <= 599:
                return Trigger("status", where, status, text=text)
    return None


def delay_of(texts: Sequence[str]) -> float:
    """Seconds asked by the ``[[delay:SECONDS]]`` markers in ``texts``: the largest, else 0.0.

    One request is answered when its slowest item is ready, so across several markers
    (in one text or in several) the largest counts. SECONDS is digits with an optional
    decimal fraction.
    """
    slowest = 0.0
    for text in texts:
        if "[[delay:" not in text:  # cheap pre-check: almost no input holds a marker
            continue
        for found in _DELAY_PATTERN.findall(text):
            slowest = max(slowest, float(found))
    return slowest
