"""The JSON codec of the ``http`` transport: request bodies out, answers in.

Design
------
A :class:`JSONCodec` turns a request's payload into the bytes of its body and an
answer's bytes back into Python values. The base class is the standard library's
``json`` (compact separators, non-ASCII characters written as UTF-8), the reference
behaviour. :class:`OrjsonCodec` uses ``orjson`` (``pip install 'feste[fast]'``) where it
is installed, several times faster on large answers (an embedding batch is thousands
of floats), and falls back to the standard library for anything ``orjson`` declines,
so that both codecs give the same values and raise the same errors:

* encoding: dataclasses, datetimes and subclasses of the JSON types are left to the
  standard library (``orjson`` would encode some the standard library rejects, or
  encode them differently), and so is a body that comes out holding ``null``, since
  ``orjson`` writes ``null`` for NaN and infinities where the standard library writes
  ``NaN`` and ``Infinity``. Only UUIDs and plain ``Enum`` members, which ``orjson``
  encodes and the standard library rejects, differ. Floats may be spelled differently
  (``1e-5`` for ``1e-05``), with the same value.
* decoding: anything ``orjson`` rejects (``NaN``, integers beyond 64 bits, lone
  surrogates, UTF-16 bodies, nesting beyond its limit) is decoded again by the
  standard library, which accepts it or raises its own error.

:data:`CODEC` is the codec the transport uses: ``orjson``'s when installed.
"""

from __future__ import annotations

import json
from typing import Any

try:  # optional: the "fast" extra
    import orjson
except ImportError:  # pragma: no cover - exercised where orjson is not installed
    orjson = None  # type: ignore[assignment]

__all__ = ["CODEC", "JSONCodec", "OrjsonCodec", "available_codecs"]


class JSONCodec:
    """The standard library's ``json``: the reference behaviour of every codec."""

    name = "json"

    def __init__(self) -> None:
        # One encoder for every request: json.dumps with options builds one per call.
        self._encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))

    def encode(self, payload: Any) -> bytes:
        """The body for ``payload``; TypeError or ValueError when it is not JSON."""
        return self._encoder.encode(payload).encode()

    def decode(self, content: bytes) -> Any:
        """The value of a JSON body; ValueError when it is not JSON (RecursionError
        when it is nested too deeply)."""
        return json.loads(content)


class OrjsonCodec(JSONCodec):
    """``orjson``, with the standard library for what it declines (see the module)."""

    name = "orjson"

    def __init__(self) -> None:
        super().__init__()
        if orjson is None:
            raise ImportError("orjson is not installed: pip install 'feste[fast]' (or orjson)")
        self._dumps = orjson.dumps
        self._loads = orjson.loads
        self._error = orjson.JSONDecodeError
        self._encode_error = orjson.JSONEncodeError
        # Types whose encoding differs between the two libraries go to the fallback.
        self._options = (
            orjson.OPT_PASSTHROUGH_DATACLASS
            | orjson.OPT_PASSTHROUGH_DATETIME
            | orjson.OPT_PASSTHROUGH_SUBCLASS
        )

    def encode(self, payload: Any) -> bytes:
        try:
            body: bytes = self._dumps(payload, option=self._options)
        except self._encode_error:
            return super().encode(payload)
        if b"null" in body:
            # None, or NaN / infinity (written NaN and Infinity by the standard library).
            return super().encode(payload)
        return body

    def decode(self, content: bytes) -> Any:
        try:
            return self._loads(content)
        except self._error:
            return super().decode(content)


def available_codecs() -> list[JSONCodec]:
    """One instance of each codec installed here, the standard library's first."""
    codecs = [JSONCodec()]
    if orjson is not None:
        codecs.append(OrjsonCodec())
    return codecs


#: The codec the ``http`` transport uses.
CODEC: JSONCodec = OrjsonCodec() if orjson is not None else JSONCodec()
