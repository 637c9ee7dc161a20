"""What chat backends share: structured answers finished after the cache, and repairs.

Design
------
A chat call that asks for a structured answer (``response_format=Model``, ``dict``) or
a whole answer (``full=True``) is cached as the provider's answer and *finished*
afterwards: validated into the model, or turned into a ``ChatResult``. A validation
error can be *repaired*: the conversation goes on with the bad answer and the error.
Every chat backend does this the same way; only its roles differ (``chat_roles``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from feste.backend.structured import finish_chat, finishes_chat, repair_messages
from feste.backend.validation import check_messages
from feste.errors import StructuredOutputError

__all__ = ["StructuredChat"]


class StructuredChat:
    """Mixin of chat backends (before :class:`~feste.backend.base.Backend` in the bases)."""

    provider: ClassVar[str]
    #: The message roles this provider's chat accepts.
    chat_roles: ClassVar[frozenset[str]] = frozenset()

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
