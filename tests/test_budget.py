"""The budget (``max_cost``): refused before a run, enforced per request, counted at
the local server.

Costs follow from the rule the docs state: a chat request reserves its estimated
input tokens (the message's tokens, 4 of framing, plus ``max_tokens``) at the input
price and ``max_tokens`` (else ``ASSUMED_OUTPUT_TOKENS``) at the output price; it is
then charged what the server reports (``count_tokens`` of the message and of the
answer). Every request reserves only while what was spent plus what is reserved fits,
so the number of requests sent depends on the costs alone: with a reservation ``r``
and a charge ``a`` per request, ``N = floor((budget - r) / a) + 1`` are sent. Budgets
below sit half a charge past a boundary, so float rounding cannot move ``N``.
"""

from __future__ import annotations

import asyncio
import pickle
from typing import Any

import dask
import pytest

import feste
from feste import Failure, context
from feste.backend import Cohere, OpenAI
from feste.backend.prices import builtin_prices
from feste.backend.types import Usage
from feste.errors import BudgetExceeded, ConfigurationError, OptionError, SchedulerError
from feste.limits import ASSUMED_INPUT_TOKENS, ASSUMED_OUTPUT_TOKENS
from feste.testing import chat_text, count_tokens

MODEL = "gpt-4o-mini"
PRICE = builtin_prices().price("openai", MODEL)
assert PRICE is not None and PRICE.input is not None and PRICE.output is not None
INPUT, OUTPUT = PRICE.input / 1e6, PRICE.output / 1e6
FRAMING = 4  # tokens of framing a chat message counts in the request's own estimate


def reservation(prompt: str, max_tokens: int | None = None) -> float:
    """What one chat request sets aside before it is sent."""
    input_tokens = count_tokens(prompt) + FRAMING + (max_tokens or 0)
    return input_tokens * INPUT + (max_tokens or ASSUMED_OUTPUT_TOKENS) * OUTPUT


def charge(prompt: str, max_tokens: int | None = None) -> float:
    """What the server bills one chat request (its reported usage)."""
    answer_tokens = count_tokens(chat_text(MODEL, prompt))
    if max_tokens is not None:
        answer_tokens = min(answer_tokens, max_tokens)
    return count_tokens(prompt) * INPUT + answer_tokens * OUTPUT


def budget_for(sent: int, reserved: float, charged: float) -> float:
    """A budget that lets exactly ``sent`` requests out, half a charge past the edge."""
    return reserved + (sent - 1) * charged + charged / 2


def openai(server: Any) -> OpenAI:
    return OpenAI(base_url=server.openai_base_url, api_key="k")


PROMPTS = [f"question {index:02d}" for index in range(20)]  # all the same length


def split(values: list[Any]) -> tuple[list[Any], list[Failure]]:
    answered = [value for value in values if not isinstance(value, Failure)]
    failed = [value for value in values if isinstance(value, Failure)]
    return answered, failed


# -- the options ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("max_cost", 0, "must be a positive finite number of dollars (max_cost=5.0)"),
        ("max_cost", -2.5, "must be a positive finite number of dollars"),
        ("max_cost", float("inf"), "must be a positive finite number of dollars"),
        ("max_cost", "5", "expected a positive number of dollars (max_cost=5.0) or None"),
        ("max_cost", True, "expected a positive number of dollars"),
        ("over_estimate", "ignore", "must be one of 'refuse', 'start'; got 'ignore'"),
    ],
)
def test_bad_budget_options_are_refused_by_name_before_anything_is_sent(
    name: str, value: Any, reason: str, llm_server: Any
) -> None:
    call = openai(llm_server).chat("hello")
    with pytest.raises(OptionError) as raised:
        feste.compute(call, **{name: value})
    assert f"invalid value for feste option {name!r}" in str(raised.value)
    assert reason in str(raised.value)
    with pytest.raises(OptionError, match=f"feste option {name!r}"), context.set(**{name: value}):
        pass  # pragma: no cover - never entered
    assert llm_server.stats()["requests"] == 0


