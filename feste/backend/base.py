"""The backend base class: method declarations, request building, response parsing.

Design
------
A backend knows how to talk to one provider *without doing I/O*: it declares its
methods (:class:`MethodSpec`), turns a call into a provider-neutral
:class:`~feste.backend.types.Request`, and turns a
:class:`~feste.backend.types.Response` into values. Sending is the transport's job
(:mod:`feste.backend.transports`), and retries, limits and batching belong to the
scheduler (:mod:`feste._calls`, :mod:`feste.limits`, :mod:`feste.optimization`), which
read only the declarations made here, never provider-specific code.

In a graph, a call is a ``Task`` whose function is a :class:`BackendCall` (one item) or
a :class:`BatchCall` (a list of items, built by the batching pass). The batched item is
always the call's first positional argument; every other argument is a keyword
parameter, and two calls may share a batch only when their backend identity, method
and all keyword parameters are equal (:meth:`BackendCall.batch_group`).

Parameters: a public method merges the method's built-in defaults
(``method_defaults``), the constructor's keyword defaults, a typed parameter object
(:class:`CallParams` subclass) or mapping, and the call's keywords into one explicit
dict when the node is built (:meth:`Backend.call_params`), so graph keys and batch
groups show every parameter that will be sent; constructor defaults are therefore left
out of :meth:`Backend.identity`. Unknown names are refused with the valid ones listed.

Secrets: the API key is kept in a private attribute, left out of ``repr``, of
``__dask_tokenize__`` (so out of graph keys and cache tokens) and of every request
payload; the transports add it to headers at send time. A key given explicitly is
pickled with the backend (so it reaches Dask workers); a key read from the environment
is not stored at all and is re-read where the call runs.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from dask.base import tokenize

from feste import context
from feste.backend.types import ItemFailure, Parsed, Request, Response
from feste.errors import BadRequestError, ConfigurationError, MalformedResponseError
from feste.task import FesteBase, FesteDelayed, is_eager, lazy_call

__all__ = [
    "Backend",
    "BackendCall",
    "BaseTransport",
    "BatchCall",
    "CallParams",
    "MethodSpec",
    "take_item",
]


@dataclass(frozen=True)
class MethodSpec:
    """How one backend method may be sent.

    ``batch_size`` > 1 makes the method batchable: up to that many calls (their first
    positional arguments) go in one request. ``batch_tokens`` additionally caps the
    estimated tokens of one batched request. ``params`` lists the keyword parameters the
    method accepts (unknown names are refused before anything is sent).
    """

    name: str
    params: frozenset[str] = field(default_factory=frozenset)
    batch_size: int = 1
    batch_tokens: int | None = None

    @property
    def batchable(self) -> bool:
        return self.batch_size > 1


@dataclass(frozen=True)
class CallParams:
    """Base class of typed parameter objects (``ChatParams``...).

    Subclasses are frozen dataclasses whose fields all default to None; a field left at
    None is not sent. :meth:`as_dict` gives the fields that are set.
    """

    def as_dict(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for param in fields(self):
            value = getattr(self, param.name)
            if value is not None:
                values[param.name] = value
        return values


class BaseTransport:
    """Sends requests for one backend on one event loop.

    ``send`` returns a 2xx :class:`Response` or raises a :mod:`feste.errors` error
    (mapped from HTTP statuses and from the client library's exceptions).
    """

    async def send(self, request: Request) -> Response:
        raise NotImplementedError

    async def aclose(self) -> None:
        """Release connections. Called before the event loop that used it closes."""


def estimate_tokens(text: str) -> int:
    """A cheap token estimate (about four characters a token) for limits and batching."""
    return (len(text) + 3) // 4 if text else 0


_CREDENTIAL_SALT = os.urandom(16)


class Backend(FesteBase):
    """Base class of model providers.

    Subclasses set ``provider``, ``methods``, ``api_key_env`` and implement
    :meth:`build_request` and :meth:`parse_response`. Their public methods call
    :meth:`_call`, which builds a graph node (or, in eager mode, sends at once).
    """

    provider: ClassVar[str] = ""
    methods: ClassVar[Mapping[str, MethodSpec]] = {}
    api_key_env: ClassVar[str] = ""
    default_base_url: ClassVar[str] = ""
    #: Which official client library the "sdk" transport uses ("openai", "cohere").
    sdk_package: ClassVar[str] = ""
    #: Per method, the typed parameter class its calls accept besides keywords.
    params_types: ClassVar[Mapping[str, type[CallParams]]] = {}
    #: Per method, values used when neither the call nor the constructor gives one.
    method_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {}

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float = 60.0,
        transport: str | None = None,
        client: Any = None,
        max_concurrency: int | None = None,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        **defaults: Any,
    ) -> None:
        if api_key is not None and not isinstance(api_key, str):
            raise ConfigurationError(
                f"api_key must be a string, got {type(api_key).__name__}", backend=self.provider
            )
        if client is not None:
            self._check_client(client)
        self._api_key = api_key
        self.base_url = (base_url or self.default_base_url).rstrip("/")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ConfigurationError(
                f"timeout must be a positive number of seconds, got {timeout!r}",
                backend=self.provider,
            )
        self.timeout = float(timeout)
        if transport is None:
            transport = "sdk" if client is not None else "http"
        if transport not in ("http", "sdk"):
            raise ConfigurationError(
                f"unknown transport {transport!r}; valid transports: 'http', 'sdk'",
                backend=self.provider,
            )
        if client is not None and transport != "sdk":
            raise ConfigurationError(
                "a client object is used by the 'sdk' transport; drop transport='http' or client=",
                backend=self.provider,
            )
        self.transport = transport
        self._client = client
        for name, value in (
            ("max_concurrency", max_concurrency),
            ("requests_per_minute", requests_per_minute),
            ("tokens_per_minute", tokens_per_minute),
        ):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0
            ):
                raise ConfigurationError(
                    f"{name} must be a positive number or None, got {value!r}",
                    backend=self.provider,
                )
        self.max_concurrency = max_concurrency
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        # Live connection pools, one per event loop; never pickled or tokenized.
        self._transports: dict[Any, BaseTransport] = {}
        # Constructor defaults of call parameters. They are merged into each node's
        # keyword parameters when the node is built, so they are not part of identity().
        self._defaults: dict[str, Any] = {}
        self._set_defaults(defaults)

    # -- identity and secrets ---------------------------------------------------------

    def identity(self) -> str:
        """A token naming where requests go: class, base URL and settings, never the key.

        Limiters, batch groups and (later) cache entries are keyed by it. It is computed
        once: every call node asks for it, and changing a public setting resets it.
        """
        cached = self.__dict__.get("_identity")
        if cached is None:
            cached = tokenize(type(self).__module__, type(self).__qualname__, self._token_state())
            self.__dict__["_identity"] = cached
        return cached

    def __setattr__(self, name: str, value: Any) -> None:
        self.__dict__.pop("_identity", None)
        super().__setattr__(name, value)

    def _token_state(self) -> Any:
        state = {
            name: value
            for name, value in vars(self).items()
            if not name.startswith("_")
            and name
            not in ("timeout", "max_concurrency", "requests_per_minute", "tokens_per_minute")
        }
        if self._client is not None:
            # A configured client is identified by its type and address only.
            state["client"] = (
                type(self._client).__qualname__,
                str(getattr(self._client, "base_url", "")),
            )
        return state

    def __repr__(self) -> str:
        shown = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        shown["api_key"] = "***" if self._api_key else f"${self.api_key_env}"
        if self._client is not None:
            shown["client"] = f"<{type(self._client).__qualname__}>"
        shown.update(self._defaults)
        text = ", ".join(f"{k}={v!r}" for k, v in shown.items())
        return f"{type(self).__name__}({text})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_transports"] = {}
        if state.get("_client") is not None:
            # Official client objects hold sockets and locks; they cannot travel.
            state["_client"] = None
            state["_client_was_set"] = True
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def request_headers(self) -> dict[str, str]:
        """Headers sent with every request besides the key (never secret)."""
        return {}

    def scrub(self, text: str) -> str:
        """``text`` with any API key this backend may send replaced by ``***``.

        A safety net for messages built from provider answers or exceptions, which
        should not echo a key but are not under feste's control.
        """
        secrets = [self._api_key, os.environ.get(self.api_key_env)] if self.api_key_env else []
        client_key = getattr(self._client, "api_key", None)
        if isinstance(client_key, str):
            secrets.append(client_key)
        for secret in secrets:
            # Very short values would mangle ordinary words; real keys are long.
            if secret and len(secret) >= 8 and secret in text:
                text = text.replace(secret, "***")
        return text

    def api_key(self) -> str:
        """The key to send: the explicit one, else read now from ``api_key_env``."""
        if self._api_key:
            return self._api_key
        key = os.environ.get(self.api_key_env, "")
        if not key:
            raise ConfigurationError(
                f"no API key: pass api_key= to {type(self).__name__}(...) or set the "
                f"{self.api_key_env} environment variable where the call runs",
                backend=self.provider,
            )
        return key

    # -- calls ------------------------------------------------------------------------

    def spec(self, method: str) -> MethodSpec:
        try:
            return self.methods[method]
        except KeyError:
            known = ", ".join(sorted(self.methods))
            raise ConfigurationError(
                f"{type(self).__name__} has no method {method!r}; methods: {known}",
                backend=self.provider,
            ) from None

    def check_params(self, method: str, params: Mapping[str, Any]) -> None:
        """Refuse parameter names the method does not know, listing the valid ones."""
        spec = self.spec(method)
        unknown = sorted(set(params) - spec.params)
        if unknown:
            names = ", ".join(map(repr, unknown))
            valid = ", ".join(sorted(spec.params))
            raise ConfigurationError(
                f"unknown parameter{'s' if len(unknown) > 1 else ''} {names} "
                f"for {type(self).__name__}.{method}; valid parameters: {valid}",
                backend=self.provider,
                method=method,
            )

    #: (module, class name, public spelling) of the official async client this backend
    #: accepts as ``client=``; and the synchronous clients to refuse with a hint.
    async_client: ClassVar[tuple[str, str, str]] = ("", "", "")
    sync_clients: ClassVar[tuple[tuple[str, str], ...]] = ()

    def credential_fingerprint(self) -> str | None:
        """A salted hash of the key this backend was given (directly or in its client).

        Batch groups include it, so calls of backends with different keys never share
        a request. The salt is random per process and the hash is never stored: it
        identifies nothing outside this process. None when the key comes from the
        environment (the same for every backend where the call runs).
        """
        given = [self._api_key, getattr(self._client, "api_key", None)]
        keys = [key for key in given if isinstance(key, str) and key]
        if not keys:
            return None
        digest = hashlib.sha256(_CREDENTIAL_SALT)
        for key in keys:
            digest.update(key.encode() + b"\0")
        return digest.hexdigest()

    def _check_client(self, client: Any) -> None:
        """Refuse anything but the official async client (checked without importing it)."""
        module_name, class_name, public_name = self.async_client
        if not module_name:
            return  # this backend declares no official client: nothing to check
        module = sys.modules.get(module_name)
        if module is not None and isinstance(client, getattr(module, class_name)):
            return
        hint = ""
        for sync_module_name, sync_class_name in self.sync_clients:
            sync_module = sys.modules.get(sync_module_name)
            if sync_module is not None and isinstance(
                client, getattr(sync_module, sync_class_name)
            ):
                hint = (
                    ": that is a synchronous client, which would block feste's event loop; "
                    f"pass {public_name}(...) with the same settings"
                )
        raise ConfigurationError(
            f"client= must be an instance of {public_name}, got {type(client).__qualname__}{hint}",
            backend=self.provider,
        )

    def _set_defaults(self, defaults: Mapping[str, Any]) -> None:
        """Keep constructor defaults, refusing names that no method accepts."""
        accepted: set[str] = set()
        for spec in self.methods.values():
            accepted |= spec.params
        unknown = sorted(set(defaults) - accepted)
        if unknown:
            raise ConfigurationError(
                f"unknown parameter{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(map(repr, unknown))} for {type(self).__name__}(...); valid "
                f"parameters: {', '.join(sorted(accepted))}",
                backend=self.provider,
            )
        self._defaults = {name: value for name, value in defaults.items() if value is not None}

    def call_params(self, method: str, typed: Any, keywords: Mapping[str, Any]) -> dict[str, Any]:
        """The explicit keyword parameters of one call, as they go into its graph node.

        Lowest to highest precedence: the method's built-in defaults (its default
        model...), the constructor's defaults that the method accepts, a typed parameter
        object (or mapping) and the call's keywords. Parameters left at None are dropped.
        """
        spec = self.spec(method)
        self.check_params(method, keywords)
        merged = dict(self.method_defaults.get(method, {}))
        for name, value in self._defaults.items():
            if name in spec.params:
                merged[name] = value
        if typed is not None:
            merged.update(self._typed_params(method, typed))
        for name, value in keywords.items():
            if value is not None:
                merged[name] = value
        return {name: value for name, value in merged.items() if value is not None}

    def _typed_params(self, method: str, typed: Any) -> dict[str, Any]:
        expected = self.params_types.get(method)
        if expected is not None and isinstance(typed, expected):
            return typed.as_dict()
        if isinstance(typed, Mapping):
            values = dict(typed)
            self.check_params(method, values)
            return values
        wanted = f"a {expected.__name__} or a mapping" if expected is not None else "a mapping"
        raise ConfigurationError(
            f"params of {type(self).__name__}.{method} must be {wanted} of parameters, "
            f"got {type(typed).__name__}",
            backend=self.provider,
            method=method,
        )

    def _call(self, method: str, item: Any, params: dict[str, Any], *, pure: bool = True) -> Any:
        """A lazy node for ``method(item, **params)``, or its value in eager mode."""
        self.check_params(method, params)
        call = BackendCall(self, method, pure=pure)
        if is_eager():
            from feste._calls import run_call
            from feste._loop import run_sync
            from feste.task import _compute_if_lazy

            (item,), params = _compute_if_lazy((item,), params)
            return run_sync(run_call(self, method, item, params, pure=pure))
        return lazy_call(call, item, name=f"{self.provider}-{method}", pure=pure, **params)

    # -- to implement -----------------------------------------------------------------

    def build_request(self, method: str, items: list[Any], params: Mapping[str, Any]) -> Request:
        """The request for ``items`` (one item, or a batch for batchable methods)."""
        raise NotImplementedError

    def parse_response(self, request: Request, response: Response) -> Parsed:
        """One value per item of ``request``, and the usage. Raise
        :class:`~feste.errors.MalformedResponseError` for a body that does not fit."""
        raise NotImplementedError

    def make_transport(self) -> BaseTransport:
        """A new transport for the current event loop (``self.transport`` names the kind)."""
        from feste.backend.transports import make_transport

        return make_transport(self)

    def malformed(self, request: Request, detail: str) -> MalformedResponseError:
        return MalformedResponseError(
            f"unexpected response body: {detail}",
            backend=self.provider,
            method=request.method,
            model=request.model,
        )


class BackendCall:
    """The function of a graph node that calls ``backend.method(item, **params)``.

    Called directly (sync, threads and processes schedulers) it sends the request on
    this thread's event loop; the async scheduler recognizes it and awaits the call
    itself, coalescing calls of one batch group.
    """

    __slots__ = ("backend", "method", "pure")

    def __init__(self, backend: Backend, method: str, pure: bool = True) -> None:
        self.backend = backend
        self.method = method
        # False for calls made with pure=False: never merged with an identical call.
        self.pure = pure

    @property
    def __name__(self) -> str:  # used by dask's funcname() in reprs and keys
        return f"{self.backend.provider}-{self.method}"

    @property
    def spec(self) -> MethodSpec:
        return self.backend.spec(self.method)

    def batch_group(self, params: Mapping[str, Any]) -> tuple[Any, ...] | None:
        """Calls with equal groups may share one request; None if not batchable."""
        if not self.spec.batchable:
            return None
        return (
            self.backend.identity(),
            self.backend.credential_fingerprint(),
            self.method,
            tokenize(sorted(params.items())),
        )

    def __call__(self, item: Any, **params: Any) -> Any:
        from feste._calls import run_call
        from feste._loop import run_sync

        return run_sync(run_call(self.backend, self.method, item, params, pure=self.pure))

    def __dask_tokenize__(self) -> Any:
        return ("feste.BackendCall", self.backend.identity(), self.method)

    def __repr__(self) -> str:
        return f"<{self.backend.provider}.{self.method}>"

    def __reduce__(self) -> tuple[Any, ...]:
        return (BackendCall, (self.backend, self.method, self.pure))


class BatchCall:
    """The function of a batched node: ``backend.method`` over a list of items.

    Returns one entry per item: its value, or an :class:`ItemFailure` when the provider
    rejected that item alone (the batch is split to find it).
    """

    __slots__ = ("backend", "distinct", "method")

    def __init__(self, backend: Backend, method: str, distinct: bool = False) -> None:
        self.backend = backend
        self.method = method
        # True when some items come from pure=False calls: identical items are then
        # all sent, each asking for its own answer.
        self.distinct = distinct

    @property
    def __name__(self) -> str:
        return f"{self.backend.provider}-{self.method}-batch"

    def __call__(self, items: list[Any], **params: Any) -> list[Any]:
        from feste._calls import run_batch
        from feste._loop import run_sync

        batch = run_batch(self.backend, self.method, list(items), params, dedupe=not self.distinct)
        return run_sync(batch)

    def __dask_tokenize__(self) -> Any:
        return ("feste.BatchCall", self.backend.identity(), self.method)

    def __repr__(self) -> str:
        return f"<{self.backend.provider}.{self.method} batch>"

    def __reduce__(self) -> tuple[Any, ...]:
        return (BatchCall, (self.backend, self.method, self.distinct))


def take_item(batch_result: list[Any], index: int) -> Any:
    """Pick one item's value out of a batch result (re-raising that item's own error)."""
    value = batch_result[index]
    if isinstance(value, ItemFailure):
        import copy

        # Duplicate calls share one item: each key raises its own copy of the error,
        # so the scheduler labels every copy with the key that raised it.
        try:
            error = copy.copy(value.error)
        except Exception:  # an exception type that cannot be rebuilt from its args
            error = value.error
        raise error
    return value


_MESSAGE_SHAPE = "{'role': 'user', 'content': 'some text'}"


def chat_messages(
    backend: Backend, method: str, prompt: Any, system: Any, roles: frozenset[str]
) -> Any:
    """The item of a chat call: its messages list (or a lazy prompt, turned into one later).

    A string becomes one user message and ``system`` a leading system message. Messages
    known now are checked now, so a bad shape is reported where the call is written;
    lazy parts are checked when the call runs (:func:`check_messages`).
    """
    if system is not None and not isinstance(system, (str, FesteDelayed)):
        raise BadRequestError(
            f"system must be a string, got {type(system).__name__}",
            backend=backend.provider,
            method=method,
        )
    if isinstance(prompt, FesteDelayed):
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
        if isinstance(message, FesteDelayed):
            continue
        if not isinstance(message, Mapping):
            raise bad(
                f"message {index} must be a dict like {_MESSAGE_SHAPE}, "
                f"got {type(message).__name__}"
            )
        role = message.get("role")
        if not isinstance(role, FesteDelayed) and role not in roles:
            raise bad(
                f"message {index} has role {role!r}; expected one of "
                f"{', '.join(sorted(roles))} (shape: {_MESSAGE_SHAPE})"
            )
        content = message.get("content")
        if content is None and message.get("tool_calls") is not None:
            continue  # an assistant turn that only calls tools
        if not isinstance(content, (str, list, FesteDelayed)):
            found = "no content" if content is None else f"{type(content).__name__} content"
            raise bad(
                f"message {index} has {found}; content must be a string or a list of "
                f"content parts (shape: {_MESSAGE_SHAPE})"
            )
    return list(prompt)


def check_text(backend: Backend, method: str, text: Any, *, allow_empty: bool = True) -> None:
    """Refuse an item that must be a string (lazy values are checked when they run)."""
    if isinstance(text, FesteDelayed):
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


def backend_option(backend: Backend, name: str) -> Any:
    """A limit for ``backend``: the context's value if set, else the backend's own."""
    value = context.get(name)
    return value if value is not None else getattr(backend, name)
