"""A real local HTTP server imitating the OpenAI and Cohere APIs, for tests and benchmarks.

Design: an aiohttp application on 127.0.0.1 answers ``/v1/chat/completions``,
``/v1/completions``, ``/v1/embeddings``, ``/v1/models`` (OpenAI) and
``/v2/chat``, ``/v2/embed``, ``/v2/rerank`` (Cohere v2) in the shapes the
official ``openai`` and ``cohere`` clients parse. Every answer is a pure
function of the request (``feste.testing._responses``), so tests can state
exact expected values; the server adds latency, limits, authentication and
fault injection (seeded random faults, plus markers such as ``[[status:503]]``,
``[[hang]]``, ``[[drop]]`` or ``[[malformed]]`` inside one input), and counts
everything. It needs nothing else from feste.

Deterministic outputs:

- chat (both providers): ``f"echo({model}): {last user message}"``, truncated
  to ``max_tokens`` tokens (then finish reason "length" / "MAX_TOKENS");
- completions: ``f"complete({model}): {prompt}"``, one choice per prompt;
- embeddings: ``embedding(model, text, dim)``, the same for OpenAI and Cohere;
- rerank: ``rerank_scores(query, documents)``, results by score then index;
- tokens: ``count_tokens(text) == ceil(len(text) / 4)`` (0 for "").

``TestServer.stats()`` (and ``GET /_stats``) keys: ``requests``, ``by_route``,
``items``, ``items_per_request``, ``max_in_flight``, ``in_flight``, ``faults``,
``status_counts``, ``inputs`` (meanings in ``feste.testing._server._Stats``).

Marker triggers answer with the status in the provider's error shape, whose
message says ``"triggered by input[i]"`` (``i``: the poisoned item; a rerank
query is ``"query"``). Random faults draw one number per admitted request
from ``random.Random(seed)``, in arrival order, so a seed replays them.

Usage::

    with TestServer(latency=0.01) as server:
        client = openai.OpenAI(base_url=server.openai_base_url, api_key="x")
        ...
        assert server.stats()["requests"] == 1

or the pytest fixtures of ``feste.testing.fixtures`` (``llm_server``,
``llm_server_factory``), or ``python -m feste.testing --port 8000``.
"""

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
from ._server import ApiSimulator, ServerConfig, TestServer, serve

__all__ = [
    "ApiSimulator",
    "ServerConfig",
    "TestServer",
    "chat_text",
    "completion_text",
    "count_tokens",
    "embedding",
    "embedding_base64",
    "rerank_order",
    "rerank_scores",
    "serve",
    "truncate_to_tokens",
]
