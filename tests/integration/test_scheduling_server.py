"""What the async engine does first, observed at the server: the critical path, and
calls batched as their inputs arrive instead of waiting for the slowest one."""

from __future__ import annotations

import threading

import pytest

import feste
from feste.backend.openai import OpenAI
from feste.testing import chat_text, embedding, wait_until

pytestmark = pytest.mark.slow

CHAT = "/v1/chat/completions"
EMBED = "/v1/embeddings"


def test_a_chain_of_calls_goes_before_hundreds_of_independent_ones(llm_server_factory):
    server = llm_server_factory(latency=0.005)
    llm = OpenAI(base_url=server.openai_base_url, api_key="k", max_concurrency=4)
    independent = [llm.chat(f"independent {index}") for index in range(300)]
    link = llm.chat("chain start")
    chain = [link]
    for _ in range(4):
        link = llm.chat(link)
        chain.append(link)
    # The chain is written last: submission order alone would send it last.
    (independent_out, chain_out) = feste.compute(independent, chain)
    assert independent_out[299] == chat_text("gpt-4o-mini", "independent 299")
    expected = "chain start"
    for value in chain_out:
        expected = chat_text("gpt-4o-mini", expected)
        assert value == expected
    arrivals = [texts[0] for texts in server.stats()["inputs"][CHAT]]
    positions = [arrivals.index(text) for text in ["chain start", *chain_out[:4]]]
    assert positions == sorted(positions)
    # Each link is admitted as soon as a slot frees after the previous one answered:
    # the whole chain arrives within the first half of the 305 requests.
    assert positions[-1] < 305 // 2


def test_embeds_of_answers_go_out_before_the_slowest_answer(llm_server_factory):
    server = llm_server_factory(hang_seconds=3)
    llm = OpenAI(base_url=server.openai_base_url, api_key="k")
    questions = [f"question {index}" for index in range(10)]
    questions[7] += " [[hang]]"
    vectors = [llm.embed(llm.chat(question)) for question in questions]
    outcome: list[object] = []
    runner = threading.Thread(target=lambda: outcome.extend(feste.compute(vectors)))
    runner.start()
    # The embeddings of the nine quick answers leave while the slow chat still hangs.
    assert wait_until(lambda: server.stats()["by_route"].get(EMBED, 0) >= 1)
    stats = server.stats()
    assert stats["in_flight"] >= 1
    assert stats["status_counts"].get("200", 0) < 20  # not everything is answered yet
    runner.join(30)
    (values,) = outcome
    for question, value in zip(questions, values):
        assert value == embedding("text-embedding-3-small", chat_text("gpt-4o-mini", question))
    sent = [text for request in server.stats()["inputs"][EMBED] for text in request]
    assert len(sent) == 10
