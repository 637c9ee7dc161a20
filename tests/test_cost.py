"""Cost in dollars: the dated price table, dollars in usage records (also for requests
made in worker processes and for calls the cache answered), user prices, and the
estimate ``feste.explain`` gives before anything is sent.

The local server reports tokens with ``count_tokens`` (prompt: every message;
completion: the answer), so every expected dollar amount is computed here from the
inputs and the table's prices.
"""

from __future__ import annotations

import pytest

import feste
from feste import context
from feste.backend import Cohere, OpenAI
from feste.backend.prices import Price, builtin_prices, price_table
from feste.backend.spec import estimate_tokens
from feste.backend.types import Response, Usage
from feste.errors import OptionError
from feste.task import feste_task
from feste.testing import chat_text, count_tokens
from feste.usage import CachedRecord, record_usage

KEY = "sk-test-cost-0123456789"
GPT = "gpt-4o-mini"
EMBED = "text-embedding-3-small"
COMMAND = "command-a-03-2025"
MILLION = 1_000_000


def openai_llm(server, transport: str = "http", **kwargs) -> OpenAI:
    return OpenAI(api_key=KEY, base_url=server.openai_base_url, transport=transport, **kwargs)


def cohere_llm(server, transport: str = "http") -> Cohere:
    return Cohere(api_key=KEY, base_url=server.cohere_base_url, transport=transport)


@feste_task
def ask_eagerly(llm: OpenAI, question: str) -> str:
    """A plain task that calls a backend itself (it runs in a worker process)."""
    with context.set(eager=True):
        return llm.chat(question)


# -- the table ----------------------------------------------------------------------------


def test_the_price_table_is_dated_and_prices_every_default_model():
    table = builtin_prices()
    assert (table.date, table.currency) == ("2026-06-01", "USD")
    assert table.sources == ("https://openai.com/api/pricing/", "https://cohere.com/pricing")
    assert table.price("openai", GPT) == Price(
        input=0.15, cached_input=0.075, output=0.60, batch_input=0.075, batch_output=0.30
    )
    assert table.price("cohere", "rerank-v3.5") == Price(search=0.002)
    # A snapshot name takes its model's price; another name does not.
    assert table.price("openai", "gpt-4o-mini-2024-07-18") == table.price("openai", GPT)
    assert table.price("openai", "gpt-4o-minimal") is None
    assert table.price("cohere", GPT) is None
    for backend in (OpenAI, Cohere):
        for defaults in backend.method_defaults.values():
            assert table.price(backend.provider, defaults["model"]) is not None


def test_cost_arithmetic():
    price = Price(input=2.0, cached_input=0.5, output=8.0, search=0.002)
    # 600k uncached prompt tokens at $2, 400k cached at $0.5, 500k completion at $8.
    assert price.cost(Usage("m", MILLION, 500_000, cached_tokens=400_000)) == 1.2 + 0.2 + 4.0
    assert price.cost(Usage("m", search_units=3)) == 0.006
    assert Price(input=1.0).cost(Usage("m", 10)) == 0.00001
    assert Price(input=1.0).cost(Usage("m", 10, 5)) is None  # output has no price
    assert Price(input=1.0).cost(Usage("m", 4, cached_tokens=4)) == 0.000004  # input price


def test_user_prices_merge_over_the_table(tmp_path):
    with context.set(prices={"openai": {GPT: {"input": 1.0}, "my-model": {"output": 3}}}):
        table = price_table()
        assert table.price("openai", GPT) == Price(
            input=1.0, cached_input=0.075, output=0.60, batch_input=0.075, batch_output=0.30
        )
        assert table.price("openai", "my-model") == Price(output=3.0)
        assert table.date == "2026-06-01"
    path = tmp_path / "prices.toml"
    path.write_text('date = "2027-01-01"\n[cohere."command-a-03-2025"]\noutput = 12.5\n')
    with context.set(prices=str(path)):
        assert price_table().date == "2027-01-01"
        assert price_table().price("cohere", COMMAND) == Price(input=2.5, output=12.5)
    assert price_table() is builtin_prices()


@pytest.mark.parametrize(
    ("prices", "message"),
    [
        ({"openai": {GPT: {"inptu": 1.0}}}, "openai.gpt-4o-mini has unknown field 'inptu'"),
        ({"openai": {GPT: {"input": -1}}}, "must be a number of dollars >= 0, got -1"),
        ({"openai": {GPT: 0.15}}, "openai.gpt-4o-mini must be a table of prices"),
        ({"openai": 3}, "'openai' must be a table of models"),
        ("/nonexistent/prices.toml", "'/nonexistent/prices.toml': cannot be read"),
    ],
)
def test_bad_price_tables_are_refused_by_name(prices, message):
    with context.set(prices=prices), pytest.raises(OptionError) as raised:
        price_table()
    assert "invalid price table" in str(raised.value)
    assert message in str(raised.value)


