"""The OpenAI backend: chat, legacy completions and embeddings.

Design
------
:class:`OpenAI` only describes requests and reads answers (no I/O here; see
:mod:`feste.backend.transports`). Each public method merges its parameters into one
explicit keyword dict when the graph is built (built-in default model < constructor
defaults < typed parameter object < call keywords), so graph keys and batch groups
show every parameter that will be sent. The batched item is the first positional
argument: the messages list of a chat call, the prompt of a completion, the text of an
embedding. ``complete`` and ``embed`` are batchable (the endpoints take lists and
answer with an ``index`` per input, which orders the values); ``chat`` is not.

Structured outputs, whole answers and tools (``response_format=Model``, ``full=True``,
``repair_retries``, ``tools``) are resolved by :mod:`feste.backend.structured`; this
module writes them in OpenAI's form (``json_schema`` with ``strict``) and reads
OpenAI's answers (choices, tool calls, log probabilities, cached tokens) into the
provider-neutral answer record.

The same code serves OpenAI-compatible servers (vLLM, llama.cpp, the feste.testing
server...) through ``base_url``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from feste.backend.base import Backend
from feste.backend.chat import StructuredChat
from feste.backend.spec import CallParams, MethodSpec, estimate_tokens
from feste.backend.structured import (
    ResponseFormat,
    answer_record,
    check_chat_params,
    choice_record,
    split_chat_params,
    strict_schema,
)
from feste.backend.types import Parsed, Request, Response, Usage
from feste.backend.validation import chat_messages, check_messages, check_text, check_texts
from feste.errors import ConfigurationError

__all__ = ["ChatParams", "CompleteParams", "EmbedParams", "OpenAI"]

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


@dataclass(frozen=True)
class ChatParams(CallParams):
    """Parameters of :meth:`OpenAI.chat`; fields left at None are not sent.

    ``n`` > 1 makes the call return a list of ``n`` answers instead of one string.
    ``response_format`` is a Pydantic model class (the answer comes back validated
    into it), ``dict`` (any JSON object, decoded) or OpenAI's own mapping (sent as
    it is; the answer stays text). ``full=True`` returns a
    :class:`~feste.backend.types.ChatResult`; ``repair_retries`` re-asks answers that
    do not validate. ``tools``, ``tool_choice``, ``parallel_tool_calls``, ``logprobs``
    and ``top_logprobs`` are sent as they are (tool calls and log probabilities are in
    the ``full=True`` result).
    """

    model: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: Any = None
    reasoning_effort: str | None = None
    service_tier: str | None = None
    user: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    full: bool | None = None
    repair_retries: int | None = None
    batch_api: bool | None = None


@dataclass(frozen=True)
class CompleteParams(CallParams):
    """Parameters of :meth:`OpenAI.complete` (legacy ``/completions``)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    echo: bool | None = None
    user: str | None = None
    batch_api: bool | None = None


@dataclass(frozen=True)
class EmbedParams(CallParams):
    """Parameters of :meth:`OpenAI.embed`."""

    model: str | None = None
    dimensions: int | None = None
    user: str | None = None
    batch_api: bool | None = None


def _field_names(params_type: type[CallParams]) -> frozenset[str]:
    return frozenset(params_type.__dataclass_fields__)


