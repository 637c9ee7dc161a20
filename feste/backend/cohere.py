"""The Cohere backend (API v2): chat, embed and rerank.

Design
------
Like :mod:`feste.backend.openai`, :class:`Cohere` only describes requests and reads
answers; the transports send them. Parameters are merged into explicit keywords when
the graph is built (built-in defaults < constructor defaults < ``params=`` < call
keywords). The batched item is the first positional argument: the messages list of a
chat call, the text of an embedding, the *query* of a rerank call. ``embed`` is
batchable (96 texts per request, answered in input order); a rerank call already
scores a list of documents against its query, so the documents are a keyword parameter
(part of the node's key) and rerank calls are not batched.

Structured outputs, whole answers and tools (``response_format=Model``, ``full=True``,
``repair_retries``, ``tools``) are resolved by :mod:`feste.backend.structured`; here
they are written in Cohere's form (``json_object`` with ``json_schema``) and Cohere's
answers (tool calls, log probabilities, billed units, search units) are read into the
provider-neutral answer record and usage.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

from dask.delayed import Delayed

from feste.backend.base import NOT_ANSWERED, Backend
from feste.backend.chat import StructuredChat
from feste.backend.spec import MethodSpec, estimate_tokens
from feste.backend.structured import (
    answer_record,
    check_chat_params,
    choice_record,
    split_chat_params,
)
from feste.backend.types import Parsed, Request, Response, Usage
from feste.backend.validation import chat_messages, check_messages, check_text, check_texts
from feste.errors import BadRequestError, ConfigurationError

__all__ = ["Cohere"]

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})

_CHAT_PARAMS = frozenset(
    {
        "model",
        "temperature",
        "max_tokens",
        "p",
        "k",
        "seed",
        "stop_sequences",
        "frequency_penalty",
        "presence_penalty",
        "response_format",
        "safety_mode",
        "priority",
        "tools",
        "tool_choice",
        "strict_tools",
        "logprobs",
        "full",
        "repair_retries",
    }
)

# Cohere's finish reasons, spelled the provider-neutral (OpenAI) way.
_FINISH_REASONS = {
    "COMPLETE": "stop",
    "STOP_SEQUENCE": "stop",
    "MAX_TOKENS": "length",
    "TOOL_CALL": "tool_calls",
}
_EMBED_PARAMS = frozenset(
    {"model", "input_type", "output_dimension", "truncate", "max_tokens", "priority"}
)
_RERANK_PARAMS = frozenset({"model", "documents", "top_n", "max_tokens_per_doc", "priority"})


class Cohere(StructuredChat, Backend):
    """Cohere v2: ``chat``, ``embed``, ``rerank``.

    ``Cohere(model="command-a-03-2025", temperature=0)``: keyword defaults apply to every
    method that accepts them. Without a model, chat uses ``command-a-03-2025``, embed
    ``embed-v4.0``, rerank ``rerank-v3.5``.

    The key: ``api_key=`` or, by default, the ``CO_API_KEY`` environment variable, read
    when each call runs. An explicit ``api_key`` travels with the backend when it is
    pickled (to Dask workers, or into a stored graph); the environment variable does
    not. The key never appears in ``repr``, graph keys, tokens, errors or logs. The
    address: ``base_url=``, else the ``CO_API_URL`` environment variable when the backend
    is made, else Cohere's.

    ``transport="http"`` (default) uses feste's own HTTP/1.1 client; ``"sdk"`` the official
    ``cohere.AsyncClientV2`` (retries off). ``client=`` takes a configured
    ``cohere.AsyncClientV2``; the synchronous ``cohere.ClientV2`` is refused.
    """

    provider: ClassVar[str] = "cohere"
    chat_roles: ClassVar[frozenset[str]] = CHAT_ROLES
    api_key_env: ClassVar[str] = "CO_API_KEY"
    default_base_url: ClassVar[str] = "https://api.cohere.com"
    base_url_env: ClassVar[str] = "CO_API_URL"
    sdk_package: ClassVar[str] = "cohere"
    methods: ClassVar[Mapping[str, MethodSpec]] = {
        "chat": MethodSpec("chat", params=_CHAT_PARAMS, generates=True),
        "embed": MethodSpec("embed", params=_EMBED_PARAMS, batch_size=96),
        "rerank": MethodSpec("rerank", params=_RERANK_PARAMS),
    }
    async_client = ("cohere.v2.client", "AsyncV2Client", "cohere.AsyncClientV2")
    sync_clients = (("cohere", "ClientV2"), ("cohere", "Client"))
    refused_params: ClassVar[Mapping[str, str]] = {
        "stream": "feste returns whole answers; to get results as they finish, use "
        "feste.as_completed(...)",
        "batch_api": "feste sends Batch API jobs to OpenAI-compatible servers only, and "
        "Cohere calls online (the batch_api option leaves them online); drop batch_api=",
    }
    method_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "chat": {"model": "command-a-03-2025"},
        "embed": {"model": "embed-v4.0", "input_type": "search_document"},
        "rerank": {"model": "rerank-v3.5"},
    }

    # -- public methods ---------------------------------------------------------------

    def chat(
        self,
        prompt_or_messages: Any,
        params: Mapping[str, Any] | None = None,
        *,
        system: Any = None,
        pure: bool = True,
        **kwargs: Any,
    ) -> Any:
        """The assistant's answer (a ``str``) to a prompt or a list of messages.

        A string becomes one user message, ``system=`` a leading system message; a list
        of ``{"role": ..., "content": ...}`` dicts is sent as it is.

        ``response_format=Model`` (a Pydantic model class) returns a validated
        ``Model`` (Cohere's JSON mode with the model's schema), ``response_format=dict``
        a decoded JSON object, and a mapping is Cohere's own format (sent as it is; the
        answer stays text). ``full=True`` returns the whole answer
        (:class:`~feste.backend.types.ChatResult`); ``repair_retries=N`` re-asks answers
        that do not validate. ``tools``, ``tool_choice`` (``"REQUIRED"``, ``"NONE"``),
        ``strict_tools`` and ``logprobs`` are sent as they are.
        """
        call_params = check_chat_params(self.provider, self.call_params("chat", params, kwargs))
        messages = chat_messages(self, "chat", prompt_or_messages, system, CHAT_ROLES)
        return self._call("chat", messages, call_params, pure=pure)

    def embed(
        self,
        text: Any,
        params: Mapping[str, Any] | None = None,
        *,
        input_type: str | None = None,
        pure: bool = True,
        **kwargs: Any,
    ) -> Any:
        """The float embedding (a ``list[float]``) of ``text``. Batchable, 96 per request.

        ``input_type`` defaults to ``"search_document"``; use ``"search_query"`` for
        queries, ``"classification"`` or ``"clustering"`` for those tasks.
        """
        call_params = self.call_params("embed", params, {**kwargs, "input_type": input_type})
        check_text(self, "embed", text, allow_empty=False)
        return self._call("embed", text, call_params, pure=pure)

    def rerank(
        self,
        query: Any,
        documents: Any,
        top_n: int | None = None,
        params: Mapping[str, Any] | None = None,
        *,
        pure: bool = True,
        **kwargs: Any,
    ) -> Any:
        """``documents`` ranked by relevance to ``query``: a list of ``(index, score)``.

        Pairs come in the order the API returns them (most relevant first); ``index``
        points into ``documents``. ``top_n`` keeps the best ``top_n``.
        """
        check_text(self, "rerank", query, allow_empty=False)
        if not isinstance(documents, Delayed):
            if isinstance(documents, str) or not isinstance(documents, (list, tuple)):
                raise BadRequestError(
                    f"documents must be a list of strings, got {type(documents).__name__}",
                    backend=self.provider,
                    method="rerank",
                )
            if not documents:
                raise BadRequestError(
                    "documents is empty; give at least one document to rank",
                    backend=self.provider,
                    method="rerank",
                )
            for index, document in enumerate(documents):
                if not isinstance(document, (str, Delayed)):
                    raise BadRequestError(
                        f"documents[{index}] must be a string, got {type(document).__name__}",
                        backend=self.provider,
                        method="rerank",
                    )
            documents = list(documents)
        call_params = self.call_params(
            "rerank", params, {**kwargs, "documents": documents, "top_n": top_n}
        )
        return self._call("rerank", query, call_params, pure=pure)

    # -- requests and answers -----------------------------------------------------------

    def build_request(self, method: str, items: list[Any], params: Mapping[str, Any]) -> Request:
        # Calls built by the methods carry every parameter already; a BatchCall made by
        # hand may leave out the built-in defaults (the model...), which fill in here.
        params = {**self.method_defaults.get(method, {}), **params}
        model = params.get("model")
        if method == "chat":
            (item,) = items
            messages = check_messages(self, method, item, CHAT_ROLES)
            prompt_tokens = sum(
                estimate_tokens(message["content"]) + 4
                for message in messages
                if isinstance(message, dict) and isinstance(message.get("content"), str)
            )
            payload, structured = split_chat_params(params)
            if structured is not None:
                schema = structured.schema()
                payload["response_format"] = (
                    {"type": "json_object"}
                    if schema is None
                    else {"type": "json_object", "json_schema": schema}
                )
            return Request(
                provider=self.provider,
                method=method,
                path="/v2/chat",
                payload={**payload, "messages": messages},
                model=model,
                items=1,
                estimated_tokens=prompt_tokens + (params.get("max_tokens") or 0),
                sdk_method="chat",
                full_answer=self.finishes(method, params),
            )
        if method == "embed":
            check_texts(self, method, items, allow_empty=False)
            return Request(
                provider=self.provider,
                method=method,
                path="/v2/embed",
                payload={**params, "texts": list(items), "embedding_types": ["float"]},
                model=model,
                items=len(items),
                estimated_tokens=sum(estimate_tokens(item) for item in items),
                sdk_method="embed",
            )
        if method == "rerank":
            (query,) = items
            check_text(self, method, query, allow_empty=False)
            documents = params.get("documents")
            if not isinstance(documents, list) or not all(
                isinstance(document, str) for document in documents
            ):
                raise BadRequestError(
                    "documents must be a list of strings",
                    backend=self.provider,
                    method=method,
                    model=model,
                )
            tokens = estimate_tokens(query) * len(documents)
            tokens += sum(estimate_tokens(document) for document in documents)
            return Request(
                provider=self.provider,
                method=method,
                path="/v2/rerank",
                payload={**params, "query": query},
                model=model,
                items=1,
                estimated_tokens=tokens,
                sdk_method="rerank",
            )
        self.spec(method)  # raises for an unknown method
        raise ConfigurationError(f"no request for method {method!r}", backend=self.provider)

    def parse_response(self, request: Request, response: Response) -> Parsed:
        body = response.body
        if not isinstance(body, dict):
            raise self.malformed(request, f"expected a JSON object, got {type(body).__name__}")
        if request.method == "chat":
            return self._parse_chat(request, body)
        if request.method == "embed":
            embeddings = body.get("embeddings")
            vectors = embeddings.get("float") if isinstance(embeddings, dict) else None
            if not isinstance(vectors, list) or len(vectors) != request.items:
                raise self.malformed(request, f"expected {request.items} float embeddings")
            for vector in vectors:
                if not isinstance(vector, list):
                    raise self.malformed(request, "an embedding is not a list of numbers")
            return Parsed(vectors, _billed_usage(body, request.model))
        results = body.get("results")
        if not isinstance(results, list):
            raise self.malformed(request, "no list of rerank results")
        ranking = []
        for position, result in enumerate(results):
            index = result.get("index") if isinstance(result, dict) else None
            score = result.get("relevance_score") if isinstance(result, dict) else None
            if not isinstance(index, int) or not isinstance(score, (int, float)):
                raise self.malformed(request, f"rerank result {position} lacks index or score")
            ranking.append((index, float(score)))
        return Parsed([ranking], _search_usage(body, request.model))

    def _parse_chat(self, request: Request, body: dict[str, Any]) -> Parsed:
        usage = _chat_usage(body, request.model)
        message = body.get("message")
        if not isinstance(message, dict):
            raise self.malformed(request, "the answer has no message")
        calls = self.tool_calls_of(request, message.get("tool_calls"))
        text = self._chat_text(request, message, answered_by_tools=bool(calls))
        reason = body.get("finish_reason")
        finish_reason = (
            _FINISH_REASONS.get(reason, reason.lower()) if isinstance(reason, str) else None
        )
        truncated = finish_reason == "length"
        if not request.full_answer:
            return Parsed([text], usage, truncated)
        record = answer_record(
            self.provider,
            body.get("id") if isinstance(body.get("id"), str) else None,
            request.model,
            usage,
            [choice_record(text, finish_reason, calls, _logprobs(body.get("logprobs")))],
        )
        return Parsed([record], usage, truncated)

    def _chat_text(
        self, request: Request, message: dict[str, Any], *, answered_by_tools: bool
    ) -> str | None:
        content = message.get("content")
        if content is None and answered_by_tools:
            return None  # the model only called tools
        if not isinstance(content, list):
            raise self.malformed(request, "the answer has no message content")
        pieces = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise self.malformed(request, "a text part of the answer has no text")
                pieces.append(text)
        return "".join(pieces)

    def estimated_usage(
        self, method: str, item: Any, params: Mapping[str, Any], answer: Any = NOT_ANSWERED
    ) -> Usage:
        if method == "rerank":  # billed per search, not per token
            model = params.get("model") or self.method_defaults["rerank"]["model"]
            return Usage(model, search_units=1)
        return super().estimated_usage(method, item, params, answer)


def _logprobs(value: Any) -> list[dict[str, Any]] | None:
    """Cohere's log probabilities (text chunks) as answer-record entries."""
    if not isinstance(value, list):
        return None
    entries: list[dict[str, Any]] = []
    for item in value:
        logprobs = item.get("logprobs") if isinstance(item, dict) else None
        if not isinstance(logprobs, list):
            continue
        numbers = [number for number in logprobs if isinstance(number, (int, float))]
        entries.append({"token": str(item.get("text") or ""), "logprob": sum(numbers), "top": []})
    return entries


