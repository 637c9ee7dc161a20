"""Staggered: chats of varied latency, each answer then embedded.

Per document, one OpenAI chat call, whose answer is then embedded (OpenAI embeddings,
up to 2,048 inputs per request). Real generations take very different times; here
each document carries a ``[[delay:SECONDS]]`` marker (``feste.testing``) that adds
0 to 0.5 s, spread evenly over the documents, to its chat's 50 ms. Embeddings ignore
the marker their input echoes: each embedding request takes 50 ms + 0.1 ms per input.
One server, 64 requests at once, shared by chats and embeddings.

What it measures: how soon the embeddings start. The embeddings of the answers are
batchable, and a client that gathers them into one request waits for the slowest chat
before sending any: the whole embedding stage then comes after the last answer. A
client that embeds answers as they arrive overlaps the two stages. Rows:

* feste, as a user writes it (``chat`` then ``embed`` per document, ``feste.compute``):
  the embeddings wait on chats, so the static pass leaves them to the async
  scheduler, which gathers ready embeddings at run time within its batch window;
* feste with ``optimize_graph=False``: the same without the static pass;
* hand-written asyncio, per document ``chat`` then ``embed`` of that answer alone,
  ``asyncio.gather`` over the documents (one request per embedding). Chats and
  embeddings share one ``asyncio.Semaphore(64)``, which is first come, first served:
  each embedding queues behind every chat not yet started;
* hand-written asyncio that embeds answers in batches as they arrive: the chats get
  63 slots, and on the 64th one embedding request at a time takes every answer that
  is ready.

Each row notes when the first embedding request reached the server, in seconds from
the start of the run.

Ideal: the chats alone need ``max(sum of chat latencies / 64 slots, slowest chat)``;
the last answer then needs its embedding, ``50 ms + 0.1 ms``. Embedding the others in
batches while chats run costs a few slots only, so the ideal is the sum of the two.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from typing import Any

from benchmarks.harness import GRAPH_BUILT, Contender, Ideal, Job, Size, Workload
from benchmarks.peers import CHAT_MODEL, EMBED_MODEL, aiohttp_session, post_json

__all__ = ["WORKLOAD", "chat_delay", "make_documents", "staggered_ideal"]

CONCURRENCY = 64
BATCH = 2048
SETTINGS = {"concurrency": CONCURRENCY, "max_retries": 2, "batch": BATCH}
# Chat delays: 0, 25, ..., 500 ms, spread over the documents by a stride coprime to 21.
DELAY_STEP_MS = 25
DELAY_STEPS = 21
DELAY_STRIDE = 8
EMBEDDINGS_ROUTE = "/v1/embeddings"


def chat_delay(index: int) -> float:
    """Seconds the ``[[delay:...]]`` marker of document ``index`` adds to its chat."""
    return (index * DELAY_STRIDE % DELAY_STEPS) * DELAY_STEP_MS / 1000


def make_documents(n: int) -> list[str]:
    return [
        f"Document {index} [[delay:{chat_delay(index):g}]]: notes on topic {index % 37}."
        for index in range(n)
    ]


def vectors_match(got: Any, expected: list[float]) -> bool:
    return len(got) == len(expected) and all(
        math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7) for a, b in zip(got, expected)
    )


def check_answers_and_vectors(inputs: list[str], outputs: Any) -> str | None:
    from feste.testing import chat_text, embedding

    outputs = list(outputs)
    if len(outputs) != len(inputs):
        return f"{len(outputs)} results for {len(inputs)} documents"
    for index, (document, (answer, vector)) in enumerate(zip(inputs, outputs)):
        expected = chat_text(CHAT_MODEL, document)
        if answer != expected:
            return f"answer {index} is {answer!r}, expected {expected!r}"
        if not vectors_match(list(vector), embedding(EMBED_MODEL, expected)):
            return f"vector {index} does not match the server's embedding of answer {index}"
    return None


def staggered_ideal(n: int, server: Mapping[str, Any]) -> Ideal:
    latency, per_item = server["latency"], server["latency_per_item"]
    chats = [latency + per_item + chat_delay(index) for index in range(n)]
    chat_stage = max(sum(chats) / CONCURRENCY, max(chats))
    last_embedding = latency + per_item
    return Ideal(
        seconds=chat_stage + last_embedding,
        formula=(
            f"max(sum of {n} chat latencies {sum(chats):.1f} s / {CONCURRENCY} slots, "
            f"slowest chat {max(chats) * 1000:.0f} ms) + the last answer's embedding "
            f"{last_embedding * 1000:g} ms"
        ),
    )


# -- feste ------------------------------------------------------------------------------


def run_feste(job: Job, optimize_graph: bool = True) -> list[tuple[str, Any]]:
    import feste
    from feste.backend import OpenAI

    llm = OpenAI(
        base_url=job.openai_base_url,
        api_key=job.api_key,
        max_concurrency=job.settings["concurrency"],
    )
    answers = [llm.chat(document, model=CHAT_MODEL) for document in job.inputs]
    vectors = [llm.embed(answer, model=EMBED_MODEL) for answer in answers]
    job.mark(GRAPH_BUILT)
    answer_values, vector_values = feste.compute(answers, vectors, optimize_graph=optimize_graph)
    return list(zip(answer_values, vector_values))


def run_feste_without_static_pass(job: Job) -> list[tuple[str, Any]]:
    return run_feste(job, optimize_graph=False)


# -- peers ------------------------------------------------------------------------------


def _chat_payload(document: str) -> dict[str, Any]:
    return {"model": CHAT_MODEL, "messages": [{"role": "user", "content": document}]}


def run_asyncio_chains(job: Job) -> list[tuple[str, Any]]:
    """Hand-written: per document, chat then embed that answer; gather the documents."""
    chat_url = job.openai_base_url + "/chat/completions"
    embed_url = job.openai_base_url + "/embeddings"
    max_retries = job.settings["max_retries"]

    async def main() -> list[tuple[str, Any]]:
        async with aiohttp_session(job) as session:
            slots = asyncio.Semaphore(job.settings["concurrency"])

            async def document_chain(document: str) -> tuple[str, Any]:
                async with slots:
                    body = await post_json(session, chat_url, _chat_payload(document), max_retries)
                answer = str(body["choices"][0]["message"]["content"])
                payload = {"model": EMBED_MODEL, "input": [answer]}
                async with slots:
                    body = await post_json(session, embed_url, payload, max_retries)
                return answer, body["data"][0]["embedding"]

            return await asyncio.gather(*(document_chain(d) for d in job.inputs))

    return asyncio.run(main())


def run_asyncio_batched_as_ready(job: Job) -> list[tuple[str, Any]]:
    """Hand-written: the chats on all slots but one; on that one, one embedding request
    at a time, each taking every answer that arrived (up to the batch size) while the
    previous one was out. (Sharing one semaphore, the embeddings would queue behind
    every chat not yet started, as the per-document chains do.)"""
    chat_url = job.openai_base_url + "/chat/completions"
    embed_url = job.openai_base_url + "/embeddings"
    max_retries = job.settings["max_retries"]
    total = len(job.inputs)

    async def main() -> list[tuple[str, Any]]:
        results: list[tuple[str, Any] | None] = [None] * total
        ready: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
        async with aiohttp_session(job) as session:
            chat_slots = asyncio.Semaphore(job.settings["concurrency"] - 1)

            async def ask(index: int, document: str) -> None:
                async with chat_slots:
                    body = await post_json(session, chat_url, _chat_payload(document), max_retries)
                ready.put_nowait((index, str(body["choices"][0]["message"]["content"])))

            async def embed_as_ready() -> None:
                embedded = 0
                while embedded < total:
                    batch = [await ready.get()]
                    while not ready.empty() and len(batch) < job.settings["batch"]:
                        batch.append(ready.get_nowait())
                    payload = {"model": EMBED_MODEL, "input": [answer for _, answer in batch]}
                    body = await post_json(session, embed_url, payload, max_retries)
                    for (index, answer), item in zip(batch, body["data"]):
                        results[index] = (answer, item["embedding"])
                    embedded += len(batch)

            await asyncio.gather(
                embed_as_ready(), *(ask(index, d) for index, d in enumerate(job.inputs))
            )
        return [result for result in results if result is not None]

    return asyncio.run(main())


WORKLOAD = Workload(
    name="staggered",
    title="staggered: chats of varied latency, then embeddings",
    description=(
        "Per document, an OpenAI chat taking 50 ms plus 0 to 0.5 s (a [[delay:S]] "
        "marker), then an embedding of its answer (50 ms + 0.1 ms per input, 2,048 "
        "inputs per request); 64 requests at once on one server."
    ),
    size=Size(full=500, quick=40),
    server={"latency": 0.05, "latency_per_item": 0.0001, "max_concurrency": CONCURRENCY},
    settings=SETTINGS,
    make_inputs=make_documents,
    ideal=staggered_ideal,
    check=check_answers_and_vectors,
    contenders=(
        Contender("feste", run_feste, kind="feste"),
        Contender(
            "feste, optimize_graph=False",
            run_feste_without_static_pass,
            kind="feste",
            note="no static pass: the async scheduler gathers ready embeddings at run time",
        ),
        Contender(
            "asyncio.gather of per-document chains (aiohttp)",
            run_asyncio_chains,
            note="hand-written; chat then one embedding request per answer, one semaphore",
        ),
        Contender(
            "asyncio, embeddings batched as answers arrive (aiohttp)",
            run_asyncio_batched_as_ready,
            note=(
                "hand-written; 63 slots for chats, on the 64th one embedding request at "
                "a time takes every ready answer"
            ),
        ),
    ),
    milestones={"first embedding request": EMBEDDINGS_ROUTE},
)
