"""Chrome/Perfetto traces (``feste.compute(..., trace=path)``): the file parses, holds one
span per request with its batch size, attempts, waits and tokens, also for requests
made in worker processes and for a run that fails."""

from __future__ import annotations

import itertools
import json
import os
from collections import defaultdict

import pytest

import feste
from feste import feste_task
from feste.backend import OpenAI
from feste.errors import BadRequestError
from feste.testing import chat_text, count_tokens
from feste.trace import record_trace

KEY = "sk-test-trace-0123456789"
GPT = "gpt-4o-mini"


def requests_of(trace: dict) -> list[dict]:
    return [e for e in trace["traceEvents"] if e.get("cat") == "request" and e["ph"] == "X"]


def check_layout(trace: dict) -> None:
    """Children sit inside their request; requests on one lane never overlap."""
    events = trace["traceEvents"]
    spans = requests_of(trace)
    lanes = defaultdict(list)
    for span in spans:
        lanes[(span["pid"], span["tid"])].append(span)
    for lane in lanes.values():
        lane.sort(key=lambda span: span["ts"])
        for before, after in itertools.pairwise(lane):
            assert before["ts"] + before["dur"] <= after["ts"]
    for child in (e for e in events if e.get("cat") in ("wait", "attempt")):
        assert any(
            span["ts"] <= child["ts"] and child["ts"] + child["dur"] <= span["ts"] + span["dur"]
            for span in lanes[(child["pid"], child["tid"])]
        )
    names = {(e["pid"], e["tid"]) for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names == set(lanes)


@pytest.mark.parametrize("transport", ["http", "sdk"])
def test_one_span_per_request_with_its_details(llm_server, transport, tmp_path):
    llm = OpenAI(api_key=KEY, base_url=llm_server.openai_base_url, transport=transport)
    questions = ["one", "two", "three"]
    texts = ["alpha", "beta", "gamma delta"]
    path = tmp_path / "run.json"
    results = feste.compute(
        [llm.chat(q) for q in questions],
        [llm.embed(t) for t in texts],
        llm.chat("slow [[retry_after:0.01]]"),
        llm.chat("bad [[status:400]]"),
        trace=path,
        errors="return",
    )
    assert isinstance(results[3], feste.Failure)
    trace = json.loads(path.read_text())
    assert trace["displayTimeUnit"] == "ms"
    spans = requests_of(trace)
    # Seven requests reached the server: six requests, one of them tried twice.
    assert llm_server.stats()["requests"] == 7
    assert len(spans) == trace["otherData"]["requests"] == 6
    assert {span["pid"] for span in spans} == {os.getpid()}
    by_kind = defaultdict(list)
    for span in spans:
        by_kind[span["name"]].append(span["args"])
    assert sorted(by_kind) == ["openai.chat gpt-4o-mini", "openai.embed text-embedding-3-small"]
    (embed,) = by_kind["openai.embed text-embedding-3-small"]
    assert (embed["items"], embed["attempts"]) == (3, 1)  # one batched request
    assert embed["prompt_tokens"] == sum(count_tokens(t) for t in texts)
    chats = by_kind["openai.chat gpt-4o-mini"]
    retried = [args for args in chats if args["retries"]]
    assert [(args["attempts"], args["retries"]) for args in retried] == [(2, 1)]
    assert retried[0]["retry_wait_ms"] > 0
    failed = [args for args in chats if "error" in args]
    assert len(failed) == 1 and failed[0]["error"].startswith("BadRequestError: ")
    assert failed[0]["prompt_tokens"] is None
    answered = [args for args in chats if "error" not in args and not args["retries"]]
    assert sorted(args["completion_tokens"] for args in answered) == sorted(
        count_tokens(chat_text(GPT, q)) for q in questions
    )
    assert all(args["limiter_wait_ms"] >= 0 for args in chats)
    children = [e for e in trace["traceEvents"] if e.get("cat") in ("wait", "attempt")]
    assert len(children) == 2 * len(spans)
    check_layout(trace)


@feste_task
def ask_in_a_worker(base_url: str, prompt: str) -> str:
    """A plain task that makes its own request (in a worker process under "processes")."""
    with feste.context.set(eager=True):
        return OpenAI(api_key=KEY, base_url=base_url).chat(prompt)


def test_requests_made_in_worker_processes_are_traced(llm_server, tmp_path):
    path = tmp_path / "processes.json"
    url = llm_server.openai_base_url
    feste.compute(
        [ask_in_a_worker(url, f"q{i}") for i in range(4)],
        scheduler="processes",
        num_workers=2,
        trace=path,
    )
    spans = requests_of(json.loads(path.read_text()))
    assert len(spans) == llm_server.stats()["requests"] == 4
    assert os.getpid() not in {span["pid"] for span in spans}
    check_layout(json.loads(path.read_text()))


def test_the_processes_schedulers_own_calls_are_traced_here(llm_server, tmp_path):
    llm = OpenAI(api_key=KEY, base_url=llm_server.openai_base_url)
    path = tmp_path / "parent.json"
    feste.compute([llm.chat(f"q{i}") for i in range(4)], scheduler="processes", trace=path)
    spans = requests_of(json.loads(path.read_text()))
    assert len(spans) == llm_server.stats()["requests"] == 4
    assert {span["pid"] for span in spans} == {os.getpid()}


def test_a_failed_run_still_writes_its_trace(llm_server, tmp_path):
    llm = OpenAI(api_key=KEY, base_url=llm_server.openai_base_url)
    path = tmp_path / "failed.json"
    with pytest.raises(BadRequestError):
        feste.compute(llm.chat("bad [[status:400]]"), trace=path)
    (span,) = requests_of(json.loads(path.read_text()))
    assert span["args"]["error"].startswith("BadRequestError")


def test_record_trace_around_any_code(llm_server, tmp_path):
    llm = OpenAI(api_key=KEY, base_url=llm_server.openai_base_url)
    path = tmp_path / "eager.json"
    with record_trace(path) as recorder, feste.context.set(eager=True):
        llm.chat("a")
        llm.chat("b")
    assert len(recorder.reports) == 2
    assert len(requests_of(json.loads(path.read_text()))) == 2
