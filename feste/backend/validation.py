"""Checks of call inputs shared by the backends: chat messages and texts.

Design
------
A call's input is checked where the call is written, so a bad shape is reported at
the user's line rather than when the graph runs; parts that are still lazy (a
``dask.delayed.Delayed``, which every feste value is) are accepted as they are and
checked again when the request is built from their values. The errors are
:class:`~feste.errors.BadRequestError` naming the backend, the method and, for batch
items, the item's index, so the sender fails that item alone and sends the others.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dask.delayed import Delayed

from feste.backend.base import Backend
from feste.errors import BadRequestError

__all__ = ["chat_messages", "check_messages", "check_text", "check_texts"]


_MESSAGE_SHAPE = "{'role': 'user', 'content': 'some text'}"


def chat_messages(
    backend: Backend, method: str, prompt: Any, system: Any, roles: frozenset[str]
) -> Any:
    """The item of a chat call: its messages list (or a lazy prompt, turned into one later).

    A string becomes one user message and ``system`` a leading system message. Messages
    known now are checked now, so a bad shape is reported where the call is written;
    lazy parts are checked when the call runs (:func:`check_messages`).
    """
    if system is not None and not isinstance(system, (str, Delayed)):
        raise BadRequestError(
            f"system must be a string, got {type(system).__name__}",
            backend=backend.provider,
            method=method,
        )
    if isinstance(prompt, Delayed):
        if system is None:
            return prompt  # a string or a messages list: settled when the call runs
        return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    messages = check_messages(backend, method, prompt, roles)
    if system is not None:
        messages = [{"role": "system", "content": system}, *messages]
    return messages


def check_messages(backend: Backend, method: str, prompt: Any, roles: frozenset[str]) -> list[Any]:
    """``prompt`` as a list of chat messages, or :class:`BadRequestError` naming the problem.

    Lazy values inside messages are accepted as they are (they are resolved before the
    request is built, and checked again then).
    """

    def bad(detail: str) -> BadRequestError:
        return BadRequestError(detail, backend=backend.provider, method=method)

    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, (list, tuple)):
        raise bad(
            f"expected a prompt string or a list of messages like [{_MESSAGE_SHAPE}], "
            f"got {type(prompt).__name__}"
        )
    if not prompt:
        raise bad(f"the list of messages is empty; give at least one message like {_MESSAGE_SHAPE}")
    for index, message in enumerate(prompt):
        if isinstance(message, Delayed):
            continue
        if not isinstance(message, Mapping):
            raise bad(
                f"message {index} must be a dict like {_MESSAGE_SHAPE}, "
                f"got {type(message).__name__}"
            )
        role = message.get("role")
        if not isinstance(role, Delayed) and role not in roles:
            raise bad(
                f"message {index} has role {role!r}; expected one of "
                f"{', '.join(sorted(roles))} (shape: {_MESSAGE_SHAPE})"
            )
        content = message.get("content")
        if content is None and message.get("tool_calls") is not None:
            continue  # an assistant turn that only calls tools
        if not isinstance(content, (str, list, Delayed)):
            found = "no content" if content is None else f"{type(content).__name__} content"
            raise bad(
                f"message {index} has {found}; content must be a string or a list of "
                f"content parts (shape: {_MESSAGE_SHAPE})"
            )
    return list(prompt)


def check_text(backend: Backend, method: str, text: Any, *, allow_empty: bool = True) -> None:
    """Refuse an item that must be a string (lazy values are checked when they run)."""
    if isinstance(text, Delayed):
        return
    if not isinstance(text, str):
        raise BadRequestError(
            f"expected a string, got {type(text).__name__}"
            + ("; call the method once per text" if isinstance(text, (list, tuple)) else ""),
            backend=backend.provider,
            method=method,
        )
    if not allow_empty and not text:
        raise BadRequestError(
            "the text is empty; the provider refuses empty inputs",
            backend=backend.provider,
            method=method,
        )


def check_texts(backend: Backend, method: str, texts: list[Any], *, allow_empty: bool) -> None:
    """:func:`check_text` for each item of a batch; the error names the item's index, so
    the batch runner fails that item alone and sends the others."""
    for index, text in enumerate(texts):
        try:
            check_text(backend, method, text, allow_empty=allow_empty)
        except BadRequestError as error:
            error.message = f"input[{index}]: {error.message}"
            error.args = (error.message,)
            error.item_index = index
            raise
