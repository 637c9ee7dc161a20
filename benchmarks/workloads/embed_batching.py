"""Embed batching: thousands of single ``embed`` calls, written one per text.

The code a user writes embeds one text at a time; the API accepts 2,048 inputs per
request. The server charges ``latency`` per request plus ``latency_per_item`` per
input, so sending texts one by one costs a full request latency each, while a batched
request pays it once.

Ideal: the fewest requests, ``k = ceil(N / 2048)``, all sent at once (``k`` is far
below the concurrency cap): the makespan is the slowest request,
``latency + 2048 x latency_per_item``. (Under this server's latency model, splitting
into 64 smaller requests would finish sooner, in ``latency + ceil(N / 64) x
latency_per_item``; the ideal here counts requests as what providers meter and
rate-limit, and so does feste's batching.)
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
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
    EMBED_MODEL,
    aiohttp_session,
    chunks,
    gather_limited,
    openai_client,
    pool_map,
    post_json,
    worker_clients,
)

__all__ = ["WORKLOAD", "check_embeddings", "make_texts"]

BATCH = 2048
CONCURRENCY = 64
SETTINGS = {"concurrency": CONCURRENCY, "max_retries": 2, "batch": BATCH}
SLOW_PEER_SUBSET = Size(full=200, quick=20)


def make_texts(n: int) -> list[str]:
    return [f"Document {index}: a short note about topic {index % 37}." for index in range(n)]


def vectors_match(got: Any, expected: list[float]) -> bool:
    # The official openai client fetches base64 float32 vectors; allow for that rounding.
    return len(got) == len(expected) and all(
        math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7) for a, b in zip(got, expected)
    )


def check_embeddings(inputs: list[str], outputs: Any) -> str | None:
    from feste.testing import embedding

    outputs = list(outputs)
    if len(outputs) != len(inputs):
        return f"{len(outputs)} vectors for {len(inputs)} texts"
    for index, (text, vector) in enumerate(zip(inputs, outputs)):
        if not vectors_match(list(vector), embedding(EMBED_MODEL, text)):
            return f"vector {index} does not match the server's embedding of {text!r}"
    return None


def embed_ideal(n: int, server: Mapping[str, Any]) -> Ideal:
    requests = ceil_div(n, BATCH)
    largest = min(n, BATCH)
    waves = ceil_div(requests, server["max_concurrency"])
    seconds = waves * (server["latency"] + largest * server["latency_per_item"])
    per_item_ms = server["latency_per_item"] * 1000
    return Ideal(
        seconds=seconds,
        formula=(
            f"ceil({n} / {BATCH}) = {requests} requests at once; slowest = "
            f"{server['latency'] * 1000:g} ms + {largest} x {per_item_ms:g} ms"
        ),
        requests=requests,
    )


# -- feste ------------------------------------------------------------------------------


def run_feste(job: Job, optimize_graph: bool = True) -> list[Any]:
    import feste
    from feste.backend import OpenAI

    llm = OpenAI(
        base_url=job.openai_base_url,
        api_key=job.api_key,
        model=EMBED_MODEL,
        max_concurrency=job.settings["concurrency"],
    )
    vectors = [llm.embed(text) for text in job.inputs]
    job.mark(GRAPH_BUILT)
    (values,) = feste.compute(vectors, optimize_graph=optimize_graph)
    return list(values)


def run_feste_without_static_pass(job: Job) -> list[Any]:
    return run_feste(job, optimize_graph=False)


# -- peers ------------------------------------------------------------------------------


def run_chunked_loop(job: Job) -> list[Any]:
    """The usual hand-batched code: a loop over pre-chunked lists, official client."""
    client = openai_client(job)
    vectors: list[Any] = []
    for chunk in chunks(job.inputs, job.settings["batch"]):
        response = client.embeddings.create(model=EMBED_MODEL, input=chunk)
        vectors.extend(item.embedding for item in response.data)
    return vectors


def run_asyncio_chunks(job: Job) -> list[Any]:
    """Hand-written: pre-chunked lists sent at once with aiohttp (batching + concurrency)."""
    url = job.openai_base_url + "/embeddings"

    async def main() -> list[Any]:
        async with aiohttp_session(job) as session:

            async def embed_chunk(chunk: list[str]) -> list[Any]:
                payload = {"model": EMBED_MODEL, "input": chunk}
                body = await post_json(session, url, payload, job.settings["max_retries"])
                return [item["embedding"] for item in body["data"]]

            batches = chunks(job.inputs, job.settings["batch"])
            results = await gather_limited(job.settings["concurrency"], embed_chunk, batches)
        return [vector for batch in results for vector in batch]

    return asyncio.run(main())


def _dask_threads(job: Job, num_workers: int | None) -> list[Any]:
    client = openai_client(job)
    job.mark(SETUP_MARK)

    @dask.delayed
    def embed(text: str) -> list[float]:
        return client.embeddings.create(model=EMBED_MODEL, input=text).data[0].embedding

    vectors = [embed(text) for text in job.inputs]
    return list(dask.compute(*vectors, scheduler="threads", num_workers=num_workers))


def run_dask_64(job: Job) -> list[Any]:
    return _dask_threads(job, job.settings["concurrency"])


def run_dask_default(job: Job) -> list[Any]:
    return _dask_threads(job, None)


def _pool_embed(text: str) -> list[float]:
    client, _, _ = worker_clients()
    return client.embeddings.create(model=EMBED_MODEL, input=text).data[0].embedding


def run_pool(job: Job) -> list[Any]:
    return pool_map(job, _pool_embed)


def run_langchain(job: Job) -> list[Any]:
    from langchain_openai import OpenAIEmbeddings
    from pydantic import SecretStr

    embeddings = OpenAIEmbeddings(
        model=EMBED_MODEL,
        base_url=job.openai_base_url,
        api_key=SecretStr(job.api_key),
        chunk_size=job.settings["batch"],
        # Its token-length check needs tiktoken's downloaded tables; not for local servers.
        check_embedding_ctx_length=False,
        max_retries=job.settings["max_retries"],
    )
    return embeddings.embed_documents(job.inputs)


WORKLOAD = Workload(
    name="embed_batching",
    title="embed batching: single embed calls",
    description=(
        "N OpenAI embedding calls written one text at a time; the server takes up to "
        "2,048 inputs per request and answers after 30 ms + 0.1 ms per input."
    ),
    size=Size(full=5000, quick=500),
    server={"latency": 0.03, "latency_per_item": 0.0001, "max_concurrency": CONCURRENCY},
    settings=SETTINGS,
    make_inputs=make_texts,
    ideal=embed_ideal,
    check=check_embeddings,
    contenders=(
        Contender("feste", run_feste, kind="feste"),
        Contender(
            "feste, optimize_graph=False",
            run_feste_without_static_pass,
            kind="feste",
            note="no static pass: the async scheduler gathers ready calls at run time",
        ),
        Contender(
            "asyncio.gather over pre-chunked lists (aiohttp)",
            run_asyncio_chunks,
            note="hand-batched, chunks sent at once",
        ),
        Contender(
            "loop over pre-chunked lists (openai client)",
            run_chunked_loop,
            note="hand-batched, one chunk at a time",
        ),
        Contender(
            "LangChain OpenAIEmbeddings.embed_documents",
            run_langchain,
            note="chunk_size=2048",
            requires=("langchain_openai",),
        ),
        Contender(
            "dask.delayed threads, 64 workers",
            run_dask_64,
            note="one request per text, official openai client",
        ),
        Contender(
            "dask.delayed threads, default workers",
            run_dask_default,
            note="one request per text",
            subset=SLOW_PEER_SUBSET,
        ),
        Contender(
            "multiprocessing.Pool(cpu_count)",
            run_pool,
            note="original feste design, one request per text",
            subset=SLOW_PEER_SUBSET,
            spawns_processes=True,
        ),
    ),
)
