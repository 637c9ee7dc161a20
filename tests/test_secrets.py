"""API keys never leak: not in reprs, errors, graph keys, tokens, displays, pickles, logs.

A key given to the constructor travels with a pickled backend (workers need it; this is
documented); a key from the environment is read where the call runs and stored nowhere.
"""

from __future__ import annotations

import io
import logging
import pickle

import cloudpickle
import dask
import pytest

import feste
from feste import context
from feste.backend import Cohere, OpenAI
from feste.errors import AuthenticationError, ConfigurationError
from feste.graph import FesteGraph

OPENAI_KEY = "sk-secret-openai-5f3c9a7e21"
COHERE_KEY = "co-secret-cohere-8d2b6e4f90"
TRANSPORTS = ["http", "sdk"]

pytestmark = pytest.mark.filterwarnings("ignore:The `__fields__` attribute is deprecated")


def pipeline(llm: OpenAI, co: Cohere) -> list[feste.FesteDelayed]:
    answer = llm.chat("question", system="be brief", temperature=0)
    return [answer, llm.embed(answer), co.chat(answer), co.rerank("query", ["a", "b"])]


def everything_shown(values: list[feste.FesteDelayed], *backends) -> str:
    graph, _, _ = FesteGraph.collect(values)
    printed = io.StringIO()
    graph.print(file=printed)
    parts = [printed.getvalue(), graph.to_dot(), str(graph), repr(graph)]
    parts += [str(value.key) for value in values] + [repr(value) for value in values]
    for backend in backends:
        parts += [repr(backend), str(backend), dask.base.tokenize(backend), backend.identity()]
    return "\n".join(parts)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_explicit_keys_stay_out_of_reprs_keys_tokens_and_displays(transport):
    llm = OpenAI(api_key=OPENAI_KEY, transport=transport)
    co = Cohere(api_key=COHERE_KEY, transport=transport)
    shown = everything_shown(pipeline(llm, co), llm, co)
    assert OPENAI_KEY not in shown and COHERE_KEY not in shown
    assert "api_key='***'" in repr(llm)
    assert dask.base.tokenize(llm) == dask.base.tokenize(
        OpenAI(api_key="sk-other-key-000", transport=transport)
    )


def test_environment_keys_stay_out_of_pickled_graphs(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    monkeypatch.setenv("CO_API_KEY", COHERE_KEY)
    llm, co = OpenAI(), Cohere()
    values = pipeline(llm, co)
    graph, _, _ = FesteGraph.collect(values)
    for dumped in (pickle.dumps(graph.to_dict()), cloudpickle.dumps(graph.to_dict())):
        assert OPENAI_KEY.encode() not in dumped and COHERE_KEY.encode() not in dumped
    assert "api_key='$OPENAI_API_KEY'" in repr(llm)
    assert OPENAI_KEY not in everything_shown(values, llm, co)


def test_an_explicit_key_travels_in_the_pickle_as_documented():
    llm = OpenAI(api_key=OPENAI_KEY)
    assert OPENAI_KEY.encode() in pickle.dumps(llm)
    assert pickle.loads(pickle.dumps(llm)).api_key() == OPENAI_KEY
    assert "travels with it when the backend is\n    pickled" in (OpenAI.__doc__ or "")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_keys_stay_out_of_errors_and_logs(llm_server_factory, transport, caplog):
    server = llm_server_factory(api_key="sk-the-real-one-000000")
    llm = OpenAI(api_key=OPENAI_KEY, base_url=server.openai_base_url, transport=transport)
    co = Cohere(api_key=COHERE_KEY, base_url=server.cohere_base_url, transport=transport)
    caught = []
    with caplog.at_level(logging.DEBUG), context.set(eager=True, max_retries=0):
        for call in (lambda: llm.chat("hi"), lambda: co.embed("hi")):
            with pytest.raises(AuthenticationError) as info:
                call()
            caught.append(info.value)
    assert server.stats()["status_counts"] == {"401": 2}
    text = caplog.text + "".join(f"{error}{error!r}{error.args}" for error in caught)
    text += "".join(str(record.__dict__) for record in caplog.records)
    assert OPENAI_KEY not in text and COHERE_KEY not in text
    pickled = pickle.dumps(caught)
    assert OPENAI_KEY.encode() not in pickled and COHERE_KEY.encode() not in pickled


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_successful_runs_log_no_key(llm_server, transport, caplog, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    monkeypatch.setenv("CO_API_KEY", COHERE_KEY)
    llm = OpenAI(base_url=llm_server.openai_base_url, transport=transport)
    co = Cohere(base_url=llm_server.cohere_base_url, transport=transport)
    with caplog.at_level(logging.DEBUG):
        results = feste.compute(*pipeline(llm, co), scheduler="sync")
    assert results[0] == "echo(gpt-4o-mini): question"
    assert OPENAI_KEY not in caplog.text and COHERE_KEY not in caplog.text


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_missing_key_is_a_configuration_error_naming_the_variable(
    llm_server, transport, monkeypatch
):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("CO_API_KEY", raising=False)
    llm = OpenAI(base_url=llm_server.openai_base_url, transport=transport)
    co = Cohere(base_url=llm_server.cohere_base_url, transport=transport)
    with pytest.raises(ConfigurationError, match="OPENAI_API_KEY"):
        feste.compute(llm.chat("hi"), scheduler="sync")
    with context.set(eager=True), pytest.raises(ConfigurationError, match="CO_API_KEY"):
        co.rerank("q", ["d"])
    assert llm_server.stats()["requests"] == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_environment_key_is_read_when_the_call_runs(llm_server_factory, transport, monkeypatch):
    server = llm_server_factory(api_key=OPENAI_KEY)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    answer = OpenAI(base_url=server.openai_base_url, transport=transport).chat("later")
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    assert feste.compute(answer, scheduler="sync") == ("echo(gpt-4o-mini): later",)
