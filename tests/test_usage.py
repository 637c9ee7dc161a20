"""feste.usage: the tokens providers report, recorded per request, on every scheduler.

The local server reports usage with a fixed rule (``feste.testing.count_tokens``:
prompt tokens are the tokens of every message, completion tokens those of the reply),
so the expected totals are computed here from the inputs.
"""

from __future__ import annotations

import contextvars
import pickle

import cloudpickle
import pytest

import feste
from feste.backend import Cohere, OpenAI
from feste.backend.types import Usage
from feste.testing import chat_text, count_tokens
from feste.usage import (
    Relayed,
    UsageRecord,
    UsageRecorder,
    delivered,
    delivered_error,
    record_usage,
    run_relayed,
)

CHAT_MODEL = "gpt-4o-mini"
EMBED_MODEL = "text-embedding-3-small"


@pytest.mark.parametrize("scheduler", ["async", "sync", "threads"])
def test_every_request_is_recorded_with_the_reported_tokens(scheduler, llm_server):
    llm = OpenAI(base_url=llm_server.openai_base_url, api_key="k")
    questions = [f"question number {i}" for i in range(4)]
    texts = ["alpha", "beta gamma", "delta epsilon zeta"]
    answers = [llm.chat(question) for question in questions]
    vectors = [llm.embed(text) for text in texts]

    with record_usage() as usage:
        feste.compute(answers, vectors, scheduler=scheduler)

    # Four chat requests and one batched embedding request, as the server counted.
    assert usage.requests == llm_server.stats()["requests"] == 5
    chats = [record for record in usage.records if record.method == "chat"]
    embeds = [record for record in usage.records if record.method == "embed"]
    assert len(chats) == 4
    assert [record.items for record in embeds] == [3]

    chat_prompt = sum(count_tokens(question) for question in questions)
    chat_completion = sum(count_tokens(chat_text(CHAT_MODEL, q)) for q in questions)
    embed_prompt = sum(count_tokens(text) for text in texts)
    assert usage.by_model() == {
        ("openai", CHAT_MODEL): feste.backend.types.Usage(CHAT_MODEL, chat_prompt, chat_completion),
        ("openai", EMBED_MODEL): feste.backend.types.Usage(EMBED_MODEL, embed_prompt, 0),
    }
    assert usage.total.prompt_tokens == chat_prompt + embed_prompt
    assert usage.total.completion_tokens == chat_completion
    assert usage.total.model is None  # two models answered
    assert all(isinstance(record, UsageRecord) for record in usage.records)


def test_eager_calls_are_recorded_and_nothing_outside_the_block(llm_server):
    llm = OpenAI(base_url=llm_server.openai_base_url, api_key="k")
    with feste.context.set(eager=True):
        llm.chat("before")
        with record_usage() as usage:
            llm.chat("inside")
        llm.chat("after")
    assert usage.requests == 1
    (record,) = usage.records
    assert (record.provider, record.method, record.model, record.items) == (
        "openai",
        "chat",
        CHAT_MODEL,
        1,
    )
    assert record.prompt_tokens == count_tokens("inside")
    assert record.total_tokens == count_tokens("inside") + count_tokens(
        chat_text(CHAT_MODEL, "inside")
    )


def test_failed_requests_are_not_recorded_and_nested_recorders_both_see_requests(llm_server):
    llm = OpenAI(base_url=llm_server.openai_base_url, api_key="k")
    with record_usage() as outer, record_usage() as inner:
        results = feste.compute(
            [llm.chat("fine"), llm.chat("bad [[status:400]]")], errors="return"
        )[0]
    assert isinstance(results[1], feste.Failure)
    assert inner.requests == outer.requests == 1
    assert inner.total == outer.total


def test_rerank_is_recorded_in_searches_not_tokens(llm_server):
    cohere = Cohere(base_url=llm_server.cohere_base_url, api_key="k")
    with record_usage() as usage:
        feste.compute(cohere.rerank("apple", ["an apple", "a pear"]))
    (record,) = usage.records
    assert (record.method, record.prompt_tokens, record.completion_tokens) == ("rerank", 0, 0)
    assert record.search_units == 1
    assert record.cost == 0.002  # the table's price of one rerank-v3.5 search


def test_repr_summarizes():
    recorder = UsageRecorder(feste._calls.RunObserver())
    assert repr(recorder) == "UsageRecorder(0 requests, 0 prompt + 0 completion tokens)"


def test_the_relay_hook_carries_reports_through_pickling(llm_server):
    """What a worker process (or a Dask worker) and its caller do with request reports."""
    llm = OpenAI(base_url=llm_server.openai_base_url, api_key="k")

    def task(question):
        with feste.context.set(eager=True):
            return llm.chat(question)

    def failing_task():
        task("before failing")
        raise ValueError("the task failed after a request")

    # A worker has none of the caller's observers: a fresh context stands for it.
    shipped = contextvars.Context().run(run_relayed, task, "hello")
    assert isinstance(shipped, Relayed)
    (report,) = shipped.events
    assert (report.provider, report.method, report.items, report.error) == (
        "openai",
        "chat",
        1,
        None,
    )
    with record_usage() as usage:
        value = delivered(cloudpickle.loads(cloudpickle.dumps(shipped)))
    assert value == chat_text(CHAT_MODEL, "hello")
    expected = Usage(CHAT_MODEL, count_tokens("hello"), count_tokens(value))
    assert usage.requests == 1 and usage.total == expected

    with pytest.raises(ValueError) as raised:
        contextvars.Context().run(run_relayed, failing_task)
    with record_usage() as failed:
        error = delivered_error(pickle.loads(pickle.dumps(raised.value)))
    assert str(error) == "the task failed after a request"
    assert failed.requests == 1 and failed.records[0].prompt_tokens == count_tokens(
        "before failing"
    )
    # Nothing sent: the value comes back as it is.
    assert contextvars.Context().run(run_relayed, len, "abc") == 3
    assert delivered(3) == 3

    merged = UsageRecorder(feste._calls.RunObserver())
    merged.merge(usage.records + failed.records)
    assert merged.requests == 2
    assert merged.total == expected + failed.total


def test_usage_is_recorded_behind_the_progress_bar_and_the_run_history(llm_server, tmp_path):
    """Both wrap the current observer during a run: they pass request reports on."""
    llm = OpenAI(base_url=llm_server.openai_base_url, api_key="k")
    questions = [f"question {i}" for i in range(3)]
    with record_usage() as usage:
        feste.compute(
            [llm.chat(q) for q in questions],
            progress=True,
            cache=str(tmp_path / "cache.sqlite"),
            run="recorded",
        )
    assert usage.requests == llm_server.stats()["requests"] == 3
    assert usage.total.prompt_tokens == sum(count_tokens(q) for q in questions)
