"""Every error feste raises, in one tree.

::

    FesteError
    ├── OptionError              unknown option name or invalid option value (also KeyError)
    ├── SchedulerError           unknown scheduler name, unusable scheduler (also ValueError)
    ├── GraphError               a graph that cannot be run (cycle, missing key)
    ├── PromptError              template problems (also ValueError)
    │   ├── TemplateSyntaxError  a template that does not parse (names the line)
    │   ├── MissingVariableError a variable the template needs was not given
    │   └── UnknownLanguageError an ISO 639 code that does not exist
    ├── CancelledError           a task skipped because something it needs failed
    ├── CacheError               an unusable cache: bad location, corrupt, locked or read-only
    │                            database, newer schema, a result that cannot be stored
    └── BackendError             a call to a provider failed (backend, method, model, key, attempts)
        ├── ConfigurationError   unusable backend setup: missing API key, unknown parameter
        ├── AuthenticationError  401/403: wrong or missing key, no permission     (never retried)
        ├── BadRequestError      400/404/413/422: the request itself is wrong    (never retried)
        ├── MalformedResponseError  a 2xx answer feste cannot read              (never retried)
        ├── StructuredOutputError   an answer that is not the JSON asked for (``raw`` holds it;
        │                           ``repair_retries=N`` re-asks with the validation error)
        ├── TruncatedOutputError    an answer cut at max_tokens, with ``on_truncation="raise"``
        ├── BudgetExceeded       ``max_cost`` would be passed: the run refused before it started
        │                        (``estimate``), or a call not sent (``budget``, ``spent``)
        └── RetryableError       worth trying again
            ├── RateLimitError   429, carries ``retry_after`` (seconds) from the server
            └── TransientError   5xx, connection reset or refused, timeout

Each backend maps its provider's answers and its client library's exceptions into this
tree at one boundary (``feste.backend.transports``); nothing above the transports sees
a socket, ``openai`` or ``cohere`` exception. Messages name the backend, method and
model, and never contain an API key.

:class:`TruncatedOutputWarning` (a ``UserWarning``, not an error) is what a truncated
answer gives by default (``on_truncation="warn"``), once per run.

:class:`Failure` is not an exception: with ``errors="return"`` it stands in place of an
output whose task failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "AuthenticationError",
    "BackendError",
    "BadRequestError",
    "BudgetExceeded",
    "CacheError",
    "CancelledError",
    "ConfigurationError",
    "Failure",
    "FesteError",
    "GraphError",
    "MalformedResponseError",
    "MissingVariableError",
    "OptionError",
    "PromptError",
    "RateLimitError",
    "RetryableError",
    "SchedulerError",
    "StructuredOutputError",
    "TemplateSyntaxError",
    "TransientError",
    "TruncatedOutputError",
    "TruncatedOutputWarning",
    "UnknownLanguageError",
]


class FesteError(Exception):
    """Base class of every error feste raises."""


class OptionError(FesteError, KeyError):
    """An unknown option name, or a value an option does not accept."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class SchedulerError(FesteError, ValueError):
    """An unknown scheduler name or an object that cannot schedule a graph."""


class GraphError(FesteError, ValueError):
    """A graph that cannot be computed."""


class PromptError(FesteError, ValueError):
    """Base class of template errors."""


class TemplateSyntaxError(PromptError):
    """A template that Jinja2 cannot parse."""


class MissingVariableError(PromptError):
    """A template variable that was not given a value."""


class UnknownLanguageError(PromptError):
    """A language code that is not in ISO 639."""


class CancelledError(FesteError):
    """A task that did not run because a task it depends on failed."""


class CacheError(FesteError):
    """The result cache cannot be used: the message names the store and what to do."""