# -- before the run ---------------------------------------------------------------------


def test_a_run_estimated_above_the_budget_is_refused_with_the_estimate(llm_server: Any) -> None:
    calls = [openai(llm_server).chat(prompt) for prompt in PROMPTS]
    estimate = round(sum(reservation(prompt) for prompt in PROMPTS), 12)
    with pytest.raises(BudgetExceeded) as raised:
        feste.compute(calls, max_cost=0.001)
    error = raised.value
    assert error.estimate == pytest.approx(estimate, abs=1e-12)
    assert (error.budget, error.spent, error.unknown_inputs) == (0.001, 0.0, 0)
    assert str(error) == (
        f"estimated cost ${estimate:.6f} of 20 calls (20 requests) is above "
        "max_cost=$0.001000 (20 requests without max_tokens counted at "
        f"{ASSUMED_OUTPUT_TOKENS} output tokens per answer); nothing was sent. Raise "
        "max_cost, set max_tokens for a tighter estimate, or pass over_estimate='start' "
        "to run anyway (no request is sent once the budget would be passed)"
    )
    assert llm_server.stats()["requests"] == 0

    # The same budget set in the context; a budget above the estimate runs everything.
    with context.set(max_cost=0.001), pytest.raises(BudgetExceeded):
        feste.compute(calls)
    (values,) = feste.compute(calls, max_cost=estimate * 1.01)
    assert values == [chat_text(MODEL, prompt) for prompt in PROMPTS]
    assert llm_server.stats()["requests"] == 20


def test_calls_fed_by_other_calls_are_estimated_at_an_assumed_size_not_zero(
    llm_server: Any,
) -> None:
    llm = openai(llm_server)
    firsts = [llm.chat(prompt, max_tokens=10) for prompt in PROMPTS[:3]]
    seconds = [llm.chat(first, max_tokens=10) for first in firsts]
    # A second call's message is assumed ASSUMED_INPUT_TOKENS long.
    assumed = (ASSUMED_INPUT_TOKENS + FRAMING + 10) * INPUT + 10 * OUTPUT
    estimate = sum(reservation(prompt, 10) for prompt in PROMPTS[:3]) + 3 * assumed
    with pytest.raises(BudgetExceeded) as raised:
        feste.compute(seconds, max_cost=estimate * 0.99)
    assert raised.value.unknown_inputs == 3
    assert raised.value.estimate == pytest.approx(estimate, abs=1e-12)
    assert (
        f"(3 calls whose input comes from another call counted at {ASSUMED_INPUT_TOKENS} "
        "input tokens each); nothing was sent"
    ) in str(raised.value)
    assert llm_server.stats()["requests"] == 0


def test_every_entry_point_refuses_before_sending(llm_server: Any) -> None:
    calls = [openai(llm_server).chat(prompt) for prompt in PROMPTS[:4]]
    with pytest.raises(BudgetExceeded, match="nothing was sent"):
        asyncio.run(feste.compute_async(calls, max_cost=0.0001))
    with pytest.raises(BudgetExceeded, match="nothing was sent"):
        asyncio.run(feste.compute_async(calls, max_cost=0.0001, scheduler="threads"))
    with pytest.raises(BudgetExceeded, match="nothing was sent"):
        feste.as_completed(calls, max_cost=0.0001)
    with pytest.raises(BudgetExceeded, match="nothing was sent"):
        dask.compute(calls, max_cost=0.0001)
    with pytest.raises(BudgetExceeded, match="nothing was sent"):
        calls[0].compute(max_cost=0.0001)
    assert llm_server.stats()["requests"] == 0


