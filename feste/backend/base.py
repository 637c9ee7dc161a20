"""The backend base class: who a backend is, what it accepts, how calls become requests.

Design
------
A backend knows how to talk to one provider *without doing I/O*: it declares its
methods (:class:`~feste.backend.spec.MethodSpec`), turns a call into a provider-neutral
:class:`~feste.backend.types.Request` (:meth:`Backend.build_request`), and turns a
:class:`~feste.backend.types.Response` into values (:meth:`Backend.parse_response`).
Sending is the transports' job (:mod:`feste.backend.transports`), and limits, retries
and batching belong to the layers above (:mod:`feste.limits`, :mod:`feste._calls`,
:mod:`feste.optimization`), which read only the declarations made here.

A subclass declares: ``provider``, ``methods``, ``api_key_env``, ``default_base_url``,
``params_types`` and ``method_defaults``, its extra constructor ``settings`` (public
attributes such as OpenAI's ``organization``), the official client it accepts
(``async_client``), and implements the two abstract methods. Its public methods
(``chat``, ``embed``...) check their input and end in :meth:`Backend._call`.

Calls: :meth:`Backend._call` hands the call to the *call builder*, which the graph
layer (:mod:`feste.task`) installs when ``feste`` is imported: it returns a lazy node,
or in eager mode the value. A backend never imports the layers above it; the package's
``__init__`` imports :mod:`feste.task`, so the builder is in place before any backend
module can be imported.

Parameters: a public method merges the method's built-in defaults
(``method_defaults``), the constructor's keyword defaults, a typed parameter object
(:class:`~feste.backend.spec.CallParams` subclass) or mapping, and the call's keywords
into one explicit dict when the node is built (:meth:`Backend.call_params`), so graph
keys and batch groups show every parameter that will be sent; constructor defaults are
therefore left out of :meth:`Backend.identity`. Unknown names are refused with the
valid ones listed.

Secrets: the API key is kept in a private attribute, left out of ``repr``, of
``__dask_tokenize__`` (so out of graph keys and cache tokens) and of every request
payload; the transports add it to headers at send time. A key given explicitly is
pickled with the backend (so it reaches Dask workers); a key read from the environment
is not stored at all and is re-read where the call runs. A key that cannot go into a
header (whitespace, non-ASCII) is refused, given or read, without being quoted.

Connections: the sender keeps the backend's transports (one per event loop) in
``_transports``; :meth:`Backend.close`, :meth:`Backend.aclose` and ``with`` /
``async with`` close them (see :mod:`feste.backend.transports.base` for the others).
"""

from __future__ import annotations

import abc
import hashlib
import os
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Self

from dask.base import tokenize

from feste import context
from feste._loop import aclose_on_loop, close_on_loop
from feste.backend.spec import CallParams, MethodSpec, estimate_item_tokens, estimate_tokens
from feste.backend.structured import usage_from_record
from feste.backend.types import Parsed, Request, Response, Usage
from feste.errors import ConfigurationError, MalformedResponseError, OptionError

__all__ = ["Backend", "CallBuilder", "NOT_ANSWERED", "install_call_builder"]

#: ``builder(backend, method, item, params, pure)``: a lazy node, or the value in eager mode.
CallBuilder = Callable[["Backend", str, Any, dict[str, Any], bool], Any]

_call_builder: CallBuilder | None = None


def install_call_builder(builder: CallBuilder) -> None:
    """Called once by :mod:`feste.task`: how backend method calls become graph nodes."""
    global _call_builder
    _call_builder = builder


_CREDENTIAL_SALT = os.urandom(16)


class _NotAnswered:
    def __repr__(self) -> str:
        return "NOT_ANSWERED"


#: The answer of a call not made yet (cost estimates before a run).
NOT_ANSWERED: Any = _NotAnswered()

# An API key goes into an HTTP header: visible ASCII only, no whitespace.
_KEY_CHARACTERS = re.compile(r"[\x21-\x7e]+")
_URL_SCHEME = re.compile(r"https?://[^/\s]", re.IGNORECASE)


def _fingerprint_of(given: tuple[Any, ...], salt: bytes) -> str | None:
    """The salted hash of the keys among ``given`` (None when there is none)."""
    keys = [key for key in given if isinstance(key, str) and key]
    if not keys:
        return None
    digest = hashlib.sha256(salt)
    for key in keys:
        digest.update(key.encode() + b"\0")
    return digest.hexdigest()


