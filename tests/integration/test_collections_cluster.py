"""feste.map on a real Dask cluster: partitions run on worker processes, the local test
server in this process counts what the whole cluster sends.

One ``LocalCluster`` (two worker processes, two threads each) serves the module: four
partitions run at once, so a limit kept per partition would let four times the cap
through; the cluster's lease board keeps it for the whole cluster.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask.bag as db
import dask.dataframe as dd
import pandas as pd
import pytest
from pydantic import BaseModel

import feste
from feste import context
from feste.backend.openai import OpenAI
from feste.testing import TestServer, chat_text, count_tokens, embedding
from tests.test_collections import SCALE_PARTITIONS, SCALE_ROWS, scale_partition

distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.slow

CHAT_MODEL = "gpt-4o-mini"
EMBED_MODEL = "text-embedding-3-small"


class Topic(BaseModel):
    topic: str
    length: int


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=2, processes=True, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as dask_client,
    ):
        yield dask_client


def openai(server: TestServer, **settings: Any) -> OpenAI:
    return OpenAI(base_url=server.openai_base_url, api_key="test-key", **settings)


def frame_of(texts: list[str], npartitions: int) -> dd.DataFrame:
    pandas_frame = pd.DataFrame({"text": pd.Series(texts, dtype="string[pyarrow]")})
    return dd.from_pandas(pandas_frame, npartitions=npartitions, sort=False)


def compute_pools(client: Any) -> dict[str, Any]:
    """The lease board's pools of computations (``max_concurrency=`` in the context)."""
    board = client.sync(client.scheduler.feste_board)
    return {name: pool for name, pool in board.items() if name.startswith("compute:")}


@pytest.mark.parametrize("where", ["context", "backend"])
def test_exact_results_and_one_cap_for_the_whole_cluster(
    client: Any, llm_server_factory: Any, where: str
) -> None:
    cap = 3
    # Beyond the cap the server answers 429: an excess would show as 429s (and retries).
    server = llm_server_factory(latency=0.03, max_concurrency=cap)
    llm = openai(server, max_concurrency=cap) if where == "backend" else openai(server)
    texts = [f"question {index}" for index in range(120)]
    frame = frame_of(texts, npartitions=12)

    if where == "context":
        with context.set(max_concurrency=cap):
            answers = feste.map(llm.chat, frame.text)
    else:
        answers = feste.map(llm.chat, frame.text)
    values = answers.compute(scheduler=client)

    assert values.tolist() == [chat_text(CHAT_MODEL, text) for text in texts]
    stats = server.stats()
    assert stats["faults"]["limit_429"] == 0
    assert stats["requests"] == 120
    assert stats["max_in_flight"] <= cap
    if where == "context":
        pools = [pool for pool in compute_pools(client).values() if pool["cap"] == cap]
        assert pools and max(pool["max_held"] for pool in pools) <= cap


def test_structured_rows_and_a_failed_row_on_the_cluster(
    client: Any, llm_server: TestServer
) -> None:
    llm = openai(llm_server)
    texts = [f"topic {index}" for index in range(16)]
    texts[5] = "topic 5 [[status:400]]"
    frame = frame_of(texts, npartitions=4)

    topics = feste.map(llm.chat, frame.text, response_format=Topic, errors="return")
    values = topics.compute(scheduler=client)

    assert list(values.columns) == ["topic", "length", "error"]
    good = [index for index in range(16) if index != 5]
    assert values.topic[good].tolist() == [texts[index] for index in good]
    assert values.length[good].tolist() == [count_tokens(texts[index]) for index in good]
    assert values.topic.isna().tolist() == [index == 5 for index in range(16)]
    assert values.error.isna().tolist() == [index != 5 for index in range(16)]
    assert values.error[5].startswith("BadRequestError: ")


def test_a_second_run_is_served_by_the_cache_on_the_cluster(
    client: Any, llm_server: TestServer, tmp_path: Path
) -> None:
    llm = openai(llm_server)
    texts = [f"cached {index}" for index in range(20)]
    with context.set(cache=str(tmp_path / "cache.sqlite")):
        answers = feste.map(llm.chat, frame_of(texts, npartitions=4).text)

    first = answers.compute(scheduler=client).tolist()
    sent = llm_server.stats()["requests"]
    second = answers.compute(scheduler=client).tolist()

    assert first == second == [chat_text(CHAT_MODEL, text) for text in texts]
    assert sent == 20
    assert llm_server.stats()["requests"] == 20


def test_a_bag_on_the_cluster_batches_each_partition(client: Any, llm_server: TestServer) -> None:
    llm = openai(llm_server)
    texts = [f"doc {index}" for index in range(40)]
    bag = db.from_sequence(texts, npartitions=4)

    vectors = feste.map(llm.embed, bag).compute(scheduler=client)

    assert vectors == [embedding(EMBED_MODEL, text, 8) for text in texts]
    assert sorted(llm_server.stats()["items_per_request"]["/v1/embeddings"]) == [10, 10, 10, 10]


def test_a_100000_row_frame_streams_through_the_cluster(
    client: Any, llm_server: TestServer, tmp_path: Path
) -> None:
    llm = openai(llm_server)
    frame = dd.from_map(scale_partition, range(SCALE_PARTITIONS))
    frame["vector"] = feste.map(llm.embed, frame.text)

    # The workers make, embed and write the partitions: no text reaches this process.
    frame[["id", "vector"]].to_parquet(tmp_path / "vectors", compute_kwargs={"scheduler": client})

    stats = llm_server.stats()
    assert (stats["items"], stats["requests"]) == (SCALE_ROWS, SCALE_PARTITIONS)
    back = dd.read_parquet(tmp_path / "vectors", dtype_backend="pyarrow")
    first = back.head(2)
    assert first.id.tolist() == [0, 1]
    assert [list(vector) for vector in first.vector] == [
        embedding(EMBED_MODEL, f"document {index}", 8) for index in (0, 1)
    ]
