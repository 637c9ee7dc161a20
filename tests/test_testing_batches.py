"""The test server's Files and Batch APIs, driven by the official ``openai`` client."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import openai
import pytest

from feste.testing import TestServer, chat_text, embedding, wait_until


def client_of(server: TestServer, key: str = "sk-test") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.openai_base_url, api_key=key, max_retries=0)


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def chat_line(custom_id: str, text: str) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]},
    }


def finished(client: openai.OpenAI, batch_id: str) -> Any:
    """The batch once it ended (polled until its status is terminal)."""
    ended: list[Any] = []

    def done() -> bool:
        batch = client.batches.retrieve(batch_id)
        ended[:] = [batch]
        return batch.status in ("completed", "expired", "cancelled", "failed")

    wait_until(done, timeout=30)
    return ended[0]


def lines_of(client: openai.OpenAI, file_id: str | None) -> list[Any]:
    assert file_id is not None
    return [json.loads(line) for line in client.files.content(file_id).content.splitlines()]


def submit(client: openai.OpenAI, lines: list[dict[str, Any]], endpoint: str) -> Any:
    uploaded = client.files.create(file=("input.jsonl", jsonl(lines)), purpose="batch")
    return client.batches.create(
        input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h"
    )  # type: ignore[arg-type]


def test_a_job_answers_each_line_as_the_online_endpoint(llm_server: TestServer) -> None:
    client = client_of(llm_server)
    lines = [chat_line("a", "hello"), chat_line("b", "world")]
    lines.append(
        {
            "custom_id": "c",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "text-embedding-3-small", "input": ["x", "y"]},
        }
    )
    batch = submit(client, lines[:2], "/v1/chat/completions")
    embed_batch = submit(client, lines[2:], "/v1/embeddings")

    ended = finished(client, batch.id)
    answers = {
        line["custom_id"]: line["response"] for line in lines_of(client, ended.output_file_id)
    }
    embedded = lines_of(client, finished(client, embed_batch.id).output_file_id)

    assert ended.status == "completed"
    assert ended.error_file_id is None
    assert (ended.request_counts.total, ended.request_counts.completed) == (2, 2)
    assert answers["a"]["status_code"] == 200
    assert answers["a"]["body"]["choices"][0]["message"]["content"] == chat_text(
        "gpt-4o-mini", "hello"
    )
    assert answers["b"]["body"]["choices"][0]["message"]["content"] == chat_text(
        "gpt-4o-mini", "world"
    )
    vectors = [entry["embedding"] for entry in embedded[0]["response"]["body"]["data"]]
    assert vectors == [embedding("text-embedding-3-small", text, 8) for text in ("x", "y")]
    stats = llm_server.stats()
    assert stats["batches"]["files_uploaded"] == 2
    assert stats["batches"]["jobs_created"] == 2
    assert stats["batches"]["lines_answered"] == 3
    assert stats["billed"]["gpt-4o-mini"]["requests"] == 2
    assert stats["batches"]["billed"]["gpt-4o-mini"] == stats["billed"]["gpt-4o-mini"]
    assert stats["batches"]["billed"]["text-embedding-3-small"]["prompt_tokens"] == 2
    # Jobs are not online requests: no chat route was called.
    assert "/v1/chat/completions" not in stats["by_route"]


def test_marked_lines_land_in_the_error_file_or_break_the_output(
    llm_server: TestServer,
) -> None:
    client = client_of(llm_server)
    lines = [
        chat_line("good", "fine"),
        chat_line("bad", "no [[status:400]]"),
        chat_line("broken", "[[malformed]]"),
    ]
    ended = finished(client, submit(client, lines, "/v1/chat/completions").id)

    output = client.files.content(ended.output_file_id).content.splitlines()
    errors = lines_of(client, ended.error_file_id)

    assert (ended.request_counts.completed, ended.request_counts.failed) == (2, 1)
    assert json.loads(output[0])["custom_id"] == "good"
    with pytest.raises(ValueError):
        json.loads(output[1])
    assert [line["custom_id"] for line in errors] == ["bad"]
    assert errors[0]["response"]["status_code"] == 400
    assert errors[0]["response"]["body"]["error"]["message"] == (
        "Injected error 400 triggered by input[0]"
    )


def test_expiring_jobs_put_every_line_in_the_error_file(
    llm_server_factory: Callable[..., TestServer],
) -> None:
    server = llm_server_factory(batch_expire_jobs=1)
    client = client_of(server)
    expired = finished(client, submit(client, [chat_line("a", "one")], "/v1/chat/completions").id)
    later = finished(client, submit(client, [chat_line("a", "one")], "/v1/chat/completions").id)

    errors = lines_of(client, expired.error_file_id)

    assert expired.status == "expired"
    assert expired.output_file_id is None
    assert errors[0]["error"]["code"] == "batch_expired"
    assert later.status == "completed"
    assert server.stats()["batches"]["jobs_expired"] == 1


def test_jobs_are_held_by_the_completion_delay_and_can_be_cancelled(
    llm_server_factory: Callable[..., TestServer],
) -> None:
    server = llm_server_factory(batch_completion_delay=3600)
    client = client_of(server)
    batch = submit(client, [chat_line("a", "one")], "/v1/chat/completions")

    assert client.batches.retrieve(batch.id).status == "in_progress"
    assert [job.id for job in client.batches.list().data] == [batch.id]
    assert client.batches.cancel(batch.id).status == "cancelled"
    with pytest.raises(openai.ConflictError, match="Cannot cancel a batch with status"):
        client.batches.cancel(batch.id)
    assert server.stats()["batches"]["jobs_cancelled"] == 1


def test_invalid_input_files_fail_the_job_with_line_errors(llm_server: TestServer) -> None:
    client = client_of(llm_server)
    lines = [chat_line("same", "one"), chat_line("same", "two")]

    batch = submit(client, lines, "/v1/chat/completions")

    assert batch.status == "failed"
    assert batch.errors is not None and batch.errors.data is not None
    assert [(error.code, error.line) for error in batch.errors.data] == [("duplicate_custom_id", 2)]
    with pytest.raises(openai.BadRequestError, match="endpoint must be one of"):
        submit(client, lines[:1], "/v1/rerank")
    with pytest.raises(openai.NotFoundError, match="No such Batch object"):
        client.batches.retrieve("batch_missing")


def test_batch_routes_require_the_key_when_one_is_set(
    llm_server_factory: Callable[..., TestServer],
) -> None:
    server = llm_server_factory(api_key="sk-right")

    with pytest.raises(openai.AuthenticationError):
        client_of(server, "sk-wrong").files.create(file=("a.jsonl", b"{}\n"), purpose="batch")
    uploaded = client_of(server, "sk-right").files.create(
        file=("a.jsonl", jsonl([chat_line("a", "x")])), purpose="batch"
    )
    assert uploaded.bytes > 0
    assert server.stats()["faults"]["401"] == 1
