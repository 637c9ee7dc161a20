"""A real local HTTP server imitating the OpenAI and Cohere APIs, for tests and benchmarks.

Design: an aiohttp application on 127.0.0.1 answers ``/v1/chat/completions``,
``/v1/completions``, ``/v1/embeddings``, ``/v1/models`` (OpenAI) and
``/v2/chat``, ``/v2/embed``, ``/v2/rerank`` (Cohere v2) in the shapes the
official ``openai`` and ``cohere`` clients parse, and OpenAI's Files and Batch APIs
(``/v1/files``, ``/v1/files/{id}/content``, ``/v1/batches``,
``/v1/batches/{id}``, ``/v1/batches/{id}/cancel``: ``_batches``). Every answer is a pure
function of the request (``feste.testing._responses``), so tests can state
exact expected values; the server adds latency, limits, authentication and
fault injection (seeded random faults, plus markers such as ``[[status:503]]``,
``[[hang]]``, ``[[drop]]`` or ``[[malformed]]`` inside one input), and counts
everything. It needs nothing else from feste.

Deterministic outputs:

- chat (both providers): ``f"echo({model}): {last user message}"``, truncated
  to ``max_tokens`` tokens (then finish reason "length" / "MAX_TOKENS"); OpenAI's
  ``n`` gives ``n`` choices (``chat_text(model, message, i)``), ``logprobs`` and
  ``top_logprobs`` give per-token log probabilities (``token_chunks``,
  ``token_logprob``), Cohere's ``logprobs`` likewise;
- JSON modes (OpenAI ``json_object`` / ``json_schema``, Cohere ``json_object``
  with or without ``json_schema``): ``schema_instance(schema, source)``, a value
  conforming to the requested schema built from ``source_text(first user
  message)`` (``{"echo": source}`` without a schema); in the last user message,
  ``[[invalid_json]]`` makes the text invalid JSON (``invalid_json_text``) and
  ``[[wrong_schema]]`` answers ``wrong_schema_value(source)`` instead;
- tools: with ``tool_choice`` "required" (Cohere "REQUIRED") or naming a tool, or
  "auto" and a tool's name in the last user message, a call of that tool whose
  arguments are ``schema_instance(its parameters, source)`` (``tool_call``),
  finish reason "tool_calls" / "TOOL_CALL" (rules in ``_chat``);
- completions: ``f"complete({model}): {prompt}"``, one choice per prompt;
- embeddings: ``embedding(model, text, dim)``, the same for OpenAI and Cohere;
- rerank: ``rerank_scores(query, documents)``, results by score then index;
- tokens: ``count_tokens(text) == ceil(len(text) / 4)`` (0 for "").

``TestServer.stats()`` (and ``GET /_stats``) keys: ``requests``, ``by_route``,
``first_arrival`` (per route, seconds from the last reset to its first
request), ``by_api_key``, ``items``, ``items_per_request``, ``max_in_flight``,
``in_flight``, ``faults``, ``status_counts``, ``billed`` (tokens and
searches the answers reported, per model, batch job lines included), ``inputs``
(meanings in ``feste.testing._stats.Stats``), ``batches`` (files uploaded, jobs
created, cancelled and expired, lines answered and failed, downloads: see
``_batches``). Lists are in ARRIVAL order: ``inputs[route]``
holds the item texts of each successful request in the order the server
received them, whatever order it answered them in. ``by_api_key`` counts every
request under ``key_label(token)`` of its ``Authorization: Bearer`` token:
``"sha256:"`` plus the first 12 hex digits of the token's SHA-256, so a test
can tell keys apart without a secret in the statistics
(``stats["by_api_key"][key_label("sk-a")]``); ``"(no key)"`` without one.

Markers inside one input, answered in the provider's shape (a status
answer's message says ``"triggered by input[i]"``; ``i``: the poisoned item, a
rerank query is ``"query"``):

- ``[[status:NNN]]`` (400..599): that status; 429 and 503 carry Retry-After;
- ``[[retry_after:SECONDS]]``: a 429 announcing exactly ``SECONDS`` in its
  retry headers, once per distinct input text (the retry then succeeds;
  ``reset_stats()`` forgets which texts were answered);
- ``[[hang]]``: sleep ``hang_seconds``, then answer; ``[[drop]]``: close the
  connection; ``[[malformed]]``: 200 whose body is not JSON;
- ``[[bad_usage]]``: 200 with the normal body but a malformed usage: OpenAI
  ``"usage": {"prompt_tokens": "many"}``, Cohere chat ``"usage":
  {"billed_units": {"input_tokens": "many"}}``, Cohere embed / rerank
  ``meta.billed_units`` ``{"input_tokens": "many"}`` / ``{"search_units": "many"}``;
- ``[[deep_json]]``: 200 with the normal body plus a field ``"deep"`` holding
  arrays nested 100,000 levels (valid JSON a recursive parser cannot read).

Batch API jobs answer each line as the online endpoint would, and complete
``batch_completion_delay`` seconds after they were created (as configured when they
are polled); ``[[status:NNN]]`` puts that line in the job's error file and
``[[malformed]]`` writes an output line that is not JSON; ``batch_expire_jobs=N``
makes the next N jobs expire with every line unanswered.

Not a fault: ``[[delay:SECONDS]]`` in the input of a chat or completion
request adds ``SECONDS`` to its latency (the largest marker of the request
counts), for generations of varied length; embeddings and rerank ignore it, so
an answer echoing the marker embeds at the usual latency.

Random faults draw one number per admitted request from ``random.Random(seed)``,
in arrival order, so a seed replays them. Retry headers are ``retry-after-ms``
plus ``Retry-After`` in seconds, or with ``retry_after_http_date=True`` only
``Retry-After`` as an IMF-fixdate. ``fault_429_retry_after`` (None: use
``retry_after``) is what injected 429s announce (``fault_429`` and
``[[status:429]]``). ``tokens_per_minute`` refuses (429) a request whose input
tokens would exceed the sliding 60 s window. With ``rate_limit_headers=True``,
OpenAI-route 200 and 429 answers carry ``x-ratelimit-{limit,remaining,reset}-
requests`` (when ``requests_per_minute`` is set) and ``-tokens`` (when
``tokens_per_minute`` is set); reset is the time until the window is empty,
written like OpenAI's ``"20ms"``, ``"1s"``, ``"6m0s"``.

Modules: ``_config`` (knobs, CLI mapping), ``_stats`` (counters,
``key_label``), ``_responses`` (deterministic outputs, markers), ``_answers``
(error shapes, retry headers), ``_parsing`` (one parser per endpoint),
``_chat`` (chat options: ``n``, JSON modes, tools, log probabilities),
``_structured`` (schema instances, tool calls, token log probabilities),
``_limits`` (concurrency, requests and tokens windows, rate-limit headers),
``_faults`` (fault choice and odd bodies), ``_batches`` (files and batch
jobs), ``_app`` (``ApiSimulator``, the aiohttp handlers), ``_run``
(``TestServer``, ``serve``, thread and process modes).

Usage::

    with TestServer(latency=0.01) as server:
        client = openai.OpenAI(base_url=server.openai_base_url, api_key="x")
        ...
        assert server.stats()["requests"] == 1

or the pytest fixtures of ``feste.testing.fixtures`` (``llm_server``,
``llm_server_factory``), or ``python -m feste.testing --port 8000``.
"""

from ._app import ApiSimulator
from ._config import ServerConfig
from ._responses import (
    chat_text,
    completion_text,
    count_tokens,
    embedding,
    embedding_base64,
    rerank_order,
    rerank_scores,
    truncate_to_tokens,
)
from ._run import TestServer, serve
from ._stats import key_label
from ._structured import (
    invalid_json_text,
    json_answer_text,
    schema_instance,
    source_text,
    token_chunks,
    token_logprob,
    tool_call,
    wrong_schema_value,
)
from ._waiting import wait_until

__all__ = [
    "ApiSimulator",
    "ServerConfig",
    "TestServer",
    "chat_text",
    "completion_text",
    "count_tokens",
    "embedding",
    "embedding_base64",
    "invalid_json_text",
    "json_answer_text",
    "key_label",
    "rerank_order",
    "rerank_scores",
    "schema_instance",
    "serve",
    "source_text",
    "token_chunks",
    "token_logprob",
    "tool_call",
    "truncate_to_tokens",
    "wait_until",
    "wrong_schema_value",
]
