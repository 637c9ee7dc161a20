"""What chat backends share: structured answers finished after the cache, and repairs.

Design
------
A chat call that asks for a structured answer (``response_format=Model``, ``dict``) or
a whole answer (``full=True``) is cached as the provider's answer and *finished*
afterwards: validated into the model, or turned into a ``ChatResult``. A validation
error can be *repaired*: the conversation goes on with the bad answer and the error.
Every chat backend does this the same way, and reads tool calls in the same shape;
only its roles differ (``chat_roles``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from feste.backend.structured import finish_chat, finishes_chat, repair_messages
from feste.backend.types import Request
from feste.backend.validation import check_messages
from feste.errors import StructuredOutputError

__all__ = ["StructuredChat"]


class StructuredChat:
    """Mixin of chat backends (before :class:`~feste.backend.base.Backend` in the bases)."""

    provider: ClassVar[str]
    #: The message roles this provider's chat accepts.
    chat_roles: ClassVar[frozenset[str]] = frozenset()

    def tool_calls_of(self, request: Request, calls: Any) -> list[dict[str, str]]:
        """The tool calls of an answer (both providers use OpenAI's shape) as records."""
        found = []
        for call in calls or ():
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise self.malformed(request, "a tool call has no function name")  # type: ignore[attr-defined]
            arguments = function.get("arguments")
            found.append(
                {
                    "id": str(call.get("id") or ""),
                    "name": function["name"],
                    "arguments": arguments if isinstance(arguments, str) else "",
                }
            )
        return found

    def finishes(self, method: str, params: Mapping[str, Any]) -> bool:
        return method == "chat" and finishes_chat(params)

    def finish(self, method: str, params: Mapping[str, Any], answer: Any) -> Any:
        return finish_chat(self.provider, answer, params)

    def repair_retries(self, method: str, params: Mapping[str, Any]) -> int:
        return int(params.get("repair_retries") or 0)

    def repair_item(self, method: str, item: Any, error: Exception) -> Any:
        if not isinstance(error, StructuredOutputError):
            raise error
        messages = check_messages(self, method, item, self.chat_roles)  # type: ignore[arg-type]
        return repair_messages(messages, error)
