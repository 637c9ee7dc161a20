"""A realistic pipeline: summarize, embed and classify documents, then aggregate.

For each document: an OpenAI chat call summarizes it; the summary is embedded by
Cohere and classified by a second OpenAI chat call whose prompt holds the summary;
a final step groups the documents by topic and averages their vectors. So the graph
is three levels deep, mixes two providers, and holds one batchable method (Cohere
embed, 96 texts per request).

The two providers are two servers, each answering after ``latency`` +
``latency_per_item`` per input and each allowing ``max_concurrency`` requests at once.

Ideal: the OpenAI server is the bottleneck: ``2N`` chat requests of
``latency + latency_per_item`` each on 64 slots, so at least ``2N x (latency +
latency_per_item) / 64`` seconds; the embeddings (``ceil(N / 96)`` requests) run on
the other server meanwhile, and the critical path of one document (summary, then
classification or embedding) is far shorter. The ideal is the larger of that work
bound and the critical path.

Each row also notes when the first embedding request reached the Cohere server, in
seconds from the start of the run: the embeddings can start once the first summaries
are in, or wait for the last.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import dask

from benchmarks.harness import (
    GRAPH_BUILT,
    SETUP_MARK,
    Contender,
    Ideal,
    Job,
    Size,
    Workload,
    ceil_div,
)
from benchmarks.peers import (
    CHAT_MODEL,
    COHERE_EMBED_MODEL,
    aiohttp_session,
    chunks,
    cohere_client,
    gather_limited,
    openai_client,
    pool_map,
    post_json,
    run_on_process_loop,
    worker_clients,
)

__all__ = ["WORKLOAD", "aggregate", "expected_report", "make_documents"]

CONCURRENCY = 64
COHERE_BATCH = 96
SETTINGS = {"concurrency": CONCURRENCY, "max_retries": 2, "cohere_batch": COHERE_BATCH}
INPUT_TYPE = "clustering"
TOPICS = ("sales", "research", "support", "finance", "legal", "design", "operations")

# The same two prompts, as Jinja2 templates (feste) and as str.format templates.
SUMMARIZE = "Summarize in one sentence: {{ document }}"
CLASSIFY = "Name the topic of this summary in one word: {{ summary }}"
SUMMARIZE_FORMAT = "Summarize in one sentence: {document}"
CLASSIFY_FORMAT = "Name the topic of this summary in one word: {summary}"


def make_documents(n: int) -> list[str]:
    documents = []
    for index in range(n):
        topic = TOPICS[index % len(TOPICS)]
        documents.append(
            f"Report {index}: the {topic} team met on day {index % 28 + 1} "
            f"and agreed on {index % 5 + 2} actions."
        )
    return documents


def aggregate(labels: Sequence[str], vectors: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Documents per topic and the mean vector of each topic, topics in sorted order."""
    groups: dict[str, list[Sequence[float]]] = {}
    for label, vector in zip(labels, vectors):
        found = re.search(r"the (\w+) team", label)
        topic = found.group(1) if found else "other"
        groups.setdefault(topic, []).append(vector)
    report = {}
    for topic in sorted(groups):
        members = groups[topic]
        centroid = [sum(values) / len(members) for values in zip(*members)]
        report[topic] = {"documents": len(members), "centroid": centroid}
    return report


def expected_report(documents: Sequence[str]) -> dict[str, Any]:
    from feste.testing import chat_text, embedding

    labels = []
    vectors = []
    for document in documents:
        summary = chat_text(CHAT_MODEL, SUMMARIZE_FORMAT.format(document=document))
        labels.append(chat_text(CHAT_MODEL, CLASSIFY_FORMAT.format(summary=summary)))
        vectors.append(embedding(COHERE_EMBED_MODEL, summary))
    return aggregate(labels, vectors)


def check_report(documents: list[str], report: Any) -> str | None:
    expected = expected_report(documents)
    if not isinstance(report, dict):
        return f"the report is {report!r}, expected a dict of topics"
    if sorted(report) != sorted(expected):
        return f"topics {sorted(report)}, expected {sorted(expected)}"
    for topic, want in expected.items():
        got = report[topic]
        if got["documents"] != want["documents"]:
            return f"topic {topic}: {got['documents']} documents, expected {want['documents']}"
        close = all(
            math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7)
            for a, b in zip(got["centroid"], want["centroid"])
        )
        if not close or len(got["centroid"]) != len(want["centroid"]):
            return f"topic {topic}: centroid differs from the expected one"
    return None