def _key_problem(key: str) -> str | None:
    """What makes ``key`` unusable in a header, described without quoting it."""
    if _KEY_CHARACTERS.fullmatch(key):
        return None
    if not key.isascii():
        return "has non-ASCII characters"
    if key != key.strip():
        return "has leading or trailing whitespace (a newline from a file or a paste?)"
    return "has whitespace or control characters inside"


class Backend(abc.ABC):
    """Base class of model providers (see the module docstring for what to declare).

    Constructor settings common to every provider: ``api_key`` (else read from
    ``api_key_env`` where each call runs), ``base_url`` (else read from ``base_url_env``
    when the backend is made, else ``default_base_url``), ``timeout`` (seconds per
    request), ``transport`` (``"http"`` or ``"sdk"``), ``client`` (a configured official
    async client, used by the ``"sdk"`` transport), the limits ``max_concurrency``,
    ``requests_per_minute`` and ``tokens_per_minute``, the subclass's own ``settings``,
    and any other keyword as a default call parameter (``model=...``).
    """

    provider: ClassVar[str] = ""
    methods: ClassVar[Mapping[str, MethodSpec]] = {}
    api_key_env: ClassVar[str] = ""
    default_base_url: ClassVar[str] = ""
    #: The environment variable read for the base URL when ``base_url=`` is not given
    #: (as the official clients do), before ``default_base_url``.
    base_url_env: ClassVar[str] = ""
    #: Which official client library the "sdk" transport uses ("openai", "cohere").
    sdk_package: ClassVar[str] = ""
    #: Per method, the typed parameter class its calls accept besides keywords.
    params_types: ClassVar[Mapping[str, type[CallParams]]] = {}
    #: Per method, values used when neither the call nor the constructor gives one.
    method_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    #: Provider-specific constructor settings, kept as public attributes (default None).
    settings: ClassVar[tuple[str, ...]] = ()
    #: A ``feste.backend.transports.BaseTransport`` subclass that sends this backend's
    #: requests instead of the ``transport=`` kinds (a provider with its own protocol).
    transport_class: ClassVar[Any] = None
    #: Parameters refused on purpose, with the reason (``stream``: feste returns whole
    #: answers), checked before unknown names.
    refused_params: ClassVar[Mapping[str, str]] = {}

    def __init__(
        self,
        api_key: str | None = None,
        *,
        base_url: str | None = None,
        timeout: float = 60.0,
        transport: str | None = None,
        client: Any = None,
        max_concurrency: int | None = None,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        **defaults: Any,
    ) -> None:
        for name in self.settings:
            setattr(self, name, defaults.pop(name, None))
        if api_key is not None and not isinstance(api_key, str):
            raise ConfigurationError(
                f"api_key must be a string, got {type(api_key).__name__}", backend=self.provider
            )
        if api_key is not None:
            self._check_key(api_key, f"the api_key given to {type(self).__name__}")
        if client is not None:
            self._check_client(client)
        self._api_key = api_key
        if not base_url and self.base_url_env:
            base_url = os.environ.get(self.base_url_env)
        self.base_url = (base_url or self.default_base_url).rstrip("/")
        if self.base_url and not _URL_SCHEME.match(self.base_url):
            raise ConfigurationError(
                f"base_url must start with http:// or https://, got {self.base_url!r}",
                backend=self.provider,
            )
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
        self.max_concurrency = self._checked_limit("max_concurrency", max_concurrency)
        self.requests_per_minute = self._checked_limit("requests_per_minute", requests_per_minute)
        self.tokens_per_minute = self._checked_limit("tokens_per_minute", tokens_per_minute)
        # Live transports (connection pools), one per event loop, filled in by the
        # sender (feste._calls.transport_for); never pickled or tokenized.
        self._transports: dict[Any, Any] = {}
        # Constructor defaults of call parameters. They are merged into each node's
        # keyword parameters when the node is built, so they are not part of identity().
        self._defaults: dict[str, Any] = {}
        self._set_defaults(defaults)

    def _checked_limit(self, name: str, value: Any) -> Any:
        """A limit checked by the rule of the context option of the same name."""
        try:
            return context.validate(name, value)
        except OptionError as error:
            reason = str(error).split(": ", 1)[-1]
            raise ConfigurationError(
                f"invalid {name} for {type(self).__name__}(...): {reason}", backend=self.provider
            ) from None

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
        # What is worked out once from the settings is worked out again after a change.
        self.__dict__.pop("_identity", None)
        self.__dict__.pop("_default_params", None)
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

    def __dask_tokenize__(self) -> Any:
        return (type(self).__module__, type(self).__qualname__, tokenize(self._token_state()))

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
        # Salted for this process only: another process computes its own.
        state.pop("_fingerprint", None)
        # Node functions shared by calls (feste.task): rebuilt where they are needed.
        state.pop("_call_functions", None)
        state.pop("_default_params", None)  # a cache of call_params
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
            if not secret:
                continue
            # A key with stray whitespace is quoted by clients without it (or escaped).
            for form in {secret, secret.strip()}:
                # Very short values would mangle ordinary words; real keys are long.
                if len(form) >= 8 and form in text:
                    text = text.replace(form, "***")
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
        self._check_key(key, f"the {self.api_key_env} environment variable")
        return key

    def _check_key(self, key: str, where: str) -> None:
        """Refuse a key that cannot go into a header, without ever quoting it."""
        problem = _key_problem(key)
        if problem is not None:
            raise ConfigurationError(
                f"the API key in {where} {problem}; fix the key (it is not shown here)",
                backend=self.provider,
            )

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
        given = params.keys()
        if given <= spec.params and not (self.refused_params and given & self.refused_params):
            return  # every call checks its parameters: the usual answer comes first
        for name in params:
            reason = self.refused_params.get(name)
            if reason is not None:
                raise ConfigurationError(
                    f"{type(self).__name__}.{method} does not take {name}=: {reason}",
                    backend=self.provider,
                    method=method,
                )
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

    def credential_fingerprint(self, salt: bytes | None = None) -> str | None:
        """A salted hash of the key this backend was given (directly or in its client).

        Batch groups include it, so calls of backends with different keys never share
        a request. The salt is random per process and the hash is never stored: it
        identifies nothing outside this process (it is remembered per backend object for
        speed, and left out when the backend is pickled). None when the key comes from
        the environment (the same for every backend where the call runs). ``salt``
        replaces the process's salt (a cluster run's salt names one key alike in
        every worker); such a fingerprint is not remembered.
        """
        given = (self._api_key, getattr(self._client, "api_key", None))
        if salt is not None:
            return _fingerprint_of(given, salt)
        remembered = self.__dict__.get("_fingerprint")
        if remembered is not None and remembered[0] == given:
            return remembered[1]
        fingerprint = _fingerprint_of(given, _CREDENTIAL_SALT)
        self.__dict__["_fingerprint"] = (given, fingerprint)
        return fingerprint

    def _check_client(self, client: Any) -> None:
        """Refuse anything but the official async client (checked without importing it)."""
        module_name, class_name, public_name = self.async_client
        if not module_name:
            return  # this backend declares no official client: nothing to check
        module = sys.modules.get(module_name)
        if module is not None and isinstance(client, getattr(module, class_name)):
            client_key = getattr(client, "api_key", None)
            if isinstance(client_key, str) and client_key:
                self._check_key(client_key, f"the client given to {type(self).__name__}")
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
        if typed is None and not keywords:
            # Most calls pass no parameters: theirs are the defaults, merged once per
            # method (until an attribute is set: __setattr__) and copied for each node.
            merged_once = self.__dict__.get("_default_params")
            if merged_once is None:
                merged_once = self.__dict__["_default_params"] = {}
            params = merged_once.get(method)
            if params is None:
                params = merged_once[method] = self._merged_params(method, None, {})
            return dict(params)
        return self._merged_params(method, typed, keywords)

    def _merged_params(
        self, method: str, typed: Any, keywords: Mapping[str, Any]
    ) -> dict[str, Any]:
        spec = self.spec(method)
        self.check_params(method, keywords)
        merged = dict(self.method_defaults.get(method, ()))
        for name, value in self._defaults.items():
            if name in spec.params:
                merged[name] = value
        if typed is not None:
            merged.update(self._typed_params(method, typed))
        for name, value in keywords.items():
            if value is not None:  # None leaves the lower-precedence value in place
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
        if _call_builder is None:
            raise ConfigurationError(
                "feste's graph layer is not loaded; import feste before calling a backend",
                backend=self.provider,
            )
        return _call_builder(self, method, item, params, pure)

    # -- to implement -----------------------------------------------------------------

    @abc.abstractmethod
    def build_request(self, method: str, items: list[Any], params: Mapping[str, Any]) -> Request:
        """The request for ``items`` (one item, or a batch for batchable methods)."""

    @abc.abstractmethod
    def parse_response(self, request: Request, response: Response) -> Parsed:
        """One value per item of ``request``, and the usage. Raise
        :class:`~feste.errors.MalformedResponseError` for a body that does not fit."""

    # -- values finished after the cache (structured outputs, whole answers) -------------

    def finishes(self, method: str, params: Mapping[str, Any]) -> bool:
        """Whether the value of ``method(item, **params)`` is made from the parsed answer
        after the cache (:meth:`finish`): the sender and the cache then carry the plain
        JSON the parser returned, and :meth:`finish` turns it into the value each time
        the call is answered. False by default: the parsed value is the value."""
        return False

    def finish(self, method: str, params: Mapping[str, Any], answer: Any) -> Any:
        """The call's value from its parsed ``answer`` (for calls that :meth:`finishes`).

        May raise :class:`~feste.errors.StructuredOutputError`, which the sender answers
        by re-asking up to :meth:`repair_retries` times with :meth:`repair_item`.
        """
        return answer

    def repair_retries(self, method: str, params: Mapping[str, Any]) -> int:
        """How many times an answer :meth:`finish` refuses is re-asked (default 0)."""
        return 0

    def repair_item(self, method: str, item: Any, error: Exception) -> Any:
        """The item of the call that re-asks after ``error`` (only called when
        :meth:`repair_retries` is above zero)."""
        raise error

    # -- estimates --------------------------------------------------------------------

    def estimated_usage(
        self, method: str, item: Any, params: Mapping[str, Any], answer: Any = NOT_ANSWERED
    ) -> Usage:
        """What one call is estimated to be billed, without sending it.

        Prompt tokens are estimated from the item (4 characters a token; an item not
        known yet counts 0). Completion tokens come from the answer when it is known
        (an answer record carries the usage the provider reported; a text is
        estimated), else, for a method that :attr:`~MethodSpec.generates`, from
        ``max_completion_tokens``/``max_tokens`` times ``n`` when given, and otherwise
        guessed as long as the prompt. Used for ``explain()`` and for calls the cache
        answered (the dollars saved).
        """
        model = params.get("model") or self.method_defaults.get(method, {}).get("model")
        if isinstance(answer, Mapping) and isinstance(answer.get("usage"), Mapping):
            reported = usage_from_record(answer)
            if reported is not None:
                return reported
        prompt = estimate_item_tokens(item)
        if not self.spec(method).generates:
            return Usage(model, prompt, 0)
        if answer is NOT_ANSWERED:
            budget = params.get("max_completion_tokens") or params.get("max_tokens")
            completion = budget * (params.get("n") or 1) if budget else prompt
        elif isinstance(answer, str):
            completion = estimate_tokens(answer)
        elif isinstance(answer, list):
            completion = sum(estimate_tokens(text) for text in answer if isinstance(text, str))
        else:
            completion = 0
        return Usage(model, prompt, completion)

    def malformed(self, request: Request, detail: str) -> MalformedResponseError:
        return MalformedResponseError(
            f"unexpected response body: {detail}",
            backend=self.provider,
            method=request.method,
            model=request.model,
        )

    # -- closing ------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection pools this backend opened (one per event loop it used).

        The backend stays usable: a later call opens a new pool. Pools are also closed
        when the backend is garbage-collected and when their event loop shuts down;
        ``close()`` (or ``with backend:``) releases them at a known moment: it waits for
        pools on this thread's loop and on loops running in other threads. A pool on a
        loop that cannot be run from here (the loop running this very code, an idle
        loop of another thread) is closed when that loop next runs or shuts down; from
        async code, ``await backend.aclose()`` waits for the running loop's pool.
        """
        transports = list(self._transports.items())
        self._transports.clear()
        for loop, transport in transports:
            close_on_loop(loop, transport.aclose)

    async def aclose(self) -> None:
        """:meth:`close` for async code (``async with backend:``)."""
        transports = list(self._transports.items())
        self._transports.clear()
        for loop, transport in transports:
            await aclose_on_loop(loop, transport.aclose)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
