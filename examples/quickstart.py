"""Quickstart: a three-step LLM pipeline, run offline against feste's local test server.

Each document is summarized, the summary is embedded and classified. Nothing runs while
the pipeline is written; ``feste.explain`` shows the plan (the embeddings of all
summaries become one batched request) and ``feste.compute`` runs it on the async
scheduler. The local server answers like the OpenAI API with deterministic text, so
this needs no network and no API key: point ``base_url`` at a real server to go live.
"""

from __future__ import annotations

import feste
from feste import Prompt, feste_task
from feste.backend import OpenAI
from feste.testing import TestServer

DOCUMENTS = [
    "Whisk eggs with sugar, fold in flour, bake for twenty minutes.",
    "The home side scored twice in extra time to win the cup final.",
    "Simmer the tomatoes with garlic and basil until the sauce thickens.",
    "A late penalty decided the derby after a goalless first half.",
]

summarize = Prompt("Summarize in one sentence: {{ document }}")
classify = Prompt("Answer 'cooking' or 'sports'. Text: {{ summary }}")


@feste_task(pure=True)
def report(documents: list[str], labels: list[str], vectors: list[list[float]]) -> str:
    lines = []
    for document, label, vector in zip(documents, labels, vectors):
        lines.append(
            f"- {document[:32]:<32} | label: {label[:44]:<44} | embedding dim {len(vector)}"
        )
    return "\n".join(lines)


def main() -> None:
    with TestServer(latency=0.02) as server:
        llm = OpenAI(base_url=server.openai_base_url, api_key="offline-demo", max_concurrency=16)

        summaries = [llm.chat(summarize(document=d)) for d in DOCUMENTS]
        labels = [llm.chat(classify(summary=s)) for s in summaries]
        vectors = [llm.embed(s) for s in summaries]
        table = report(DOCUMENTS, labels, vectors)

        print("Plan before running:")
        print(feste.explain(table))
        (text,) = feste.compute(table, progress=False)
        print("\nResults:")
        print(text)
        stats = server.stats()
        print(f"\nThe server saw {stats['requests']} requests for {3 * len(DOCUMENTS)} calls.")
        print("(The local server echoes each prompt: a real model would answer it.)")


if __name__ == "__main__":
    main()