class OpenAI(StructuredChat, Backend):
    """OpenAI (or an OpenAI-compatible server): ``chat``, ``complete``, ``embed``.

    ``OpenAI(model="gpt-4o-mini", temperature=0)``: keyword defaults apply to every
    method that accepts them (so a ``model`` default also applies to ``embed``; give
    per-method models at the call, or use one backend per model). Without a model, chat
    uses ``gpt-4o-mini``, complete ``gpt-3.5-turbo-instruct``, embed
    ``text-embedding-3-small``.

    The key: ``api_key=`` or, by default, the ``OPENAI_API_KEY`` environment variable,
    read when each call runs (so it need not exist where the graph is built). An
    explicit ``api_key`` is kept in the backend and travels with it when the backend is
    pickled (to Dask workers, or into a stored graph): prefer the environment variable
    for graphs you save. The key is never in ``repr``, graph keys, tokens, error
    messages or logs. The address: ``base_url=``, else the ``OPENAI_BASE_URL``
    environment variable when the backend is made, else OpenAI's.

    ``transport="http"`` (default) uses feste's own HTTP/1.1 client; ``"sdk"`` the official
    ``openai.AsyncOpenAI`` client (retries off). ``client=`` takes a configured
    ``openai.AsyncOpenAI`` (its key and base URL then apply; a sync ``openai.OpenAI`` is
    refused). ``organization`` is sent as the ``OpenAI-Organization`` header (left
    unset, the ``sdk`` transport lets the openai client read ``OPENAI_ORG_ID`` and
    ``OPENAI_PROJECT_ID`` as it always does; the ``http`` transport sends neither).
    ``max_concurrency``, ``requests_per_minute``, ``tokens_per_minute`` are this
    backend's limits (the ``feste.context`` options of the same names override them).
    ``batch_api=True`` (here, or on one call) sends calls as Batch API jobs at batch
    prices (``docs/batch-jobs.md``); ``batch_api=False`` keeps them online whatever the
    ``batch_api`` option says.
    """

    provider: ClassVar[str] = "openai"
    chat_roles: ClassVar[frozenset[str]] = CHAT_ROLES
    api_key_env: ClassVar[str] = "OPENAI_API_KEY"
    default_base_url: ClassVar[str] = "https://api.openai.com/v1"
    base_url_env: ClassVar[str] = "OPENAI_BASE_URL"
    sdk_package: ClassVar[str] = "openai"
    methods: ClassVar[Mapping[str, MethodSpec]] = {
        "chat": MethodSpec("chat", params=_field_names(ChatParams), generates=True),
        # /completions takes a list of prompts; OpenAI-compatible servers serve lists too.
        "complete": MethodSpec(
            "complete", params=_field_names(CompleteParams), batch_size=64, generates=True
        ),
        # 2048 inputs and 300,000 tokens per request are the API's limits; the token
        # budget stays below because feste's estimate (4 characters a token) is rough.
        "embed": MethodSpec(
            "embed", params=_field_names(EmbedParams), batch_size=2048, batch_tokens=250_000
        ),
    }
    params_types: ClassVar[Mapping[str, type[CallParams]]] = {
        "chat": ChatParams,
        "complete": CompleteParams,
        "embed": EmbedParams,
    }
    async_client = ("openai", "AsyncOpenAI", "openai.AsyncOpenAI")
    sync_clients = (("openai", "OpenAI"),)
    method_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "chat": {"model": "gpt-4o-mini"},
        "complete": {"model": "gpt-3.5-turbo-instruct"},
        "embed": {"model": "text-embedding-3-small"},
    }
    settings: ClassVar[tuple[str, ...]] = ("organization",)
    refused_params: ClassVar[Mapping[str, str]] = {
        "stream": "feste returns whole answers; to get results as they finish, use "
        "feste.as_completed(...)",
    }
    organization: str | None

    def request_headers(self) -> dict[str, str]:
        return {"OpenAI-Organization": self.organization} if self.organization else {}

    # -- public methods ---------------------------------------------------------------

    def chat(
        self,
        prompt_or_messages: Any,
        params: ChatParams | Mapping[str, Any] | None = None,
        *,
        system: Any = None,
        pure: bool = True,
        **kwargs: Any,
    ) -> Any:
        """The assistant's answer (a ``str``) to a prompt or a list of messages.

        A string becomes one user message; ``system=`` adds a leading system message; a
        list of ``{"role": ..., "content": ...}`` dicts is sent as it is. Parameters come
        as a :class:`ChatParams`, as ``params=`` or as keywords (``temperature=0``).
        Returns a lazy value, or the answer itself in eager mode.

        ``response_format=Model`` (a Pydantic model class) returns a validated
        ``Model``; ``response_format=dict`` a decoded JSON object; ``full=True`` the
        whole answer (:class:`~feste.backend.types.ChatResult`). See
        :class:`ChatParams` for the rest.
        """
        call_params = check_chat_params(self.provider, self.call_params("chat", params, kwargs))
        messages = chat_messages(self, "chat", prompt_or_messages, system, CHAT_ROLES)
        return self._call("chat", messages, call_params, pure=pure)

    def complete(
        self,
        prompt: Any,
        params: CompleteParams | Mapping[str, Any] | None = None,
        *,
        pure: bool = True,
        **kwargs: Any,
    ) -> Any:
        """The completion (a ``str``) of ``prompt`` by the legacy ``/completions`` endpoint.

        Batchable: calls with equal parameters may share one request.
        """
        call_params = self.call_params("complete", params, kwargs)
        check_text(self, "complete", prompt)
        return self._call("complete", prompt, call_params, pure=pure)

    def embed(
        self,
        text: Any,
        params: EmbedParams | Mapping[str, Any] | None = None,
        *,
        pure: bool = True,
        **kwargs: Any,
    ) -> Any:
        """The embedding (a ``list[float]``) of ``text``. Batchable, up to 2048 per request."""
        call_params = self.call_params("embed", params, kwargs)
        check_text(self, "embed", text, allow_empty=False)
        return self._call("embed", text, call_params, pure=pure)

    # -- requests and answers -----------------------------------------------------------

    def build_request(self, method: str, items: list[Any], params: Mapping[str, Any]) -> Request:
        # Calls built by the methods carry every parameter already; a BatchCall made by
        # hand may leave out the built-in defaults (the model...), which fill in here.
        params = {**self.method_defaults.get(method, {}), **params}
        model = params.get("model")
        if method == "chat":
            (item,) = items
            messages = check_messages(self, method, item, CHAT_ROLES)
            # OpenAI counts max_tokens against the tokens-per-minute limit up front.
            budget = params.get("max_completion_tokens") or params.get("max_tokens") or 0
            payload, structured = split_chat_params(params)
            if structured is not None:
                payload["response_format"] = _response_format(structured)
            return Request(
                provider=self.provider,
                method=method,
                path="/chat/completions",
                payload={**payload, "messages": messages},
                model=model,
                items=1,
                estimated_tokens=_messages_tokens(messages) + budget * (params.get("n") or 1),
                sdk_method="chat.completions.create",
                full_answer=self.finishes(method, params),
            )
        check_texts(self, method, items, allow_empty=method != "embed")
        prompt_tokens = sum(estimate_tokens(item) for item in items)
        if method == "complete":
            budget = (params.get("max_tokens") or 16) * len(items)
            return Request(
                provider=self.provider,
                method=method,
                path="/completions",
                payload={**params, "prompt": list(items)},
                model=model,
                items=len(items),
                estimated_tokens=prompt_tokens + budget,
                sdk_method="completions.create",
            )
        if method == "embed":
            return Request(
                provider=self.provider,
                method=method,
                path="/embeddings",
                # Explicit "float": the official client asks for base64 when not told.
                payload={**params, "input": list(items), "encoding_format": "float"},
                model=model,
                items=len(items),
                estimated_tokens=prompt_tokens,
                sdk_method="embeddings.create",
            )
        self.spec(method)  # raises for an unknown method
        raise ConfigurationError(f"no request for method {method!r}", backend=self.provider)

    def parse_response(self, request: Request, response: Response) -> Parsed:
        body = response.body
        if not isinstance(body, dict):
            raise self.malformed(request, f"expected a JSON object, got {type(body).__name__}")
        usage = _usage(body, request.model)
        if request.method == "embed":
            values = self._indexed(request, body.get("data"), "embedding")
            for value in values:
                if not isinstance(value, list):
                    raise self.malformed(request, "an embedding is not a list of numbers")
            return Parsed(values, usage)
        choices = body.get("choices")
        if request.method == "complete":
            return Parsed(self._indexed(request, choices, "text"), usage)
        # chat: one item; n > 1 gives a list of answers
        wanted = request.payload.get("n") or 1
        entries = self._indexed(request, choices, "message", count=wanted, whole=True)
        records = [self._choice_record(request, entry) for entry in entries]
        truncated = any(record["finish_reason"] == "length" for record in records)
        if request.full_answer:
            answer_id = body.get("id")
            record = answer_record(
                self.provider,
                answer_id if isinstance(answer_id, str) else None,
                usage.model if usage is not None else request.model,
                usage,
                records,
            )
            return Parsed([record], usage, truncated)
        texts = [record["text"] for record in records]
        return Parsed([texts[0] if wanted == 1 else texts], usage, truncated)

    def _choice_record(self, request: Request, entry: dict[str, Any]) -> dict[str, Any]:
        """One choice of an answer record, read from OpenAI's choice object."""
        message = entry.get("message")
        if not isinstance(message, dict):
            raise self.malformed(request, "a choice has no message object")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise self.malformed(request, "a message's content is not a string")
        finish_reason = entry.get("finish_reason")
        calls = self.tool_calls_of(request, message.get("tool_calls"))
        return choice_record(
            content,
            finish_reason if isinstance(finish_reason, str) else None,
            calls,
            _logprobs(entry.get("logprobs")),
        )

    def _indexed(
        self,
        request: Request,
        entries: Any,
        field: str,
        count: int | None = None,
        *,
        whole: bool = False,
    ) -> list[Any]:
        """``entries[*][field]`` (the entries themselves when ``whole``) ordered by each
        entry's ``index``; exactly ``count``."""
        expected = request.items if count is None else count
        if not isinstance(entries, list) or len(entries) != expected:
            found = len(entries) if isinstance(entries, list) else type(entries).__name__
            raise self.malformed(request, f"expected {expected} results, got {found}")
        values: list[Any] = [None] * expected
        seen = [False] * expected
        for position, entry in enumerate(entries):
            if not isinstance(entry, dict) or field not in entry:
                raise self.malformed(request, f"result {position} has no {field!r}")
            index = entry.get("index", position)
            if not isinstance(index, int) or not 0 <= index < expected or seen[index]:
                raise self.malformed(request, f"result {position} has a bad index {index!r}")
            seen[index] = True
            values[index] = entry if whole else entry[field]
        return values


