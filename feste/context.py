"""Ambient settings: one registry of option names, values held in a ``ContextVar``.

Design
------
* Every option feste reads is declared once, in :data:`OPTIONS` below, with its
  default, a one-line description and a validator. Nothing else in feste
  defines option names, so ``feste.context.describe()`` is the full list.
* The current values live in a single :class:`contextvars.ContextVar` holding an
  immutable mapping of the options set so far. ``set(**options)`` validates, merges
  and installs a new mapping, and restores the previous one with the token in a
  ``finally`` block, so nesting works (inner values win, exit restores) and two
  threads or two asyncio tasks never see each other's settings.
* A new thread starts with an empty context; feste's schedulers therefore run their
  work inside ``contextvars.copy_context()`` taken where ``compute`` was called.
  Code that starts its own threads should do the same.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from feste.errors import OptionError

__all__ = ["OPTIONS", "Option", "current", "describe", "get", "set", "snapshot", "validate"]


@dataclass(frozen=True)
class Option:
    """One named setting: its default, what it does, and how a value is checked."""

    name: str
    default: Any
    doc: str
    validate: Callable[[Any], Any] | None = None


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected True or False, got {value!r}")
    return value


def _positive_int_or_none(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected a positive integer or None, got {value!r}")
    if value <= 0:
        raise ValueError(f"must be a positive integer (> 0), got {value}")
    return value


def _positive_number_or_none(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a positive number or None, got {value!r}")
    if not value > 0 or math.isinf(value) or math.isnan(value):
        raise ValueError(f"must be a positive finite number (> 0), got {value}")
    return float(value)


def _dollars_or_none(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"expected a positive number of dollars (max_cost=5.0) or None for no budget, "
            f"got {value!r}"
        )
    if not value > 0 or math.isinf(value) or math.isnan(value):
        raise ValueError(
            f"must be a positive finite number of dollars (max_cost=5.0), or None for no "
            f"budget; got {value}"
        )
    return float(value)


def _positive_number(value: Any) -> float:
    if value is None:
        raise TypeError("expected a positive number, got None")
    checked = _positive_number_or_none(value)
    assert checked is not None
    return checked


_JOB_LIMITS = ("bytes", "requests", "tokens")


def _job_limits(value: Any) -> Mapping[str, int] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(f"expected a mapping of {', '.join(_JOB_LIMITS)} or None, got {value!r}")
    unknown = sorted(name for name in value if name not in _JOB_LIMITS)
    if unknown:
        raise ValueError(f"unknown limit {unknown[0]!r}; limits: {', '.join(_JOB_LIMITS)}")
    checked: dict[str, int] = {}
    for name, limit in value.items():
        if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            raise ValueError(f"{name} must be a positive integer, got {limit!r}")
        checked[name] = limit
    return MappingProxyType(checked)


def _non_negative_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"must be >= 0, got {value}")
    return value


def _non_negative_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number >= 0, got {value!r}")
    if value < 0 or math.isnan(value):
        raise ValueError(f"must be >= 0, got {value}")
    return float(value)


def _one_of(*choices: Any) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(map(repr, choices))}; got {value!r}")
        return value

    return check


def _optional_bool(value: Any) -> bool | None:
    if value is None:
        return None
    return _bool(value)


def _optional_callable(value: Any) -> Any:
    if value is not None and not callable(value):
        raise TypeError(f"expected a callable or None, got {value!r}")
    return value


def _scheduler(value: Any) -> Any:
    # Names are checked against the scheduler registry when a graph is computed, so
    # that this module does not import the schedulers (which import this module).
    if value is None or isinstance(value, str) or callable(value) or hasattr(value, "get"):
        return value
    raise TypeError(
        f"expected a scheduler name, a get function or a distributed Client, got {value!r}"
    )


def _cache_location(value: Any) -> Any:
    # Checked by shape here: the cache package sits above this module. Opening happens
    # where the first call is sent, which reports a bad path or URL by name.
    if value is None or value is False or isinstance(value, (str, os.PathLike)):
        if isinstance(value, str) and not value.strip():
            raise ValueError("the cache location is empty; give a file path or a URL")
        return value
    if hasattr(value, "get_many") and hasattr(value, "put_many"):
        return value
    raise TypeError(
        "expected a file path (SQLite), a postgresql:// URL, a feste.cache.CacheStore, "
        f"None (FESTE_CACHE or no cache) or False (no cache), got {value!r}"
    )


def _prices(value: Any) -> Any:
    # Checked by shape here; feste.backend.prices reads and checks the table itself.
    if value is None or isinstance(value, (str, os.PathLike, Mapping)):
        if isinstance(value, str) and not value.strip():
            raise ValueError("the price table location is empty; give a TOML file path")
        return value
    raise TypeError(
        "expected a TOML file path, a mapping {provider: {model: {price: dollars}}} or None "
        f"(the built-in list prices), got {value!r}"
    )


def _run_name(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"expected a run name (a string) or None, got {value!r}")
    if not value.strip() or len(value) > 200 or not value.isprintable():
        raise ValueError(f"a run name is 1 to 200 printable characters, not blank; got {value!r}")
    return value


_OPTION_LIST = [
    Option(
        "eager", False, "Run every feste task at once and return plain values (debugging).", _bool
    ),
    Option(
        "scheduler",
        None,
        "Scheduler used by feste.compute: a name ('async', 'sync', 'threads', 'processes'), "
        "a get function, or a distributed Client. None means 'async'.",
        _scheduler,
    ),
    Option(
        "num_workers",
        None,
        "Worker threads or processes for the 'threads' and 'processes' schedulers, and the "
        "thread pool that runs plain Python tasks under 'async'. None: one per core (at least 4 "
        "threads for I/O).",
        _positive_int_or_none,
    ),
    Option(
        "python_executor",
        "threads",
        "Where the 'async' scheduler runs plain Python tasks: 'threads' (a pool of num_workers "
        "threads) or 'processes' (a pool of num_workers processes, for CPU-bound tasks; their "
        "functions, inputs and results must pickle).",
        _one_of("threads", "processes"),
    ),
    Option(
        "max_concurrency",
        None,
        "Requests in flight at once, per account, within one computation; the backend's own "
        "max_concurrency applies as well, across computations.",
        _positive_int_or_none,
    ),
    Option(
        "requests_per_minute",
        None,
        "Requests started per minute, per account, within one computation; the backend's "
        "own requests_per_minute applies as well.",
        _positive_number_or_none,
    ),
    Option(
        "tokens_per_minute",
        None,
        "Tokens per minute, per account, within one computation: estimated before each call, "
        "corrected with the usage the provider returns; the backend's own applies as well.",
        _positive_number_or_none,
    ),
    Option(
        "max_retries",
        5,
        "Retries of a call that failed with a transient error or a rate limit.",
        _non_negative_int,
    ),
    Option(
        "retry_backoff",
        0.5,
        "Base delay in seconds of the exponential backoff between retries (with full jitter).",
        _non_negative_number,
    ),
    Option(
        "max_retry_after",
        60.0,
        "Longest server Retry-After (seconds) that feste honours; a longer one is treated as "
        "no hint (exponential backoff) and never pauses other calls.",
        _non_negative_number,
    ),
    Option(
        "rate_limit_timeout",
        600.0,
        "Seconds after its first rate-limit (429) answer within which a call may still start "
        "a retry; 429s do not count against max_retries: the server is asking to wait.",
        _non_negative_number,
    ),
    Option(
        "call_timeout",
        None,
        "Seconds one call may take in all: waiting for admission, every attempt and the "
        "waits between retries. None: no overall bound (task_timeout bounds each attempt).",
        _positive_number_or_none,
    ),
    Option(
        "task_timeout",
        None,
        "Seconds one backend request may take before it is abandoned and retried as transient.",
        _positive_number_or_none,
    ),
    Option(
        "event_loop",
        "auto",
        "Event loop of the loops feste starts itself (feste.compute from synchronous code): "
        "'auto' uses uvloop when it is installed (pip install 'feste[fast]'), else asyncio's; "
        "'uvloop' requires it; 'asyncio' always uses the standard loop. A loop already running "
        "(asyncio.run, Jupyter) is used as it is.",
        _one_of("auto", "uvloop", "asyncio"),
    ),
    Option(
        "batch_window",
        0.005,
        "Seconds the async scheduler waits to gather ready calls of one batch group into a "
        "single request (runtime coalescing). 0 sends what is ready at once.",
        _non_negative_number,
    ),
    Option(
        "errors",
        "raise",
        "'raise': the first failure stops the run and is raised; 'return': each failed output "
        "becomes a feste.Failure and independent work finishes.",
        _one_of("raise", "return"),
    ),
    Option(
        "progress",
        None,
        "Show a progress bar: None shows it when stderr is a terminal.",
        _optional_bool,
    ),
    Option(
        "on_task_done", None, "Callback(key, value) after each task finishes.", _optional_callable
    ),
    Option(
        "on_task_failed",
        None,
        "Callback(key, exception) after each task fails.",
        _optional_callable,
    ),
    Option("on_progress", None, "Callback(done, total) after each task ends.", _optional_callable),
    Option(
        "cache",
        None,
        "Result cache: a file path (SQLite), a postgresql:// URL or a feste.cache.CacheStore. "
        "None reads the FESTE_CACHE environment variable (no cache when unset); False turns "
        "caching off.",
        _cache_location,
    ),
    Option(
        "on_truncation",
        "warn",
        "What a chat answer cut at its token limit (finish_reason 'length') does: 'warn' "
        "(a TruncatedOutputWarning, once per run), 'raise' (TruncatedOutputError) or 'ignore'.",
        _one_of("warn", "raise", "ignore"),
    ),
    Option(
        "prices",
        None,
        "Prices used for dollar amounts (usage records, explain): a TOML file or a mapping "
        "laid out like feste/backend/prices.toml, merged over the built-in dated list prices.",
        _prices,
    ),
    Option(
        "max_cost",
        None,
        "Dollars one computation may spend (at the prices option's table): a run estimated "
        "above it is refused before anything is sent (see over_estimate), and no request is "
        "sent once what was spent plus what requests in flight may cost would pass it; the "
        "calls left fail with BudgetExceeded. None: no budget.",
        _dollars_or_none,
    ),
    Option(
        "over_estimate",
        "refuse",
        "What a computation with max_cost does when its estimated cost is above it: "
        "'refuse' (raise BudgetExceeded before sending anything) or 'start' (run anyway; "
        "requests stop being sent when the budget would be passed).",
        _one_of("refuse", "start"),
    ),
    Option(
        "batch_api",
        False,
        "Send eligible calls (OpenAI chat, completions, embeddings) as provider Batch API "
        "jobs at batch prices instead of online requests; a call or backend given "
        "batch_api=True/False decides for itself.",
        _bool,
    ),
    Option(
        "batch_api_window",
        0.5,
        "Seconds of quiet before the calls gathered for a Batch API job are submitted "
        "(at most 20 times this after the first one).",
        _non_negative_number,
    ),
    Option(
        "batch_api_poll",
        10.0,
        "Seconds between the first polls of a Batch API job; the interval grows by half "
        "each poll, up to 30 times this.",
        _positive_number,
    ),
    Option(
        "batch_api_job_limits",
        None,
        "Limits of Batch API jobs, lower than the provider's: a mapping with any of "
        "'requests' and 'bytes' (per job) and 'tokens' (estimated, of one model's jobs "
        "running at once: the enqueued-token budget). None: the provider's (50,000 "
        "requests, 200 MB).",
        _job_limits,
    ),
    Option(
        "batch_api_on_expiry",
        "resubmit",
        "What the unfinished calls of an expired or cancelled Batch API job do: "
        "'resubmit' (a new job) or 'online' (sent as ordinary requests).",
        _one_of("resubmit", "online"),
    ),
    Option(
        "run",
        None,
        "Name of the run: feste.compute records it in the cache's run history, and "
        "pure=False calls are cached within it (a re-run with the same name resumes).",
        _run_name,
    ),
]

OPTIONS: Mapping[str, Option] = MappingProxyType({o.name: o for o in _OPTION_LIST})

_EMPTY: Mapping[str, Any] = MappingProxyType({})
_current: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "feste_options", default=_EMPTY
)


def _unknown(name: str) -> OptionError:
    known = ", ".join(sorted(OPTIONS))
    return OptionError(f"unknown feste option {name!r}; known options: {known}")


def validate(name: str, value: Any) -> Any:
    """``value`` checked (and normalized) by option ``name``'s rule, or :class:`OptionError`.

    The one rule for each option: backends check their own settings of the same name
    (``OpenAI(max_concurrency=...)``) with it too.
    """
    option = OPTIONS.get(name)
    if option is None:
        raise _unknown(name)
    if option.validate is None:
        return value
    try:
        return option.validate(value)
    except (TypeError, ValueError) as exc:
        raise OptionError(f"invalid value for feste option {name!r}: {exc}") from None


@contextlib.contextmanager
def set(**options: Any) -> Iterator[None]:
    """Set options for the code inside the ``with`` block.

    >>> from feste import context
    >>> with context.set(eager=True):
    ...     context.get("eager")
    True
    """
    checked = {name: validate(name, value) for name, value in options.items()}
    merged = dict(_current.get())
    merged.update(checked)
    token = _current.set(MappingProxyType(merged))
    try:
        yield
    finally:
        _current.reset(token)


def get(key: str) -> Any:
    """The current value of option ``key`` (its default when nothing set it)."""
    values = _current.get()
    if key in values:
        return values[key]
    option = OPTIONS.get(key)
    if option is None:
        raise _unknown(key)
    return option.default


def current() -> Mapping[str, Any]:
    """The options set in this context, as one read-only mapping (unset ones absent).

    A new mapping is made by every ``set``: the same object means the same options, so
    a value derived from them may be reused while it is the same.
    """
    return _current.get()


def snapshot() -> dict[str, Any]:
    """Every option with its current value."""
    values = _current.get()
    return {name: values.get(name, option.default) for name, option in OPTIONS.items()}


def describe() -> str:
    """A plain-text table of the options: name, default and description."""
    lines = []
    for option in OPTIONS.values():
        lines.append(f"{option.name} (default {option.default!r})\n    {option.doc}")
    return "\n".join(lines)