def test_a_model_missing_from_the_price_table_is_refused_by_name(llm_server: Any) -> None:
    llm = openai(llm_server)
    calls = [llm.chat(prompt, model="house-model") for prompt in PROMPTS[:2]]
    with pytest.raises(ConfigurationError) as raised:
        feste.compute(calls, max_cost=1.0, over_estimate="start")
    message = str(raised.value)
    assert "max_cost needs the price of openai model 'house-model'" in message
    assert "feste.context.set(prices={'openai': {'house-model': {'input'" in message
    assert llm_server.stats()["requests"] == 0
    # Given a price, the same run goes.
    prices = {"openai": {"house-model": {"input": 0.15, "output": 0.6}}}
    with context.set(prices=prices):
        (values,) = feste.compute(calls, max_cost=1.0)
    assert values == [chat_text("house-model", prompt) for prompt in PROMPTS[:2]]


def test_schedulers_that_cannot_enforce_a_budget_refuse_it_by_name(llm_server: Any) -> None:
    calls = [openai(llm_server).chat(prompt) for prompt in PROMPTS[:2]]
    with pytest.raises(SchedulerError) as raised:
        feste.compute(calls, scheduler=dask.get, max_cost=1.0)
    assert str(raised.value) == (
        "max_cost is enforced by feste's own schedulers ('async', 'processes', 'sync', "
        "'threads'), not by the get function 'get_sync', which cannot keep one budget for "
        "the whole computation: use one of those schedulers, or leave max_cost unset"
    )
    assert llm_server.stats()["requests"] == 0


@pytest.mark.slow
def test_the_cluster_scheduler_refuses_a_budget(llm_server: Any) -> None:
    distributed = pytest.importorskip("distributed")
    calls = [openai(llm_server).chat(prompt) for prompt in PROMPTS[:2]]
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        with pytest.raises(SchedulerError, match=r"not by the cluster scheduler \(a distri"):
            feste.compute(calls, scheduler=client, max_cost=1.0)
        with context.set(max_cost=1.0), pytest.raises(SchedulerError, match="cluster"):
            feste.compute(calls, scheduler=client)
    assert llm_server.stats()["requests"] == 0


def test_cache_hits_cost_nothing_and_reserve_nothing(llm_server: Any, tmp_path: Any) -> None:
    calls = [openai(llm_server).chat(prompt) for prompt in PROMPTS[:6]]
    cache = tmp_path / "cache.db"
    (first,) = feste.compute(calls, cache=cache)
    assert llm_server.stats()["requests"] == 6
    # A budget smaller than one request: every call is answered by the cache.
    (again,) = feste.compute(calls, cache=cache, max_cost=charge(PROMPTS[0]) / 2)
    assert again == first
    assert llm_server.stats()["requests"] == 6


# -- while running ----------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["async", "threads", "sync", "processes"])
def test_no_request_is_sent_past_the_budget(scheduler: str, llm_server: Any) -> None:
    # Without max_tokens each request reserves ASSUMED_OUTPUT_TOKENS of output: one in
    # flight at a time; each is charged its short echo, so exactly 5 fit.
    reserved, charged = reservation(PROMPTS[0]), charge(PROMPTS[0])
    assert 2 * reserved > budget_for(5, reserved, charged)
    calls = [openai(llm_server).chat(prompt) for prompt in PROMPTS]
    (values,) = feste.compute(
        calls,
        scheduler=scheduler,
        max_cost=budget_for(5, reserved, charged),
        over_estimate="start",
        errors="return",
    )
    answered, failed = split(values)
    assert llm_server.stats()["requests"] == 5
    assert len(answered) == len(set(answered)) == 5
    assert set(answered) <= {chat_text(MODEL, prompt) for prompt in PROMPTS}
    assert len(failed) == 15
    for failure in failed:
        error = failure.exception
        assert isinstance(error, BudgetExceeded)
        assert (error.estimate, error.spent) == (
            pytest.approx(reserved, abs=1e-12),
            pytest.approx(5 * charged, abs=1e-12),
        )
        assert str(error).startswith(
            f"[openai.chat model={MODEL} task={failure.key!r}] not sent: it may cost up to "
            f"${reserved:.6f} and ${5 * charged:.6f} of max_cost=$"
        )
        assert "raise max_cost to run the calls left" in str(error)


