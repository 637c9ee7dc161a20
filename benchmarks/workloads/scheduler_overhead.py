"""Scheduler overhead: tens of thousands of trivial Python tasks, no I/O at all.

Each task adds one to its input; a last task sums them all. Whatever time this takes
is the price of building the graph and scheduling it, which in a real workload is paid
on top of the model calls. The ideal is zero overhead; the report gives microseconds
per task and the ratio to dask's own schedulers on the same graph. A plain Python loop
is shown for reference (it is not a peer: it builds no graph).

Size: 50,000 tasks. Contenders:

* feste end to end: ``feste_task`` calls, then ``feste.compute`` (async scheduler);
* the same graph dict (``dask.task_spec`` nodes, built once outside the timing of
  either) run by feste's async scheduler and by dask's threaded scheduler: this pair
  compares the schedulers alone;
* ``dask.delayed`` on a 10,000-task subset: with dask 2026.8, a task taking a list of N
  delayed values costs time quadratic in N to build (``unpack_collections`` culls the
  graph once per element), so 50,000 takes minutes; feste builds its own argument
  references and stays linear;
* graph building alone, two rows whose figure is the "graph built in" time:
  ``OpenAI.embed`` calls, two per task (100,000 at full size; divide by 100,000 for
  microseconds per call), planned with ``feste.explain`` (which checks the calls and
  the batched requests they become) and never sent; and a chain of 8,000 dependent
  ``feste_task`` calls (each takes the previous one's value), then computed. Building
  must stay linear in the number of calls and in the depth of a chain.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dask

from benchmarks.harness import GRAPH_BUILT, Contender, Ideal, Job, Size, Workload, ceil_div
from benchmarks.peers import EMBED_MODEL

__all__ = ["WORKLOAD", "increment"]


# Embeddings per request (OpenAI's limit): how explain() should plan the embed calls.
EMBED_BATCH = 2048


def increment(value: int) -> int:
    return value + 1


def total(values: list[int]) -> int:
    return sum(values)


def make_numbers(n: int) -> list[int]:
    return list(range(n))


def check_total(inputs: list[int], output: Any) -> str | None:
    expected = sum(inputs) + len(inputs)
    return None if output == expected else f"total {output!r}, expected {expected}"


def overhead_ideal(n: int, server: Mapping[str, Any]) -> Ideal:
    return Ideal(seconds=0.0, formula="no I/O: any time spent is scheduling overhead")


def run_feste(job: Job) -> int:
    import feste
    from feste import feste_task

    lazy_increment = feste_task(increment)
    lazy_total = feste_task(total)
    result = lazy_total([lazy_increment(value) for value in job.inputs])
    job.mark(GRAPH_BUILT)
    (value,) = feste.compute(result)
    return int(value)


def _dask(job: Job, scheduler: str) -> int:
    result = dask.delayed(total)([dask.delayed(increment)(value) for value in job.inputs])
    job.mark(GRAPH_BUILT)
    (value,) = dask.compute(result, scheduler=scheduler)
    return int(value)


def run_dask_threads(job: Job) -> int:
    return _dask(job, "threads")


def _graph_dict(inputs: list[int]) -> dict[str, Any]:
    from dask.task_spec import List, Task, TaskRef

    graph: dict[str, Any] = {}
    for index, value in enumerate(inputs):
        key = f"increment-{index}"
        graph[key] = Task(key, increment, value)
    graph["total"] = Task("total", total, List(*(TaskRef(key) for key in list(graph))))
    return graph


def run_feste_scheduler_on_graph(job: Job) -> int:
    from feste.schedulers import get_scheduler

    graph = _graph_dict(job.inputs)
    job.mark(GRAPH_BUILT)
    return int(get_scheduler("async")(graph, "total"))


def run_dask_threaded_on_graph(job: Job) -> int:
    from dask import threaded

    graph = _graph_dict(job.inputs)
    job.mark(GRAPH_BUILT)
    return int(threaded.get(graph, "total"))


# Embed calls per task in the graph-building row: 100,000 calls at the full size.
EMBEDS_PER_TASK = 2
# The length of the chain of dependent calls (fewer when the run has fewer tasks).
CHAIN_LENGTH = 8_000


def run_feste_embed_graph(job: Job) -> int:
    """Build two embed calls per task and plan them; nothing is sent."""
    import feste
    from feste.backend import OpenAI

    llm = OpenAI(base_url=job.openai_base_url, api_key=job.api_key)
    calls = EMBEDS_PER_TASK * len(job.inputs)
    vectors = [llm.embed(f"text {index}", model=EMBED_MODEL) for index in range(calls)]
    job.mark(GRAPH_BUILT)
    stats = feste.explain(vectors)
    planned = stats.calls.get("openai.embed"), stats.requests.get("openai.embed")
    if planned != (calls, ceil_div(calls, EMBED_BATCH)):
        raise AssertionError(f"explain() planned {planned} (calls, requests) for {calls} calls")
    # The graph is right: answer the workload's sum without sending anything.
    return total([increment(value) for value in job.inputs])


def run_feste_chain(job: Job) -> int:
    """A chain of dependent calls: each adds one to the previous one's value."""
    import feste
    from feste import feste_task

    lazy_increment = feste_task(increment, pure=True)
    length = min(CHAIN_LENGTH, len(job.inputs))
    # Starts where the chain ends on the workload's answer: sum + one per task.
    value: Any = sum(job.inputs) + len(job.inputs) - length
    for _ in range(length):
        value = lazy_increment(value)
    job.mark(GRAPH_BUILT)
    (result,) = feste.compute(value)
    return int(result)


def run_plain_loop(job: Job) -> int:
    return total([increment(value) for value in job.inputs])


WORKLOAD = Workload(
    name="scheduler_overhead",
    title="scheduler overhead: trivial Python tasks",
    description="N tasks adding one to a number, then one task summing them; no I/O.",
    size=Size(full=50_000, quick=1_000),
    server={},
    settings={},
    make_inputs=make_numbers,
    ideal=overhead_ideal,
    check=check_total,
    contenders=(
        Contender("feste", run_feste, kind="feste"),
        Contender(
            "feste async scheduler, same graph dict",
            run_feste_scheduler_on_graph,
            kind="feste",
            note="scheduling only",
        ),
        Contender(
            "dask threaded scheduler, same graph dict",
            run_dask_threaded_on_graph,
            note="scheduling only",
        ),
        Contender(
            "dask.delayed, threaded scheduler",
            run_dask_threads,
            subset=Size(full=10_000, quick=1_000),
            note="graph building is quadratic in dask.delayed",
        ),
        Contender(
            "graph building, 100,000 embed calls (us/call)",
            run_feste_embed_graph,
            kind="feste",
            note="2 embed calls per task, built and planned, none sent; us/call = "
            "graph built time / 100,000 (full size)",
        ),
        Contender(
            "chain of 8,000 dependent calls (build seconds)",
            run_feste_chain,
            kind="feste",
            note="feste_task(pure=True) chain, then computed; the build is the graph built time",
        ),
        Contender("plain Python loop", run_plain_loop, kind="reference", note="no graph"),
    ),
    per_item=True,
)
