"""The knobs of the simulated API and their command-line form.

Design: ``ServerConfig`` is a frozen dataclass whose fields are the knobs; each
field carries its help text and bounds in its metadata, and its annotation
gives its type (``int``, ``float``, ``bool`` or ``str``, optionally ``| None``).
Validation, the ``--kebab-case`` options of ``python -m feste.testing`` and
the argv a parent passes to a process-mode child are all generated from those
fields, so adding a knob is one line here and the CLI cannot drift from it.
The api key is never echoed: not in errors, not in ``repr``, not on a child's
command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Final

__all__ = [
    "LOOPBACK_HOSTS",
    "ServerConfig",
    "add_knob_arguments",
    "check_loopback_host",
    "config_from_namespace",
    "config_to_argv",
]

LOOPBACK_HOSTS: Final = ("127.0.0.1", "localhost", "::1")

_TRUE_WORDS: Final = frozenset({"true", "1", "yes", "on"})
_FALSE_WORDS: Final = frozenset({"false", "0", "no", "off"})


def _knob(
    default: Any, help: str, *, minimum: float | None = None, maximum: float | None = None
) -> Any:
    return field(default=default, metadata={"help": help, "minimum": minimum, "maximum": maximum})


@dataclass(frozen=True)
class ServerConfig:
    """Every behaviour knob of the simulated API. Immutable: change it with ``with_changes``.

    Values are validated on construction; a ``ValueError`` names the knob.
    """

    latency: float = _knob(0.0, "seconds added to every request", minimum=0.0)
    latency_per_item: float = _knob(
        0.0, "seconds added per input item (prompt, embedding input, document)", minimum=0.0
    )
    max_concurrency: int | None = _knob(
        None, "requests served at once; more are refused with 429", minimum=1
    )
    requests_per_minute: int | None = _knob(
        None, "accepted requests per sliding 60 s window; more are refused with 429", minimum=1
    )
    tokens_per_minute: int | None = _knob(
        None,
        "input tokens per sliding 60 s window; a request that would exceed it is refused with 429",
        minimum=1,
    )
    rate_limit_headers: bool = _knob(
        False,
        "send OpenAI's x-ratelimit-* headers on OpenAI-route 200 and 429 answers "
        "(for requests_per_minute and tokens_per_minute)",
    )
    retry_after: float = _knob(
        0.05, "seconds announced by limit 429s, injected 429s and 503s", minimum=0.0
    )
    retry_after_http_date: bool = _knob(
        False, "announce Retry-After as an HTTP date (and no retry-after-ms) instead of seconds"
    )
    fault_429_retry_after: float | None = _knob(
        None,
        "seconds announced by injected 429s (fault_429, [[status:429]]); None: retry_after",
        minimum=0.0,
    )
    fault_429: float = _knob(0.0, "probability of an injected 429", minimum=0.0, maximum=1.0)
    fault_500: float = _knob(0.0, "probability of an injected 500", minimum=0.0, maximum=1.0)
    fault_hang: float = _knob(
        0.0, "probability of sleeping hang_seconds before answering", minimum=0.0, maximum=1.0
    )
    fault_drop: float = _knob(
        0.0, "probability of closing the connection without an answer", minimum=0.0, maximum=1.0
    )
    hang_seconds: float = _knob(30.0, "how long a hang fault sleeps", minimum=0.0)
    seed: int = _knob(0, "seed of the random fault sequence")
    api_key: str | None = _knob(None, "when set, require 'Authorization: Bearer <api_key>'")
    embedding_dim: int = _knob(8, "length of embedding vectors", minimum=1, maximum=65_536)
    max_input_tokens: int = _knob(8191, "token limit of one embedding input", minimum=1)
    max_batch_openai_embed: int = _knob(2048, "most inputs in one OpenAI embedding call", minimum=1)
    max_batch_cohere_embed: int = _knob(96, "most texts in one Cohere embed call", minimum=1)
    batch_completion_delay: float = _knob(
        0.0, "seconds a Batch API job runs before it is completed", minimum=0.0
    )
    batch_expire_jobs: int = _knob(
        0, "the next N Batch API jobs created expire instead of completing", minimum=0
    )

    def __post_init__(self) -> None:
        hints = _knob_types()
        for knob in fields(self):
            value = getattr(self, knob.name)
            base, optional = hints[knob.name]
            object.__setattr__(self, knob.name, _checked_knob(knob, value, base, optional))
        fault_sum = self.fault_429 + self.fault_500 + self.fault_hang + self.fault_drop
        if fault_sum > 1.0 + 1e-9:
            raise ValueError(
                "fault_429 + fault_500 + fault_hang + fault_drop must be at most 1, "
                f"got {fault_sum:g}"
            )

    @classmethod
    def knob_names(cls) -> tuple[str, ...]:
        return tuple(knob.name for knob in fields(cls))

    def with_changes(self, **changes: Any) -> ServerConfig:
        """A copy with ``changes`` applied; an unknown name raises ``ValueError`` listing all."""
        unknown = sorted(set(changes) - set(self.knob_names()))
        if unknown:
            raise ValueError(
                f"unknown server knob(s) {', '.join(unknown)}; "
                f"valid knobs: {', '.join(self.knob_names())}"
            )
        return dataclasses.replace(self, **changes)

    def as_dict(self, *, hide_api_key: bool = True) -> dict[str, Any]:
        values = {knob.name: getattr(self, knob.name) for knob in fields(self)}
        if hide_api_key and values["api_key"] is not None:
            values["api_key"] = "***"
        return values

    def changed_knobs(self) -> dict[str, Any]:
        """Knobs whose value differs from the default (api_key hidden)."""
        defaults = ServerConfig()
        return {
            name: shown
            for name, shown in self.as_dict().items()
            if getattr(self, name) != getattr(defaults, name)
        }

    def __repr__(self) -> str:
        knobs = ", ".join(f"{name}={value!r}" for name, value in self.as_dict().items())
        return f"ServerConfig({knobs})"


_KNOB_TYPES: dict[str, tuple[type, bool]] = {}


def _knob_types() -> dict[str, tuple[type, bool]]:
    """Knob name -> (base type, whether None is allowed), read from the annotations."""
    if not _KNOB_TYPES:
        for name, hint in typing.get_type_hints(ServerConfig).items():
            args = typing.get_args(hint)
            if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
                base = next(arg for arg in args if arg is not type(None))
                _KNOB_TYPES[name] = (base, True)
            else:
                _KNOB_TYPES[name] = (hint, False)
    return _KNOB_TYPES


def _checked_knob(knob: dataclasses.Field[Any], value: Any, base: type, optional: bool) -> Any:
    name = knob.name
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} must not be None")
    if base is str:
        if not isinstance(value, str) or not value:
            # Never echo the value: the only string knob is the api key.
            raise ValueError(f"{name} must be a non-empty string or None")
        return value
    if base is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if base is int:
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"{name} must be an integer, got {value!r}")
            value = int(value)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
    minimum = knob.metadata.get("minimum")
    maximum = knob.metadata.get("maximum")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum:g}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum:g}, got {value!r}")
    return value


def check_loopback_host(host: str) -> str:
    """The address to bind for ``host``; anything but a loopback name raises ``ValueError``.

    The simulator has no real authentication, so it must never be reachable
    from another machine.
    """
    if host not in LOOPBACK_HOSTS:
        raise ValueError(
            f"refusing to bind {host!r}: the test server only listens on loopback "
            f"({', '.join(LOOPBACK_HOSTS)})"
        )
    return "127.0.0.1" if host == "localhost" else host


def _parse_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _argument_type(base: type) -> Callable[[str], Any]:
    return _parse_bool if base is bool else base


def add_knob_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--kebab-case`` option per ``ServerConfig`` field, so the CLI never drifts."""
    for knob in fields(ServerConfig):
        base = _knob_types()[knob.name][0]
        default = knob.default
        parser.add_argument(
            "--" + knob.name.replace("_", "-"),
            dest=knob.name,
            type=_argument_type(base),
            default=argparse.SUPPRESS,
            metavar=base.__name__.upper(),
            help=f"{knob.metadata['help']} (default: {default})",
        )


def config_from_namespace(namespace: argparse.Namespace) -> ServerConfig:
    names = set(ServerConfig.knob_names())
    return ServerConfig(**{key: value for key, value in vars(namespace).items() if key in names})


def config_to_argv(config: ServerConfig) -> list[str]:
    """Command-line options reproducing ``config``, except api_key (kept out of ``ps``)."""
    defaults = ServerConfig()
    argv: list[str] = []
    for knob in fields(config):
        value = getattr(config, knob.name)
        if knob.name == "api_key" or value == getattr(defaults, knob.name) or value is None:
            continue
        argv += ["--" + knob.name.replace("_", "-"), repr(value)]
    return argv