@pytest.mark.parametrize("scheduler", ["async", "threads"])
def test_concurrent_requests_never_reserve_past_the_budget(scheduler: str, llm_server: Any) -> None:
    # With max_tokens=4 a request reserves little, so several are in flight at once;
    # the answers are cut at 4 tokens, so each is charged exactly its 4 output tokens.
    llm_server.configure(latency=0.1)
    reserved, charged = reservation(PROMPTS[0], 4), charge(PROMPTS[0], 4)
    budget = budget_for(8, reserved, charged)
    assert budget > 4 * reserved  # room for several at once
    calls = [openai(llm_server).chat(prompt, max_tokens=4) for prompt in PROMPTS]
    (values,) = feste.compute(
        calls,
        scheduler=scheduler,
        max_cost=budget,
        over_estimate="start",
        errors="return",
        on_truncation="ignore",
        num_workers=8,
    )
    answered, failed = split(values)
    stats = llm_server.stats()
    assert stats["requests"] == 8
    assert stats["max_in_flight"] > 1
    assert len(answered) == 8
    assert [type(failure.exception) for failure in failed] == [BudgetExceeded] * 12
    billed = stats["billed"][MODEL]
    assert billed["prompt_tokens"] * INPUT + billed["completion_tokens"] * OUTPUT <= budget


def test_with_errors_raise_the_first_refusal_is_raised(llm_server: Any) -> None:
    reserved, charged = reservation(PROMPTS[0]), charge(PROMPTS[0])
    calls = [openai(llm_server).chat(prompt) for prompt in PROMPTS]
    with pytest.raises(BudgetExceeded, match="not sent: it may cost up to"):
        feste.compute(calls, max_cost=budget_for(3, reserved, charged), over_estimate="start")
    assert llm_server.stats()["requests"] == 3


def test_as_completed_stops_sending_at_the_budget(llm_server: Any) -> None:
    reserved, charged = reservation(PROMPTS[0]), charge(PROMPTS[0])
    calls = [openai(llm_server).chat(prompt) for prompt in PROMPTS[:10]]
    stream = feste.as_completed(
        calls, max_cost=budget_for(4, reserved, charged), over_estimate="start"
    )
    with stream:
        values = [value for _, value in stream]
    answered, failed = split(values)
    assert (len(answered), len(failed)) == (4, 6)
    assert all(isinstance(failure.exception, BudgetExceeded) for failure in failed)
    assert llm_server.stats()["requests"] == 4


def test_failed_attempts_cost_nothing(llm_server: Any) -> None:
    # Two calls fail (503 on every attempt), one succeeds; all three are the same
    # length, so they reserve alike. The budget fits the success's charge plus one
    # reservation, not two reservations: if a failure kept its reservation, whatever
    # came after it would be refused.
    bad = ["[[status:503]] one", "[[status:503]] two"]
    good = "an ordinary text!!"
    assert len({len(text) for text in [*bad, good]}) == 1
    reserved, charged = reservation(good), charge(good)
    budget = charged + reserved + charged / 4
    assert budget < 2 * reserved
    llm = openai(llm_server)
    (values,) = feste.compute(
        [llm.chat(text) for text in [*bad, good]],
        max_cost=budget,
        over_estimate="start",
        errors="return",
        max_retries=1,
        retry_backoff=0.0,
    )
    assert values[2] == chat_text(MODEL, good)
    assert [type(value.exception).__name__ for value in values[:2]] == ["TransientError"] * 2
    stats = llm_server.stats()
    assert stats["status_counts"] == {"200": 1, "503": 4}


