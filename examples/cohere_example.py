"""Cohere backend (API v2): embed -> rerank -> chat over a handful of documents.

Offline by default: a local feste.testing server imitates the Cohere API, so this runs
in about a second with no key. With CO_API_KEY set it talks to api.cohere.com.

The documents are embedded for search (one batched request), reranked against a
question, and the best one is handed to chat as context; all of it one lazy graph that
``feste.compute`` runs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import feste
from feste import Prompt, feste_task
from feste.backend import Cohere
from feste.testing import TestServer

DOCUMENTS = [
    "The Rhine flows from the Swiss Alps to the North Sea.",
    "Bees store nectar in wax cells and fan it until it thickens into honey.",
    "Yeast ferments sugar and releases carbon dioxide, which makes dough rise.",
    "The Danube passes through ten countries on its way to the Black Sea.",
]
QUESTION = "how does dough rise with yeast"

answer_with = Prompt("Using this fact: {{ fact }}\nAnswer briefly: {{ question }}")


@feste_task(pure=True)
def best_document(documents: list[str], ranking: list[tuple[int, float]]) -> str:
    index, _score = ranking[0]
    return documents[index]


@contextlib.contextmanager
def cohere_backend() -> Iterator[Cohere]:
    """The real service when CO_API_KEY is set, else the local imitation."""
    if os.environ.get("CO_API_KEY"):
        print("Using api.cohere.com (CO_API_KEY is set)")
        yield Cohere(temperature=0)
        return
    with TestServer(latency=0.01) as server:
        print(f"Using the local test server at {server.cohere_base_url}")
        yield Cohere(base_url=server.cohere_base_url, api_key="offline-demo", temperature=0)


def main() -> None:
    with cohere_backend() as co:
        vectors = [co.embed(document) for document in DOCUMENTS]
        query_vector = co.embed(QUESTION, input_type="search_query")
        ranking = co.rerank(QUESTION, DOCUMENTS, top_n=3)
        fact = best_document(DOCUMENTS, ranking)
        reply = co.chat(answer_with(fact=fact, question=QUESTION), max_tokens=80)

        print("\nPlan:")
        print(feste.explain(reply, vectors, query_vector))
        with feste.context.set(progress=False):
            reply_text, ranked, embedded, query_embedded = feste.compute(
                reply, ranking, vectors, query_vector
            )

        print(f"\nRerank of the documents for {QUESTION!r}:")
        for index, score in ranked:
            print(f"  {score:.3f}  {DOCUMENTS[index]}")
        dims = {len(vector) for vector in embedded}
        print(
            f"\n{len(embedded)} document embeddings of dimension {dims.pop()}, "
            f"query embedding of dimension {len(query_embedded)}"
        )
        print(f"\nChat answer: {reply_text}")


if __name__ == "__main__":
    main()
