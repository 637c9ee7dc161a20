"""Per-backend limits (placeholder interface; the engine issue replaces the body).

``limiter_for(backend)`` returns the process-wide limiter of a backend identity.
``async with limiter.admit(tokens)`` waits for admission; ``succeeded(estimated, usage)``
and ``rate_limited(retry_after)`` report outcomes.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any


class Limiter:
    @contextlib.asynccontextmanager
    async def admit(self, tokens: int = 0) -> AsyncIterator[None]:
        yield

    def succeeded(self, estimated_tokens: int, usage: Any) -> None:
        pass

    def rate_limited(self, retry_after: float | None) -> None:
        pass


_LIMITER = Limiter()


def limiter_for(backend: Any) -> Limiter:
    return _LIMITER