def test_cached_prompt_tokens_are_read_from_both_providers():
    llm = OpenAI(api_key=KEY)
    request = llm.build_request("chat", ["hi"], {})
    body = {
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": {"content": "ok"}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": 2000,
            "completion_tokens": 10,
            "prompt_tokens_details": {"cached_tokens": 1024},
        },
    }
    usage = llm.parse_response(request, Response(200, body)).usage
    assert usage == Usage("gpt-4o-mini-2024-07-18", 2000, 10, cached_tokens=1024)
    expected = (976 * 0.15 + 1024 * 0.075 + 10 * 0.60) / MILLION
    assert price_table().cost("openai", usage) == pytest.approx(expected, abs=1e-15)
    co = Cohere(api_key=KEY)
    cohere_body = {
        "id": "x",
        "finish_reason": "COMPLETE",
        "message": {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
        "usage": {"tokens": {"input_tokens": 30, "output_tokens": 2}, "cached_tokens": 16},
    }
    parsed = co.parse_response(co.build_request("chat", ["hi"], {}), Response(200, cohere_body))
    assert parsed.usage == Usage(COMMAND, 30, 2, cached_tokens=16)
    # Billed units, when given, are what is billed (tokens include Cohere's own).
    cohere_body["usage"]["billed_units"] = {"input_tokens": 20, "output_tokens": 1}
    parsed = co.parse_response(co.build_request("chat", ["hi"], {}), Response(200, cohere_body))
    assert parsed.usage == Usage(COMMAND, 20, 1, cached_tokens=16)


# -- dollars after a run --------------------------------------------------------------


@pytest.mark.parametrize("transport", ["http", "sdk"])
@pytest.mark.parametrize("scheduler", ["async", "processes"])
def test_dollars_match_the_price_table(llm_server, transport, scheduler):
    llm = openai_llm(llm_server, transport)
    co = cohere_llm(llm_server, transport)
    questions = ["what is a cat", "what is a dog", "and a cow"]
    texts = ["alpha", "beta gamma"]
    with record_usage() as usage:
        feste.compute(
            [llm.chat(q) for q in questions],
            [llm.embed(t) for t in texts],
            co.rerank("apple", ["an apple", "a pear"]),
            co.chat("hi"),
            scheduler=scheduler,
            num_workers=2,
        )
    # Every request the server answered is recorded, in this process or a worker's.
    assert usage.requests == llm_server.stats()["requests"] == 6
    chat_prompt = sum(count_tokens(q) for q in questions)
    chat_completion = sum(count_tokens(chat_text(GPT, q)) for q in questions)
    embed_prompt = sum(count_tokens(t) for t in texts)
    cohere_prompt, cohere_completion = count_tokens("hi"), count_tokens(chat_text(COMMAND, "hi"))
    assert usage.by_model() == {
        ("openai", GPT): Usage(GPT, chat_prompt, chat_completion),
        ("openai", EMBED): Usage(EMBED, embed_prompt),
        ("cohere", "rerank-v3.5"): Usage("rerank-v3.5", search_units=1),
        ("cohere", COMMAND): Usage(COMMAND, cohere_prompt, cohere_completion),
    }
    expected = {
        ("openai", GPT): (chat_prompt * 0.15 + chat_completion * 0.60) / MILLION,
        ("openai", EMBED): embed_prompt * 0.02 / MILLION,
        ("cohere", "rerank-v3.5"): 0.002,
        ("cohere", COMMAND): (cohere_prompt * 2.50 + cohere_completion * 10.00) / MILLION,
    }
    assert usage.cost_by_model() == pytest.approx(expected, abs=1e-12)
    assert usage.cost == pytest.approx(sum(expected.values()), abs=1e-12)
    assert usage.unpriced == []
    summary = usage.summary()
    assert f"openai  {GPT}  3  {chat_prompt}  {chat_completion}  $" in summary
    assert f"${usage.cost:.6f}" in summary


def test_requests_of_plain_tasks_in_processes_are_recorded(llm_server):
    llm = openai_llm(llm_server)
    with record_usage() as usage, context.set(python_executor="processes", num_workers=2):
        answers = feste.compute([ask_eagerly(llm, f"q{i}") for i in range(3)])[0]
    assert answers == [chat_text(GPT, f"q{i}") for i in range(3)]
    assert usage.requests == llm_server.stats()["requests"] == 3
    assert usage.total == Usage(
        GPT,
        sum(count_tokens(f"q{i}") for i in range(3)),
        sum(count_tokens(chat_text(GPT, f"q{i}")) for i in range(3)),
    )


def test_user_prices_and_unpriced_models(llm_server):
    llm = openai_llm(llm_server)
    with record_usage() as usage, context.set(prices={"openai": {GPT: {"output": 100.0}}}):
        feste.compute(llm.chat("hello"), llm.chat("hello", model="my-local-model"))
    completion = count_tokens(chat_text(GPT, "hello"))
    assert usage.cost_by_model() == {
        ("openai", GPT): pytest.approx((count_tokens("hello") * 0.15 + completion * 100) / MILLION),
        ("openai", "my-local-model"): None,
    }
    assert usage.unpriced == [("openai", "my-local-model")]
    assert "unpriced" in usage.summary()


def test_calls_the_cache_answers_are_counted_as_saved(llm_server, tmp_path):
    llm = openai_llm(llm_server)
    store = str(tmp_path / "cache.sqlite")
    values = [llm.chat(f"question {i}", full=True) for i in range(3)]
    values += [llm.embed(t) for t in ("one", "two words")]
    with record_usage() as first:
        feste.compute(values, cache=store)
    assert first.cached_calls == 0 and first.saved_cost == 0
    llm_server.reset_stats()
    with record_usage() as second:
        feste.compute(values, cache=store)
    assert llm_server.stats()["requests"] == 0
    assert second.requests == 0 and second.cost == 0
    assert second.cached_calls == 5
    # Whole answers carry their usage; the embeddings' tokens are estimated from the texts,
    # which here is the server's own count.
    assert second.saved == first.total
    assert second.saved_cost == pytest.approx(first.cost, abs=1e-12)
    by_method = {entry.method: entry for entry in second.cached}
    assert isinstance(by_method["embed"], CachedRecord)
    assert "cache: 5 calls answered" in second.summary()


# -- before a run ------------------------------------------------------------------------


def test_explain_estimates_tokens_and_dollars_before_sending(llm_server):
    llm = openai_llm(llm_server)
    co = cohere_llm(llm_server)
    questions = ["hello there", "what is a cat", "tell me more"]
    texts = [f"text number {i}" for i in range(10)]
    values = [llm.chat(q, max_tokens=10) for q in questions]
    values += [llm.embed(t) for t in texts]
    values += [co.rerank("apple", ["an apple", "a pear"]), llm.chat(llm.chat("a"))]
    stats = feste.explain(values)
    assert llm_server.stats()["requests"] == 0
    # A known chat input: its messages' tokens (4 characters each, 4 of framing per
    # message), and max_tokens of output; an input known only at run time counts 0.
    chat_input = sum(estimate_tokens(q) + 4 for q in questions) + estimate_tokens("a") + 4
    chat_output = 10 * 3 + estimate_tokens("a") + 4  # without max_tokens: as long as its input
    embed_input = sum(estimate_tokens(t) for t in texts)
    assert stats.estimated_usage == {
        "openai.chat": Usage(GPT, chat_input, chat_output),
        "openai.embed": Usage(EMBED, embed_input),
        "cohere.rerank": Usage("rerank-v3.5", search_units=1),
    }
    expected = {
        "openai.chat": (chat_input * 0.15 + chat_output * 0.60) / MILLION,
        "openai.embed": embed_input * 0.02 / MILLION,
        "cohere.rerank": 0.002,
    }
    assert stats.estimated_cost == pytest.approx(expected, abs=1e-12)
    assert stats.total_cost == pytest.approx(sum(expected.values()), abs=1e-12)
    assert stats.unknown_inputs == 1
    assert stats.price_date == "2026-06-01"
    text = str(stats)
    assert "  openai.embed: 10 calls -> 1 request" in text  # the existing lines stay
    assert f"estimated cost: ${stats.total_cost:.6f} at list prices of 2026-06-01" in text
    assert "  cohere.rerank: 1 search, $0.002000" in text
    assert "(1 call with inputs known only at run time counted without input tokens)" in text
    unpriced = feste.explain(llm.chat("x", model="my-local-model"))
    assert unpriced.estimated_cost == {"openai.chat": None}
    assert unpriced.total_cost is None
    assert "estimated cost: unknown" in str(unpriced)