def test_a_refusal_keeps_its_numbers_through_pickling(llm_server: Any) -> None:
    # Process pools and cluster workers hand errors back pickled.
    calls = [openai(llm_server).chat(prompt) for prompt in PROMPTS[:3]]
    with pytest.raises(BudgetExceeded) as raised:
        feste.compute(calls, max_cost=0.0001)
    copy = pickle.loads(pickle.dumps(raised.value))
    assert type(copy) is BudgetExceeded
    assert (copy.estimate, copy.budget, copy.spent, copy.unknown_inputs) == (
        raised.value.estimate,
        0.0001,
        0.0,
        0,
    )
    assert str(copy) == str(raised.value)
    assert isinstance(copy, feste.FesteError)


def test_embeddings_and_reranks_are_priced_by_what_they_are_billed(llm_server: Any) -> None:
    texts = [f"text number {index}" for index in range(10)]
    cohere = Cohere(base_url=llm_server.cohere_base_url, api_key="k")
    embed_price = builtin_prices().price("cohere", "embed-v4.0")
    search_price = builtin_prices().price("cohere", "rerank-v3.5")
    assert embed_price is not None and search_price is not None
    assert embed_price.input is not None and search_price.search is not None
    # Embeddings: their input tokens, no output. Reranks: one search per 100 documents.
    embed_cost = sum(count_tokens(text) for text in texts) * embed_price.input / 1e6
    documents = [f"document {index}" for index in range(150)]
    rerank_cost = 2 * search_price.search
    vectors = [cohere.embed(text) for text in texts]
    ranking = cohere.rerank("which document?", documents)
    with pytest.raises(BudgetExceeded) as raised:
        feste.compute(vectors, ranking, max_cost=(embed_cost + rerank_cost) * 0.99)
    assert raised.value.estimate == pytest.approx(embed_cost + rerank_cost, abs=1e-12)
    assert "of 11 calls (2 requests)" in str(raised.value)
    # Started anyway under a budget below the batched embedding's cost: its one request
    # is not sent and each of its items fails, and the rerank costs more still.
    (failed, refused) = feste.compute(
        vectors, ranking, max_cost=embed_cost * 0.9, over_estimate="start", errors="return"
    )
    assert [type(value.exception) for value in failed] == [BudgetExceeded] * 10
    assert isinstance(refused.exception, BudgetExceeded)
    assert llm_server.stats()["requests"] == 0
    # A budget that fits the embeddings only.
    (embedded, refused) = feste.compute(
        vectors, ranking, max_cost=embed_cost * 1.01, over_estimate="start", errors="return"
    )
    assert len(embedded) == 10 and not any(isinstance(value, Failure) for value in embedded)
    assert isinstance(refused.exception, BudgetExceeded)
    assert llm_server.stats()["by_route"] == {"/v2/embed": 1}


def test_in_eager_mode_the_budget_bounds_each_call_alone(llm_server: Any) -> None:
    llm = openai(llm_server)
    reserved = reservation(PROMPTS[0])
    with (
        context.set(eager=True, max_cost=reserved * 0.99),
        pytest.raises(BudgetExceeded, match="not sent: it may cost up to"),
    ):
        llm.chat(PROMPTS[0])
    assert llm_server.stats()["requests"] == 0
    # Each eager call is a computation of its own: every one fits a budget of one call.
    with context.set(eager=True, max_cost=reserved * 1.01):
        values = [llm.chat(prompt) for prompt in PROMPTS[:3]]
    assert values == [chat_text(MODEL, prompt) for prompt in PROMPTS[:3]]
    assert llm_server.stats()["requests"] == 3


# -- Batch API jobs ---------------------------------------------------------------------

BATCH_FAST = {"batch_api_poll": 0.02, "batch_api_window": 0.02}


def batch_reservation(prompt: str) -> float:
    """What one chat request sent through a Batch API job sets aside (batch prices)."""
    input_tokens = count_tokens(prompt) + FRAMING
    cost = PRICE.cost(Usage(MODEL, input_tokens, ASSUMED_OUTPUT_TOKENS), batch=True)
    assert cost is not None
    return cost


def batch_charge(prompt: str) -> float:
    answer_tokens = count_tokens(chat_text(MODEL, prompt))
    cost = PRICE.cost(Usage(MODEL, count_tokens(prompt), answer_tokens), batch=True)
    assert cost is not None
    return cost