class BackendError(FesteError):
    """A call to a model provider failed.

    Attributes carry the context: ``backend`` (e.g. ``"openai"``), ``method``
    (``"chat"``), ``model``, ``status`` (HTTP status, if any), ``key`` (the graph key of
    the task, filled in by the scheduler), ``attempts``, ``item_index`` (the item of a
    batch the provider blamed), and where the user made the call: ``input_preview`` (a
    short form of the call's input) and ``call_site`` (``"file.py:12 in func"``), set by
    :func:`describe_call`.
    """

    retryable = False

    def __init__(
        self,
        message: str,
        *,
        backend: str | None = None,
        method: str | None = None,
        model: str | None = None,
        status: int | None = None,
        key: Any = None,
        attempts: int | None = None,
        item_index: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.backend = backend
        self.method = method
        self.model = model
        self.status = status
        self.key = key
        self.attempts = attempts
        self.item_index = item_index
        self.input_preview: str | None = None
        self.call_site: str | None = None

    def __str__(self) -> str:
        where = ".".join(part for part in (self.backend, self.method) if part)
        context = []
        if where:
            context.append(where)
        if self.model:
            context.append(f"model={self.model}")
        if self.status is not None:
            context.append(f"status={self.status}")
        if self.key is not None:
            context.append(f"task={self.key!r}")
        if self.attempts and self.attempts > 1:
            context.append(f"attempts={self.attempts}")
        prefix = f"[{' '.join(context)}] " if context else ""
        origin = []
        input_preview = getattr(self, "input_preview", None)
        call_site = getattr(self, "call_site", None)
        if input_preview is not None:
            origin.append(f"input {input_preview}")
        if call_site is not None:
            origin.append(f"called at {call_site}")
        suffix = f" ({', '.join(origin)})" if origin else ""
        return prefix + self.message + suffix

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only context must survive pickling (process pools, distributed workers).
        return (_rebuild_backend_error, (type(self), self.message, self.__dict__.copy()))


def _rebuild_backend_error(
    cls: type[BackendError], message: str, state: dict[str, Any]
) -> BackendError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class ConfigurationError(BackendError, ValueError):
    """A backend that cannot be used as configured (missing key, unknown parameter)."""


class AuthenticationError(BackendError):
    """The provider refused the credentials (401) or the permission (403)."""


class BadRequestError(BackendError, ValueError):
    """The provider rejected the request itself; sending it again will not help."""


class MalformedResponseError(BackendError):
    """The provider answered with a body feste cannot read."""


class StructuredOutputError(BackendError):
    """An answer that is not the structured value asked for (``response_format=``).

    ``raw`` is the answer's text as the model wrote it, ``detail`` what is wrong with it
    (not JSON, or the validation errors), ``repairs`` how many times the call re-asked
    (``repair_retries``) before giving up. Never retried by the transport: sending the
    same request again would get the same answer from a cache, and often from the model.
    """

    def __init__(
        self, message: str, *, raw: str | None = None, detail: str = "", **context: Any
    ) -> None:
        super().__init__(message, **context)
        self.raw = raw
        self.detail = detail
        self.repairs = 0


class TruncatedOutputError(BackendError):
    """An answer the provider cut at its token limit (``finish_reason="length"``).

    Raised instead of a warning when the ``on_truncation`` option is ``"raise"``;
    ``text`` is the cut answer.
    """

    def __init__(self, message: str, *, text: str | None = None, **context: Any) -> None:
        super().__init__(message, **context)
        self.text = text


class BudgetExceeded(BackendError):
    """The ``max_cost`` budget (dollars) would be passed; nothing was sent for it.

    Raised by ``feste.compute`` before a run whose estimated cost (``estimate``) is
    above the budget (``budget``), unless ``over_estimate="start"``; and, during a run,
    by each call not sent because what was spent (``spent``) plus what the call could
    cost (``estimate``) would pass the budget (with ``errors="return"`` each becomes a
    :class:`Failure`). ``unknown_inputs`` counts the calls of a refused run whose
    inputs come from other calls, estimated at an assumed size. Never retried.
    """

    def __init__(
        self,
        message: str,
        *,
        estimate: float | None,
        budget: float,
        spent: float = 0.0,
        unknown_inputs: int = 0,
        **context: Any,
    ) -> None:
        super().__init__(message, **context)
        self.estimate = estimate
        self.budget = budget
        self.spent = spent
        self.unknown_inputs = unknown_inputs


class TruncatedOutputWarning(UserWarning):
    """An answer was cut at its token limit (shown once per run; ``on_truncation``)."""


class RetryableError(BackendError):
    """A failure that may go away if the call is sent again."""

    retryable = True


class RateLimitError(RetryableError):
    """429: too many requests or tokens. ``retry_after`` is the server's hint in seconds."""

    def __init__(self, message: str, *, retry_after: float | None = None, **context: Any) -> None:
        super().__init__(message, **context)
        self.retry_after = retry_after


class TransientError(RetryableError):
    """A 5xx answer, a dropped or refused connection, or a timeout."""


@dataclass(frozen=True)
class Failure:
    """Stands in place of an output whose task failed (``errors="return"``).

    ``exception`` is what was raised; for a task skipped because one of its
    dependencies failed it is a :class:`CancelledError` and ``cancelled`` is true.
    """

    exception: BaseException
    key: Any
    attempts: int = 1
    cancelled: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __bool__(self) -> bool:
        # A failure is never mistaken for a successful truthy result.
        return False

    def __repr__(self) -> str:
        kind = "cancelled" if self.cancelled else "failed"
        return (
            f"Failure({kind} key={self.key!r}, attempts={self.attempts}, "
            f"{type(self.exception).__name__}: {self.exception})"
        )

    def reraise(self) -> None:
        """Raise the stored exception."""
        raise self.exception


_PREVIEW_LENGTH = 40


def preview(value: Any) -> str:
    """A short, one-line form of a call's input for error messages."""
    if isinstance(value, (list, tuple)) and value and isinstance(value[-1], dict):
        value = value[-1].get("content", value[-1])  # a chat: its last message
    text = value if isinstance(value, str) else None
    if text is None:
        return f"<{type(value).__name__}>"
    text = " ".join(text.split())
    if len(text) > _PREVIEW_LENGTH:
        text = text[: _PREVIEW_LENGTH - 1] + "\u2026"
    return repr(text)


def describe_call(exc: BaseException, item: Any, call_site: str | None) -> BaseException:
    """Tell a backend error which input failed and where the user made the call."""
    if isinstance(exc, BackendError):
        if getattr(exc, "input_preview", None) is None:
            exc.input_preview = preview(item)
        if getattr(exc, "call_site", None) is None:
            exc.call_site = call_site
    return exc


def annotate_task_error(exc: BaseException, key: Any) -> BaseException:
    """Put the task key into an exception's message, keeping its type.

    Feste errors carry the key as an attribute. For other exceptions whose message is a
    plain string argument the key is added to that argument (so ``str(exc)`` shows it);
    otherwise it is added as a note, shown with the traceback.
    """
    if getattr(exc, "_feste_key", None) is not None:
        return exc
    try:
        exc._feste_key = key  # type: ignore[attr-defined]
    except AttributeError:
        return exc
    if isinstance(exc, BackendError):
        if exc.key is None:
            exc.key = key
        return exc
    suffix = f" (in feste task {key!r})"
    if (
        type(exc).__str__ is BaseException.__str__
        and len(exc.args) == 1
        and isinstance(exc.args[0], str)
    ):
        exc.args = (exc.args[0] + suffix,)
    else:
        exc.add_note(f"raised in feste task {key!r}")
    return exc