def _response_format(structured: ResponseFormat) -> dict[str, Any]:
    """OpenAI's form of a structured format: strict ``json_schema``, or JSON mode."""
    schema = structured.schema()
    if schema is None:
        return {"type": "json_object"}
    return {
        "type": "json_schema",
        "json_schema": {"name": structured.name, "schema": strict_schema(schema), "strict": True},
    }


def _logprobs(value: Any) -> list[dict[str, Any]] | None:
    """A choice's ``logprobs.content`` as answer-record entries (None when absent)."""
    content = value.get("content") if isinstance(value, dict) else None
    if not isinstance(content, list):
        return None
    entries: list[dict[str, Any]] = []
    for item in content:
        if not isinstance(item, dict) or not isinstance(item.get("logprob"), (int, float)):
            continue
        top = [
            [alternative.get("token"), alternative.get("logprob")]
            for alternative in item.get("top_logprobs") or ()
            if isinstance(alternative, dict)
        ]
        entries.append(
            {"token": str(item.get("token", "")), "logprob": item["logprob"], "top": top}
        )
    return entries


def _messages_tokens(messages: list[Any]) -> int:
    total = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += estimate_tokens(content) + 4  # a few tokens of framing per message
    return total


def _usage(body: dict[str, Any], model: str | None) -> Usage | None:
    """The reported token counts; None when absent or unreadable (the answer still counts)."""
    usage = body.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt_tokens = _token_count(usage.get("prompt_tokens"))
    completion_tokens = _token_count(usage.get("completion_tokens"))
    if prompt_tokens is None or completion_tokens is None:
        return None
    details = usage.get("prompt_tokens_details")
    cached = _token_count(details.get("cached_tokens")) if isinstance(details, dict) else 0
    reported_model = body.get("model")
    return Usage(
        reported_model if isinstance(reported_model, str) else model,
        prompt_tokens,
        completion_tokens,
        cached or 0,
    )


def _token_count(value: Any) -> int | None:
    """A count of tokens as reported (missing: 0), or None for anything but a number."""
    if type(value) is int:  # the usual answer, checked first
        return value if value >= 0 else None
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return int(value)