def pipeline_ideal(n: int, server: Mapping[str, Any]) -> Ideal:
    latency, per_item, cap = (
        server["latency"],
        server["latency_per_item"],
        server["max_concurrency"],
    )
    chat = latency + per_item
    embed_requests = ceil_div(n, COHERE_BATCH)
    work = 2 * n * chat / cap
    critical = chat + max(chat, latency + min(n, COHERE_BATCH) * per_item)
    return Ideal(
        seconds=max(work, critical),
        formula=(
            f"max(2 x {n} chats x {chat * 1000:g} ms / {cap} slots, critical path "
            f"{critical * 1000:g} ms); embeddings: {embed_requests} requests on the other server"
        ),
        requests=2 * n + embed_requests,
    )


# -- feste ------------------------------------------------------------------------------


def run_feste(job: Job) -> dict[str, Any]:
    import feste
    from feste import Prompt, feste_task
    from feste.backend import Cohere, OpenAI

    concurrency = job.settings["concurrency"]
    llm = OpenAI(
        base_url=job.openai_base_url,
        api_key=job.api_key,
        model=CHAT_MODEL,
        max_concurrency=concurrency,
    )
    co = Cohere(
        base_url=job.cohere_base_url,
        api_key=job.api_key,
        model=COHERE_EMBED_MODEL,
        max_concurrency=concurrency,
    )
    summarize = Prompt(SUMMARIZE)
    classify = Prompt(CLASSIFY)

    summaries = [llm.chat(summarize(document=document)) for document in job.inputs]
    labels = [llm.chat(classify(summary=summary)) for summary in summaries]
    vectors = [co.embed(summary, input_type=INPUT_TYPE) for summary in summaries]
    report = feste_task(aggregate)(labels, vectors)
    job.mark(GRAPH_BUILT)
    (value,) = feste.compute(report)
    return dict(value)


# -- peers ------------------------------------------------------------------------------


def run_asyncio(job: Job) -> dict[str, Any]:
    """Hand-written: per-document coroutines for the chats (one semaphore per provider),
    then the summaries embedded in chunks of 96, all chunks at once."""
    chat_url = job.openai_base_url + "/chat/completions"
    embed_url = job.cohere_base_url + "/v2/embed"
    max_retries = job.settings["max_retries"]
    concurrency = job.settings["concurrency"]

    async def main() -> dict[str, Any]:
        async with aiohttp_session(job) as session:
            openai_slots = asyncio.Semaphore(concurrency)

            async def chat(prompt: str) -> str:
                payload = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": prompt}]}
                async with openai_slots:
                    body = await post_json(session, chat_url, payload, max_retries)
                return str(body["choices"][0]["message"]["content"])

            async def summarize_and_classify(document: str) -> tuple[str, str]:
                summary = await chat(SUMMARIZE_FORMAT.format(document=document))
                label = await chat(CLASSIFY_FORMAT.format(summary=summary))
                return summary, label

            async def embed(texts: list[str]) -> list[list[float]]:
                payload = {
                    "model": COHERE_EMBED_MODEL,
                    "texts": texts,
                    "input_type": INPUT_TYPE,
                    "embedding_types": ["float"],
                }
                body = await post_json(session, embed_url, payload, max_retries)
                return list(body["embeddings"]["float"])

            pairs = await asyncio.gather(*(summarize_and_classify(d) for d in job.inputs))
            summaries = [summary for summary, _ in pairs]
            batches = chunks(summaries, job.settings["cohere_batch"])
            embedded = await gather_limited(concurrency, embed, batches)
        vectors = [vector for batch in embedded for vector in batch]
        return aggregate([label for _, label in pairs], vectors)

    return asyncio.run(main())


def _dask_threads(job: Job, num_workers: int | None) -> dict[str, Any]:
    llm = openai_client(job)
    co = cohere_client(job)
    job.mark(SETUP_MARK)

    def chat(prompt: str) -> str:
        completion = llm.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": prompt}]
        )
        return str(completion.choices[0].message.content)

    @dask.delayed
    def summarize(document: str) -> str:
        return chat(SUMMARIZE_FORMAT.format(document=document))

    @dask.delayed
    def classify(summary: str) -> str:
        return chat(CLASSIFY_FORMAT.format(summary=summary))

    @dask.delayed
    def embed(summary: str) -> list[float]:
        response = co.embed(
            texts=[summary],
            model=COHERE_EMBED_MODEL,
            input_type=INPUT_TYPE,
            embedding_types=["float"],
        )
        assert response.embeddings.float_ is not None
        return list(response.embeddings.float_[0])

    summaries = [summarize(document) for document in job.inputs]
    labels = [classify(summary) for summary in summaries]
    vectors = [embed(summary) for summary in summaries]
    report = dask.delayed(aggregate)(labels, vectors)
    (value,) = dask.compute(report, scheduler="threads", num_workers=num_workers)
    return dict(value)