def test_batch_api_calls_are_estimated_and_charged_at_batch_prices(llm_server: Any) -> None:
    assert batch_reservation(PROMPTS[0]) < reservation(PROMPTS[0]) / 1.9
    budget = 20 * batch_reservation(PROMPTS[0]) * 1.01  # the batch estimate fits, not online
    assert budget < 20 * reservation(PROMPTS[0])
    calls = [openai(llm_server).chat(prompt) for prompt in PROMPTS]
    with pytest.raises(BudgetExceeded, match=r"estimated cost \$0\.\d+ of 20 calls"):
        feste.compute(calls, max_cost=budget)
    assert llm_server.stats()["requests"] == 0
    with feste.record_usage() as usage:
        (values,) = feste.compute(calls, max_cost=budget, batch_api=True, **BATCH_FAST)
    assert values == [chat_text(MODEL, prompt) for prompt in PROMPTS]
    assert llm_server.stats()["batches"]["lines_answered"] == 20
    assert usage.cost == pytest.approx(20 * batch_charge(PROMPTS[0]), abs=1e-12)


def test_batch_api_calls_are_not_sent_past_the_budget(llm_server: Any) -> None:
    # As online: one reservation at a time fits, each call is charged its short echo at
    # batch prices, so exactly 5 calls go into jobs (one job each, in turn).
    reserved, charged = batch_reservation(PROMPTS[0]), batch_charge(PROMPTS[0])
    budget = budget_for(5, reserved, charged)
    assert 2 * reserved > budget
    calls = [openai(llm_server).chat(prompt) for prompt in PROMPTS]
    (values,) = feste.compute(
        calls,
        max_cost=budget,
        over_estimate="start",
        errors="return",
        batch_api=True,
        **BATCH_FAST,
    )
    answered, failed = split(values)
    batches = llm_server.stats()["batches"]
    assert (batches["jobs_created"], batches["lines_answered"]) == (5, 5)
    assert len(answered) == 5 and len(failed) == 15
    for failure in failed:
        assert isinstance(failure.exception, BudgetExceeded)
        assert failure.exception.spent == pytest.approx(5 * charged, abs=1e-12)


def test_batch_calls_that_may_go_online_reserve_online_prices(llm_server: Any) -> None:
    # batch_api_on_expiry="online": an expired job's calls are sent online, so the
    # estimate before the run is at online prices, the most they may cost.
    budget = 20 * batch_reservation(PROMPTS[0]) * 1.01
    calls = [openai(llm_server).chat(prompt) for prompt in PROMPTS]
    with pytest.raises(BudgetExceeded):
        feste.compute(calls, max_cost=budget, batch_api=True, batch_api_on_expiry="online")
    assert llm_server.stats()["requests"] == 0
    assert llm_server.stats()["batches"]["jobs_created"] == 0


def test_batch_calls_sent_online_after_an_expired_job_are_charged_online(
    llm_server: Any,
) -> None:
    # Every job expires and its call goes online: reserved and charged at online prices,
    # so a budget for 5 online calls lets exactly 5 through, as online.
    llm_server.configure(batch_expire_jobs=100)
    reserved, charged = reservation(PROMPTS[0]), charge(PROMPTS[0])
    calls = [openai(llm_server).chat(prompt) for prompt in PROMPTS]
    (values,) = feste.compute(
        calls,
        max_cost=budget_for(5, reserved, charged),
        over_estimate="start",
        errors="return",
        batch_api=True,
        batch_api_on_expiry="online",
        **BATCH_FAST,
    )
    answered, failed = split(values)
    stats = llm_server.stats()
    assert (stats["batches"]["jobs_expired"], stats["by_route"]["/v1/chat/completions"]) == (5, 5)
    assert len(answered) == 5 and len(failed) == 15
    assert all(isinstance(failure.exception, BudgetExceeded) for failure in failed)
