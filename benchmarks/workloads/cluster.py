"""Cluster: the fan-out's 2,000 chat calls submitted to a Dask cluster.

Submitting to a cluster is one of the three ways feste is used. The cluster is a
``distributed.LocalCluster(n_workers=2, threads_per_worker=1)`` (what ``LocalCluster``
gives on two cores), started by the row's untimed warm-up and reused by its timed run,
so starting worker processes is not part of the makespan.

Rows:

* ``feste``: ``feste.compute(answers, scheduler=client)`` with
  ``OpenAI(max_concurrency=64)``: the graph runs as a few blocks, each on feste's async
  engine on a worker, and the cap of 64 holds for the whole cluster;
* ``feste, local async scheduler``: the same calls without the cluster, for reference;
* ``dask.delayed on the cluster``: one Dask task per call with the official ``openai``
  client, the way a Dask user writes it: one request per worker thread at a time.

Ideal: the fan-out's, ``ceil(N / 64)`` waves of 50 ms.
"""

from __future__ import annotations

from typing import Any

import dask

from benchmarks.harness import SETUP_MARK, Contender, Job, Size, Workload
from benchmarks.peers import CHAT_MODEL
from benchmarks.workloads.fanout import (
    CONCURRENCY,
    check_chat,
    fanout_ideal,
    feste_chat_calls,
    make_prompts,
    run_feste,
)

__all__ = ["WORKLOAD"]

SETTINGS = {"concurrency": CONCURRENCY, "max_retries": 2}
SLOW_PEER_SUBSET = Size(full=100, quick=20)

# One cluster per benchmark process (each row runs in its own forked process, killed
# with its worker processes at the end): the warm-up starts it, the timed run uses it.
_clients: list[Any] = []


def _client() -> Any:
    if not _clients:
        import distributed

        cluster = distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        )
        _clients.append(distributed.Client(cluster))
    return _clients[0]


def run_feste_on_cluster(job: Job) -> list[str]:
    import feste

    client = _client()
    job.mark(SETUP_MARK)
    answers = feste_chat_calls(job)
    with feste.context.set(max_retries=job.settings["max_retries"]):
        (values,) = feste.compute(answers, scheduler=client)
    return list(values)


# One official client per worker process, made by its first task.
_worker_clients: dict[tuple[str, str], Any] = {}


def _ask_on_worker(base_url: str, api_key: str, max_retries: int, prompt: str) -> str:
    import openai

    client = _worker_clients.get((base_url, api_key))
    if client is None:
        client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=max_retries)
        _worker_clients[(base_url, api_key)] = client
    completion = client.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": prompt}]
    )
    return str(completion.choices[0].message.content)


def run_dask_on_cluster(job: Job) -> list[str]:
    client = _client()
    job.mark(SETUP_MARK)
    ask = dask.delayed(_ask_on_worker, pure=False)
    answers = [
        ask(job.openai_base_url, job.api_key, job.settings["max_retries"], prompt)
        for prompt in job.inputs
    ]
    return list(dask.compute(*answers, scheduler=client))


CONTENDERS = (
    Contender(
        "feste",
        run_feste_on_cluster,
        kind="feste",
        note="LocalCluster, 2 workers",
        spawns_processes=True,
    ),
    Contender(
        "feste, local async scheduler",
        run_feste,
        kind="reference",
        note="no cluster, for reference",
    ),
    Contender(
        "dask.delayed on the cluster",
        run_dask_on_cluster,
        note="official openai client, one task per call",
        subset=SLOW_PEER_SUBSET,
        spawns_processes=True,
    ),
)

WORKLOAD = Workload(
    name="cluster",
    title="cluster: chat calls on a Dask LocalCluster",
    description=(
        "The fan-out's N chat calls submitted to a LocalCluster of two worker processes "
        "with one thread each; 50 ms per request, 64 at once (more get 429)."
    ),
    size=Size(full=2000, quick=100),
    server={"latency": 0.05, "max_concurrency": CONCURRENCY},
    settings=SETTINGS,
    make_inputs=make_prompts,
    ideal=fanout_ideal,
    check=check_chat,
    contenders=CONTENDERS,
)
