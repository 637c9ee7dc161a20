"""Error answers in each provider's shape, and the retry headers they carry.

Design: anything that refuses a request (validation, authentication, limits,
injected faults) raises or returns a ``RequestError`` that knows its status,
message and retry hint but not its provider; the handler formats it at the
end with ``error_payload`` (OpenAI's ``{"error": {...}}`` or Cohere's
``{"message": ...}``) and ``retry_headers``. Keeping the shape in one place
means every refusal of a route looks the same to a client.
"""

from __future__ import annotations

import email.utils
import json
import math
import time
from typing import Any, Literal

__all__ = [
    "Provider",
    "RequestError",
    "bad_request",
    "error_payload",
    "json_bytes",
    "retry_headers",
]

Provider = Literal["openai", "cohere"]


class RequestError(Exception):
    """An error answer, formatted later in the provider's style."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        kind: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after
        # OpenAI's error "type"; None derives it from the status.
        self.kind = kind


def bad_request(message: str, param: str | None = None, code: str | None = None) -> RequestError:
    return RequestError(400, message, param=param, code=code)


def json_bytes(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def retry_headers(seconds: float, *, http_date: bool = False) -> dict[str, str]:
    """The retry headers announcing ``seconds``.

    By default both: the openai and cohere clients prefer ``retry-after-ms``,
    and ``Retry-After`` is whole seconds when exact, else a decimal (the openai
    client parses floats, cohere's only integers or dates, then falls back to
    ``retry-after-ms``). With ``http_date``, only ``Retry-After``, as an RFC
    7231 IMF-fixdate (``Sun, 06 Nov 1994 08:49:37 GMT``) no earlier than now
    plus ``seconds``: a server that sends a date sends no milliseconds, so a
    client must parse the date.
    """
    if http_date:
        moment = math.ceil(time.time() + max(0.0, seconds))
        return {"Retry-After": email.utils.formatdate(moment, usegmt=True)}
    milliseconds = max(0, math.ceil(seconds * 1000 - 1e-6))
    if milliseconds % 1000 == 0:
        in_seconds = str(milliseconds // 1000)
    else:
        in_seconds = f"{milliseconds / 1000:.3f}".rstrip("0")
    return {"retry-after-ms": str(milliseconds), "Retry-After": in_seconds}


def error_payload(provider: Provider, error: RequestError) -> dict[str, Any]:
    if provider == "cohere":
        return {"message": error.message}
    if error.kind is not None:
        kind = error.kind
    elif error.status == 429:
        kind = "requests"
    elif error.status >= 500:
        kind = "server_error"
    else:
        kind = "invalid_request_error"
    return {
        "error": {
            "message": error.message,
            "type": kind,
            "param": error.param,
            "code": error.code,
        }
    }
