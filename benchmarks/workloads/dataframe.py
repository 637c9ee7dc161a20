"""DataFrame: a column of texts in a Dask DataFrame, one chat call per row.

20,000 rows in 32 partitions; the server answers after 50 ms and serves 64 requests at
once (more get 429). Every contender gets the column as a ``dask.dataframe`` Series and
returns the answers as a Dask Series computed on Dask's threaded scheduler.

Rows:

* ``feste``: ``feste.map(llm.chat, frame.text)`` built under
  ``context.set(max_concurrency=64)``: each partition task runs its calls on feste's
  async engine, and the partitions share the one cap of 64;
* ``map_partitions, openai per row``: what users write today, a function for
  ``map_partitions`` that calls the official ``openai`` client for each row of its
  partition, on Dask's default threads (one request per thread at a time; a subset,
  scaled);
* ``map_partitions, openai per row, 32 threads``: the same with one thread per
  partition (32 requests in flight).

(A pool of 64 threads in each partition, a limit kept per partition, sends up to 32
times the cap: the server refuses most of it, and the client's two retries run out.
It is left out: a row that fails tells nothing about speed.)

Ideal: the fan-out's, ``ceil(N / 64)`` waves of 50 ms.
"""

from __future__ import annotations

from typing import Any

from benchmarks.harness import GRAPH_BUILT, SETUP_MARK, Contender, Job, Size, Workload
from benchmarks.peers import CHAT_MODEL
from benchmarks.workloads.fanout import CONCURRENCY, check_chat, fanout_ideal, make_prompts

__all__ = ["WORKLOAD"]

PARTITIONS = Size(full=32, quick=8)
SETTINGS = {"concurrency": CONCURRENCY, "max_retries": 2}
SLOW_PEER_SUBSET = Size(full=200, quick=16)
# Imported by the harness before it forks the runs (and named when missing).
REQUIRES = ("dask.dataframe", "pandas", "pyarrow")


def _frame(job: Job) -> Any:
    """The job's prompts as the ``text`` column of a Dask DataFrame."""
    import dask.dataframe as dd
    import pandas as pd

    partitions = PARTITIONS.full if len(job.inputs) > 1000 else PARTITIONS.quick
    frame = pd.DataFrame({"text": pd.Series(job.inputs, dtype="string[pyarrow]")})
    return dd.from_pandas(frame, npartitions=min(partitions, len(job.inputs)), sort=False)


def run_feste(job: Job) -> list[str]:
    import feste
    from feste.backend import OpenAI

    frame = _frame(job)
    llm = OpenAI(base_url=job.openai_base_url, api_key=job.api_key, model=CHAT_MODEL)
    with feste.context.set(
        max_concurrency=job.settings["concurrency"], max_retries=job.settings["max_retries"]
    ):
        answers = feste.map(llm.chat, frame.text)
    job.mark(GRAPH_BUILT)
    return list(answers.compute(scheduler="threads"))


# One official client per process and server, made by the first partition that needs it
# (the partition functions are module-level, so Dask can tokenize them).
_clients: dict[tuple[str, str, int], Any] = {}


def _openai(base_url: str, api_key: str, max_retries: int) -> Any:
    import openai

    client = _clients.get((base_url, api_key, max_retries))
    if client is None:
        client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=max_retries)
        _clients[(base_url, api_key, max_retries)] = client
    return client


def _ask(client: Any, prompt: str) -> str:
    completion = client.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": prompt}]
    )
    return str(completion.choices[0].message.content)


def _answer_rows(texts: Any, base_url: str, api_key: str, max_retries: int) -> Any:
    """A partition, one row after the other (what users write today)."""
    client = _openai(base_url, api_key, max_retries)
    return texts.map(lambda prompt: _ask(client, prompt)).astype(object)


def _connection(job: Job) -> tuple[str, str, int]:
    return job.openai_base_url, job.api_key, int(job.settings["max_retries"])


def _per_row(job: Job, num_workers: int | None) -> list[str]:
    frame = _frame(job)
    _openai(*_connection(job))
    job.mark(SETUP_MARK)
    answers = frame.text.map_partitions(_answer_rows, *_connection(job), meta=("text", object))
    return list(answers.compute(scheduler="threads", num_workers=num_workers))


def run_per_row_default(job: Job) -> list[str]:
    return _per_row(job, None)


def run_per_row_32(job: Job) -> list[str]:
    return _per_row(job, PARTITIONS.full)


CONTENDERS = (
    Contender(
        "feste",
        run_feste,
        kind="feste",
        note="feste.map, max_concurrency=64",
        requires=REQUIRES,
    ),
    Contender(
        "map_partitions, openai per row",
        run_per_row_default,
        note="official openai client, default threads",
        subset=SLOW_PEER_SUBSET,
        requires=REQUIRES,
    ),
    Contender(
        "map_partitions, openai per row, 32 threads",
        run_per_row_32,
        note="official openai client, one thread per partition",
        requires=REQUIRES,
    ),
)

WORKLOAD = Workload(
    name="dataframe",
    title="dataframe: a chat call per row of a Dask DataFrame",
    description=(
        "A text column of N rows in 32 partitions (8 in quick runs), one OpenAI chat call "
        "per row; the server answers after 50 ms and allows 64 requests at once (more "
        "get 429)."
    ),
    size=Size(full=20_000, quick=200),
    server={"latency": 0.05, "max_concurrency": CONCURRENCY},
    settings=SETTINGS,
    make_inputs=make_prompts,
    ideal=fanout_ideal,
    check=check_chat,
    contenders=CONTENDERS,
)
