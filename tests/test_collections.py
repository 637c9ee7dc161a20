"""feste.map over real dask.dataframe and dask.bag collections (and pandas), against the
local test server: exact results in row order, batching and dedupe inside partitions,
one cap across partitions run in parallel threads, failed rows isolated, the cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask
import dask.bag as db
import dask.dataframe as dd
import pandas as pd
import pytest
from pydantic import BaseModel

import feste
from feste import context
from feste.backend.openai import OpenAI
from feste.errors import BadRequestError, OptionError
from feste.testing import TestServer, chat_text, count_tokens, embedding

CHAT_MODEL = "gpt-4o-mini"
EMBED_MODEL = "text-embedding-3-small"
CHATS = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"
STRING_DTYPES = ["object", "string[python]", "string[pyarrow]"]


class Label(BaseModel):
    label: str
    tokens: int


def openai(server: TestServer, **settings: Any) -> OpenAI:
    return OpenAI(base_url=server.openai_base_url, api_key="test-key", **settings)


def frame_of(texts: list[str], dtype: str, npartitions: int) -> dd.DataFrame:
    pandas_frame = pd.DataFrame(
        {"text": pd.Series(texts, dtype=dtype), "number": range(len(texts))}
    )
    return dd.from_pandas(pandas_frame, npartitions=npartitions, sort=False)


def threads(workers: int = 8) -> dict[str, Any]:
    return {"scheduler": "threads", "num_workers": workers}


# -- results --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", STRING_DTYPES)
def test_chat_over_a_series_gives_exact_results_in_row_order(
    llm_server: TestServer, dtype: str
) -> None:
    llm = openai(llm_server)
    texts = [f"question {index}" for index in range(60)]
    frame = frame_of(texts, dtype, npartitions=6)

    answers = feste.map(llm.chat, frame.text)

    assert isinstance(answers, dd.Series)
    assert answers.npartitions == 6
    assert answers.name == "result"
    values = answers.compute(**threads())
    assert values.tolist() == [chat_text(CHAT_MODEL, text) for text in texts]
    assert values.index.tolist() == list(range(60))
    assert llm_server.stats()["requests"] == 60


def test_results_compose_with_filters_joins_and_parquet(
    llm_server: TestServer, tmp_path: Path
) -> None:
    llm = openai(llm_server)
    texts = [f"item {index}" for index in range(40)]
    frame = frame_of(texts, "string[pyarrow]", npartitions=4)

    frame["answer"] = feste.map(llm.chat, frame.text, meta=("answer", "string"))
    kept = frame[frame.number % 2 == 0]
    kept.to_parquet(tmp_path / "answers", compute_kwargs=threads())

    back = dd.read_parquet(tmp_path / "answers").compute().sort_values("number")
    assert back.answer.tolist() == [chat_text(CHAT_MODEL, text) for text in texts[::2]]
    assert back.text.tolist() == texts[::2]


def test_a_pandas_series_gives_a_pandas_series(llm_server: TestServer) -> None:
    llm = openai(llm_server)
    texts = pd.Series(["a", "b", "c"], index=[10, 20, 30], dtype="string[pyarrow]")

    answers = feste.map(llm.chat, texts)

    assert isinstance(answers, pd.Series)
    assert answers.to_dict() == {
        index: chat_text(CHAT_MODEL, text) for index, text in texts.items()
    }


def test_structured_outputs_expand_into_columns(llm_server: TestServer) -> None:
    llm = openai(llm_server)
    texts = [f"classify item {index}" for index in range(12)]
    frame = frame_of(texts, "string[pyarrow]", npartitions=3)

    labels = feste.map(llm.chat, frame.text, response_format=Label)

    assert isinstance(labels, dd.DataFrame)
    assert list(labels.columns) == ["label", "tokens"]
    assert labels.dtypes.to_dict() == {"label": pd.StringDtype(), "tokens": pd.Int64Dtype()}
    values = labels.compute(**threads())
    # The server's structured answers: the source text for a string, its tokens for an int.
    assert values.label.tolist() == texts
    assert values.tokens.tolist() == [count_tokens(text) for text in texts]


def test_a_prompt_over_a_frame_takes_its_columns_as_variables(llm_server: TestServer) -> None:
    llm = openai(llm_server)
    frame = dd.from_pandas(
        pd.DataFrame({"title": ["Rain", "Sun"], "body": ["wet", "dry"], "unused": [1, 2]}),
        npartitions=2,
    )
    prompt = feste.Prompt("Summarize {{ title }}: {{ body }}")

    rendered = feste.map(prompt, frame)
    answers = feste.map(llm.chat, rendered)

    assert rendered.compute(**threads()).tolist() == ["Summarize Rain: wet", "Summarize Sun: dry"]
    assert answers.compute(**threads()).tolist() == [
        chat_text(CHAT_MODEL, "Summarize Rain: wet"),
        chat_text(CHAT_MODEL, "Summarize Sun: dry"),
    ]


def test_a_function_over_a_frame_gets_each_row_as_keywords(llm_server: TestServer) -> None:
    llm = openai(llm_server)
    frame = dd.from_pandas(pd.DataFrame({"name": ["Ada", "Bo"], "city": ["Oslo", "Rome"]}), 2)
    greet = feste.Prompt("Greet {{ name }} from {{ city }}")

    def greeting(name: str, city: str) -> Any:
        return llm.chat(greet(name=name, city=city))

    answers = feste.map(greeting, frame).compute(**threads())

    assert answers.tolist() == [
        chat_text(CHAT_MODEL, "Greet Ada from Oslo"),
        chat_text(CHAT_MODEL, "Greet Bo from Rome"),
    ]


def test_a_feste_task_over_a_series_and_a_bag(llm_server: TestServer) -> None:
    llm = openai(llm_server)

    @feste.feste_task(pure=True)
    def shout(text: str) -> str:
        return text.upper()

    def shouted_answer(text: str) -> Any:
        return shout(llm.chat(text))

    texts = ["a", "b", "c", "d"]
    frame = frame_of(texts, "string[pyarrow]", npartitions=2)

    assert feste.map(shout, frame.text).compute(**threads()).tolist() == ["A", "B", "C", "D"]
    answers = feste.map(shouted_answer, db.from_sequence(texts, npartitions=2))
    assert answers.compute(**threads()) == [chat_text(CHAT_MODEL, t).upper() for t in texts]


def test_a_bag_maps_each_element(llm_server: TestServer) -> None:
    llm = openai(llm_server)
    texts = [f"doc {index}" for index in range(30)]
    bag = db.from_sequence(texts, npartitions=3)

    vectors = feste.map(llm.embed, bag)

    assert isinstance(vectors, db.Bag)
    assert vectors.compute(**threads()) == [embedding(EMBED_MODEL, text, 8) for text in texts]
    # One batched request per partition.
    assert llm_server.stats()["items_per_request"][EMBEDDINGS] == [10, 10, 10]


def test_null_values_give_null_results_without_a_call(llm_server: TestServer) -> None:
    llm = openai(llm_server)
    texts = pd.Series(["a", None, "c"], dtype="string[pyarrow]")

    answers = feste.map(llm.chat, texts)

    assert answers.isna().tolist() == [False, True, False]
    assert llm_server.stats()["requests"] == 2


# -- guarantees inside a partition -----------------------------------------------------


def test_calls_in_a_partition_are_batched_and_deduplicated(llm_server: TestServer) -> None:
    llm = openai(llm_server)
    texts = [f"text {index % 5}" for index in range(40)]  # 5 distinct texts, 8 times each
    frame = frame_of(texts, "string[pyarrow]", npartitions=2)

    vectors = feste.map(llm.embed, frame.text).compute(**threads())

    assert vectors.tolist() == [embedding(EMBED_MODEL, text, 8) for text in texts]
    # Each partition sends its 5 distinct texts once, in one request.
    assert llm_server.stats()["items_per_request"][EMBEDDINGS] == [5, 5]


def test_explain_counts_calls_and_requests_before_computing(llm_server: TestServer) -> None:
    llm = openai(llm_server)
    texts = [f"text {index % 25}" for index in range(100)]
    frame = frame_of(texts, "string[pyarrow]", npartitions=4)
    vectors = feste.map(llm.embed, frame.text)

    stats = feste.explain(vectors)

    assert stats.calls == {"openai.embed": 100}
    assert stats.requests == {"openai.embed": 4}
    assert "openai.embed: 100 calls -> 4 requests" in str(stats)
    assert llm_server.stats()["requests"] == 0


def test_explain_of_other_values_is_unchanged(llm_server: TestServer) -> None:
    llm = openai(llm_server)
    stats = feste.explain([llm.embed("a"), llm.embed("b")])
    assert stats.calls == {"openai.embed": 2}
    assert stats.requests == {"openai.embed": 1}


# -- limits across partitions -----------------------------------------------------------


@pytest.mark.parametrize("where", ["context", "backend"])
def test_a_cap_holds_across_partitions_run_in_parallel(llm_server_factory: Any, where: str) -> None:
    cap = 4
    server = llm_server_factory(latency=0.03)
    llm = openai(server, max_concurrency=cap) if where == "backend" else openai(server)
    texts = [f"question {index}" for index in range(160)]
    frame = frame_of(texts, "string[pyarrow]", npartitions=16)

    if where == "context":
        with context.set(max_concurrency=cap):
            answers = feste.map(llm.chat, frame.text)
    else:
        answers = feste.map(llm.chat, frame.text)
    values = answers.compute(**threads(8))

    assert values.tolist() == [chat_text(CHAT_MODEL, text) for text in texts]
    stats = server.stats()
    assert stats["requests"] == 160
    # 8 partitions run at once: a cap per partition would let up to 32 in flight.
    assert stats["max_in_flight"] == cap


def test_two_collections_keep_their_own_caps(llm_server_factory: Any) -> None:
    server = llm_server_factory(latency=0.03)
    llm = openai(server)
    first = frame_of([f"a {index}" for index in range(40)], "object", npartitions=4)
    second = frame_of([f"b {index}" for index in range(40)], "object", npartitions=4)
    with context.set(max_concurrency=2):
        one = feste.map(llm.chat, first.text)
    with context.set(max_concurrency=3):
        two = feste.map(llm.chat, second.text)

    dask.compute(one, two, **threads(8))

    # Two computations, each capped on its own: together at most 2 + 3.
    assert server.stats()["max_in_flight"] == 5


# -- failures ---------------------------------------------------------------------------


def test_a_failed_row_is_isolated_with_errors_return(llm_server: TestServer) -> None:
    llm = openai(llm_server)
    texts = [f"row {index}" for index in range(20)]
    texts[7] = "row 7 [[status:400]]"
    frame = frame_of(texts, "string[pyarrow]", npartitions=2)

    answers = feste.map(llm.chat, frame.text, errors="return")

    assert list(answers.columns) == ["result", "error"]
    values = answers.compute(**threads())
    expected = [chat_text(CHAT_MODEL, text) for text in texts]
    expected[7] = None
    assert values.result.tolist() == [pd.NA if value is None else value for value in expected]
    assert values.error.isna().tolist() == [index != 7 for index in range(20)]
    assert values.error[7].startswith("BadRequestError: ")
    assert "HTTP 400" in values.error[7]


def test_a_failed_structured_row_has_null_fields(llm_server: TestServer) -> None:
    llm = openai(llm_server)
    texts = pd.Series(["fine", "broken [[invalid_json]]"])

    labels = feste.map(llm.chat, texts, response_format=Label, errors="return")

    assert labels.label.tolist() == ["fine", pd.NA]
    assert labels.tokens.isna().tolist() == [False, True]
    assert labels.error.isna().tolist() == [True, False]
    assert labels.error[1].startswith("StructuredOutputError: ")


def test_errors_raise_fails_the_computation_with_the_error(llm_server: TestServer) -> None:
    llm = openai(llm_server)
    frame = frame_of(["ok", "bad [[status:400]]"], "object", npartitions=2)

    answers = feste.map(llm.chat, frame.text)

    with pytest.raises(BadRequestError, match="HTTP 400"):
        answers.compute(**threads())


def test_a_failed_bag_element_is_a_failure_in_place(llm_server: TestServer) -> None:
    llm = openai(llm_server)
    bag = db.from_sequence(["a", "b [[status:400]]", "c"], npartitions=1)

    values = feste.map(llm.chat, bag, errors="return").compute(**threads())

    assert values[0] == chat_text(CHAT_MODEL, "a")
    assert values[2] == chat_text(CHAT_MODEL, "c")
    assert isinstance(values[1], feste.Failure)
    assert isinstance(values[1].exception, BadRequestError)


# -- the cache -------------------------------------------------------------------------


def test_a_second_run_is_served_by_the_cache(llm_server: TestServer, tmp_path: Path) -> None:
    llm = openai(llm_server)
    texts = [f"cached {index}" for index in range(24)]
    frame = frame_of(texts, "string[pyarrow]", npartitions=4)
    with context.set(cache=str(tmp_path / "cache.sqlite")):
        answers = feste.map(llm.chat, frame.text)
    # Settings are captured when the collection is built: leaving the block changes nothing.
    first = answers.compute(**threads()).tolist()
    sent = llm_server.stats()["requests"]
    second = answers.compute(**threads()).tolist()

    assert first == second == [chat_text(CHAT_MODEL, text) for text in texts]
    assert sent == 24
    assert llm_server.stats()["requests"] == 24


def test_the_cache_named_by_the_environment_is_captured(
    llm_server: TestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = openai(llm_server)
    frame = frame_of(["x", "y"], "object", npartitions=2)
    monkeypatch.setenv("FESTE_CACHE", str(tmp_path / "env-cache.sqlite"))
    answers = feste.map(llm.chat, frame.text)
    monkeypatch.delenv("FESTE_CACHE")

    answers.compute(**threads())
    answers.compute(**threads())

    assert llm_server.stats()["requests"] == 2
    assert (tmp_path / "env-cache.sqlite").exists()


# -- bad input --------------------------------------------------------------------------


def test_bad_arguments_are_refused_with_the_fix(llm_server: TestServer) -> None:
    llm = openai(llm_server)
    with pytest.raises(
        TypeError, match=r"feste.map maps over a dask.dataframe .* got builtins.list"
    ):
        feste.map(llm.chat, ["a", "b"])
    with pytest.raises(ValueError, match="errors must be 'raise' or 'return', got 'ignore'"):
        feste.map(llm.chat, pd.Series(["a"]), errors="ignore")
    two_variables = feste.Prompt("{{ a }} and {{ b }}")
    with pytest.raises(TypeError, match=r"needs exactly one template variable .* \['a', 'b'\]"):
        feste.map(two_variables, pd.Series(["x"]))
    with pytest.raises(TypeError, match="fn must be a backend method"):
        feste.map("chat", pd.Series(["x"]))
    with pytest.raises(ValueError, match="meta names a column 'error'"):
        feste.map(llm.chat, pd.Series(["x"]), meta=pd.DataFrame({"error": []}))


# -- scale ------------------------------------------------------------------------------

SCALE_ROWS = 100_000
SCALE_PARTITIONS = 64


def scale_partition(number: int) -> pd.DataFrame:
    """One partition of the 100,000-row frame, made where it is read (nothing holds all)."""
    size = SCALE_ROWS // SCALE_PARTITIONS
    start = number * size
    stop = SCALE_ROWS if number == SCALE_PARTITIONS - 1 else start + size
    texts = pd.array([f"document {index}" for index in range(start, stop)], dtype="string")
    return pd.DataFrame({"id": range(start, stop), "text": texts}, index=range(start, stop))


@pytest.mark.slow
def test_a_100000_row_frame_streams_from_a_source_to_parquet(
    llm_server: TestServer, tmp_path: Path
) -> None:
    llm = openai(llm_server)
    frame = dd.from_map(scale_partition, range(SCALE_PARTITIONS))
    frame["vector"] = feste.map(llm.embed, frame.text)

    # Each partition is made, embedded and written by one task: the frame is never whole.
    frame[["id", "vector"]].to_parquet(tmp_path / "vectors", compute_kwargs=threads(4))

    stats = llm_server.stats()
    assert stats["items"] == SCALE_ROWS
    # One batched request per partition.
    assert stats["requests"] == SCALE_PARTITIONS
    assert len(list((tmp_path / "vectors").glob("*.parquet"))) == SCALE_PARTITIONS
    back = dd.read_parquet(tmp_path / "vectors", dtype_backend="pyarrow")
    assert len(back) == SCALE_ROWS
    last = back.tail(2)
    assert last.id.tolist() == [SCALE_ROWS - 2, SCALE_ROWS - 1]
    assert [list(vector) for vector in last.vector] == [
        embedding(EMBED_MODEL, f"document {index}", 8) for index in last.id
    ]


def test_explain_finds_the_calls_of_a_collection_computed_from_maps(
    llm_server: TestServer,
) -> None:
    llm = openai(llm_server)
    frame = frame_of([f"text {index}" for index in range(30)], "object", npartitions=3)
    labelled = frame.assign(vector=feste.map(llm.embed, frame.text))
    kept = labelled[labelled.number > 3]
    bag = feste.map(llm.chat, db.from_sequence(["a", "b", "c"], npartitions=3)).filter(bool)

    stats = feste.explain(kept, bag)

    assert stats.calls == {"openai.embed": 30, "openai.chat": 3}
    assert stats.requests == {"openai.embed": 3, "openai.chat": 3}
    assert llm_server.stats()["requests"] == 0


def test_explain_of_maps_says_which_calls_go_to_batch_api_jobs(llm_server: TestServer) -> None:
    batch_llm = openai(llm_server, batch_api=True)
    frame = frame_of([f"text {index}" for index in range(30)], "object", npartitions=3)
    vectors = feste.map(batch_llm.embed, frame.text)
    answers = feste.map(openai(llm_server).chat, db.from_sequence(["a", "b"], npartitions=2))

    stats = feste.explain(vectors, answers)

    assert stats.batch_api == {"openai.embed": 30}
    assert stats.calls == {"openai.embed": 30, "openai.chat": 2}
    assert llm_server.stats()["requests"] == 0


def test_a_budget_is_refused_by_map_before_anything_is_sent(llm_server: TestServer) -> None:
    frame = frame_of(["a", "b"], "object", npartitions=2)
    with context.set(max_cost=1.0), pytest.raises(OptionError) as raised:
        feste.map(openai(llm_server).chat, frame.text)
    assert str(raised.value).startswith("feste.map does not keep a max_cost budget")
    assert "Leave max_cost unset around feste.map" in str(raised.value)
    assert llm_server.stats()["requests"] == 0


def test_a_cache_url_stays_out_of_the_graph_keys_and_reprs(llm_server: TestServer) -> None:
    llm = openai(llm_server)
    url = "postgresql://feste:hunter2@db.invalid/cache"
    frame = frame_of(["a"], "object", npartitions=1)
    with context.set(cache=url):
        answers = feste.map(llm.chat, frame.text)

    graph = dict(answers.__dask_graph__())
    assert all("hunter2" not in str(key) for key in graph)
    # The partition tasks carry the options (the workers need the cache), never in a repr.
    carried = [arg for node in graph.values() for arg in getattr(node, "args", ())]
    specs = [arg for arg in carried if type(arg).__name__ == "_MapSpec"]
    assert len(specs) == 1
    assert specs[0].options["cache"] == url
    assert "hunter2" not in repr(specs[0])
    assert "test-key" not in repr(specs[0])
