"""OpenAI backend: prompt -> chat -> embed -> rank, as one lazy graph.

Offline by default: a local feste.testing server imitates the OpenAI API (echoed
answers, hash-based embeddings), so this runs in about a second with no key. With
OPENAI_API_KEY set it talks to api.openai.com instead (a few cents' worth of calls).

Nothing is sent while the pipeline is written: every ``llm.chat`` / ``llm.embed`` is a
node. ``feste.explain`` shows that the five embeddings become one batched request;
``feste.compute`` runs the graph.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import feste
from feste import Prompt, feste_task
from feste.backend import ChatParams, OpenAI
from feste.testing import TestServer

QUESTIONS = [
    "Why is the sky blue?",
    "How do bees make honey?",
    "What makes bread rise?",
    "Why do leaves change colour in autumn?",
]
QUERY = "baking and fermentation"

ask = Prompt("Answer in one short sentence: {{ question }}")


@feste_task(pure=True)
def rank(questions: list[str], answers: list[str], vectors: list[list[float]], query: list[float]):
    def cosine(a: list[float], b: list[float]) -> float:
        dot = sum(x * y for x, y in zip(a, b))
        return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))

    scored = [
        (cosine(vector, query), question, answer)
        for question, answer, vector in zip(questions, answers, vectors)
    ]
    return sorted(scored, reverse=True)


@contextlib.contextmanager
def openai_backend() -> Iterator[OpenAI]:
    """The real service when OPENAI_API_KEY is set, else the local imitation."""
    if os.environ.get("OPENAI_API_KEY"):
        print("Using api.openai.com (OPENAI_API_KEY is set)")
        yield OpenAI(temperature=0)
        return
    with TestServer(latency=0.01) as server:
        print(f"Using the local test server at {server.openai_base_url}")
        yield OpenAI(base_url=server.openai_base_url, api_key="offline-demo", temperature=0)


def main() -> None:
    with openai_backend() as llm:
        answers = [llm.chat(ask(question=q), ChatParams(max_tokens=60)) for q in QUESTIONS]
        vectors = [llm.embed(answer) for answer in answers]
        query = llm.embed(QUERY)
        ranking = rank(QUESTIONS, answers, vectors, query)

        print("\nPlan:")
        print(feste.explain(ranking))
        with feste.context.set(progress=False):
            (ranked,) = feste.compute(ranking)

        print(f"\nAnswers ranked by similarity to {QUERY!r}:")
        for score, question, answer in ranked:
            print(f"  {score:+.3f}  {question:<40} {answer}")

        # Eager mode: one call, answered at once (handy in a notebook).
        with feste.context.set(eager=True):
            completion = llm.complete("The three primary colours are", max_tokens=12)
        print(f"\nLegacy completion: {completion!r}")


if __name__ == "__main__":
    main()