def run_dask_64(job: Job) -> dict[str, Any]:
    return _dask_threads(job, job.settings["concurrency"])


def run_dask_default(job: Job) -> dict[str, Any]:
    return _dask_threads(job, None)


def _pool_document(document: str) -> tuple[str, list[float]]:
    llm, co, _ = worker_clients()

    def chat(prompt: str) -> str:
        completion = llm.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": prompt}]
        )
        return str(completion.choices[0].message.content)

    summary = chat(SUMMARIZE_FORMAT.format(document=document))
    label = chat(CLASSIFY_FORMAT.format(summary=summary))
    response = co.embed(
        texts=[summary], model=COHERE_EMBED_MODEL, input_type=INPUT_TYPE, embedding_types=["float"]
    )
    assert response.embeddings.float_ is not None
    return label, list(response.embeddings.float_[0])


def run_pool(job: Job) -> dict[str, Any]:
    results = pool_map(job, _pool_document)
    return aggregate([label for label, _ in results], [vector for _, vector in results])


def run_langchain(job: Job) -> dict[str, Any]:
    """LCEL: summarize then classify per document with ``abatch``; the summaries are
    then embedded with the official cohere client in chunks of 96 (langchain-cohere
    pins an older cohere)."""
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import PromptTemplate
    from langchain_core.runnables import RunnableConfig, RunnablePassthrough
    from langchain_openai import ChatOpenAI
    from pydantic import SecretStr

    llm = ChatOpenAI(
        model=CHAT_MODEL,
        base_url=job.openai_base_url,
        api_key=SecretStr(job.api_key),
        max_retries=job.settings["max_retries"],
    )
    summarize = PromptTemplate.from_template(SUMMARIZE_FORMAT) | llm | StrOutputParser()
    classify = PromptTemplate.from_template(CLASSIFY_FORMAT) | llm | StrOutputParser()
    chain = RunnablePassthrough.assign(summary=summarize) | RunnablePassthrough.assign(
        label=classify
    )
    inputs = [{"document": document} for document in job.inputs]
    config: RunnableConfig = {"max_concurrency": job.settings["concurrency"]}
    results = run_on_process_loop(chain.abatch(inputs, config=config))

    co = cohere_client(job)
    vectors: list[list[float]] = []
    for batch in chunks([result["summary"] for result in results], job.settings["cohere_batch"]):
        response = co.embed(
            texts=batch, model=COHERE_EMBED_MODEL, input_type=INPUT_TYPE, embedding_types=["float"]
        )
        assert response.embeddings.float_ is not None
        vectors.extend(list(vector) for vector in response.embeddings.float_)
    return aggregate([result["label"] for result in results], vectors)


SLOW_PEER_SUBSET = Size(full=30, quick=8)

WORKLOAD = Workload(
    name="pipeline",
    title="pipeline: summarize -> embed + classify -> aggregate",
    description=(
        "Per document: OpenAI chat summary, Cohere embedding of the summary, OpenAI chat "
        "classification of the summary (a Prompt); then one aggregation over all "
        "documents. Each provider's server answers after 50 ms + 0.1 ms per input and "
        "allows 64 requests at once."
    ),
    size=Size(full=500, quick=40),
    server={"latency": 0.05, "latency_per_item": 0.0001, "max_concurrency": CONCURRENCY},
    settings=SETTINGS,
    make_inputs=make_documents,
    ideal=pipeline_ideal,
    check=check_report,
    contenders=(
        Contender("feste", run_feste, kind="feste"),
        Contender(
            "asyncio.gather + semaphore (aiohttp)",
            run_asyncio,
            note="hand-written; embeddings hand-batched by 96",
        ),
        Contender(
            "dask.delayed threads, 64 workers",
            run_dask_64,
            note="official clients, one embed request per summary",
        ),
        Contender(
            "dask.delayed threads, default workers",
            run_dask_default,
            note="official clients",
            subset=SLOW_PEER_SUBSET,
        ),
        Contender(
            "multiprocessing.Pool(cpu_count)",
            run_pool,
            note="original feste design, one document per task",
            subset=SLOW_PEER_SUBSET,
            spawns_processes=True,
        ),
        Contender(
            "LangChain LCEL abatch",
            run_langchain,
            note="max_concurrency=64; embeddings by the cohere client, 96 per request",
            requires=("langchain_openai",),
        ),
    ),
    milestones={"first embedding request": "/v2/embed"},
)