def _chat_usage(body: dict[str, Any], model: str | None) -> Usage | None:
    usage = body.get("usage")
    if not isinstance(usage, dict):
        return None
    # What is billed: Cohere's "tokens" also count tokens it adds itself, not billed.
    tokens = usage.get("billed_units")
    if not isinstance(tokens, dict):
        tokens = usage.get("tokens")
    if not isinstance(tokens, dict):
        return None
    input_tokens = _token_count(tokens.get("input_tokens"))
    output_tokens = _token_count(tokens.get("output_tokens"))
    if input_tokens is None or output_tokens is None:
        return None  # unreadable counts: the answer is still good, the usage unknown
    cached = _token_count(usage.get("cached_tokens")) or 0
    return Usage(model, input_tokens, output_tokens, cached)


def _search_usage(body: dict[str, Any], model: str | None) -> Usage | None:
    """The searches a rerank request was billed for (None when unreadable)."""
    meta = body.get("meta")
    billed = meta.get("billed_units") if isinstance(meta, dict) else None
    if not isinstance(billed, dict):
        return None
    searches = _token_count(billed.get("search_units"))
    return None if searches is None else Usage(model, search_units=searches)


def _billed_usage(body: dict[str, Any], model: str | None) -> Usage | None:
    meta = body.get("meta")
    billed = meta.get("billed_units") if isinstance(meta, dict) else None
    if not isinstance(billed, dict):
        return None
    input_tokens = _token_count(billed.get("input_tokens"))
    return None if input_tokens is None else Usage(model, input_tokens, 0)


def _token_count(value: Any) -> int | None:
    """A count of tokens as reported (missing: 0), or None for anything but a number."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return int(value)
